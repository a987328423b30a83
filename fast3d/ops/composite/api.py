"""fast3d.composite: NeRF emission-absorption compositing of sampled rays, forward and backward."""

from __future__ import annotations

import torch
from torch import Tensor

from fast3d import backends
from fast3d.ops import _validate as v
from fast3d.ops._profiling import op_range

OP = "composite"


def composite(sigmas: Tensor,                   # [R, S] densities (post-activation)
              rgbs: Tensor,                     # [R, S, D] sample colours
              t_starts: Tensor,                 # [R, S] sample interval starts along the ray
              t_ends: Tensor,                   # [R, S] sample interval ends
              background: Tensor | None = None,  # [R, D] or [D]
              transmittance_eps: float = 1e-4,
              backend: str = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Composite R rays of S samples front to back (NeRF emission-absorption).

    alpha_i = 1 - exp(-sigma_i (t_end_i - t_start_i)), w_i = alpha_i prod_{j<i} (1 - alpha_j);
    samples after the transmittance falls below ``transmittance_eps`` get zero weight.

    Returns color [R, D] (plus ``(1 - opacity) * background``), opacity [R, 1],
    depth [R, 1] (weighted interval midpoints) and weights [R, S]. Gradients flow to sigmas, rgbs
    and background; the sample intervals are constants.
    """
    v.tensor("sigmas", sigmas, dims=2)
    R, S = sigmas.shape
    v.tensor("rgbs", rgbs, dims=3)
    if rgbs.shape[:2] != (R, S):
        raise ValueError(f"rgbs must have shape [R, S, D] with [R, S] = {(R, S)} from sigmas; got {tuple(rgbs.shape)}")
    v.tensor("t_starts", t_starts, dims=2)
    v.same_shape("t_starts", t_starts, (R, S), "[R, S] of sigmas")
    v.tensor("t_ends", t_ends, dims=2)
    v.same_shape("t_ends", t_ends, (R, S), "[R, S] of sigmas")
    D = rgbs.shape[2]
    if background is not None:
        v.tensor("background", background)
        if tuple(background.shape) not in ((D,), (R, D)):
            raise ValueError(f"background must have shape [D] = ({D},) or [R, D] = {(R, D)}; "
                             f"got {tuple(background.shape)}")
    v.same_device_dtype("sigmas", sigmas, rgbs=rgbs, t_starts=t_starts, t_ends=t_ends, background=background)
    transmittance_eps = v.real_in("transmittance_eps", transmittance_eps, 0.0, 1.0)
    v.finite("t_starts", t_starts)
    v.finite("t_ends", t_ends)

    q = backends.Query(device=sigmas.device, dtype=sigmas.dtype,
                       requires_grad=torch.is_grad_enabled() and any(
                           x is not None and x.requires_grad for x in (sigmas, rgbs, background)))
    impl = backends.select(OP, backend, q)
    with op_range(f"{OP}[{impl.name}]", sigmas.device):
        return impl.fn(sigmas, rgbs, t_starts, t_ends, background, transmittance_eps)
