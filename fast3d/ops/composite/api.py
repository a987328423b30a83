"""fast3d.composite: NeRF emission-absorption compositing of sampled rays, forward and backward."""

from __future__ import annotations

from torch import Tensor

from fast3d import backends
from fast3d.ops import _validate as v
from fast3d.ops._profiling import op_range

OP = "composite"
# The feature of a backend whose fn also takes the packed form, 1-D samples [M] with
# packed_info=[R, 2] (first sample, count per ray), walking each ray's own range; the packed
# path pads to a dense [R, S] block for every other backend.
PACKED_NATIVE = "packed_native"


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
    """Composite R rays of S samples front to back (NeRF emission-absorption), forward and backward.

    alpha_i = 1 - exp(-sigma_i (t_end_i - t_start_i)),  w_i = alpha_i prod_{j<i} (1 - alpha_j);
    :mod:`fast3d.ops.composite.reference` is the specification every backend is tested against.

    .. note::
        **Early termination.** Samples whose transmittance T_i = prod_{j<i} (1 - alpha_j) is below
        ``transmittance_eps`` get zero weight.

    .. note::
        **Packed rays** (rays of different lengths, nerfacc's layout): ``sigmas``, ``rgbs``,
        ``t_starts``, ``t_ends`` hold the M samples of all rays, flat, each ray's samples
        contiguous and front to back, described by ``ray_indices`` (each sample's ray) or by
        ``packed_info`` (each ray's first sample and count); the weights come back packed, [M]
        (:mod:`fast3d.ops.composite.packed`).

    .. note::
        **Gradients** flow to sigmas, rgbs and background; the sample intervals are constants.

    Args:
        sigmas: densities, post-activation. [R, S]; packed: [M]
        rgbs: sample colours (any D channels). [R, S, D]; packed: [M, D]
        t_starts, t_ends: each sample's interval along its ray. [R, S]; packed: [M]
        background: colour added with weight 1 - opacity, per ray [R, D] or shared [D]; None for
            none.
        transmittance_eps: the early-termination threshold, in [0, 1). Default 1e-4.
        backend: "auto" (the fastest that serves the inputs), "torch", "cpu", "cuda" or "triton".
        ray_indices: packed form: each sample's ray, non-decreasing, int32/int64. [M]
        packed_info: packed form: each ray's (first sample, sample count), int. [R, 2]
        n_rays: with ``ray_indices``: R, to count trailing rays that have no sample (default: the
            last index + 1).

    Returns:
        A tuple:

        - **color**: sum_i w_i rgb_i (+ (1 - opacity) background). [R, D]
        - **opacity**: sum_i w_i. [R, 1]
        - **depth**: sum_i w_i (t_start_i + t_end_i) / 2 (not divided by opacity). [R, 1]
        - **weights**: w_i. [R, S]; packed: [M]
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
    impl = _select(backend, sigmas)
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


def _select(backend: str, sigmas: Tensor) -> backends.Backend:
    return backends.select(OP, backend, backends.Query(device=sigmas.device, dtype=sigmas.dtype))


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
    impl = _select(backend, sigmas)
    if PACKED_NATIVE in impl.features:   # walks each ray's own sample range: no padded block
        with op_range(f"{OP}[packed, {impl.name}]", sigmas.device):
            return impl.fn(sigmas, rgbs, t_starts, t_ends, background, transmittance_eps, packed_info=info)
    mask, index, (s, c, t0, t1) = packed.pad(info, sigmas, rgbs, t_starts, t_ends)
    color, opacity, depth, w = composite(s, c, t0, t1, background, transmittance_eps, impl.name)
    weights = w.new_zeros(M).index_put((index[mask],), w[mask])
    return color, opacity, depth, weights
