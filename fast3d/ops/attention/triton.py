"""The `triton` backend of multiview_attention: FlashAttention-2 style kernels over multi-view layouts.

Addressing. Both layouts are V *segments* of S tokens per attention group, read in place:

    group g = (b, r) with r < R rows (R = 1 for "views", R = h for "rows"),
    token (view j, position p < S) of group g lives at row  b*V + j  and sequence index  r*S + p
    of the [B*V, L, H, D] tensor (S = L for "views", S = w for "rows"),

so the kernels take the tensors' strides and never copy or rearrange q, k, v, out or their
gradients. A query block never straddles two views (blocks tile each segment, the last one masked),
so the view mask is a per-(query view, key view) decision: the kernels loop over a table of the
allowed views and skip masked view pairs entirely (block-sparse, no wasted work).

Statistics. The forward keeps the online-softmax running max and sum in base 2 (scores are scaled
by scale * log2(e) once, so exp2 replaces exp) and saves lse = m + log2(l) per query, [B*V, H, Lq]
float32. A query view with no allowed key view (an empty view-mask row) gets output 0 and
lse = +inf: its P is 0 in the backward, it has no key view to loop over in the dQ kernel (dq = 0)
and appears in no key view's query table in the dK/dV kernel (no contribution). The backward
(FlashAttention-2 split, no atomics, deterministic) is:

    delta_t = sum_d dO_td O_td                        (_delta_kernel)
    P_ts    = exp2(scale*log2e <q_t, k_s> - lse_t)    (recomputed, exact softmax probabilities)
    dV_s    = sum_t P_ts dO_t,   dK_s = scale sum_t dS_ts q_t        (_dkdv_kernel, per key block)
    dQ_t    = scale sum_s dS_ts k_s                                  (_dq_kernel, per query block)
    with dS_ts = P_ts (<dO_t, v_s> - delta_t)  (softmax Jacobian: sum_s P_ts dP_ts = delta_t).

Head dims up to 256 are padded to the next power of two (>= 16, tl.dot's minimum) with masked loads.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from fast3d import backends
from fast3d.ops._triton_math import mm, upcast

LOG2E = 1.4426950408889634


@triton.jit
def _program_tile(n_blocks, NV, H, R):
    """Program id -> (block within the segment, view, head, sample, row group): the one grid
    order shared by the forward, dK/dV and dQ kernels (blocks fastest, row groups slowest)."""
    pid = tl.program_id(0).to(tl.int64)
    blk = pid % n_blocks
    view = (pid // n_blocks) % NV
    hd = (pid // (n_blocks * NV)) % H
    g = pid // (n_blocks * NV * H)
    return blk, view, hd, g // R, g % R


@triton.jit
def _fwd_kernel(Q, K, Vt, O, LSE, KV_VIEWS, KV_COUNT,
                s_qb, s_ql, s_qh, s_qd, s_kb, s_kl, s_kh, s_kd,
                s_vb, s_vl, s_vh, s_vd, s_ob, s_ol, s_oh, s_od,
                NV, R, H, SEG_Q, SEG_K, LQ, HEAD_DIM, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                EVEN_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # One program: BLOCK_M queries of query view i, in group g = (b, r), head hd.
    mb, i, hd, b, r = _program_tile(tl.cdiv(SEG_Q, BLOCK_M), NV, H, R)

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)            # positions in the segment
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < SEG_Q
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + (b * NV + i) * s_qb + (r * SEG_Q + offs_m[:, None]) * s_ql + hd * s_qh + offs_d[None, :] * s_qd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)   # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_views = tl.load(KV_COUNT + i)
    for jj in range(0, n_views):
        j = tl.load(KV_VIEWS + i * NV + jj).to(tl.int64)      # an allowed key view
        k_base = K + (b * NV + j) * s_kb + r * SEG_K * s_kl + hd * s_kh
        v_base = Vt + (b * NV + j) * s_vb + r * SEG_K * s_vl + hd * s_vh
        for start_n in range(0, SEG_K, BLOCK_N):
            n = (start_n + offs_n).to(tl.int64)                # token offsets may pass 2^31 bytes
            n_ok = n < SEG_K
            kt = tl.load(k_base + n[None, :] * s_kl + offs_d[:, None] * s_kd,
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)       # [BLOCK_D, BLOCK_N]
            s = mm(q, kt, PRECISION, UPCAST) * qk_scale          # log2-scaled logits
            if not EVEN_N:
                s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            vb = tl.load(v_base + n[:, None] * s_vl + offs_d[None, :] * s_vd,
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0)       # [BLOCK_N, BLOCK_D]
            # P is rounded to the input dtype for the tensor-core PV product; the normaliser sums the
            # same rounded values, so the output stays an exact convex combination of the v rows
            # (in bf16 this cuts the forward's error vs float64 by ~25%).
            p = tl.math.exp2(s - m_new[:, None]).to(vb.dtype)
            alpha = tl.math.exp2(m_i - m_new)                                # rescales the old sums
            l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
            acc = acc * alpha[:, None] + mm(p, vb, PRECISION, UPCAST)
            m_i = m_new

    # A query view with no allowed key view (an empty view-mask row) ran no iteration: l = 0,
    # m = -inf. Its output is defined as 0 and its lse as +inf, so the backward's recomputed
    # P = exp2(s - lse) is exactly 0 for it (no NaN from 0/0 or -inf - -inf).
    attends = l_i > 0.0
    out = acc / tl.where(attends, l_i, 1.0)[:, None]
    o_ptrs = O + (b * NV + i) * s_ob + (r * SEG_Q + offs_m[:, None]) * s_ol + hd * s_oh + offs_d[None, :] * s_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    lse_ptrs = LSE + ((b * NV + i) * H + hd) * LQ + r * SEG_Q + offs_m
    lse = tl.where(attends, m_i + tl.math.log2(tl.where(attends, l_i, 1.0)), float("inf"))
    tl.store(lse_ptrs, lse, mask=m_ok)


@triton.jit
def _delta_kernel(O, DO, DELTA, s_ob, s_ol, s_oh, s_od, s_gb, s_gl, s_gh, s_gd, H, LQ, HEAD_DIM,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # delta[bv, hd, t] = sum_d dO * O, for BLOCK_M tokens t of one (bv, hd).
    bh = tl.program_id(0).to(tl.int64)    # B*V*H on axis 0: axis 1 is capped at 65535
    mb = tl.program_id(1).to(tl.int64)
    bv, hd = bh // H, bh % H
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < LQ)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + bv * s_ob + offs_m[:, None] * s_ol + hd * s_oh + offs_d[None, :] * s_od, mask=ok, other=0.0)
    do = tl.load(DO + bv * s_gb + offs_m[:, None] * s_gl + hd * s_gh + offs_d[None, :] * s_gd, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * LQ + offs_m, delta, mask=offs_m < LQ)


@triton.jit
def _dkdv_kernel(Q, K, Vt, DO, LSE, DELTA, DK, DV, Q_VIEWS, Q_COUNT,
                 s_qb, s_ql, s_qh, s_qd, s_kb, s_kl, s_kh, s_kd, s_vb, s_vl, s_vh, s_vd,
                 s_gb, s_gl, s_gh, s_gd, s_dkb, s_dkl, s_dkh, s_dkd, s_dvb, s_dvl, s_dvh, s_dvd,
                 NV, R, H, SEG_Q, SEG_K, LQ, HEAD_DIM, qk_scale, sm_scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # One program: BLOCK_N keys of key view j in group g, head hd; loops over the query views
    # allowed to see view j. Query rows past the segment load lse = +inf, so P = 0 there; key
    # rows past it are never stored.
    nb, j, hd, b, r = _program_tile(tl.cdiv(SEG_K, BLOCK_N), NV, H, R)

    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < SEG_K
    d_ok = offs_d < HEAD_DIM
    nd_ok = n_ok[:, None] & d_ok[None, :]
    row_k = r * SEG_K + offs_n[:, None]
    k = tl.load(K + (b * NV + j) * s_kb + row_k * s_kl + hd * s_kh + offs_d[None, :] * s_kd, mask=nd_ok, other=0.0)
    vb = tl.load(Vt + (b * NV + j) * s_vb + row_k * s_vl + hd * s_vh + offs_d[None, :] * s_vd, mask=nd_ok, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    n_views = tl.load(Q_COUNT + j)
    for ii in range(0, n_views):
        i = tl.load(Q_VIEWS + j * NV + ii).to(tl.int64)       # a query view that sees view j
        q_base = Q + (b * NV + i) * s_qb + r * SEG_Q * s_ql + hd * s_qh
        g_base = DO + (b * NV + i) * s_gb + r * SEG_Q * s_gl + hd * s_gh
        stat = ((b * NV + i) * H + hd) * LQ + r * SEG_Q
        for start_m in range(0, SEG_Q, BLOCK_M):
            m = (start_m + offs_m).to(tl.int64)                # token offsets may pass 2^31 bytes
            m_ok = m < SEG_Q
            md_ok = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + m[:, None] * s_ql + offs_d[None, :] * s_qd, mask=md_ok, other=0.0)
            do = tl.load(g_base + m[:, None] * s_gl + offs_d[None, :] * s_gd, mask=md_ok, other=0.0)
            lse = tl.load(LSE + stat + m, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + stat + m, mask=m_ok, other=0.0)
            # Transposed scores, [BLOCK_N, BLOCK_M], so dK and dV come out without transposing P.
            st = mm(k, tl.trans(q), PRECISION, UPCAST) * qk_scale
            pt = tl.math.exp2(st - lse[None, :])
            dv += mm(pt.to(do.dtype), do, PRECISION, UPCAST)
            dpt = mm(vb, tl.trans(do), PRECISION, UPCAST)     # <dO_t, v_s>, [BLOCK_N, BLOCK_M]
            dst = pt * (dpt - delta[None, :])
            dk += mm(dst.to(q.dtype), q, PRECISION, UPCAST)

    dk = dk * sm_scale
    tl.store(DK + (b * NV + j) * s_dkb + row_k * s_dkl + hd * s_dkh + offs_d[None, :] * s_dkd,
             dk.to(DK.dtype.element_ty), mask=nd_ok)
    tl.store(DV + (b * NV + j) * s_dvb + row_k * s_dvl + hd * s_dvh + offs_d[None, :] * s_dvd,
             dv.to(DV.dtype.element_ty), mask=nd_ok)


@triton.jit
def _dq_kernel(Q, K, Vt, DO, LSE, DELTA, DQ, KV_VIEWS, KV_COUNT,
               s_qb, s_ql, s_qh, s_qd, s_kb, s_kl, s_kh, s_kd, s_vb, s_vl, s_vh, s_vd,
               s_gb, s_gl, s_gh, s_gd, s_dqb, s_dql, s_dqh, s_dqd,
               NV, R, H, SEG_Q, SEG_K, LQ, HEAD_DIM, qk_scale, sm_scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               EVEN_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # One program: BLOCK_M queries of query view i in group g, head hd (the forward's tiling).
    mb, i, hd, b, r = _program_tile(tl.cdiv(SEG_Q, BLOCK_M), NV, H, R)

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < SEG_Q
    d_ok = offs_d < HEAD_DIM
    md_ok = m_ok[:, None] & d_ok[None, :]
    row_q = r * SEG_Q + offs_m[:, None]
    q = tl.load(Q + (b * NV + i) * s_qb + row_q * s_ql + hd * s_qh + offs_d[None, :] * s_qd, mask=md_ok, other=0.0)
    do = tl.load(DO + (b * NV + i) * s_gb + row_q * s_gl + hd * s_gh + offs_d[None, :] * s_gd, mask=md_ok, other=0.0)
    stat = ((b * NV + i) * H + hd) * LQ + r * SEG_Q + offs_m
    lse = tl.load(LSE + stat, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + stat, mask=m_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_views = tl.load(KV_COUNT + i)
    for jj in range(0, n_views):
        j = tl.load(KV_VIEWS + i * NV + jj).to(tl.int64)
        k_base = K + (b * NV + j) * s_kb + r * SEG_K * s_kl + hd * s_kh
        v_base = Vt + (b * NV + j) * s_vb + r * SEG_K * s_vl + hd * s_vh
        for start_n in range(0, SEG_K, BLOCK_N):
            n = (start_n + offs_n).to(tl.int64)                # token offsets may pass 2^31 bytes
            n_ok = n < SEG_K
            nd_ok = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + n[:, None] * s_kl + offs_d[None, :] * s_kd, mask=nd_ok, other=0.0)
            vb = tl.load(v_base + n[:, None] * s_vl + offs_d[None, :] * s_vd, mask=nd_ok, other=0.0)
            s = mm(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            if not EVEN_N:
                p = tl.where(n_ok[None, :], p, 0.0)
            dp = mm(do, tl.trans(vb), PRECISION, UPCAST)
            ds = p * (dp - delta[:, None])
            dq += mm(ds.to(k.dtype), k, PRECISION, UPCAST)

    dq = dq * sm_scale
    tl.store(DQ + (b * NV + i) * s_dqb + row_q * s_dql + hd * s_dqh + offs_d[None, :] * s_dqd,
             dq.to(DQ.dtype.element_ty), mask=md_ok)


# --- launch configuration -------------------------------------------------------------------------


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by BLOCK_D; "16" = fp16/bf16 operands, "32" = fp32 (ieee
# or tf32 dots). Chosen so every kernel fits the smallest opt-in shared memory of the targets
# (sm_86/89: 101,376 B) by the compiled figures and by _shared_memory_estimate. fp32 tiles are four
# times the bytes of bf16 ones at half the dot throughput, so they get smaller tiles and fewer stages.
# The backward's two kernels share one tiling (the dK/dV kernel holds five operand tiles: k, v
# resident, q and dO streamed, and q's transpose). Warps: 8 wherever 4 spill registers at these
# tiles (the compile test prints the spill stack of each). Untuned starting points.
_FWD = {
    "16": {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 8, 3), 128: (128, 64, 8, 3),
           256: (64, 64, 8, 2)},
    "32": {16: (64, 32, 8, 2), 32: (64, 32, 8, 2), 64: (64, 32, 8, 2), 128: (64, 32, 8, 2),
           256: (32, 32, 4, 1)},
}
_BWD = {
    "16": {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 64, 8, 2), 128: (64, 64, 8, 2),
           256: (32, 32, 8, 1)},
    "32": {16: (64, 32, 8, 1), 32: (64, 32, 8, 1), 64: (64, 32, 8, 1), 128: (32, 32, 8, 1),
           256: (16, 16, 4, 1)},
}


def _config(seg_q: int, seg_k: int, head_dim: int, dtype: torch.dtype, backward: bool = False) -> dict:
    """Tile sizes, warps and stages of a launch: the table above, blocks no longer than a segment
    (rounded up to a power of two, >= 16) so short Era3D rows do not waste half a tile. The
    interpreter gets 32x32 tiles so small test sizes still run several blocks per segment with
    masked tails (unless backends.gpu_launch_configs() asks for a GPU's choice)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if backends.triton_interpreter_configs():
        bm, bn, warps, stages = 32, 32, 4, 1
    else:
        bm, bn, warps, stages = (_BWD if backward else _FWD)["32" if dtype == torch.float32 else "16"][block_d]
    bm = min(bm, max(16, triton.next_power_of_2(seg_q)))
    bn = min(bn, max(16, triton.next_power_of_2(seg_k)))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages)


