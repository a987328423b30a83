"""fast3d.triplane_sample and fast3d.render_triplane: public functions, validation, dispatch."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from fast3d import backends, checks
from fast3d.ops import _validate as v
from fast3d.ops._profiling import op_range
from fast3d.ops.triplane.decoder import as_weights

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


@dataclass(frozen=True)
class DecoderShape:
    """What the render_triplane backends' checks read from a call (``backends.Query.shape``):
    the decoder MLP the fused marcher would have to run.

    Attributes:
        layers: linear layers (hidden layers plus the output layer).
        hidden: width of the hidden layers.
        dtype: the decoder weights' dtype.
    """

    layers: int
    hidden: int
    dtype: torch.dtype


def triplane_sample(planes: Tensor,   # [B, 3, C, H, W] feature planes XY, XZ, YZ
                    points: Tensor,   # [B, M, 3] query points
                    reduce: str = "concat",
                    bound: float = 1.0,
                    backend: str = "auto") -> Tensor:
    """Bilinear triplane features of points (EG3D / OpenLRM's triplane lookup).

    Plane 0 is XY (u = x, v = y), plane 1 XZ (u = x, v = z), plane 2 YZ (u = y, v = z); plane i's
    value is ``F.grid_sample(planes[:, i], (u, v) / bound, mode="bilinear", padding_mode="zeros",
    align_corners=False)`` (u indexes the width, v the height).

    Args:
        planes: ``[B, 3, C, H, W]`` feature planes (float16, bfloat16, float32; float64 on `torch`).
        points: ``[B, M, 3]`` query points; may be float32 under half-precision planes.
        reduce: how the three planes' features combine: "concat" (plane-major), "sum" or "mean".
        bound: the planes cover the box [-bound, bound]^3.
        backend: "auto", "torch" or "triton" (:func:`fast3d.backends.availability` says which can run).

    Returns:
        ``[B, M, 3C]`` ("concat") or ``[B, M, C]`` ("sum" | "mean") features in planes' dtype.

    Notes:
        - Outside the box: points fade to zero within half a texel (zero padding).
        - Gradients: flow to planes and points. The `triton` backward adds plane gradients with
          float32 atomics, whose order varies between runs on a GPU: repeated backward passes
          agree to rounding, not bit for bit (the `torch` backend is deterministic).
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
    impl = backends.select(OP_SAMPLE, backend, backends.Query(device=planes.device, dtype=planes.dtype))
    with op_range(f"{OP_SAMPLE}[{impl.name}]", planes.device):
        return impl.fn(planes, points, reduce, bound)


def box_interval(rays_o: Tensor,   # [B, R, 3] ray origins
                 rays_d: Tensor,   # [B, R, 3] ray directions
                 near: Tensor,     # [B, R]
                 far: Tensor,      # [B, R]
                 bound: float) -> tuple[Tensor, Tensor]:
    """Each ray's [near, far] clipped to the box [-bound, bound]^3 (slab test), no gradient.
    A ray whose clipped interval is empty (it misses the box, or the box lies outside [near, far])
    gets near = far = its near: an empty interval, which both backends render as nothing (zero
    opacity, the background) and the fused marcher skips. Returns near, far [B, R]."""
    with torch.no_grad():
        # In float32 at least: in fp16 / bf16 the 1e-12 guard below rounds to 0, and a ray on a box
        # face with a zero direction component would get 0 / 0 = NaN, a miss.
        compute = torch.promote_types(near.dtype, torch.float32)
        o, d = rays_o.detach().to(compute), rays_d.detach().to(compute)
        n, f = near.to(compute), far.to(compute)
        # Axis-parallel directions: a tiny signed component keeps the slab bounds +-inf-like, finite.
        d = torch.where(d.abs() < 1e-12, torch.copysign(torch.full_like(d, 1e-12), d), d)
        t1, t2 = (-bound - o) / d, (bound - o) / d
        lo = torch.maximum(torch.minimum(t1, t2).amax(-1), n)
        hi = torch.minimum(torch.maximum(t1, t2).amin(-1), f)
        hit = hi > lo
        return torch.where(hit, lo, n).to(near.dtype), torch.where(hit, hi, n).to(near.dtype)


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
                    decoder,                          # DecoderWeights (3C inputs), or e.g. a TriplaneMLP
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
                    clip_to_box: bool = True,
                    backend: str = "auto") -> dict:
    """Volume-render rays through a triplane (LRM / OpenLRM's renderer).

    Args:
        planes: ``[B, 3, C, H, W]`` feature planes covering the box [-bound, bound]^3.
        decoder: the decoder's :class:`~fast3d.ops.triplane.decoder.DecoderWeights` (3C inputs),
            or an object whose ``weights()`` returns them (``fast3d.nn.TriplaneMLP``).
        rays_o: ``[B, R, 3]`` ray origins.
        rays_d: ``[B, R, 3]`` ray directions; t (near, far, depth) is in their units.
        near, far: each ray's interval, a float or ``[B, R]``; near < far.
        n_samples: stratified (coarse) samples per ray, >= 1.
        n_importance: samples drawn from the coarse weights' PDF, >= 0.
        background: ``[3]`` or ``[B, R, 3]`` colour behind the rays (None: black).
        bound: half-size of the planes' box.
        deterministic: stratum midpoints and evenly spaced CDF values instead of random jitter.
        generator: draws the jitter when not deterministic.
        transmittance_eps: samples behind transmittance < eps are cut (early termination).
        clip_to_box: clip each ray's [near, far] to the planes' box (default); False integrates
            the whole interval, where features outside read zero but still decode to a density.
        backend: "auto", "torch" or "triton" (the fused marcher).

    Returns:
        dict(color ``[B, R, 3]``, opacity ``[B, R, 1]``, depth ``[B, R, 1]``) in the decoder's dtype.

    Notes:
        - Sampling: ``n_samples`` stratified samples in [near, far], then ``n_importance`` from the
          coarse weights by NeRF's inverse-CDF ``sample_pdf``; the decoder runs on all and NeRF
          compositing (:func:`fast3d.composite`) integrates the merged, sorted samples.
        - Box clipping: a ray that misses the box (or meets it outside [near, far]) gets exactly the
          background, zero opacity and depth, and zero gradient; the fused marcher skips it.
        - Gradients: flow to planes, the decoder's weights, rays_o, rays_d and background; sample
          positions (and the clipped interval) are constants, as in NeRF.
        - Determinism: ``deterministic=True`` fixes the sample positions only. The `triton`
          backward adds plane gradients with float32 atomics whose order varies between runs on a
          GPU, so its gradients agree between runs to rounding, not bit for bit.
    """
    B, C, H, W = _planes(planes)
    dec = as_weights(decoder)
    if dec.in_features != 3 * C:
        raise ValueError(f"decoder takes {dec.in_features} input features (n_features={dec.in_features // 3}) "
                         f"but planes give 3 * C = {3 * C} (C = {C})")
    v.tensor("rays_o", rays_o, dims=3, last=3)
    if rays_o.shape[0] != B:
        raise ValueError(f"rays_o must have shape [B, R, 3] with B = {B} from planes; got {tuple(rays_o.shape)}")
    R = rays_o.shape[1]
    v.tensor("rays_d", rays_d, dims=3, last=3)
    v.same_shape("rays_d", rays_d, rays_o.shape, "[B, R, 3] of rays_o")
    for name, x in (("rays_o", rays_o), ("rays_d", rays_d), ("decoder", dec.weights[0])):
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
    if checks.boolean("clip_to_box", clip_to_box):
        near, far = box_interval(rays_o, rays_d, near, far, bound)
    q = backends.Query(device=planes.device, dtype=planes.dtype,
                       shape=DecoderShape(layers=len(dec.weights), hidden=dec.hidden, dtype=dec.dtype))
    impl = backends.select(OP_RENDER, backend, q)
    with op_range(f"{OP_RENDER}[{impl.name}]", planes.device):
        return impl.fn(planes, dec, rays_o, rays_d, near, far, int(n_samples), int(n_importance), background,
                       bound, bool(deterministic), generator, transmittance_eps)
