"""The `triton` backend of composite: a block of rays per program, samples in tiles.

Transmittance by a running sum of optical depth, T_i = exp(-sum_{j<i} tau_j) (tl.cumsum inside a
tile plus a carry across tiles): the same quantity as composite_math.h's product of (1 - alpha_j),
reached by a scan instead of a sequential loop. Rays whose transmittance is already below
transmittance_eps at a tile's start skip that tile's loads (early termination).

Backward (derivation in csrc/composite/composite_math.h): dL/dtau_k = g_k T_{k+1} - sum_{i>k} g_i w_i
with g_i = <dcolor, rgb_i> + (dopacity - <dcolor, bg>) + ddepth mid_i + dweights_i. The total
G = sum_i g_i w_i is read off the saved forward outputs instead of a first pass over the ray:
G = <dcolor, color> - <dcolor, bg> + dopacity opacity + ddepth depth + <dweights, weights>,
so the backward is one pass (suffix = G - inclusive prefix).

Layouts: dense (ray r's samples are r S .. r S + S - 1) or packed (nerfacc's: per ray its first
sample and count, rays in any order, no padding); a program's tile loop runs to the longest ray
of its block. Colour channels are walked in chunks of at most MAX_BLOCK_D, so any D compiles to
the same register footprint (D <= 16, the common case, is one chunk).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fast3d import backends
from fast3d.ops._triton_math import one_minus_exp_neg, rne

BLOCK_R = 16
BLOCK_S = 32
MAX_BLOCK_D = 16   # wider rgbs are walked in chunks of 16 channels: registers stay bounded for any D


@triton.jit
def _rays(info_ptr, R, S, PACKED: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's rays: (rows, mask, first sample, sample count, longest count in the block).
    Dense: ray r's samples are r S .. r S + S - 1; packed: info [R, 2] int64 (first, count)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    if PACKED:
        start = tl.load(info_ptr + rows * 2, mask=mask_r, other=0)
        count = tl.load(info_ptr + rows * 2 + 1, mask=mask_r, other=0)
    else:
        start = rows.to(tl.int64) * S
        count = tl.where(mask_r, S, 0)
    return rows, mask_r, start, count, tl.max(count)


@triton.jit
def _tile(sigma_ptr, t0_ptr, t1_ptr, mask_r, start, count, s0, carry, eps, BLOCK_S: tl.constexpr):
    """One tile of samples: (in-range mask, live mask, flat offsets, dt, mid, tau, optical depth
    through sample i, T_{i+1}, w), each [BLOCK_R, BLOCK_S]."""
    cols = s0 + tl.arange(0, BLOCK_S)
    in_range = mask_r[:, None] & (cols[None, :] < count[:, None])
    # Rays already below the cut-off load nothing more.
    m = in_range & (tl.exp(-carry) >= eps)[:, None]
    off = start[:, None] + cols[None, :]
    sig = tl.load(sigma_ptr + off, mask=m, other=0.0).to(tl.float32)
    a = tl.load(t0_ptr + off, mask=m, other=0.0).to(tl.float32)
    b = tl.load(t1_ptr + off, mask=m, other=0.0).to(tl.float32)
    dt = b - a
    tau = sig * dt
    incl = tl.cumsum(tau, axis=1) + carry[:, None]   # optical depth through sample i
    T = tl.exp(-(incl - tau))                        # T_i
    T_next = tl.exp(-incl)                           # T_{i+1}
    live = m & (T >= eps)
    alpha = one_minus_exp_neg(tau)
    w = tl.where(live, alpha * T, 0.0)
    return in_range, live, off, dt, 0.5 * (a + b), tau, incl, T_next, w


@triton.jit
def _composite_fwd(sigma_ptr, rgb_ptr, t0_ptr, t1_ptr,   # [M], [M, D], [M], [M]: dense M = R S
                   info_ptr,                              # [R, 2] int64 (first, count) if PACKED
                   bg_ptr, bg_stride,                     # [R, D] (stride D) or [D] (stride 0)
                   color_ptr, opacity_ptr, depth_ptr, weights_ptr,  # [R, D], [R], [R], [M]
                   R, S, D, eps,
                   PACKED: tl.constexpr, HAS_BG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    rows, mask_r, start, count, longest = _rays(info_ptr, R, S, PACKED, BLOCK_R)
    ds0 = tl.arange(0, BLOCK_D)
    # Channel chunks outside, sample tiles inside: the first chunk also writes opacity, depth and
    # the weights; later chunks (D > BLOCK_D only) recompute the weights, which costs sigma and t loads.
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + ds0
        mask_d = ds < D
        first = d0 == 0
        carry = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc_c = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        depth_end = tl.zeros([BLOCK_R], dtype=tl.float32)   # optical depth through the last live sample
        acc_z = tl.zeros([BLOCK_R], dtype=tl.float32)
        for s0 in range(0, longest, BLOCK_S):
            in_range, live, off, dt, mid, tau, incl, T_next, w = _tile(sigma_ptr, t0_ptr, t1_ptr, mask_r, start,
                                                                       count, s0, carry, eps, BLOCK_S)
            tl.store(weights_ptr + off, rne(w, weights_ptr.dtype.element_ty), mask=in_range & first)
            depth_end = tl.maximum(depth_end, tl.max(tl.where(live, incl, 0.0), axis=1))
            acc_z += tl.sum(w * mid, axis=1)
            m3 = live[:, :, None] & mask_d[None, None, :]
            rgb = tl.load(rgb_ptr + off[:, :, None] * D + ds[None, None, :], mask=m3, other=0.0).to(tl.float32)
            acc_c += tl.sum(w[:, :, None] * rgb, axis=1)
            carry += tl.sum(tau, axis=1)
        # opacity = sum_i w_i = 1 - T_{k+1} (k the last live sample; the live samples are a prefix):
        # read off the optical depth rather than summed, so an opaque ray's is 1 to the rounding of
        # one exp, not of S float32 additions (the background's weight 1 - opacity is then 0 too),
        # and a thin ray's keeps its relative precision (no 1 - exp cancellation).
        acc_o = one_minus_exp_neg(depth_end)
        md = mask_r[:, None] & mask_d[None, :]
        if HAS_BG:
            bg = tl.load(bg_ptr + rows[:, None].to(tl.int64) * bg_stride + ds[None, :], mask=md,
                         other=0.0).to(tl.float32)
            acc_c += (1.0 - acc_o)[:, None] * bg
        tl.store(color_ptr + rows[:, None].to(tl.int64) * D + ds[None, :], acc_c.to(color_ptr.dtype.element_ty),
                 mask=md)
        tl.store(opacity_ptr + rows, acc_o.to(opacity_ptr.dtype.element_ty), mask=mask_r & first)
        tl.store(depth_ptr + rows, acc_z.to(depth_ptr.dtype.element_ty), mask=mask_r & first)


@triton.jit
def _composite_bwd(sigma_ptr, rgb_ptr, t0_ptr, t1_ptr,   # [M], [M, D], [M], [M]
                   info_ptr,                              # [R, 2] int64 if PACKED
                   g_color_ptr, g_open_ptr, g_depth_ptr,  # [R, D], [R], [R] (float32)
                   g_weights_ptr, total_ptr,              # [M] (if HAS_GW), [R] G of each ray (float32)
                   g_sigma_ptr, g_rgb_ptr,                # [M], [M, D]
                   R, S, D, eps,
                   PACKED: tl.constexpr, HAS_GW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    rows, mask_r, start, count, longest = _rays(info_ptr, R, S, PACKED, BLOCK_R)
    ds0 = tl.arange(0, BLOCK_D)
    g_open = tl.load(g_open_ptr + rows, mask=mask_r, other=0.0)
    g_depth = tl.load(g_depth_ptr + rows, mask=mask_r, other=0.0)
    total = tl.load(total_ptr + rows, mask=mask_r, other=0.0)
    carry = tl.zeros([BLOCK_R], dtype=tl.float32)
    prefix = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s0 in range(0, longest, BLOCK_S):
        in_range, live, off, dt, mid, tau, incl, T_next, w = _tile(sigma_ptr, t0_ptr, t1_ptr, mask_r, start,
                                                                   count, s0, carry, eps, BLOCK_S)
        g = g_open[:, None] + g_depth[:, None] * mid
        for d0 in range(0, D, BLOCK_D):                   # g += <dcolor, rgb_i>, a chunk at a time
            ds = d0 + ds0
            mask_d = ds < D
            gc = tl.load(g_color_ptr + rows[:, None].to(tl.int64) * D + ds[None, :],
                         mask=mask_r[:, None] & mask_d[None, :], other=0.0)
            rgb = tl.load(rgb_ptr + off[:, :, None] * D + ds[None, None, :],
                          mask=live[:, :, None] & mask_d[None, None, :], other=0.0).to(tl.float32)
            g += tl.sum(gc[:, None, :] * rgb, axis=2)
            # dL/drgb_i = w_i dcolor
            tl.store(g_rgb_ptr + off[:, :, None] * D + ds[None, None, :],
                     rne(gc[:, None, :] * w[:, :, None], g_rgb_ptr.dtype.element_ty),
                     mask=in_range[:, :, None] & mask_d[None, None, :])
        if HAS_GW:
            g += tl.load(g_weights_ptr + off, mask=live, other=0.0).to(tl.float32)
        gw = g * w
        incl = tl.cumsum(gw, axis=1) + prefix[:, None]   # sum_{i<=k} g_i w_i
        g_sig = tl.where(live, (g * T_next - (total[:, None] - incl)) * dt, 0.0)
        tl.store(g_sigma_ptr + off, rne(g_sig, g_sigma_ptr.dtype.element_ty), mask=in_range)
        prefix += tl.sum(gw, axis=1)
        carry += tl.sum(tau, axis=1)


def _block_d(D: int) -> int:
    return min(max(triton.next_power_of_2(D), 1), MAX_BLOCK_D)


def _launch_meta(packed_info: Tensor | None, D: int) -> dict:
    # A channel chunk wider than 4 makes [BLOCK_R, BLOCK_S, BLOCK_D] tiles of 8192 values: 8 warps
    # hold them in registers where 4 spill (the compile test prints the spill stack).
    block_d = _block_d(D)
    return dict(PACKED=packed_info is not None, BLOCK_R=BLOCK_R, BLOCK_S=BLOCK_S, BLOCK_D=block_d,
                num_warps=4 if block_d <= 4 else 8)


@torch.library.custom_op("fast3d::composite_triton_fwd", mutates_args=())
def composite_fwd(sigmas: Tensor, rgbs: Tensor, t_starts: Tensor, t_ends: Tensor, packed_info: Tensor | None,
                  R: int, S: int, background: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # contiguous flat samples sigmas [M], rgbs [M, D], t_starts, t_ends [M]: dense M = R S (ray r's
    # samples r S ..), or packed by packed_info [R, 2] int64 (first, count)
    # -> color [R, D], opacity [R], depth [R] (float32: the backward reads them, and half-precision
    # rounding of the opacity would bias the background gradient), weights [M]
    M, D = rgbs.shape
    f32 = torch.float32
    color, opacity, depth = (sigmas.new_empty(R, D, dtype=f32), sigmas.new_empty(R, dtype=f32),
                             sigmas.new_empty(R, dtype=f32))
    weights = sigmas.new_zeros(M)   # samples of no ray (packed) stay zero
    if R == 0:
        return color, opacity, depth, weights
    bg_stride = 0 if background is None or background.dim() == 1 else D
    with backends.cuda_device_guard(sigmas.device):
        _composite_fwd[(triton.cdiv(R, BLOCK_R),)](
            sigmas, rgbs, t_starts, t_ends, packed_info if packed_info is not None else sigmas,
            background if background is not None else sigmas, bg_stride,
            color, opacity, depth, weights, R, S, D, eps, HAS_BG=background is not None,
            **_launch_meta(packed_info, D))
    return color, opacity, depth, weights


@composite_fwd.register_fake
def _(sigmas, rgbs, t_starts, t_ends, packed_info, R, S, background, eps):
    M, D = rgbs.shape
    f32 = torch.float32
    return (sigmas.new_empty(R, D, dtype=f32), sigmas.new_empty(R, dtype=f32), sigmas.new_empty(R, dtype=f32),
            sigmas.new_empty(M))


@torch.library.custom_op("fast3d::composite_triton_bwd", mutates_args=())
def composite_bwd(sigmas: Tensor, rgbs: Tensor, t_starts: Tensor, t_ends: Tensor, packed_info: Tensor | None,
                  R: int, S: int, eps: float, g_color: Tensor, g_open: Tensor, g_depth: Tensor,
                  g_weights: Tensor | None, total: Tensor) -> tuple[Tensor, Tensor]:
    # g_color [R, D], g_open, g_depth, total [R] float32; g_weights [M] or None
    # -> g_sigmas [M], g_rgbs [M, D] (zero for samples of no ray)
    M, D = rgbs.shape
    g_sigmas, g_rgbs = torch.zeros_like(sigmas), torch.zeros_like(rgbs)
    if R == 0:
        return g_sigmas, g_rgbs
    with backends.cuda_device_guard(sigmas.device):
        _composite_bwd[(triton.cdiv(R, BLOCK_R),)](
            sigmas, rgbs, t_starts, t_ends, packed_info if packed_info is not None else sigmas, g_color, g_open,
            g_depth, g_weights if g_weights is not None else sigmas, total, g_sigmas, g_rgbs, R, S, D, eps,
            HAS_GW=g_weights is not None, **_launch_meta(packed_info, D))
    return g_sigmas, g_rgbs


@composite_bwd.register_fake
def _(sigmas, rgbs, t_starts, t_ends, packed_info, R, S, eps, g_color, g_open, g_depth, g_weights, total):
    return torch.empty_like(sigmas), torch.empty_like(rgbs)


def _setup_context(ctx, inputs, output):
    sigmas, rgbs, t_starts, t_ends, packed_info, R, S, background, eps = inputs
    color, opacity, depth, weights = output
    ctx.save_for_backward(sigmas, rgbs, t_starts, t_ends, packed_info, background, color, opacity, depth, weights)
    ctx.R, ctx.S, ctx.eps = R, S, eps
    ctx.set_materialize_grads(False)  # unused outputs give None, not zero tensors to read


def _backward(ctx, g_color, g_opacity, g_depth, g_weights):
    sigmas, rgbs, t_starts, t_ends, packed_info, background, color, opacity, depth, weights = ctx.saved_tensors
    R, D = ctx.R, rgbs.shape[1]
    f32 = torch.float32
    g_color = sigmas.new_zeros(R, D, dtype=f32) if g_color is None else g_color.to(f32).contiguous()
    g_opacity = sigmas.new_zeros(R, dtype=f32) if g_opacity is None else g_opacity.to(f32)
    g_depth = sigmas.new_zeros(R, dtype=f32) if g_depth is None else g_depth.to(f32).contiguous()
    gc_bg = (g_color * background.to(f32)).sum(-1) if background is not None else 0.0   # <dcolor, bg> [R]
    g_open = (g_opacity - gc_bg).contiguous()
    # G = sum_i g_i w_i from the forward's outputs (module docstring).
    total = (g_color * color).sum(-1) - gc_bg + g_opacity * opacity + g_depth * depth
    if g_weights is not None:
        g_weights = g_weights.contiguous()
        gw = g_weights.to(f32) * weights.to(f32)                                          # [M]
        if packed_info is None:
            total = total + gw.reshape(R, ctx.S).sum(-1)
        else:
            ray = torch.repeat_interleave(torch.arange(R, device=gw.device), packed_info[:, 1],
                                          output_size=int(packed_info[:, 1].sum()))
            total = total.index_add(0, ray, gw[_packed_slots(packed_info)])
    g_sigmas, g_rgbs = composite_bwd(sigmas, rgbs, t_starts, t_ends, packed_info, R, ctx.S, ctx.eps, g_color,
                                     g_open, g_depth.contiguous(), g_weights, total.contiguous())
    g_bg = None
    if background is not None:
        g_bg = g_color * (1.0 - opacity)[:, None]                            # [R, D] per ray
        g_bg = (g_bg.sum(0) if background.dim() == 1 else g_bg).to(background.dtype)
    return g_sigmas, g_rgbs, None, None, None, None, None, g_bg, None


composite_fwd.register_autograd(_backward, setup_context=_setup_context)


def _packed_slots(packed_info: Tensor) -> Tensor:
    """The flat sample index of every (ray, slot) of packed_info [R, 2], ray-major: [sum counts]."""
    starts, counts = packed_info[:, 0], packed_info[:, 1]
    n = int(counts.sum())
    first = torch.repeat_interleave(starts - (torch.cumsum(counts, 0) - counts), counts, output_size=n)
    return first + torch.arange(n, device=packed_info.device)


def composite(sigmas: Tensor,            # [R, S]
              rgbs: Tensor,              # [R, S, D]
              t_starts: Tensor,          # [R, S]
              t_ends: Tensor,            # [R, S]
              background: Tensor | None,  # [R, D] or [D]
              transmittance_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as reference.composite; computes in float32, returns the inputs' dtype."""
    dtype = sigmas.dtype
    R, S, D = rgbs.shape
    color, opacity, depth, weights = composite_fwd(
        sigmas.reshape(-1).contiguous(), rgbs.reshape(R * S, D).contiguous(), t_starts.reshape(-1).contiguous(),
        t_ends.reshape(-1).contiguous(), None, R, S, None if background is None else background.contiguous(),
        float(transmittance_eps))
    return color.to(dtype), opacity[:, None].to(dtype), depth[:, None].to(dtype), weights.reshape(R, S)


def composite_packed(sigmas: Tensor,            # [M]
                     rgbs: Tensor,              # [M, D]
                     t_starts: Tensor,          # [M]
                     t_ends: Tensor,            # [M]
                     packed_info: Tensor,       # [R, 2] int64 (first sample, count)
                     background: Tensor | None,  # [R, D] or [D]
                     transmittance_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The packed form without padding: each program walks its rays' own sample ranges.
    Returns color [R, D], opacity [R, 1], depth [R, 1], weights [M] in the inputs' dtype."""
    dtype = sigmas.dtype
    R = packed_info.shape[0]
    color, opacity, depth, weights = composite_fwd(
        sigmas.contiguous(), rgbs.contiguous(), t_starts.contiguous(), t_ends.contiguous(),
        packed_info.to(torch.int64).contiguous(), R, 0, None if background is None else background.contiguous(),
        float(transmittance_eps))
    return color.to(dtype), opacity[:, None].to(dtype), depth[:, None].to(dtype), weights