def _shared_memory_estimate(kernel: str, cfg: dict, dtype: torch.dtype, precision: str, arch: int) -> int:
    """Bytes of shared memory one program of `kernel` ("fwd", "dkdv", "dq") needs at `cfg`: a model
    fitted to Triton's compiled figures and checked against them, as an upper bound, for every
    launch the compile test records (tests/test_triton_compile.py). Terms:

    * forward: the streamed k and v tiles [BLOCK_N, BLOCK_D], one copy per stage for fp32
      operands (ieee or tf32), one per stage but the last for 16-bit ones, plus P [BLOCK_M, BLOCK_N]
      passed through shared memory to take the dot-operand layout; on sm_90 (wgmma reads its A
      operand from shared memory) the q tile too;
    * dK/dV: k and v [BLOCK_N, BLOCK_D] resident, q and dO [BLOCK_M, BLOCK_D] and q's transpose;
    * dQ: q and dO resident, k and v streamed, and for fp32 dS [BLOCK_M, BLOCK_N] in float32;
    * 1 KiB for reductions and layout conversions."""
    es = torch.finfo(dtype).bits // 8
    bm, bn, bd, stages = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_D"], cfg["num_stages"]
    fp32 = dtype == torch.float32
    if kernel == "fwd":
        copies = stages if fp32 else max(1, stages - 1)
        est = copies * 2 * bn * bd * es + bm * bn * (4 if fp32 else 2)
        if arch >= 90:
            est += bm * bd * es
    elif kernel == "dkdv":
        est = (3 * bm * bd + 2 * bn * bd) * es
    elif kernel == "dq":
        est = (2 * bm * bd + 2 * bn * bd) * es + (bm * bn * 4 if fp32 else 0)
    else:
        raise ValueError(f"kernel must be 'fwd', 'dkdv' or 'dq'; got {kernel!r}")
    return est + 1024


