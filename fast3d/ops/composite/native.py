"""The `cpu` (C++/OpenMP) and `cuda` backends of composite, as torch custom ops.

`fast3d::composite_fwd` / `fast3d::composite_bwd` wrap fast3d._C with fake (meta) implementations
and registered autograd, so they trace under torch.compile without graph breaks.
"""


import torch
from torch import Tensor

from fast3d import _native


@torch.library.custom_op("fast3d::composite_fwd", mutates_args=())
def composite_fwd(sigmas: Tensor, rgbs: Tensor, t_starts: Tensor, t_ends: Tensor, background: Tensor | None,
                  eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # -> color [R, D], opacity [R], depth [R], weights [R, S]
    return _native.module().composite_forward(sigmas, rgbs, t_starts, t_ends, background, eps)


@composite_fwd.register_fake
def _(sigmas, rgbs, t_starts, t_ends, background, eps):
    R, S, D = rgbs.shape
    return sigmas.new_empty(R, D), sigmas.new_empty(R), sigmas.new_empty(R), sigmas.new_empty(R, S)


@torch.library.custom_op("fast3d::composite_bwd", mutates_args=())
def composite_bwd(sigmas: Tensor, rgbs: Tensor, t_starts: Tensor, t_ends: Tensor, background: Tensor | None,
                  eps: float, opacity: Tensor, g_color: Tensor, g_opacity: Tensor, g_depth: Tensor,
                  g_weights: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    # -> g_sigmas [R, S], g_rgbs [R, S, D], g_background [R, D] per ray ([0] without background)
    return _native.module().composite_backward(sigmas, rgbs, t_starts, t_ends, background, eps, opacity,
                                                g_color, g_opacity, g_depth, g_weights)


@composite_bwd.register_fake
def _(sigmas, rgbs, t_starts, t_ends, background, eps, opacity, g_color, g_opacity, g_depth, g_weights):
    R, S, D = rgbs.shape
    g_bg = sigmas.new_empty(R, D) if background is not None else sigmas.new_empty(0)
    return torch.empty_like(sigmas), torch.empty_like(rgbs), g_bg


def _setup_context(ctx, inputs, output):
    sigmas, rgbs, t_starts, t_ends, background, eps = inputs
    ctx.save_for_backward(sigmas, rgbs, t_starts, t_ends, background, output[1])
    ctx.eps = eps
    ctx.bg_shape = None if background is None else background.shape
    ctx.set_materialize_grads(False)  # unused outputs give None, not zero tensors to read


def _backward(ctx, g_color, g_opacity, g_depth, g_weights):
    sigmas, rgbs, t_starts, t_ends, background, opacity = ctx.saved_tensors
    R, S, D = rgbs.shape
    # Outputs that did not reach the loss come as None: they contribute nothing.
    g_color = sigmas.new_zeros(R, D) if g_color is None else g_color.contiguous()
    g_opacity = sigmas.new_zeros(R) if g_opacity is None else g_opacity.contiguous()
    g_depth = sigmas.new_zeros(R) if g_depth is None else g_depth.contiguous()
    g_weights = None if g_weights is None else g_weights.contiguous()
    g_sigmas, g_rgbs, g_bg = composite_bwd(sigmas, rgbs, t_starts, t_ends, background, ctx.eps, opacity,
                                           g_color, g_opacity, g_depth, g_weights)
    if background is None:
        g_bg = None
    elif len(ctx.bg_shape) == 1:  # one background shared by all rays
        g_bg = g_bg.sum(0)
    return g_sigmas, g_rgbs, None, None, g_bg, None


composite_fwd.register_autograd(_backward, setup_context=_setup_context)


def composite(sigmas: Tensor,            # [R, S]
              rgbs: Tensor,              # [R, S, D]
              t_starts: Tensor,          # [R, S]
              t_ends: Tensor,            # [R, S]
              background: Tensor | None,  # [R, D] or [D]
              transmittance_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as reference.composite; inputs contiguous, float32 (or float64 on the CPU)."""
    color, opacity, depth, weights = composite_fwd(
        sigmas.contiguous(), rgbs.contiguous(), t_starts.contiguous(), t_ends.contiguous(),
        None if background is None else background.contiguous(), float(transmittance_eps))
    return color, opacity[:, None], depth[:, None], weights
