"""fast3d.composite: NeRF emission-absorption compositing of sampled rays, forward and backward."""

from __future__ import annotations

import torch
from torch import Tensor

from fast3d import backends
from fast3d.ops import _validate as v
from fast3d.ops._profiling import op_range

OP = "composite"


def composite(sigmas: Tensor,                   # [R, S] densities (post-activation); packed: [M]
              rgbs: Tensor,                     # [R, S, D] sample colours; packed: [M, D]
              t_starts: Tensor,                 # [R, S] sample interval starts along the ray; packed: [M]
              t_ends: Tensor,                   # [R, S] sample interval ends; packed: [M]
              background: Tensor | None = None,  # [R, D] or [D]
              transmittance_eps: float = 1e-4,
              backend: str = "auto", *,
              ray_indices: Tensor | None = None,  # packed: [M] int, each sample's ray, non-decreasing
              packed_info: Tensor | None = None,  # packed: [R, 2] int, each ray's (first sample, count)
              n_rays: int | None = None,          # packed with ray_indices: R (default: last index + 1)
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Composite R rays of S samples front to back (NeRF emission-absorption).

    alpha_i = 1 - exp(-sigma_i (t_end_i - t_start_i)), w_i = alpha_i prod_{j<i} (1 - alpha_j);
    samples after the transmittance falls below ``transmittance_eps`` get zero weight.

    Returns color [R, D] (plus ``(1 - opacity) * background``), opacity [R, 1],
    depth [R, 1] (weighted interval midpoints) and weights [R, S]. Gradients flow to sigmas, rgbs
    and background; the sample intervals are constants.

    Packed form (rays of different lengths, nerfacc's layout): flat samples [M] with either
    ``ray_indices`` or ``packed_info``; weights come back packed, [M] (fast3d.ops.composite.packed).
    """
    if ray_indices is not None or packed_info is not None:
        return _composite_packed(sigmas, rgbs, t_starts, t_ends, background, transmittance_eps, backend,
                                 ray_indices, packed_info, n_rays)
    if n_rays is not None:
        raise ValueError("n_rays goes with ray_indices (the packed form); got it without")
    v.tensor("sigmas", sigmas, dims=2)
    R, S = sigmas.shape
    v.tensor("rgbs", rgbs, dims=3)
    if rgbs.shape[:2] != (R, S):
        raise ValueError(f"rgbs must have shape [R, S, D] with [R, S] = {(R, S)} from sigmas; got {tuple(rgbs.shape)}")
    v.tensor("t_starts", t_starts, dims=2)
    v.same_shape("t_starts", t_starts, (R, S), "[R, S] of sigmas")
    v.tensor("t_ends", t_ends, dims=2)
    v.same_shape("t_ends", t_ends, (R, S), "[R, S] of sigmas")
    transmittance_eps = _check_common(sigmas, rgbs, t_starts, t_ends, background, R, transmittance_eps)
    impl = _select(backend, sigmas, rgbs, background)
    with op_range(f"{OP}[{impl.name}]", sigmas.device):
        return impl.fn(sigmas, rgbs, t_starts, t_ends, background, transmittance_eps)


def _check_common(sigmas, rgbs, t_starts, t_ends, background, R: int, transmittance_eps) -> float:
    """Background shape, one device and dtype, finite intervals, eps in (0, 1): the checks the
    dense and packed forms share. Returns eps as a float."""
    D = rgbs.shape[-1]
    if background is not None:
        v.tensor("background", background)
        if tuple(background.shape) not in ((D,), (R, D)):
            raise ValueError(f"background must have shape [D] = ({D},) or [R, D] = {(R, D)}; "
                             f"got {tuple(background.shape)}")
    v.same_device_dtype("sigmas", sigmas, rgbs=rgbs, t_starts=t_starts, t_ends=t_ends, background=background)
    transmittance_eps = v.real_in("transmittance_eps", transmittance_eps, 0.0, 1.0)
    v.finite("t_starts", t_starts)
    v.finite("t_ends", t_ends)
    return transmittance_eps


def _select(backend: str, sigmas: Tensor, rgbs: Tensor, background: Tensor | None) -> backends.Backend:
    q = backends.Query(device=sigmas.device, dtype=sigmas.dtype,
                       requires_grad=torch.is_grad_enabled() and any(
                           x is not None and x.requires_grad for x in (sigmas, rgbs, background)))
    return backends.select(OP, backend, q)


def _composite_packed(sigmas, rgbs, t_starts, t_ends, background, transmittance_eps, backend,
                      ray_indices, packed_info, n_rays):
    from fast3d.ops.composite import packed

    if ray_indices is not None and packed_info is not None:
        raise ValueError("give ray_indices or packed_info, not both")
    v.tensor("sigmas", sigmas, dims=1)
    M = sigmas.shape[0]
    v.tensor("rgbs", rgbs, dims=2)
    for name, x, shape in (("rgbs", rgbs, (M, rgbs.shape[-1])), ("t_starts", t_starts, (M,)), ("t_ends", t_ends, (M,))):
        if tuple(x.shape) != shape:
            raise ValueError(f"packed {name} must have shape {list(shape)} (M = {M} samples from sigmas); "
                             f"got {tuple(x.shape)}")
    if ray_indices is not None:
        if ray_indices.shape != (M,):
            raise ValueError(f"ray_indices must have shape [M] = [{M}]; got {tuple(ray_indices.shape)}")
        info = packed.packed_info_of(ray_indices, n_rays)
    else:
        if n_rays is not None:
            raise ValueError("n_rays goes with ray_indices; packed_info already gives R")
        info = packed.check_packed_info(packed_info, M)
    info = info.to(sigmas.device)
    R = info.shape[0]
    transmittance_eps = _check_common(sigmas, rgbs, t_starts, t_ends, background, R, transmittance_eps)
    impl = _select(backend, sigmas, rgbs, background)
    if impl.name == "triton":   # walks each ray's own sample range: no padded block
        from fast3d.ops.composite import triton as composite_triton

        with op_range(f"{OP}[packed, {impl.name}]", sigmas.device):
            return composite_triton.composite_packed(sigmas, rgbs, t_starts, t_ends, info, background,
                                                     transmittance_eps)
    mask, index, (s, c, t0, t1) = packed.pad(info, sigmas, rgbs, t_starts, t_ends)
    color, opacity, depth, w = composite(s, c, t0, t1, background, transmittance_eps, impl.name)
    weights = w.new_zeros(M).index_put((index[mask],), w[mask])
    return color, opacity, depth, weights