def shared_memory_reasons(dtype: torch.dtype, head_dim: int, seg_q: int, seg_k: int, requires_grad: bool,
                          device: torch.device) -> list[str]:
    """Why the Triton kernels cannot launch for these inputs on `device` (empty if they can): a
    kernel whose estimated shared memory exceeds the device's per-block opt-in limit. CPU tensors
    (the interpreter) are judged against every architecture the build targets, at the
    configurations a GPU would choose, so what passes here launches on each of them.

    Args:
        dtype: q's dtype; head_dim: D; seg_q, seg_k: query and key tokens per segment.
        requires_grad: also judge the backward's kernels.
        device: the tensors' device.

    Returns:
        One reason per kernel and architecture that does not fit.
    """
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        targets = {10 * major + minor: backends.shared_memory_limit(device)}
    else:
        targets = dict(backends.SHARED_MEMORY_OPTIN)
    with backends.gpu_launch_configs():
        precision = _precision(dtype, device)["PRECISION"]
        launches = [("fwd", _config(seg_q, seg_k, head_dim, dtype))]
        if requires_grad:
            bwd = _config(seg_q, seg_k, head_dim, dtype, backward=True)
            launches += [("dkdv", bwd), ("dq", bwd)]
    reasons = []
    for arch, limit in sorted(targets.items()):
        for kernel, cfg in launches:
            need = _shared_memory_estimate(kernel, cfg, dtype, precision, arch)
            if need > limit:
                reasons.append(f"{kernel} kernel at {cfg} needs ~{need:,} B of shared memory > sm_{arch}'s "
                               f"{limit:,} B per block")
    return reasons


