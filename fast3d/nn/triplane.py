"""nn.Module wrappers of the triplane renderer: the decoder MLP and the renderer module."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fast3d.ops.triplane.api import render_triplane
from fast3d.ops.triplane.decoder import DecoderWeights, decode


class TriplaneMLP(nn.Module):
    """OpenLRM / EG3D's OSGDecoder: concatenated triplane features [..., 3C] -> ``n_layers``
    linear layers (ReLU between) -> density sigma [...] and colour rgb [..., 3].

    The function is :func:`fast3d.ops.triplane.decoder.decode` (shifted softplus density, widened
    sigmoid colour); this module holds its parameters. ``weights()`` is what ``render_triplane``
    takes, so a TriplaneMLP can be passed to it directly.

    Args:
        n_features: C, channels per plane (the decoder takes 3C inputs).
        hidden: width of the hidden layers.
        n_layers: linear layers (>= 1).
        density_bias: added to the density pre-activation (negative: empty space at init).
    """

    def __init__(self, n_features: int, hidden: int = 64, n_layers: int = 4, density_bias: float = -1.0):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1; got {n_layers}")
        self.n_features = int(n_features)
        self.in_features = 3 * self.n_features
        self.hidden = int(hidden)
        self.density_bias = float(density_bias)
        widths = [self.in_features] + [self.hidden] * (n_layers - 1) + [4]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def weights(self) -> DecoderWeights:
        """The parameters (live, so gradients reach them) as the ops layer's DecoderWeights."""
        return DecoderWeights(tuple(layer.weight for layer in self.layers), tuple(layer.bias for layer in self.layers),
                              self.density_bias)

    def forward(self, feats: Tensor) -> tuple[Tensor, Tensor]:   # feats [..., 3C] -> [...], [..., 3]
        """sigma [...] and rgb [..., 3] of features [..., 3C]."""
        return decode(self.weights(), feats)


class TriplaneRenderer(nn.Module):
    """Renders rays through a triplane with its own :class:`TriplaneMLP` decoder
    (``fast3d.render_triplane``). forward(planes [B, 3, C, H, W], rays_o, rays_d [B, R, 3],
    near, far: float or [B, R], background) -> dict(color [B, R, 3], opacity, depth [B, R, 1])."""

    def __init__(self, n_features: int, hidden: int = 64, n_layers: int = 4, n_samples: int = 64,
                 n_importance: int = 64, bound: float = 1.0, density_bias: float = -1.0,
                 transmittance_eps: float = 1e-4, backend: str = "auto"):
        super().__init__()
        self.decoder = TriplaneMLP(n_features, hidden, n_layers, density_bias)
        self.n_samples, self.n_importance = int(n_samples), int(n_importance)
        self.bound, self.transmittance_eps, self.backend = float(bound), float(transmittance_eps), backend

    def forward(self, planes: Tensor, rays_o: Tensor, rays_d: Tensor, near, far,
                background: Tensor | None = None, deterministic: bool | None = None,
                generator: torch.Generator | None = None) -> dict:
        # Evaluation renders are reproducible (midpoints, evenly spaced importance samples);
        # training jitters the samples, as NeRF does.
        det = (not self.training) if deterministic is None else deterministic
        return render_triplane(planes, self.decoder, rays_o, rays_d, near, far, n_samples=self.n_samples,
                               n_importance=self.n_importance, background=background, bound=self.bound,
                               deterministic=det, generator=generator,
                               transmittance_eps=self.transmittance_eps, backend=self.backend)
