"""The `cpu` (C++/OpenMP) and `cuda` backends of rasterization, as torch custom ops.

Three stages, each a custom op with a fake (meta) implementation and registered autograd, chained
by autograd: projection (``fast3d::gs_project``), SH colours (``fast3d::gs_sh``) and binning +
blending (``fast3d::gs_rasterize``). ``project_stage``, ``sh_stage`` and ``rasterize_stage`` are
the backend's stages (:class:`fast3d.ops.rasterization.stages.RasterStages`); the public function
chains them, so the 2D means it returns in meta are the rasterizer's inputs. Backgrounds, the depth
channel, channel chunks and the packed layout are plain torch around them.
"""


import torch
from torch import Tensor

from fast3d import _native

# --- projection ---------------------------------------------------------------------------------

@torch.library.custom_op("fast3d::gs_project", mutates_args=())
def gs_project(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, viewmats: Tensor, Ks: Tensor,
               width: int, height: int, near_plane: float, far_plane: float, eps2d: float,
               antialiased: bool, ortho: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # -> means2d [B,C,N,2], conics [B,C,N,3], depths [B,C,N], opacities [B,C,N], radii [B,C,N,2] int32
    return _native.module().gs_project_forward(means, quats, scales, opacities, viewmats, Ks, width, height,
                                               near_plane, far_plane, eps2d, antialiased, ortho)


@gs_project.register_fake
def _(means, quats, scales, opacities, viewmats, Ks, width, height, near_plane, far_plane, eps2d, antialiased, ortho):
    B, N = means.shape[:2]
    C = viewmats.shape[1]
    return (means.new_empty(B, C, N, 2), means.new_empty(B, C, N, 3), means.new_empty(B, C, N),
            means.new_empty(B, C, N), means.new_empty(B, C, N, 2, dtype=torch.int32))


@torch.library.custom_op("fast3d::gs_project_bwd", mutates_args=())
def gs_project_bwd(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, viewmats: Tensor, Ks: Tensor,
                   width: int, height: int, near_plane: float, far_plane: float, eps2d: float, antialiased: bool,
                   ortho: bool,
                   g_means2d: Tensor, g_conics: Tensor, g_depths: Tensor,
                   g_opac: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # -> g_means [B,N,3], g_quats [B,N,4], g_scales [B,N,3], g_opacities [B,N]
    return _native.module().gs_project_backward(means, quats, scales, opacities, viewmats, Ks, width, height,
                                                near_plane, far_plane, eps2d, antialiased, ortho, g_means2d, g_conics,
                                                g_depths, g_opac)


@gs_project_bwd.register_fake
def _(means, quats, scales, opacities, *rest):
    return torch.empty_like(means), torch.empty_like(quats), torch.empty_like(scales), torch.empty_like(opacities)


def _project_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.args = inputs[6:]


def _zeros_if_none(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g.contiguous()


def _project_backward(ctx, g_means2d, g_conics, g_depths, g_opac, g_radii):
    means, quats, scales, opacities, viewmats, Ks = ctx.saved_tensors
    B, N = means.shape[:2]
    C = viewmats.shape[1]
    like2, like3, like1 = means.new_empty(B, C, N, 2), means.new_empty(B, C, N, 3), means.new_empty(B, C, N)
    grads = gs_project_bwd(means, quats, scales, opacities, viewmats, Ks, *ctx.args,
                           _zeros_if_none(g_means2d, like2), _zeros_if_none(g_conics, like3),
                           _zeros_if_none(g_depths, like1), _zeros_if_none(g_opac, like1))
    return (*grads, None, None, None, None, None, None, None, None, None)


gs_project.register_autograd(_project_backward, setup_context=_project_setup)


# --- spherical harmonics --------------------------------------------------------------------------

@torch.library.custom_op("fast3d::gs_sh", mutates_args=())
def gs_sh(sh: Tensor, means: Tensor, viewmats: Tensor, degree: int) -> Tensor:
    # sh [B,N,K,3] -> colors [B,C,N,3]
    return _native.module().gs_sh_forward(sh, means, viewmats, degree)


@gs_sh.register_fake
def _(sh, means, viewmats, degree):
    return sh.new_empty(sh.shape[0], viewmats.shape[1], sh.shape[1], 3)


@torch.library.custom_op("fast3d::gs_sh_bwd", mutates_args=())
def gs_sh_bwd(sh: Tensor, means: Tensor, viewmats: Tensor, degree: int, g_colors: Tensor) -> tuple[Tensor, Tensor]:
    return _native.module().gs_sh_backward(sh, means, viewmats, degree, g_colors)


@gs_sh_bwd.register_fake
def _(sh, means, viewmats, degree, g_colors):
    return torch.empty_like(sh), torch.empty_like(means)


def _sh_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3])
    ctx.degree = inputs[3]


def _sh_backward(ctx, g_colors):
    sh, means, viewmats = ctx.saved_tensors
    g_sh, g_means = gs_sh_bwd(sh, means, viewmats, ctx.degree, g_colors.contiguous())
    return g_sh, g_means, None, None


gs_sh.register_autograd(_sh_backward, setup_context=_sh_setup)


# --- binning and blending -----------------------------------------------------------------------

@torch.library.custom_op("fast3d::gs_rasterize", mutates_args=())
def gs_rasterize(means2d: Tensor, conics: Tensor, opac: Tensor, feats: Tensor, depths: Tensor, radii: Tensor,
                 width: int, height: int, deterministic: bool, capacity: int | None,
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # [I,N,...] -> image [I,H,W,D], alpha [I,H,W], then what the backward reuses: last [I,H,W],
    # tile_offsets [I*T+1], flat_ids [n], isect_src [n], gauss_offsets [I*N+1] (the last two CUDA
    # only; empty on CPU); n_isect [] int64, the true number of Gaussian-tile intersections; and
    # absgrad [I,N,2], which the backward fills. n = capacity on CUDA when one is given (no host
    # synchronisation), else n_isect. `deterministic` selects the backward's reduction.
    outs = _native.module().gs_rasterize_forward(means2d, conics, opac, feats, depths, radii, width, height,
                                                 capacity)
    return (*outs, torch.zeros_like(means2d))


@gs_rasterize.register_fake
def _(means2d, conics, opac, feats, depths, radii, width, height, deterministic, capacity):
    I, N, D = feats.shape
    tile = _native.module().gs_tile
    tiles = -(-width // tile) * -(-height // tile)
    cuda = feats.device.type == "cuda"
    n = capacity if cuda and capacity is not None else torch.library.get_ctx().new_dynamic_size()
    i32, i64 = dict(dtype=torch.int32), dict(dtype=torch.int64)
    return (feats.new_empty(I, height, width, D), feats.new_empty(I, height, width),
            feats.new_empty(I, height, width, **i32), feats.new_empty(I * tiles + 1, **i64), feats.new_empty(n, **i32),
            feats.new_empty(n if cuda else 0, **i32), feats.new_empty(I * N + 1 if cuda else 0, **i64),
            feats.new_empty((), **i64), torch.empty_like(means2d))


@torch.library.custom_op("fast3d::gs_rasterize_bwd", mutates_args=())
def gs_rasterize_bwd(means2d: Tensor, conics: Tensor, opac: Tensor, feats: Tensor, radii: Tensor,
                     tile_offsets: Tensor, flat_ids: Tensor, isect_src: Tensor, gauss_offsets: Tensor, alpha: Tensor,
                     last: Tensor, g_image: Tensor, g_alpha: Tensor, width: int, height: int,
                     deterministic: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # -> g_means2d [I,N,2], g_conics [I,N,3], g_opac [I,N], g_feats [I,N,D], absgrad [I,N,2]
    return _native.module().gs_rasterize_backward(means2d, conics, opac, feats, radii, tile_offsets, flat_ids,
                                                  isect_src, gauss_offsets, alpha, last, g_image, g_alpha, width,
                                                  height, deterministic, None)


@gs_rasterize_bwd.register_fake
def _(means2d, conics, opac, feats, *rest):
    return (torch.empty_like(means2d), torch.empty_like(conics), torch.empty_like(opac), torch.empty_like(feats),
            torch.empty_like(means2d))


def _rasterize_setup(ctx, inputs, output):
    means2d, conics, opac, feats, depths, radii, width, height, deterministic, capacity = inputs
    image, alpha, last, tile_offsets, flat_ids, isect_src, gauss_offsets, n_isect, absgrad = output
    ctx.save_for_backward(means2d, conics, opac, feats, radii, tile_offsets, flat_ids, isect_src, gauss_offsets,
                          alpha, last)
    ctx.args = (width, height, deterministic)
    ctx.absgrad = absgrad  # filled by the backward (meta["means2d"].absgrad)


def _rasterize_backward(ctx, g_image, g_alpha, *unused):
    means2d, conics, opac, feats, radii, tile_offsets, flat_ids, isect_src, gauss_offsets, alpha, last = \
        ctx.saved_tensors
    g_image = _zeros_if_none(g_image, feats.new_empty(*alpha.shape, feats.shape[-1]))
    g_alpha = _zeros_if_none(g_alpha, alpha)
    g_m2, g_con, g_op, g_f, absgrad = gs_rasterize_bwd(means2d, conics, opac, feats, radii, tile_offsets, flat_ids,
                                                        isect_src, gauss_offsets, alpha, last, g_image, g_alpha,
                                                        *ctx.args)
    if not torch.compiler.is_compiling():
        ctx.absgrad.copy_(absgrad)
    return g_m2, g_con, g_op, g_f, None, None, None, None, None, None


gs_rasterize.register_autograd(_rasterize_backward, setup_context=_rasterize_setup)


def project_stage(means: Tensor,      # [B, N, 3]
                  quats: Tensor,      # [B, N, 4]
                  scales: Tensor,     # [B, N, 3]
                  opacities: Tensor,  # [B, N]
                  viewmats: Tensor,   # [B, C, 4, 4]
                  Ks: Tensor,         # [B, C, 3, 3]
                  width: int, height: int, near: float, far: float, eps2d: float, antialiased: bool,
                  camera_model: str = "pinhole"):
    """Projection stage (``fast3d::gs_project``, pinhole or orthographic); contract of
    :class:`.stages.RasterStages`."""
    viewmats, Ks = viewmats.detach().contiguous(), Ks.detach().contiguous()
    means, quats, scales, opacities = (x.contiguous() for x in (means, quats, scales, opacities))
    return gs_project(means, quats, scales, opacities, viewmats, Ks, width, height, near, far, eps2d, antialiased,
                      camera_model == "ortho")


def sh_stage(sh: Tensor,        # [B, N, K, 3]
             means: Tensor,     # [B, N, 3]
             viewmats: Tensor,  # [B, C, 4, 4]
             degree: int) -> Tensor:  # [B, C, N, 3]
    """SH stage (``fast3d::gs_sh``)."""
    return gs_sh(sh.contiguous(), means.contiguous(), viewmats.detach().contiguous(), degree)


def rasterize_stage(means2d: Tensor,  # [I, N, 2]
                    conics: Tensor,   # [I, N, 3]
                    opac: Tensor,     # [I, N]
                    feats: Tensor,    # [I, N, D]
                    depths: Tensor,   # [I, N]
                    radii: Tensor,    # [I, N, 2] int32
                    width: int, height: int, deterministic: bool, capacity: int | None, absgrad: bool):
    """Binning + blending stage (``fast3d::gs_rasterize``). With a capacity, CUDA bins at most that
    many intersections and never synchronises with the host; the CPU ignores it (it always bins
    and renders every intersection)."""
    image, alpha, *_, n_isect, absgrad_buf = gs_rasterize(
        means2d.contiguous(), conics.contiguous(), opac.contiguous(), feats.contiguous(), depths.detach().contiguous(),
        radii.contiguous(), width, height, deterministic, capacity)
    return image, alpha[..., None], n_isect, absgrad_buf if absgrad else None
