"""fast3d.rasterization: differentiable 3D Gaussian splatting, gsplat-compatible signature."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fast3d import backends, checks
from fast3d.checks import check_shape
from fast3d.ops import _validate as v
from fast3d.ops._profiling import op_range

OP = "rasterization"
RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
RASTERIZE_MODES = ("classic", "antialiased")
MAX_CAPACITY = 2**31 - 1  # intersection indices are int32 (gaussians.h: kGsMaxIntersections)


@dataclass(frozen=True)
class RasterShape:
    """What the rasterization backends' checks read from a call (``backends.Query.shape``).

    Attributes:
        channels: output channels per pixel (colour channels, plus one for depth).
        images: images rendered in the call (scenes x cameras).
        dense_elements: images x Gaussians x pixels, the dense reference's working-set size.
    """

    channels: int
    images: int
    dense_elements: int


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
    """Rasterize 3D Gaussians to images: B scenes of N Gaussians, C cameras each, in one call.

    The projection, spherical harmonics and compositing are those of gsplat and the INRIA
    rasterizer; :mod:`fast3d.ops.rasterization.reference` states the math and is the
    specification every backend is tested against.

    .. note::
        **Batching.** The leading dims ``...`` (B scenes, any number of dims, possibly none) are
        shared by every tensor argument; all B x C images render in one launch.

    .. note::
        **Colours.** ``colors`` holds D channels per Gaussian ``[..., N, D]`` (the same for every
        camera) or per camera and Gaussian ``[..., C, N, D]``. With ``sh_degree`` set it holds
        spherical-harmonics coefficients ``[..., N, K, 3]``, K >= (sh_degree + 1)^2, evaluated per
        camera at the direction from the camera centre to the Gaussian (D = 3).

    .. note::
        **Render modes.** "RGB": the D colour channels; "D": the accumulated depth sum_i w_i z_i;
        "ED": the expected depth (D divided by alpha); "RGB+D" / "RGB+ED": both, depth last.
        ``backgrounds`` fill the colour channels where alpha < 1.

    .. note::
        **Antialiasing.** ``rasterize_mode="antialiased"`` scales each opacity by
        sqrt(det(Sigma2d - eps2d I) / det(Sigma2d)), compensating the eps2d blur (Mip-Splatting's
        2D filter, as gsplat's "antialiased" mode).

    .. note::
        **Densification statistics.** With ``absgrad=True``, after backward
        ``meta["means2d"].absgrad`` holds the per-pixel gradients of each 2D mean summed in absolute
        value, [..., C, N, 2] (AbsGS / gsplat's absgrad).

    .. note::
        **CUDA graphs.** ``capacity=None`` sizes the CUDA binning buffers by the true number of
        (Gaussian, 16x16 tile) intersections, read back to the host: one synchronisation per call.
        An int bounds the buffers up front, so the CUDA path never synchronises and a training step
        can be captured. Intersections are numbered image by image, Gaussian by Gaussian in input
        order; those past ``capacity`` are not rendered by the cuda backend (forward and backward
        alike) and ``meta["overflow"]`` is set: check it outside capture with
        :func:`check_overflow`. The buffers and the sort cost ``capacity``, not the true count. The
        torch and cpu backends report n_intersections and overflow the same way but always render
        every Gaussian.

    .. note::
        **Precision and gradients.** bf16/fp16 inputs are computed in float32 and the outputs cast
        back. Gradients flow to means, quats, scales, opacities, colors (or SH) and backgrounds;
        viewmats and Ks are constants.

    Args:
        means: Gaussian centres in world space. [..., N, 3]
        quats: rotations as wxyz quaternions, normalised inside. [..., N, 4]
        scales: axis scales, post-activation. [..., N, 3]
        opacities: post-activation, in [0, 1]. [..., N]
        colors: [..., N, D] or [..., C, N, D], or SH coefficients [..., N, K, 3] (see the notes).
        viewmats: world-to-camera matrices, OpenCV axes (x right, y down, z forward). [..., C, 4, 4]
        Ks: pinhole intrinsics, pixel centres at +0.5. [..., C, 3, 3]
        width, height: image size in pixels (positive integers).
        near_plane, far_plane: Gaussians with camera depth outside [near_plane, far_plane] are
            culled; 0 < near_plane < far_plane. Default 0.01 and 1e10.
        eps2d: added to the diagonal of each 2D covariance, in pixels^2: a low-pass filter that
            keeps tiny Gaussians at least about a pixel wide. Default 0.3.
        sh_degree: None (colors are colours) or the SH degree 0..3 to evaluate. Default None.
        backgrounds: per-image background colour, or None for black. [..., C, D]
        render_mode: "RGB", "D", "ED", "RGB+D" or "RGB+ED". Default "RGB".
        rasterize_mode: "classic" or "antialiased". Default "classic".
        deterministic: make the native backward sum each Gaussian's per-tile gradients in a
            fixed order (one row per intersection, csrc/gaussians/isect_rows.h) instead of by
            atomic adds: bit-identical gradients from run to run, at some cost in speed and
            memory. Default False.
        absgrad: record ``meta["means2d"].absgrad`` in the backward. Default False.
        backend: "auto" (the fastest that serves the inputs), "torch", "cpu" or "cuda".
        capacity: None, or the number of Gaussian-tile intersections to allocate for (see the
            notes), in [1, 2^31 - 1].

    Returns:
        A tuple:

        - **colors**: the rendered channels, [..., C, H, W, X]: X = D for "RGB", 1 for "D"/"ED",
          D + 1 for "RGB+D"/"RGB+ED".
        - **alphas**: accumulated opacity, [..., C, H, W, 1].
        - **meta**: a dict: ``means2d`` [..., C, N, 2], ``conics`` [..., C, N, 3] (xx, xy, yy of
          the inverse 2D covariance), ``depths`` [..., C, N], ``opacities`` [..., C, N] (after the
          antialiasing compensation), ``colors`` [..., C, N, D] (after SH), ``radii`` [..., C, N, 2]
          (int32 pixel half-extents, 0 for culled Gaussians), ``n_intersections`` (0-dim int64 on
          the device, over all images of the call), ``overflow`` (0-dim bool: n_intersections >
          capacity), ``capacity``, ``backend`` (the one that ran), ``width``, ``height``.
    """
    for name, x in (("means", means), ("quats", quats), ("scales", scales), ("opacities", opacities),
                    ("colors", colors), ("viewmats", viewmats), ("Ks", Ks)):
        v.tensor(name, x)
    v.tensor("means", means, last=3)
    d = check_shape(means, "[..., N, 3]", "means")
    d = check_shape(quats, "[..., N, 4]", "quats", d)
    d = check_shape(scales, "[..., N, 3]", "scales", d)
    d = check_shape(opacities, "[..., N]", "opacities", d)
    d = check_shape(viewmats, "[..., C, 4, 4]", "viewmats", d)
    d = check_shape(Ks, "[..., C, 3, 3]", "Ks", d)
    batch, N, C = d["..."], d["N"], d["C"]
    sh_degree = checks.integer("sh_degree", sh_degree, 0, 3, optional=True)
    if sh_degree is not None:
        d = check_shape(colors, "[..., N, K, 3]", "colors", d)
        if d["K"] < (sh_degree + 1) ** 2:
            raise ValueError(f"colors holds {d['K']} SH coefficients; sh_degree={sh_degree} needs "
                             f"K >= {(sh_degree + 1) ** 2}")
        d["D"] = 3
    elif colors.dim() == len(batch) + 3:
        d = check_shape(colors, "[..., C, N, D]", "colors", d)
    else:
        d = check_shape(colors, "[..., N, D]", "colors", d)
    D = d["D"]
    if D == 0:
        raise ValueError(f"colors must have at least one channel; got shape {tuple(colors.shape)}")
    checks.one_of("render_mode", render_mode, RENDER_MODES)
    checks.one_of("rasterize_mode", rasterize_mode, RASTERIZE_MODES)
    use_colors = render_mode.startswith("RGB")
    with_depth = render_mode != "RGB"
    if backgrounds is not None:
        v.tensor("backgrounds", backgrounds)
        if not use_colors:
            raise ValueError(f"backgrounds apply to colour channels; render_mode={render_mode!r} has none")
        check_shape(backgrounds, "[..., C, D]", "backgrounds", d)
    v.same_device_dtype("means", means, quats=quats, scales=scales, opacities=opacities, colors=colors,
                        viewmats=viewmats, Ks=Ks, backgrounds=backgrounds)
    width = checks.positive_int("width", width)
    height = checks.positive_int("height", height)
    near_plane = checks.real("near_plane", near_plane, 0.0, lo_open=True)
    far_plane = checks.real("far_plane", far_plane)
    if far_plane <= near_plane:
        raise ValueError(f"far_plane must exceed near_plane={near_plane:g}; got {far_plane!r}")
    eps2d = checks.real("eps2d", eps2d, 0.0)
    checks.boolean("deterministic", deterministic)
    checks.boolean("absgrad", absgrad)
    capacity = checks.integer("capacity", capacity, 1, MAX_CAPACITY, optional=True,
                              note="the number of Gaussian-tile intersections to allocate for")
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
                           shape=RasterShape(channels=channels, images=B * C, dense_elements=B * C * N * width * height))
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
