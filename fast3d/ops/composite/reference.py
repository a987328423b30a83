"""Pure-PyTorch twin of :func:`fast3d.composite`: the executable specification.

NeRF emission-absorption compositing of R rays with S samples each, written as OpenLRM and nerfacc
write it (cumprod over the samples), differentiable by autograd, any device, float64 included:

    alpha_i = 1 - exp(-sigma_i (t_end_i - t_start_i))
    T_i     = prod_{j<i} (1 - alpha_j)                         (exclusive cumulative product)
    w_i     = alpha_i T_i  where T_i >= transmittance_eps, else 0
    color   = sum_i w_i rgb_i + (1 - opacity) background
    opacity = sum_i w_i
    depth   = sum_i w_i (t_start_i + t_end_i) / 2

t_starts and t_ends are constants (no gradient), as in the kernels. Half-precision inputs are
computed in float32 and the outputs cast back (in bf16, 1 - exp(-tau) alone loses 2^-9 per sample).
"""

from __future__ import annotations

import torch
from torch import Tensor


def composite(sigmas: Tensor,            # [R, S]
              rgbs: Tensor,              # [R, S, D]
              t_starts: Tensor,          # [R, S]
              t_ends: Tensor,            # [R, S]
              background: Tensor | None,  # [R, D] or [D] or None
              transmittance_eps: float,
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns color [R, D], opacity [R, 1], depth [R, 1], weights [R, S]."""
    dtype = sigmas.dtype
    if dtype in (torch.float16, torch.bfloat16):
        up = [None if x is None else x.float() for x in (sigmas, rgbs, t_starts, t_ends, background)]
        return tuple(o.to(dtype) for o in composite(*up, transmittance_eps))
    t_starts, t_ends = t_starts.detach(), t_ends.detach()
    alphas = 1.0 - torch.exp(-sigmas * (t_ends - t_starts))                 # [R, S]
    trans = torch.cumprod(1.0 - alphas, dim=-1)                              # T_{i+1}
    trans = torch.cat([torch.ones_like(trans[:, :1]), trans[:, :-1]], -1)   # T_i, [R, S]
    weights = alphas * trans * (trans >= transmittance_eps)                  # [R, S]
    opacity = weights.sum(-1, keepdim=True)                                  # [R, 1]
    color = (weights[..., None] * rgbs).sum(-2)                              # [R, D]
    if background is not None:
        color = color + (1.0 - opacity) * background
    depth = (weights * (t_starts + t_ends) * 0.5).sum(-1, keepdim=True)     # [R, 1]
    return color, opacity, depth, weights
