"""The packed form of composite (rays of different lengths, as nerfacc): samples of all rays in one
flat array, ray r's samples contiguous and in front-to-back order, described by ``ray_indices``
(the ray of each sample, non-decreasing) or ``packed_info`` (per ray: first sample, count).

The `triton` backend composites the packed samples in place (each program walks its rays' own
ranges). For the other backends the samples are scattered into a zero-padded [R, S_max] block and
composited by the dense op; a padded slot has zero density over a zero-length interval, which adds
nothing to any output or gradient, and the block costs R x S_max elements.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fast3d.ops import _validate as v


def packed_info_of(ray_indices: Tensor,  # [M] int, non-decreasing
                   n_rays: int | None) -> Tensor:  # -> [R, 2] (first sample, count)
    v.tensor("ray_indices", ray_indices, dims=1, floating=False)
    if ray_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ray_indices must be an int32/int64 tensor; got {ray_indices.dtype}")
    M = ray_indices.shape[0]
    if M and bool((ray_indices[1:] < ray_indices[:-1]).any()):
        raise ValueError("ray_indices must be non-decreasing (each ray's samples contiguous, front to back)")
    if M and int(ray_indices[0]) < 0:
        raise ValueError(f"ray_indices must be >= 0; got {int(ray_indices[0])}")
    top = int(ray_indices[-1]) + 1 if M else 0
    R = top if n_rays is None else int(n_rays)
    if R < top:
        raise ValueError(f"n_rays={n_rays} but ray_indices reaches ray {top - 1}")
    counts = torch.bincount(ray_indices.long(), minlength=R)
    starts = torch.cumsum(counts, 0) - counts
    return torch.stack([starts, counts], 1)


def check_packed_info(packed_info: Tensor,  # [R, 2] (first sample, count)
                      M: int) -> Tensor:
    v.tensor("packed_info", packed_info, dims=2, floating=False)
    if packed_info.shape[1] != 2 or packed_info.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"packed_info must be an int tensor [R, 2] of (first sample, count); "
                         f"got {packed_info.dtype} {tuple(packed_info.shape)}")
    p = packed_info.long()
    starts, counts = p[:, 0], p[:, 1]
    if bool((counts < 0).any()) or bool((starts < 0).any()) or bool((starts + counts > M).any()):
        raise ValueError(f"packed_info must have starts >= 0, counts >= 0 and start + count <= {M} samples")
    return p


def pad(packed_info: Tensor,  # [R, 2] int64
        *flat: Tensor,        # each [M, ...]
        ) -> tuple[Tensor, Tensor, list[Tensor]]:  # -> mask [R, S], index [R, S], padded [R, S, ...] each
    """The padded block: ``index[r, j]`` is the flat sample of slot j of ray r (0 where masked)."""
    starts, counts = packed_info[:, 0], packed_info[:, 1]
    S = max(1, int(counts.max())) if counts.numel() else 1
    j = torch.arange(S, device=starts.device)
    mask = j[None] < counts[:, None]                                   # [R, S]
    index = torch.where(mask, starts[:, None] + j[None], torch.zeros_like(starts)[:, None])
    out = []
    for x in flat:
        g = x[index.reshape(-1)].reshape(*index.shape, *x.shape[1:]) if x.shape[0] else \
            x.new_zeros(*index.shape, *x.shape[1:])
        m = mask.reshape(*mask.shape, *([1] * (x.dim() - 1)))
        out.append(torch.where(m, g, torch.zeros_like(g)))
    return mask, index, out