def view_tables(view_mask: Tensor | None,   # [V, V] bool or None
                num_views: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For each query view the allowed key views first (kv_views [V, V] int32, kv_count [V]) and
    for each key view the query views that see it (q_views, q_count). Built with device ops only
    (a stable sort puts the allowed views first), so no host synchronisation."""
    if view_mask is None:
        view_mask = torch.ones(num_views, num_views, dtype=torch.bool, device=device)
    m = view_mask.to(device=device, dtype=torch.bool)

    def table(mm):
        order = torch.sort((~mm).to(torch.int32), dim=1, stable=True).indices
        return order.to(torch.int32).contiguous(), mm.sum(1).to(torch.int32).contiguous()

    return (*table(m), *table(m.t()))


def _precision(dtype: torch.dtype, device: torch.device) -> dict:
    # float32 inputs multiply in IEEE float32 (SDPA's fp32 math) unless torch's matmuls use tf32
    # (torch.backends.cuda.matmul.allow_tf32; ~1e-3 relative); 16-bit inputs use tensor cores.
    fp32 = dtype == torch.float32 and not backends.triton_tf32(dtype, device)
    return dict(PRECISION="ieee" if fp32 else "tf32", UPCAST=upcast(dtype))


def _strides(x: Tensor) -> tuple:
    return tuple(x.stride())


@torch.library.custom_op("fast3d::multiview_attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, view_mask: Tensor | None, num_views: int, n_rows: int,
                  scale: float) -> tuple[Tensor, Tensor]:
    # q [B*V, Lq, H, D], k/v [B*V, Lk, H, D], view_mask [V, V] -> out [B*V, Lq, H, D], lse [B*V, H, Lq]
    BV, Lq, H, D = q.shape
    Lk = k.shape[1]
    V, R = num_views, n_rows
    seg_q, seg_k = Lq // R, Lk // R
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((BV, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    kv_views, kv_count, _, _ = view_tables(view_mask, V, q.device)
    cfg = _config(seg_q, seg_k, D, q.dtype)
    grid = (triton.cdiv(seg_q, cfg["BLOCK_M"]) * V * H * (BV // V) * R,)
    with backends.cuda_device_guard(q.device):
        _fwd_kernel[grid](q, k, v, out, lse, kv_views, kv_count,
                          *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                          V, R, H, seg_q, seg_k, Lq, D, scale * LOG2E,
                          EVEN_N=seg_k % cfg["BLOCK_N"] == 0, **_precision(q.dtype, q.device), **cfg)
    return out, lse


@attention_fwd.register_fake
def _(q, k, v, view_mask, num_views, n_rows, scale):
    BV, Lq, H, D = q.shape
    return q.new_empty(q.shape), q.new_empty((BV, H, Lq), dtype=torch.float32)


@torch.library.custom_op("fast3d::multiview_attention_bwd", mutates_args=())
def attention_bwd(g_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  view_mask: Tensor | None, num_views: int, n_rows: int,
                  scale: float) -> tuple[Tensor, Tensor, Tensor]:
    # g_out, out [B*V, Lq, H, D], lse [B*V, H, Lq] -> dq [B*V, Lq, H, D], dk, dv [B*V, Lk, H, D]
    BV, Lq, H, D = q.shape
    Lk = k.shape[1]
    V, R = num_views, n_rows
    seg_q, seg_k = Lq // R, Lk // R
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if BV == 0 or H == 0:
        return dq, dk, dv
    if Lq == 0:  # no query reaches any key
        return dq, dk.zero_(), dv.zero_()
    kv_views, kv_count, q_views, q_count = view_tables(view_mask, V, q.device)
    cfg = _config(seg_q, seg_k, D, q.dtype, backward=True)
    common = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_precision(q.dtype, q.device))
    delta = torch.empty((BV, H, Lq), dtype=torch.float32, device=q.device)
    groups = (BV // V) * R
    with backends.cuda_device_guard(q.device):
        _delta_kernel[(BV * H, triton.cdiv(Lq, 64))](out, g_out, delta, *_strides(out), *_strides(g_out), H, Lq, D,
                                                     BLOCK_M=64, BLOCK_D=cfg["BLOCK_D"])
        _dkdv_kernel[(triton.cdiv(seg_k, cfg["BLOCK_N"]) * V * H * groups,)](
            q, k, v, g_out, lse, delta, dk, dv, q_views, q_count,
            *_strides(q), *_strides(k), *_strides(v), *_strides(g_out), *_strides(dk), *_strides(dv),
            V, R, H, seg_q, seg_k, Lq, D, scale * LOG2E, scale, **common)
        _dq_kernel[(triton.cdiv(seg_q, cfg["BLOCK_M"]) * V * H * groups,)](
            q, k, v, g_out, lse, delta, dq, kv_views, kv_count,
            *_strides(q), *_strides(k), *_strides(v), *_strides(g_out), *_strides(dq),
            V, R, H, seg_q, seg_k, Lq, D, scale * LOG2E, scale, EVEN_N=seg_k % cfg["BLOCK_N"] == 0, **common)
    return dq, dk, dv


@attention_bwd.register_fake
def _(g_out, q, k, v, out, lse, view_mask, num_views, n_rows, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, view_mask, num_views, n_rows, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, view_mask)
    ctx.args = (num_views, n_rows, scale)


def _backward(ctx, g_out, g_lse):
    q, k, v, out, lse, view_mask = ctx.saved_tensors
    dq, dk, dv = attention_bwd(g_out, q, k, v, out, lse, view_mask, *ctx.args)
    return dq, dk, dv, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def multiview_attention(q: Tensor,            # [B*V, Lq, H, D]
                        k: Tensor,            # [B*V, Lk, H, D]
                        v: Tensor,            # [B*V, Lk, H, D]
                        num_views: int,
                        layout: str,
                        image_size: tuple[int, int] | None,
                        view_mask: Tensor | None,   # [V, V] bool
                        scale: float | None) -> Tensor:
    """Same contract as reference.multiview_attention; any strides, fp16/bf16/fp32."""
    n_rows = 1 if layout == "views" else image_size[0]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return attention_fwd(q, k, v, view_mask, num_views, n_rows, scale)[0]
