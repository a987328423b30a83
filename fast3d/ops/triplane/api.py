"""fast3d.triplane_sample and fast3d.render_triplane: public functions, validation, dispatch."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from fast3d import backends
from fast3d.ops import _validate as v
from fast3d.ops._profiling import op_range

OP_SAMPLE = "triplane_sample"
OP_RENDER = "render_triplane"
REDUCTIONS = ("concat", "sum", "mean")


def _planes(planes) -> tuple[int, int, int, int]:
    v.tensor("planes", planes, dims=5)
    if planes.shape[1] != 3:
        raise ValueError(f"planes must have shape [B, 3, C, H, W] (three planes: XY, XZ, YZ); "
                         f"got {tuple(planes.shape)} with {planes.shape[1]} planes")
    B, _, C, H, W = planes.shape
    if C == 0 or H == 0 or W == 0:
        raise ValueError(f"planes must have C, H, W >= 1; got shape {tuple(planes.shape)}")
    return B, C, H, W


def _bound(bound) -> float:
    if isinstance(bound, bool) or not isinstance(bound, numbers.Real) or not (0.0 < float(bound) < math.inf):
        raise ValueError(f"bound must be a finite real number > 0; got {bound!r}")
    return float(bound)


def _query(x: Tensor, *needs_grad) -> backends.Query:
    return backends.Query(device=x.device, dtype=x.dtype,
                          requires_grad=torch.is_grad_enabled() and any(
                              t is not None and t.requires_grad for t in needs_grad))


def triplane_sample(planes: Tensor,   # [B, 3, C, H, W] feature planes XY, XZ, YZ
                    points: Tensor,   # [B, M, 3] query points
                    reduce: str = "concat",
                    bound: float = 1.0,
                    backend: str = "auto") -> Tensor:
    """Bilinear triplane features of points: [B, M, 3C] ("concat") or [B, M, C] ("sum" | "mean").

    Plane 0 is XY (u = x, v = y), plane 1 XZ (u = x, v = z), plane 2 YZ (u = y, v = z); plane i's
    value is ``F.grid_sample(planes[:, i], (u, v) / bound, mode="bilinear", padding_mode="zeros",
    align_corners=False)`` (u indexes the width, v the height), so points outside the box
    [-bound, bound]^3 fade to zero within half a texel. Gradients flow to planes and points.
    The result has planes' dtype; points may be float32 under half-precision planes.
    """
    B, C, H, W = _planes(planes)
    v.tensor("points", points, dims=3, last=3)
    if points.shape[0] != B:
        raise ValueError(f"points must have shape [B, M, 3] with B = {B} from planes; got {tuple(points.shape)}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}; got {reduce!r}")
    bound = _bound(bound)
    if points.device != planes.device:
        raise ValueError(f"points is on {points.device} but planes is on {planes.device}; all inputs must share a device")
    v.finite("points", points)
    impl = backends.select(OP_SAMPLE, backend, _query(planes, planes, points))
    with op_range(f"{OP_SAMPLE}[{impl.name}]", planes.device):
        return impl.fn(planes, points, reduce, bound)


def _near_far(name: str, x, B: int, R: int, like: Tensor) -> Tensor:
    if isinstance(x, Tensor):
        v.tensor(name, x)
        if x.dim() == 0:
            x = x.expand(B, R)
        v.same_shape(name, x, (B, R), "[B, R] of rays_o")
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device} but rays_o is on {like.device}; all inputs must share a device")
        v.finite(name, x)
        return x.detach()
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
        raise ValueError(f"{name} must be a finite real number or a [B, R] tensor; got {x!r}")
    return torch.full((B, R), float(x), dtype=like.dtype if like.is_floating_point() else torch.float32,
                      device=like.device)


def render_triplane(planes: Tensor,                   # [B, 3, C, H, W]
                    decoder: torch.nn.Module,         # fast3d.nn.triplane.TriplaneMLP with 3C inputs
                    rays_o: Tensor,                   # [B, R, 3] ray origins
                    rays_d: Tensor,                   # [B, R, 3] ray directions (t is in their units)
                    near,                             # float or [B, R]
                    far,                              # float or [B, R]
                    n_samples: int = 64,
                    n_importance: int = 64,
                    background: Tensor | None = None,  # [3] or [B, R, 3]
                    bound: float = 1.0,
                    deterministic: bool = False,
                    generator: torch.Generator | None = None,
                    transmittance_eps: float = 1e-4,
                    backend: str = "auto") -> dict:
    """Volume-render rays through a triplane (LRM / OpenLRM's renderer).

    ``n_samples`` stratified samples in [near, far], then ``n_importance`` samples drawn from the
    coarse weights' PDF (NeRF's inverse-CDF sample_pdf; ``deterministic=True`` uses stratum
    midpoints and evenly spaced CDF values, else ``generator`` draws the jitter), the decoder on all,
    NeRF compositing (:func:`fast3d.composite`) over the merged sorted samples. Returns
    dict(color [B, R, 3], opacity [B, R, 1], depth [B, R, 1]). Gradients flow to planes, the
    decoder's parameters, rays_o, rays_d and background; sample positions are constants.
    """
    from fast3d.nn.triplane import TriplaneMLP

    B, C, H, W = _planes(planes)
    if not isinstance(decoder, TriplaneMLP):
        raise TypeError(f"decoder must be a fast3d.nn.triplane.TriplaneMLP; got {type(decoder).__name__}")
    if decoder.in_features != 3 * C:
        raise ValueError(f"decoder takes {decoder.in_features} input features (n_features={decoder.n_features}) "
                         f"but planes give 3 * C = {3 * C} (C = {C})")
    v.tensor("rays_o", rays_o, dims=3, last=3)
    if rays_o.shape[0] != B:
        raise ValueError(f"rays_o must have shape [B, R, 3] with B = {B} from planes; got {tuple(rays_o.shape)}")
    R = rays_o.shape[1]
    v.tensor("rays_d", rays_d, dims=3, last=3)
    v.same_shape("rays_d", rays_d, rays_o.shape, "[B, R, 3] of rays_o")
    for name, x in (("rays_o", rays_o), ("rays_d", rays_d)):
        if x.device != planes.device:
            raise ValueError(f"{name} is on {x.device} but planes is on {planes.device}; all inputs must share a device")
        v.finite(name, x)
    near = _near_far("near", near, B, R, rays_o)
    far = _near_far("far", far, B, R, rays_o)
    if not torch.compiler.is_compiling() and near.device.type == "cpu" and near.numel() and not bool((near < far).all()):
        bad = tuple((near >= far).nonzero()[0].tolist())
        raise ValueError(f"near must be < far for every ray; got near={near[bad].item()} >= far={far[bad].item()} "
                         f"at ray {bad}")
    for name, n, lo in (("n_samples", n_samples, 1), ("n_importance", n_importance, 0)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < lo:
            raise ValueError(f"{name} must be an integer >= {lo}; got {n!r}")
    if background is not None:
        v.tensor("background", background)
        if tuple(background.shape) not in ((3,), (B, R, 3)):
            raise ValueError(f"background must have shape [3] or [B, R, 3] = {(B, R, 3)}; got {tuple(background.shape)}")
        if background.device != planes.device:
            raise ValueError(f"background is on {background.device} but planes is on {planes.device}; "
                             "all inputs must share a device")
    bound = _bound(bound)
    transmittance_eps = v.real_in("transmittance_eps", transmittance_eps, 0.0, 1.0)
    q = _query(planes, planes, rays_o, rays_d, background, *decoder.parameters())
    q.extra.update(decoder_layers=len(decoder.layers), decoder_hidden=decoder.hidden,
                   decoder_dtype=next(decoder.parameters()).dtype)
    impl = backends.select(OP_RENDER, backend, q)
    with op_range(f"{OP_RENDER}[{impl.name}]", planes.device):
        return impl.fn(planes, decoder, rays_o, rays_d, near, far, int(n_samples), int(n_importance), background,
                       bound, bool(deterministic), generator, transmittance_eps)
