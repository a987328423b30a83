"""The triplane decoder (OpenLRM / EG3D's OSGDecoder) as the ops layer defines it: its activation
constants, its weights and a functional ``decode``. The reference renderer calls ``decode``, the
fused Triton marcher (march.py) computes the same function, and ``fast3d.nn.TriplaneMLP`` only
holds the parameters and calls ``decode`` -- so the kernels' contract lives here, not in a Module.

    x_0 = feats [..., 3C];  x_{l+1} = x_l W_l^T + b_l  (ReLU between layers, none after the last)
    sigma = softplus(x[..., 0] + density_bias)               EG3D's shifted softplus
    rgb   = sigmoid(x[..., 1:4]) (1 + 2 RGB_PAD) - RGB_PAD   EG3D's widened sigmoid: 0 and 1 reachable
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

RGB_PAD = 0.001            # rgb = sigmoid(x) (1 + 2 RGB_PAD) - RGB_PAD
SOFTPLUS_THRESHOLD = 20.0  # F.softplus's default: linear above it


class DecoderWeights(NamedTuple):
    """A decoder's parameters, in nn.Linear's layout (so a Module's own parameters can be passed
    and receive gradients).

    Attributes:
        weights: one per layer, ``[out_l, in_l]``: in_0 = 3C, out_l = in_{l+1} = hidden, the last out = 4.
        biases: one per layer, ``[out_l]``.
        density_bias: added to the density pre-activation before the softplus.
    """
    weights: tuple[Tensor, ...]
    biases: tuple[Tensor, ...]
    density_bias: float

    @property
    def in_features(self) -> int:
        return self.weights[0].shape[1]

    @property
    def hidden(self) -> int:
        """Width of the hidden layers (the first layer's outputs; 4 for a one-layer decoder)."""
        return self.weights[0].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.weights[0].dtype


def decode(w: DecoderWeights,
           feats: Tensor,   # [..., 3C] concatenated triplane features
           ) -> tuple[Tensor, Tensor]:
    """The decoder on features (module docstring).

    Args:
        w: the decoder's weights.
        feats: ``[..., 3C]`` features, in the weights' dtype.

    Returns:
        sigma ``[...]`` (density, >= 0) and rgb ``[..., 3]`` (in [-RGB_PAD, 1 + RGB_PAD]).
    """
    x = feats
    for i, (weight, bias) in enumerate(zip(w.weights, w.biases)):
        x = F.linear(x, weight, bias)
        if i + 1 < len(w.weights):
            x = F.relu(x)
    sigma = F.softplus(x[..., 0] + w.density_bias, threshold=SOFTPLUS_THRESHOLD)
    rgb = torch.sigmoid(x[..., 1:]) * (1 + 2 * RGB_PAD) - RGB_PAD
    return sigma, rgb


def as_weights(decoder) -> DecoderWeights:
    """``decoder`` as DecoderWeights: either DecoderWeights itself or an object whose
    ``weights()`` returns them (``fast3d.nn.TriplaneMLP``), checked for a consistent layer chain.
    Raises TypeError for anything else, ValueError for inconsistent shapes."""
    if not isinstance(decoder, DecoderWeights):
        get = getattr(decoder, "weights", None)
        w = get() if callable(get) else None
        if not isinstance(w, DecoderWeights):
            raise TypeError("decoder must be a fast3d.ops.triplane.DecoderWeights or have a weights() method "
                            f"returning one (fast3d.nn.TriplaneMLP does); got {type(decoder).__name__}")
        decoder = w
    w = decoder
    if len(w.weights) < 1 or len(w.weights) != len(w.biases):
        raise ValueError(f"decoder must have as many biases as weights (>= 1 layer); got {len(w.weights)} weights "
                         f"and {len(w.biases)} biases")
    width = w.in_features
    for i, (weight, bias) in enumerate(zip(w.weights, w.biases)):
        if not (isinstance(weight, Tensor) and isinstance(bias, Tensor)):
            raise TypeError(f"decoder layer {i}: weight and bias must be tensors; got {type(weight).__name__}, "
                            f"{type(bias).__name__}")
        last = i + 1 == len(w.weights)
        if weight.dim() != 2 or weight.shape[1] != width or (last and weight.shape[0] != 4) \
                or tuple(bias.shape) != (weight.shape[0],):
            out = "4" if last else "hidden"
            raise ValueError(f"decoder layer {i}: weight must be [{out}, {width}] and bias [{out}]; got "
                             f"{tuple(weight.shape)} and {tuple(bias.shape)}")
        if weight.dtype != w.dtype or bias.dtype != w.dtype or weight.device != w.weights[0].device \
                or bias.device != w.weights[0].device:
            raise ValueError(f"decoder layer {i}: every weight and bias must share the first layer's dtype "
                             f"{w.dtype} and device {w.weights[0].device}; got {weight.dtype}/{bias.dtype} on "
                             f"{weight.device}/{bias.device}")
        width = weight.shape[0]
    return DecoderWeights(tuple(w.weights), tuple(w.biases), float(w.density_bias))
