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
from fast3d.ops.rasterization import reference
from fast3d.ops.rasterization.reference import TILE

OP = "rasterization"
RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
RASTERIZE_MODES = ("classic", "antialiased")
CAMERA_MODELS = ("pinhole", "ortho")          # implemented
GSPLAT_CAMERA_MODELS = ("pinhole", "ortho", "fisheye", "ftheta")  # gsplat 1.5's; the rest are refused
MAX_CAPACITY = 2**31 - 1  # intersection indices are int32 (gaussians.h: kGsMaxIntersections)
# covars must be symmetric to this relative tolerance (|S - S^T| <= tol max|S|, per Gaussian).
COVARS_SYMMETRY_RTOL = 1e-5


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


def rasterization(means: Tensor,               # [..., N, 3] world positions
                  quats: Tensor | None,        # [..., N, 4] wxyz, any norm (None with covars)
                  scales: Tensor | None,       # [..., N, 3] post-activation (None with covars)
                  opacities: Tensor,           # [..., N] post-activation, in [0, 1]
                  colors: Tensor,              # [..., (C,) N, D], or SH [..., (C,) N, K, 3]
                  viewmats: Tensor,            # [..., C, 4, 4] world-to-camera, OpenCV axes
                  Ks: Tensor,                  # [..., C, 3, 3] intrinsics
                  width: int, height: int,
                  near_plane: float = 0.01, far_plane: float = 1e10, radius_clip: float = 0.0, eps2d: float = 0.3,
                  sh_degree: int | None = None,
                  packed: bool = False,
                  tile_size: int = 16,
                  backgrounds: Tensor | None = None,  # [..., C, D]
                  render_mode: str = "RGB",
                  sparse_grad: bool = False,
                  absgrad: bool = False,
                  rasterize_mode: str = "classic",
                  channel_chunk: int = 32,
                  distributed: bool = False,
                  camera_model: str = "pinhole",
                  segmented: bool = False,
                  covars: Tensor | None = None,  # [..., N, 3, 3] symmetric positive definite
                  with_ut: bool = False,
                  with_eval3d: bool = False,
                  radial_coeffs: Tensor | None = None,      # gsplat: [..., C, 6] or [..., C, 4]; refused
                  tangential_coeffs: Tensor | None = None,  # gsplat: [..., C, 2]; refused
                  thin_prism_coeffs: Tensor | None = None,  # gsplat: [..., C, 4]; refused
                  ftheta_coeffs: object = None,
                  rolling_shutter: object = "global",
                  viewmats_rs: Tensor | None = None,        # gsplat: [..., C, 4, 4]; refused
                  *,
                  deterministic: bool = False, backend: str = "auto", capacity: int | None = None,
                  ) -> tuple[Tensor, Tensor, dict]:
    """Rasterize 3D Gaussians to images: B scenes of N Gaussians, C cameras each, in one call.

    A drop-in for ``gsplat.rasterization`` (gsplat 1.5.3): the same parameters in the same order
    with the same meanings; the values fast3d does not implement raise ``ValueError`` naming the
    parameter, the value and what is supported. The projection, spherical harmonics and
    compositing are those of gsplat and the INRIA rasterizer; :mod:`fast3d.ops.rasterization.
    reference` states the math and is the specification every backend is tested against.

    .. note::
        **Batching.** The leading dims ``...`` (B scenes, any number of dims, possibly none) are
        shared by every tensor argument; all B x C images render in one launch.

    .. note::
        **Colours.** ``colors`` holds D channels per Gaussian ``[..., N, D]`` (the same for every
        camera) or per camera and Gaussian ``[..., C, N, D]``. With ``sh_degree`` set it holds
        spherical-harmonics coefficients ``[..., N, K, 3]`` or ``[..., C, N, K, 3]``,
        K >= (sh_degree + 1)^2, evaluated per camera at the direction from the camera centre to
        the Gaussian (D = 3). Channels past ``channel_chunk`` are rendered in chunks of that many
        (one rasterization each, alphas from the first), as gsplat does.

    .. note::
        **Render modes.** "RGB": the D colour channels; "D": the accumulated depth sum_i w_i z_i;
        "ED": the expected depth (D divided by alpha); "RGB+D" / "RGB+ED": both, depth last.
        ``backgrounds`` fill the colour channels where alpha < 1.

    .. note::
        **Antialiasing.** ``rasterize_mode="antialiased"`` scales each opacity by
        sqrt(det(Sigma2d - eps2d I) / det(Sigma2d)), compensating the eps2d blur (Mip-Splatting's
        2D filter, as gsplat's "antialiased" mode).

    .. note::
        **2D-mean gradients (densification).** ``meta["means2d"]`` is the tensor the
        rasterization stage reads: call ``retain_grad()`` on it before backward and its ``.grad``
        is d loss / d mean2d of every (camera, Gaussian), as gsplat's strategies
        (``DefaultStrategy``) read it. With ``absgrad=True``, after backward
        ``meta["means2d"].absgrad`` holds the per-pixel gradients of each 2D mean summed in
        absolute value (AbsGS / gsplat's absgrad), same shape; with several channel chunks, the sum
        of each chunk's.

    .. note::
        **Packed.** ``packed=False`` (fast3d's default; gsplat's is True) gives per-camera meta
        ``[..., C, N, ...]`` (``radii`` 0 where a Gaussian is not drawn) and ``gaussian_ids`` None.
        ``packed=True`` gives gsplat's packed meta: ``batch_ids``, ``camera_ids``,
        ``gaussian_ids`` [nnz] int64 of the (image, Gaussian) pairs with radii > 0, and
        ``radii`` [nnz, 2], ``means2d`` [nnz, 2] (on the autograd path), ``depths``, ``conics``,
        ``opacities`` [nnz, ...]. The kernels are the same dense-per-image ones (packed selects the
        meta layout, not a different algorithm) and counting nnz synchronises with the host.
        ``sparse_grad=True`` (packed only, no batch dims) returns the gradients of means, quats
        and scales (or covars) as sparse COO tensors over the visible Gaussians.

    .. note::
        **Cameras.** ``camera_model``: "pinhole" (gsplat's clamped-Jacobian EWA) or "ortho"
        (mean2d = (fx x + cx, fy y + cy), J = diag(fx, fy)); "fisheye" and "ftheta", distortion
        coefficients, the unscented transform (``with_ut``), ``with_eval3d``, rolling shutter and
        ``distributed=True`` are refused. ``covars`` [..., N, 3, 3] (symmetric positive definite)
        replace quats and scales (pass None for both); the covariance projection runs as PyTorch
        ops (``reference.project_stage``, autograd, O(C N)) on every backend, the rasterization
        stage is the backend's.

    .. note::
        **CUDA graphs.** ``capacity=None`` sizes the CUDA binning buffers by the true number of
        (Gaussian, 16x16 tile) intersections, read back to the host: one synchronisation per call.
        An int bounds the buffers up front, so the CUDA path never synchronises and a training step
        can be captured (with packed=False). Intersections are numbered image by image, Gaussian by
        Gaussian in input order; those past ``capacity`` are not rendered by the cuda backend
        (forward and backward alike) and ``meta["overflow"]`` is set: check it outside capture
        with :func:`check_overflow`. The torch and cpu backends report n_intersections and
        overflow the same way but always render every Gaussian.

    .. note::
        **Precision and gradients.** bf16/fp16 inputs are computed in float32 and the outputs cast
        back. Gradients flow to means, quats, scales (or covars), opacities, colors (or SH) and
        backgrounds; viewmats and Ks are constants.

    Args:
        means: Gaussian centres in world space. [..., N, 3]
        quats: rotations as wxyz quaternions, normalised inside; None with covars. [..., N, 4]
        scales: axis scales, post-activation; None with covars. [..., N, 3]
        opacities: post-activation, in [0, 1]. [..., N]
        colors: [..., N, D] or [..., C, N, D], or SH coefficients [..., (C,) N, K, 3] (see the notes).
        viewmats: world-to-camera matrices, OpenCV axes (x right, y down, z forward). [..., C, 4, 4]
        Ks: intrinsics (fx, fy, cx, cy), pixel centres at +0.5. [..., C, 3, 3]
        width, height: image size in pixels (positive integers).
        near_plane, far_plane: Gaussians with camera depth outside [near_plane, far_plane] are
            culled; 0 < near_plane < far_plane. Default 0.01 and 1e10.
        radius_clip: Gaussians whose pixel radii are both <= this are not drawn (radii 0); >= 0.
            Default 0.
        eps2d: added to the diagonal of each 2D covariance, in pixels^2: a low-pass filter that
            keeps tiny Gaussians at least about a pixel wide. Default 0.3.
        sh_degree: None (colors are colours) or the SH degree 0..3 to evaluate. Default None.
        packed: the meta layout (see the notes). Default False.
        tile_size: 16 (the kernels' tile side; other values are refused). Default 16.
        backgrounds: per-image background colour, or None for black. [..., C, D]
        render_mode: "RGB", "D", "ED", "RGB+D" or "RGB+ED". Default "RGB".
        sparse_grad: sparse COO gradients for means, quats, scales (packed=True only). Default False.
        absgrad: record ``meta["means2d"].absgrad`` in the backward. Default False.
        rasterize_mode: "classic" or "antialiased". Default "classic".
        channel_chunk: channels rendered per rasterization (a positive integer). Default 32.
        distributed: must be False (multi-GPU rendering is not implemented).
        camera_model: "pinhole" or "ortho". Default "pinhole".
        segmented: accepted (True or False), no effect: gsplat's choice of sort; fast3d's CUDA
            backend always sorts image|tile|depth keys in one radix sort.
        covars: world-space covariances instead of quats and scales, or None. [..., N, 3, 3]
        with_ut, with_eval3d: must be False.
        radial_coeffs, tangential_coeffs, thin_prism_coeffs, ftheta_coeffs: must be None.
        rolling_shutter: must be global (gsplat's ``RollingShutterType.GLOBAL`` or "global").
        viewmats_rs: must be None.
        deterministic: (fast3d, keyword only) make the native backward sum each Gaussian's
            per-tile gradients in a fixed order (one row per intersection,
            csrc/gaussians/isect_rows.h) instead of by atomic adds: bit-identical gradients from
            run to run, at some cost in speed and memory. Default False.
        backend: (fast3d, keyword only) "auto" (the fastest that serves the inputs), "torch",
            "cpu" or "cuda".
        capacity: (fast3d, keyword only) None, or the number of Gaussian-tile intersections to
            allocate for (see the notes), in [1, 2^31 - 1].

    Returns:
        A tuple:

        - **colors**: the rendered channels, [..., C, H, W, X]: X = D for "RGB", 1 for "D"/"ED",
          D + 1 for "RGB+D"/"RGB+ED".
        - **alphas**: accumulated opacity, [..., C, H, W, 1].
        - **meta**: gsplat's keys: ``batch_ids``, ``camera_ids``, ``gaussian_ids`` ([nnz] int64
          when packed, else None), ``radii`` ([..., C, N, 2] int32 pixel half-extents, 0 where not
          drawn; [nnz, 2] packed), ``means2d`` ([..., C, N, 2]; [nnz, 2]), ``depths`` ([..., C,
          N]; [nnz]), ``conics`` ([..., C, N, 3] xx, xy, yy of the inverse 2D covariance; [nnz,
          3]), ``opacities`` ([..., C, N] after the antialiasing compensation; [nnz]),
          ``tiles_per_gauss`` ([..., C, N]; [nnz] int32), ``tile_width``, ``tile_height``,
          ``tile_size``, ``width``, ``height``, ``n_batches`` (B), ``n_cameras`` (C); and fast3d's:
          ``colors`` (after SH, [..., C, N, D]; [nnz, D]), ``n_intersections`` (0-dim int64 on
          the device, over all images of the call), ``overflow`` (0-dim bool: n_intersections >
          capacity), ``capacity``, ``backend`` (the one that ran). gsplat's sort internals
          (``isect_ids``, ``flatten_ids``, ``isect_offsets``) are not returned.
    """
    # --- gsplat parameters fast3d refuses ----------------------------------------------------------
    checks.boolean("distributed", distributed)
    if distributed:
        raise ValueError("distributed=True (multi-GPU rendering) is not supported; supported: False")
    for name, flag in (("with_ut", with_ut), ("with_eval3d", with_eval3d)):
        checks.boolean(name, flag)
        if flag:
            raise ValueError(f"{name}=True is not supported; supported: False (EWA splatting in image space)")
    for name, value in (("radial_coeffs", radial_coeffs), ("tangential_coeffs", tangential_coeffs),
                        ("thin_prism_coeffs", thin_prism_coeffs), ("ftheta_coeffs", ftheta_coeffs),
                        ("viewmats_rs", viewmats_rs)):
        if value is not None:
            shown = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)
            raise ValueError(f"{name} is not supported (camera distortion and rolling shutter are not implemented); "
                             f"supported: None; got {shown}")
    if str(getattr(rolling_shutter, "name", rolling_shutter)).lower() != "global":
        raise ValueError(f"rolling_shutter={rolling_shutter!r} is not supported; supported: global shutter "
                         f"(gsplat's RollingShutterType.GLOBAL, or 'global')")
    checks.one_of("camera_model", camera_model, GSPLAT_CAMERA_MODELS)
    if camera_model not in CAMERA_MODELS:
        raise ValueError(f"camera_model={camera_model!r} is not supported; supported: {CAMERA_MODELS!r}")
    checks.integer("tile_size", tile_size, 1)
    if tile_size != TILE:
        raise ValueError(f"tile_size={tile_size!r} is not supported; supported: {TILE} (the kernels' tile side)")
    checks.boolean("segmented", segmented)
    checks.boolean("packed", packed)
    checks.boolean("sparse_grad", sparse_grad)
    channel_chunk = checks.positive_int("channel_chunk", channel_chunk)
    radius_clip = checks.real("radius_clip", radius_clip, 0.0)

    # --- tensors ------------------------------------------------------------------------------------
    for name, x in (("means", means), ("opacities", opacities), ("colors", colors), ("viewmats", viewmats),
                    ("Ks", Ks)):
        v.tensor(name, x)
    v.tensor("means", means, last=3)
    d = check_shape(means, "[..., N, 3]", "means")
    if covars is None:
        if quats is None or scales is None:
            raise ValueError(f"quats and scales are required unless covars is given; got "
                             f"quats={'None' if quats is None else 'a tensor'}, "
                             f"scales={'None' if scales is None else 'a tensor'}")
        v.tensor("quats", quats)
        v.tensor("scales", scales)
        d = check_shape(quats, "[..., N, 4]", "quats", d)
        d = check_shape(scales, "[..., N, 3]", "scales", d)
    else:
        if quats is not None or scales is not None:
            given = " and ".join(n for n, t in (("quats", quats), ("scales", scales)) if t is not None)
            raise ValueError(f"covars replaces quats and scales: pass quats=None and scales=None with covars; "
                             f"got {given} as well")
        v.tensor("covars", covars)
        d = check_shape(covars, "[..., N, 3, 3]", "covars", d)
    d = check_shape(opacities, "[..., N]", "opacities", d)
    d = check_shape(viewmats, "[..., C, 4, 4]", "viewmats", d)
    d = check_shape(Ks, "[..., C, 3, 3]", "Ks", d)
    batch, N, C = d["..."], d["N"], d["C"]
    sh_degree = checks.integer("sh_degree", sh_degree, 0, 3, optional=True)
    sh_per_camera = False
    if sh_degree is not None:
        sh_per_camera = colors.dim() == len(batch) + 4
        d = check_shape(colors, "[..., C, N, K, 3]" if sh_per_camera else "[..., N, K, 3]", "colors", d)
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
    v.same_device_dtype("means", means, quats=quats, scales=scales, covars=covars, opacities=opacities,
                        colors=colors, viewmats=viewmats, Ks=Ks, backgrounds=backgrounds)
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
    if sparse_grad and not packed:
        raise ValueError("sparse_grad=True needs packed=True (its gradients are indexed by meta['gaussian_ids']); "
                         "got packed=False")
    if sparse_grad and batch:
        raise ValueError(f"sparse_grad=True takes Gaussians without batch dims (means [N, 3]); got means of shape "
                         f"{tuple(means.shape)}")
    v.finite("means", means)
    if covars is None:
        v.finite("scales", scales)
    else:
        _check_covars(covars)

    dtype = means.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    B = math.prod(batch)
    I = B * C

    def flat(x: Tensor | None, keep: int) -> Tensor | None:  # [..., *tail] -> [B, *tail] in compute dtype
        return None if x is None else x.reshape(B, *x.shape[x.dim() - keep:]).to(compute)

    g_means, g_quats, g_scales, g_covars = means, quats, scales, covars
    if sparse_grad and N > 0 and C > 0:
        # gradients of these become sparse over the Gaussians some camera draws (rows of others are 0)
        visible = _Visible()
        g_means = _SparseGrad.apply(means, visible)
        g_quats, g_scales = (None if t is None else _SparseGrad.apply(t, visible) for t in (quats, scales))
        g_covars = None if covars is None else _SparseGrad.apply(covars, visible)
    f_means, f_quats, f_scales, f_covars = flat(g_means, 2), flat(g_quats, 2), flat(g_scales, 2), flat(g_covars, 3)
    f_opac, f_view, f_Ks = flat(opacities, 1), flat(viewmats, 3), flat(Ks, 3)
    channels = (D if use_colors else 0) + int(with_depth)
    impl = None
    if N > 0 and C > 0:
        q = backends.Query(device=means.device, dtype=compute,
                           shape=RasterShape(channels=min(channels, channel_chunk), images=I,
                                             dense_elements=I * N * width * height))
        impl = backends.select(OP, backend, q)
    stages = impl.fn if impl is not None else None
    antialiased = rasterize_mode == "antialiased"
    with op_range(f"{OP}[{impl.name if impl else 'none'}]", means.device):
        # --- projection: [B, C, N, ...] ---
        if impl is None:
            means2d, conics, depths = (means.new_zeros(B, C, N, k, dtype=compute) for k in (2, 3, 1))
            depths, opac = depths[..., 0], f_opac[:, None].expand(B, C, N) * 0
            radii = torch.zeros(B, C, N, 2, dtype=torch.int32, device=means.device)
        elif covars is not None:
            means2d, conics, depths, opac, radii = reference.project_stage(
                f_means, f_quats, f_scales, f_opac, f_view, f_Ks, width, height, near_plane, far_plane, eps2d,
                antialiased, f_covars, camera_model)
        else:
            means2d, conics, depths, opac, radii = stages.project(f_means, f_quats, f_scales, f_opac, f_view, f_Ks,
                                                                  width, height, near_plane, far_plane, eps2d,
                                                                  antialiased, camera_model=camera_model)
        if radius_clip > 0:
            radii = torch.where((radii <= radius_clip).all(-1, keepdim=True), torch.zeros_like(radii), radii)
        # --- colours: [B, C, N, D] ---
        if sh_degree is None:
            cols = colors.to(compute)
            cols = cols.reshape(B, C, N, D) if cols.dim() == len(batch) + 3 else \
                cols.reshape(B, 1, N, D).expand(B, C, N, D)
        elif impl is None:
            cols = means.new_zeros(B, C, N, 3, dtype=compute)
        elif sh_per_camera:  # one "scene" per (scene, camera): [B C, N, K, 3] seen by one camera each
            K = colors.shape[-2]
            cols = stages.sh(colors.reshape(I, N, K, 3).to(compute), f_means[:, None].expand(B, C, N, 3).reshape(I, N, 3),
                             f_view.reshape(I, 1, 4, 4), sh_degree).reshape(B, C, N, 3)
        else:
            cols = stages.sh(flat(colors, 3), f_means, f_view, sh_degree)
        # --- meta's 2D tensors: the ones the rasterization stage reads ---
        if packed:
            b_ids, c_ids, g_ids = (radii > 0).all(-1).nonzero(as_tuple=True)   # [nnz] each
            if sparse_grad and impl is not None:
                visible.ids = torch.unique(g_ids)
            m_means2d, m_conics = means2d[b_ids, c_ids, g_ids], conics[b_ids, c_ids, g_ids]
            m_depths, m_opac = depths[b_ids, c_ids, g_ids], opac[b_ids, c_ids, g_ids]
            m_radii, m_cols = radii[b_ids, c_ids, g_ids], cols[b_ids, c_ids, g_ids]
            where = (b_ids, c_ids, g_ids)
            r_means2d, r_conics, r_depths, r_opac = (torch.zeros_like(t).index_put(where, m) for t, m in (
                (means2d, m_means2d), (conics, m_conics), (depths, m_depths), (opac, m_opac)))
        else:
            def user(t: Tensor) -> Tensor:  # [B, C, N, ...] -> [..., C, N, ...]
                return t.reshape(*batch, *t.shape[1:])

            m_means2d, m_conics, m_depths, m_opac, m_radii, m_cols = (user(t) for t in (means2d, conics, depths, opac,
                                                                                      radii, cols))
            r_means2d, r_conics, r_depths, r_opac = m_means2d, m_conics, m_depths, m_opac
        # --- rasterization, in chunks of channel_chunk: [I, H, W, channels] ---
        feats = torch.cat(([cols] if use_colors else []) + ([r_depths.reshape(B, C, N, 1)] if with_depth else []),
                          -1).reshape(I, N, channels)
        radii_i = radii.reshape(I, N, 2)
        absgrad_bufs = []
        if impl is None:
            render = means.new_zeros(I, height, width, channels, dtype=compute)
            alpha = means.new_zeros(I, height, width, 1, dtype=compute)
            n_isect = torch.zeros((), dtype=torch.int64, device=means.device)
        else:
            pieces = []
            for lo in range(0, channels, channel_chunk):
                out = stages.rasterize(r_means2d.reshape(I, N, 2), r_conics.reshape(I, N, 3), r_opac.reshape(I, N),
                                       feats[..., lo:lo + channel_chunk], r_depths.reshape(I, N), radii_i, width,
                                       height, deterministic, capacity, absgrad)
                pieces.append(out[0])
                if lo == 0:
                    alpha, n_isect = out[1], out[2]
                if absgrad:
                    absgrad_bufs.append(out[3])
            render = pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)
    render = render.view(B, C, height, width, channels)
    alpha = alpha.view(B, C, height, width, 1)
    if backgrounds is not None:
        bg = flat(backgrounds, 2)
        bg = torch.cat([bg, bg.new_zeros(B, C, 1)], -1) if with_depth else bg
        render = render + (1 - alpha) * bg[:, :, None, None, :]
    if render_mode in ("ED", "RGB+ED"):
        render = torch.cat([render[..., :-1], render[..., -1:] / alpha.clamp_min(1e-10)], -1)
    render = render.reshape(*batch, C, height, width, channels).to(dtype)
    alpha = alpha.reshape(*batch, C, height, width, 1).to(dtype)

    tiles = reference.tile_intersections(means2d.detach(), radii, width, height).to(torch.int32)  # [B, C, N]
    overflow = n_isect > capacity if capacity is not None else torch.zeros_like(n_isect, dtype=torch.bool)
    meta = dict(batch_ids=b_ids if packed else None, camera_ids=c_ids if packed else None,
                gaussian_ids=g_ids if packed else None, radii=m_radii, means2d=m_means2d, depths=m_depths,
                conics=m_conics, opacities=m_opac,
                tiles_per_gauss=tiles[b_ids, c_ids, g_ids] if packed else tiles.reshape(*batch, C, N),
                tile_width=-(-width // TILE), tile_height=-(-height // TILE), tile_size=TILE, width=width,
                height=height, n_batches=B, n_cameras=C, colors=m_cols, n_intersections=n_isect, overflow=overflow,
                capacity=capacity, backend=impl.name if impl is not None else "none")
    if absgrad:
        _attach_absgrad(m_means2d, absgrad_bufs, (B, C, N), (b_ids, c_ids, g_ids) if packed else None)
    return render, alpha, meta


def _attach_absgrad(means2d: Tensor,   # meta's: [..., C, N, 2], or [nnz, 2] packed
                    bufs: list,        # [I, N, 2] per channel chunk, filled by the backward
                    bcn: tuple, packed_ids: tuple | None) -> None:
    """Give meta["means2d"] its ``.absgrad``: the chunks' buffers summed, in meta's layout."""
    # The buffers' storage, without autograd: a native backend's buffer is an output of its rasterize
    # node, and fill (a hook of means2d, upstream of that node) holding it would close a cycle
    # node -> ... -> means2d's node -> fill -> buffer -> node through C++, which gc cannot break.
    bufs = [b.detach() for b in bufs]
    if not bufs:  # nothing drawn: no backward will touch it
        means2d.absgrad = torch.zeros_like(means2d)
    elif len(bufs) == 1 and packed_ids is None:  # the buffer itself, filled in place by the backward
        means2d.absgrad = bufs[0].view(means2d.shape)
    else:
        out = means2d.absgrad = torch.zeros_like(means2d)
        if means2d.requires_grad:
            # fill holds the buffer, not means2d: a hook of means2d that referred to means2d would be a
            # cycle through autograd's C++ hook table, which gc cannot see, keeping means2d and its
            # graph alive for ever
            def fill(grad):  # runs once means2d's gradient is complete: every chunk's backward has run
                total = sum(bufs).view(*bcn, 2)
                out.copy_(total[packed_ids] if packed_ids is not None else total.view(out.shape))
            means2d.register_hook(fill)


class _Visible:
    """The Gaussian ids some camera draws, set after projection, read by _SparseGrad's backward."""
    ids: Tensor | None = None


class _SparseGrad(torch.autograd.Function):
    """Identity whose backward returns the gradient as a sparse COO tensor over visible.ids (the
    rows of the dense gradient elsewhere are exactly 0: no undrawn Gaussian gets a gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, visible: _Visible) -> Tensor:  # x [N, ...]
        ctx.visible = visible
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ids = ctx.visible.ids
        return torch.sparse_coo_tensor(ids[None], grad[ids], grad.shape, is_coalesced=True, check_invariants=False), None


def _check_covars(covars: Tensor) -> None:  # [..., N, 3, 3]
    """covars must be finite, symmetric and positive definite (Cholesky succeeds)."""
    v.finite("covars", covars)
    c = covars.detach().to(torch.float64 if covars.dtype == torch.float64 else torch.float32)
    asym = (c - c.transpose(-1, -2)).abs().amax((-1, -2))
    bad = asym > COVARS_SYMMETRY_RTOL * c.abs().amax((-1, -2))
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"covars must be symmetric; covars[{', '.join(map(str, idx))}] differs from its transpose "
                         f"by {float(asym[idx]):.3g}")
    info = torch.linalg.cholesky_ex(c).info
    if (info != 0).any():
        idx = tuple(int(i) for i in (info != 0).nonzero()[0])
        raise ValueError(f"covars must be positive definite; covars[{', '.join(map(str, idx))}] is not "
                         f"(Cholesky fails at pivot {int(info[idx])})")


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
