"""fast3d.multiview_attention: attention across the views of multi-view diffusion models, fwd+bwd."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from fast3d import backends, checks
from fast3d.ops import _validate as v_
from fast3d.ops._profiling import op_range

OP = "multiview_attention"
LAYOUTS = ("views", "rows")


@dataclass(frozen=True)
class AttentionShape:
    """What the attention backends' checks read from a call (``backends.Query.shape``).

    Attributes:
        head_dim: D, the head dimension.
        seg_q, seg_k: query and key tokens per attended segment (a view's tokens with
            layout="views", an image row's with layout="rows"): they size the kernels' tiles.
        backward: a gradient will flow (grad mode on and q, k or v requires grad): the backward's
            kernels must fit too.
    """

    head_dim: int
    seg_q: int
    seg_k: int
    backward: bool = False


def _check_view_mask(view_mask, V: int) -> None:
    if not isinstance(view_mask, Tensor):
        raise TypeError(f"view_mask must be a bool torch.Tensor of shape [V, V] or None; got {type(view_mask).__name__}")
    if view_mask.dtype != torch.bool:
        raise ValueError(f"view_mask must be a bool tensor; got {str(view_mask.dtype).replace('torch.', '')}")
    v_.same_shape("view_mask", view_mask, (V, V), "[V, V] with V = num_views")
    # Nothing data-dependent: a row with no True is valid (that query view's output is 0), so the
    # mask's values are never read back to the host nor asserted on the device.


def multiview_attention(q: Tensor,                   # [B*V, Lq, H, D]
                        k: Tensor,                   # [B*V, Lk, H, D]
                        v: Tensor,                   # [B*V, Lk, H, D]
                        num_views: int,
                        layout: str = "views",
                        image_size: tuple[int, int] | None = None,
                        view_mask: Tensor | None = None,   # [V, V] bool
                        scale: float | None = None,
                        backend: str = "auto") -> Tensor:
    """Attention across the V views of each sample, in the xformers/diffusers BMHK layout.

    The views of one sample are consecutive along the batch (the ``(B V)`` of multi-view diffusion
    models); the result equals ``F.scaled_dot_product_attention`` on the tensors rearranged to put
    the views' tokens side by side, with masked view pairs at -inf
    (:mod:`fast3d.ops.attention.reference`, the specification every backend is tested against).

    .. note::
        **Layouts.** ``"views"``: each query attends to the keys of all V views of its sample
        (MVDream, multi-view PixArt): attention over ``B (V L)``. ``"rows"``: the tokens of a view
        are an ``image_size = (h, w)`` grid (Lq = Lk = h*w) and a query in row r attends to the keys
        of row r in all V views (Era3D's row-wise attention).

    .. note::
        **View masks.** ``view_mask[i, j]`` says whether view i attends to view j. Masked view
        pairs are skipped by the kernel, not computed and discarded. A row with no True is allowed:
        query view i attends to nothing, its output is exactly 0 and no gradient flows through it
        (on every backend; the mask's values are never checked, so a CUDA mask costs no host sync).

    .. note::
        **No copies.** The ``triton`` backend takes the tensors' strides and never copies or
        rearranges q, k, v or the output.

    Args:
        q: queries, views of a sample consecutive along the batch. [B*V, Lq, H, D]
        k: keys. [B*V, Lk, H, D]
        v: values. [B*V, Lk, H, D]
        num_views: V (a positive integer dividing B*V).
        layout: ``"views"`` or ``"rows"``. Default ``"views"``.
        image_size: (h, w) for ``"rows"``, with h*w = Lq; None for ``"views"``.
        view_mask: bool [V, V], or None for all pairs.
        scale: the logit scale, a positive finite real number; None for 1/sqrt(D).
        backend: "auto" (the fastest that serves the inputs), "torch" or "triton".

    Returns:
        out: the attention output. [B*V, Lq, H, D]
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        v_.tensor(name, x, dims=4)
    V = checks.positive_int("num_views", num_views)
    BV, Lq, H, D = q.shape
    if BV % V:
        raise ValueError(f"num_views={V} must divide the batch of q ([B*V, Lq, H, D] with B*V = {BV})")
    Lk = k.shape[1]
    for name, x in (("k", k), ("v", v)):
        if x.shape[0] != BV:
            raise ValueError(f"{name} must have the batch B*V = {BV} of q; got shape {tuple(x.shape)}")
        if x.shape[2] != H:
            raise ValueError(f"{name} must have the H = {H} heads of q; got shape {tuple(x.shape)}")
        if x.shape[3] != D:
            raise ValueError(f"{name} must have the head dim D = {D} of q; got shape {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; all inputs must share a device")
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {str(x.dtype).replace('torch.', '')} but q has "
                             f"{str(q.dtype).replace('torch.', '')}; q, k and v must share a dtype")
    if v.shape[1] != Lk:
        raise ValueError(f"v must have the Lk = {Lk} tokens of k; got shape {tuple(v.shape)}")
    if D < 1:
        raise ValueError(f"q must have a head dim D >= 1; got shape {tuple(q.shape)}")
    if Lk < 1 and BV * Lq * H:
        raise ValueError(f"k must have at least one token (Lk >= 1) for the queries to attend to; got shape {tuple(k.shape)}")
    checks.one_of("layout", layout, LAYOUTS)
    if layout == "views":
        if image_size is not None:
            raise ValueError(f"image_size is only used with layout='rows'; got image_size={image_size!r} "
                             f"with layout='views'")
    else:
        if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
                or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in image_size)):
            raise ValueError(f"image_size must be (h, w), two positive integers, with layout='rows'; got {image_size!r}")
        image_size = (int(image_size[0]), int(image_size[1]))
        h, w = image_size
        if h * w != Lq:
            raise ValueError(f"image_size (h, w) = {image_size} must have h*w = Lq = {Lq} tokens of q; got h*w = {h * w}")
        if Lk != Lq:
            raise ValueError(f"k must have Lk = Lq = {Lq} tokens (the same (h, w) grid as q) with layout='rows'; "
                             f"got shape {tuple(k.shape)}")
    if view_mask is not None:
        _check_view_mask(view_mask, V)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite real number or None; got {scale!r}")
        scale = float(scale)

    shape = AttentionShape(head_dim=D, seg_q=Lq if layout == "views" else image_size[1],
                           seg_k=Lk if layout == "views" else image_size[1],
                           backward=torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)))
    query = backends.Query(device=q.device, dtype=q.dtype, shape=shape)
    impl = backends.select(OP, backend, query)
    with op_range(f"{OP}[{impl.name}]", q.device):
        return impl.fn(q, k, v, V, layout, image_size, view_mask, scale)
