"""fast3d.rasterization: differentiable 3D Gaussian splatting, gsplat-compatible signature."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from fast3d import backends
from fast3d.ops import _validate as v
from fast3d.ops._profiling import op_range

OP = "rasterization"
RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
RASTERIZE_MODES = ("classic", "antialiased")
MAX_CAPACITY = 2**31 - 1  # intersection indices are int32 (gaussians.h: kGsMaxIntersections)


def _lead(name: str, x: Tensor, batch: tuple, tail: tuple, desc: str) -> None:
    """x must have shape batch + tail (tail entries None: any size)."""
    ok = x.dim() == len(batch) + len(tail) and tuple(x.shape[:len(batch)]) == batch and all(
        t is None or s == t for s, t in zip(x.shape[len(batch):], tail))
    if not ok:
        raise ValueError(f"{name} must have shape {desc} with [...] = {list(batch)}; got {tuple(x.shape)}")


def _positive_int(name: str, x) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x <= 0:
        raise ValueError(f"{name} must be a positive integer; got {x!r}")
    return int(x)


def _real(name: str, x, lo: float, hi: float = math.inf) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not lo <= float(x) < hi:
        raise ValueError(f"{name} must be a real number in [{lo:g}, {hi:g}); got {x!r}")
    return float(x)


def rasterization(means: Tensor,          # [..., N, 3] world positions
                  quats: Tensor,          # [..., N, 4] wxyz, any norm
                  scales: Tensor,         # [..., N, 3] post-activation
                  opacities: Tensor,      # [..., N] post-activation, in [0, 1]
                  colors: Tensor,         # [..., N, D] or [..., C, N, D], or SH [..., N, K, 3]
                  viewmats: Tensor,       # [..., C, 4, 4] world-to-camera, OpenCV axes
                  Ks: Tensor,             # [..., C, 3, 3] pinhole intrinsics
                  width: int, height: int,
                  near_plane: float = 0.01, far_plane: float = 1e10, eps2d: float = 0.3,
                  sh_degree: int | None = None,
                  backgrounds: Tensor | None = None,  # [..., C, D]
                  render_mode: str = "RGB",
                  rasterize_mode: str = "classic",
                  deterministic: bool = False, absgrad: bool = False, backend: str = "auto",
                  capacity: int | None = None,
                  ) -> tuple[Tensor, Tensor, dict]:
    """Render B x C images of B scenes of N Gaussians, C cameras each (the leading ``...`` are
    the batch dims), in one call. Semantics (projection, SH, compositing) are those of gsplat and
    the INRIA rasterizer; see :mod:`fast3d.ops.rasterization.reference` for the math.

    Returns ``colors`` [..., C, H, W, D(+1)] ("RGB": D colour channels; "D"/"ED": 1 depth channel;
    "RGB+D"/"RGB+ED": both), ``alphas`` [..., C, H, W, 1], and ``meta``: means2d [..., C, N, 2],
    conics [..., C, N, 3], depths [..., C, N], opacities [..., C, N] (after antialiasing
    compensation), colors [..., C, N, D] (after SH), radii [..., C, N, 2] (int32 pixel half-extents,
    0 for culled Gaussians), n_intersections (0-dim int64 tensor on the device: the number of
    (Gaussian, 16x16 tile) pairs binned, over all images of the call), overflow (0-dim bool tensor:
    n_intersections > capacity), capacity, backend (the one that ran), width, height. With
    ``absgrad=True``, after backward ``meta["means2d"].absgrad`` holds the summed absolute
    per-pixel gradients of the 2D means [..., C, N, 2].

    ``capacity``: None (default) sizes the CUDA binning buffers by the true intersection count,
    which is read back to the host: one synchronisation per call. An int bounds the buffers to
    that many intersections up front, so the CUDA path never synchronises and a whole training
    step can be captured in a CUDA graph. Intersections are numbered image by image, Gaussian by
    Gaussian (in input order); if there are more than ``capacity``, those numbered past it are not
    rendered (the last images lose Gaussians on some of their tiles, in the forward and the
    backward alike) and ``meta["overflow"]`` is set: check it outside capture with
    :func:`check_overflow`. The buffers (and the sort) cost ``capacity``, not the true count. The
    torch and cpu backends report n_intersections and overflow the same way but always render
    every Gaussian.

    Gradients flow to means, quats, scales, opacities, colors/SH and backgrounds; viewmats and Ks
    are constants. bf16/fp16 inputs are computed in float32 and the outputs cast back.
    """
    for name, x in (("means", means), ("quats", quats), ("scales", scales), ("opacities", opacities),
                    ("colors", colors), ("viewmats", viewmats), ("Ks", Ks)):
        v.tensor(name, x)
    v.tensor("means", means, last=3)
    if means.dim() < 2:
        raise ValueError(f"means must have shape [..., N, 3]; got {tuple(means.shape)}")
    batch, N = tuple(means.shape[:-2]), means.shape[-2]
    _lead("quats", quats, batch, (N, 4), "[..., N, 4]")
    _lead("scales", scales, batch, (N, 3), "[..., N, 3]")
    _lead("opacities", opacities, batch, (N,), "[..., N]")
    _lead("viewmats", viewmats, batch, (None, 4, 4), "[..., C, 4, 4]")
    C = viewmats.shape[-3]
    _lead("Ks", Ks, batch, (C, 3, 3), "[..., C, 3, 3]")
    if sh_degree is not None:
        if isinstance(sh_degree, bool) or not isinstance(sh_degree, numbers.Integral) or not 0 <= sh_degree <= 3:
            raise ValueError(f"sh_degree must be None or an integer in 0..3; got {sh_degree!r}")
        _lead("colors", colors, batch, (N, None, 3), "[..., N, K, 3] (SH coefficients)")
        if colors.shape[-2] < (sh_degree + 1) ** 2:
            raise ValueError(f"colors holds {colors.shape[-2]} SH coefficients; sh_degree={sh_degree} needs "
                             f"K >= {(sh_degree + 1) ** 2}")
        D = 3
    elif colors.dim() == len(batch) + 2:
        _lead("colors", colors, batch, (N, None), "[..., N, D] or [..., C, N, D]")
        D = colors.shape[-1]
    else:
        _lead("colors", colors, batch, (C, N, None), "[..., N, D] or [..., C, N, D]")
        D = colors.shape[-1]
    if D == 0:
        raise ValueError(f"colors must have at least one channel; got shape {tuple(colors.shape)}")
    if render_mode not in RENDER_MODES:
        raise ValueError(f"render_mode must be one of {list(RENDER_MODES)}; got {render_mode!r}")
    if rasterize_mode not in RASTERIZE_MODES:
        raise ValueError(f"rasterize_mode must be one of {list(RASTERIZE_MODES)}; got {rasterize_mode!r}")
    use_colors = render_mode.startswith("RGB")
    with_depth = render_mode != "RGB"
    if backgrounds is not None:
        v.tensor("backgrounds", backgrounds)
        if not use_colors:
            raise ValueError(f"backgrounds apply to colour channels; render_mode={render_mode!r} has none")
        _lead("backgrounds", backgrounds, batch, (C, D), f"[..., C, D] with C={C}, D={D}")
    v.same_device_dtype("means", means, quats=quats, scales=scales, opacities=opacities, colors=colors,
                        viewmats=viewmats, Ks=Ks, backgrounds=backgrounds)
    width = _positive_int("width", width)
    height = _positive_int("height", height)
    near_plane = _real("near_plane", near_plane, 0.0)
    if near_plane <= 0:
        raise ValueError(f"near_plane must be positive; got {near_plane!r}")
    far_plane = _real("far_plane", far_plane, 0.0, math.inf)
    if far_plane <= near_plane:
        raise ValueError(f"far_plane must exceed near_plane={near_plane:g}; got {far_plane!r}")
    eps2d = _real("eps2d", eps2d, 0.0)
    for name, flag in (("deterministic", deterministic), ("absgrad", absgrad)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool; got {flag!r}")
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral)
                                 or not 1 <= capacity <= MAX_CAPACITY):
        raise ValueError(f"capacity must be None or an integer in [1, {MAX_CAPACITY}] (the number of "
                         f"Gaussian-tile intersections to allocate for); got {capacity!r}")
    capacity = None if capacity is None else int(capacity)
    v.finite("means", means)
    v.finite("scales", scales)

    dtype = means.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    B = math.prod(batch)

    def flat(x: Tensor | None, keep: int) -> Tensor | None:  # [..., *tail] -> [B, *tail] in compute dtype
        return None if x is None else x.reshape(B, *x.shape[x.dim() - keep:]).to(compute)

    if sh_degree is None and colors.dim() == len(batch) + 2:
        colors = colors.unsqueeze(-3).expand(*batch, C, N, D)
    args = (flat(means, 2), flat(quats, 2), flat(scales, 2), flat(opacities, 1),
            flat(colors, 3), flat(viewmats, 3), flat(Ks, 3))
    bgs = flat(backgrounds, 2)
    channels = (D if use_colors else 0) + int(with_depth)
    if N == 0 or C == 0:
        render, alpha, meta = _empty(args, bgs, B, C, N, D, width, height, channels, with_depth)
    else:
        q = backends.Query(device=means.device, dtype=compute,
                           features=frozenset({"antialiased"} if rasterize_mode == "antialiased" else ()),
                           extra=dict(channels=channels, images=B * C, dense_elements=B * C * N * width * height),
                           requires_grad=torch.is_grad_enabled() and any(
                               x is not None and x.requires_grad for x in (*args[:5], bgs)))
        impl = backends.select(OP, backend, q)
        with op_range(f"{OP}[{impl.name}]", means.device):
            render, alpha, meta = impl.fn(*args, width, height, near_plane, far_plane, eps2d, sh_degree, bgs,
                                          use_colors, with_depth, rasterize_mode == "antialiased", absgrad,
                                          deterministic, capacity)
        meta["backend"] = impl.name
    if render_mode in ("ED", "RGB+ED"):
        render = torch.cat([render[..., :-1], render[..., -1:] / alpha.clamp_min(1e-10)], -1)
    render = render.reshape(*batch, C, height, width, channels).to(dtype)
    alpha = alpha.reshape(*batch, C, height, width, 1).to(dtype)
    out_meta = {"width": width, "height": height, "backend": meta.get("backend", "none")}
    for key in ("means2d", "conics", "depths", "opacities", "colors", "radii"):
        t = meta[key]
        out_meta[key] = t.reshape(*batch, *t.shape[1:])
    n_isect = meta["n_intersections"]  # [] int64, on the device: reading it would synchronise
    overflow = n_isect > capacity if capacity is not None else torch.zeros_like(n_isect, dtype=torch.bool)
    out_meta.update(n_intersections=n_isect, overflow=overflow, capacity=capacity)
    if absgrad and meta.get("absgrad") is not None:
        # A buffer the backward fills (overwrites) with the summed |per-pixel grad| of each mean2d.
        out_meta["means2d"].absgrad = meta["absgrad"].reshape(*batch, C, N, 2)
    return render, alpha, out_meta


def _empty(args, bgs, B, C, N, D, width, height, channels, with_depth):
    """No Gaussians or no cameras: every pixel is the background (zeros without one)."""
    means = args[0]
    render = means.new_zeros(B, C, height, width, channels)
    if bgs is not None:
        bg = torch.cat([bgs, bgs.new_zeros(B, C, 1)], -1) if with_depth else bgs
        render = render + bg[:, :, None, None, :]
    alpha = means.new_zeros(B, C, height, width, 1)
    meta = dict(means2d=means.new_zeros(B, C, N, 2), conics=means.new_zeros(B, C, N, 3),
                depths=means.new_zeros(B, C, N), opacities=means.new_zeros(B, C, N),
                colors=means.new_zeros(B, C, N, D), radii=torch.zeros(B, C, N, 2, dtype=torch.int32,
                                                                       device=means.device),
                n_intersections=torch.zeros((), dtype=torch.int64, device=means.device))
    return render, alpha, meta


def check_overflow(meta: dict) -> None:
    """Raise RuntimeError if a call with ``capacity`` had more Gaussian-tile intersections than
    the capacity (its CUDA render then lacks the ones past it). Reads two device scalars: a host
    synchronisation, so call it outside CUDA graph capture (after a replay, say)."""
    if bool(meta["overflow"]):
        n = int(meta["n_intersections"])
        dropped = ("the intersections past it were not rendered" if meta["backend"] == "cuda" else
                   f"the {meta['backend']} backend rendered them all, the cuda backend would drop those past it")
        raise RuntimeError(f"rasterization: {n} Gaussian-tile intersections exceeded capacity={meta['capacity']} "
                           f"({dropped}); pass capacity >= {n}, with headroom for the scene to change, or "
                           f"capacity=None to size the buffers on every call")
