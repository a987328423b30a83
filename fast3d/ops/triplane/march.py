"""The fused Triton ray marcher behind render_triplane's `triton` backend.

One kernel does, per tile of BLOCK_R rays x BLOCK_S samples (N = BLOCK_R * BLOCK_S rows):
triplane sampling (bilinear, channels-last planes, BC channels at a time), the decoder MLP
(decoder.decode: Linear 3C -> HID, ReLU, N_MID x (Linear HID -> HID, ReLU), Linear HID -> 4, as
tl.dot over the N rows), the output activations and NeRF compositing (transmittance by a cumulative
sum of optical depth inside the tile plus a carry across tiles, as the composite kernel). Nothing
per sample is written: the forward keeps its colour, opacity and depth sums per ray; a tile loop
stops once every ray of the block is below the transmittance cut-off.

The backward recomputes instead of storing activations. Per tile it re-runs the forward, then:

  compositing   g_i = <dC, rgb_i> + dO + dD mid_i, G = sum_i g_i w_i = <dC, C> + dO O + dD D
                (read off the saved outputs), dL/dtau_i = g_i T_{i+1} - (G - sum_{k<=i} g_k w_k)
                (derivation in csrc/composite/composite_math.h); dL/dsigma_i = dL/dtau_i dt_i,
                dL/drgb_i = w_i dC.
  activations   sigma = softplus(x0 + bias): dsigma/dx0 = sigmoid(x0 + bias) (1 above the
                threshold); rgb = sigmoid(x) (1 + 2 pad) - pad: drgb/dx = (1 + 2 pad) s (1 - s).
  MLP           g_pre = g_a * [a > 0], dW += a_in^T g_pre, g_a(in) = g_pre W^T. Only a_0 (the first
                layer's output) and the last hidden activation are kept; the input of middle layer
                l is recomputed from a_0 (l extra matmuls, N_MID (N_MID - 1) / 2 per tile).
  sampling      the features' gradient g_pre0 W0^T is scattered into the planes (atomic adds, as the
                triplane_sample backward), and its spatial derivative gives the point gradient,
                summed per ray into rays_o (dp/do = I) and rays_d (dp/dd = t I).

Weight gradients: the backward grid is persistent (a few programs per SM, each looping over ray
blocks); each program adds its weight gradients into its own row of a [programs, P] float32 buffer
(relaxed reductions into a private row: no contention; see _accumulate), summed once at the end.
Plane gradients are relaxed float32 atomic adds (their order, and so their rounding, varies by run).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fast3d import backends
from fast3d.ops._triton_math import mm, one_minus_exp_neg, upcast
from fast3d.ops.triplane import decoder as _decoder
from fast3d.ops.triplane import reference
from fast3d.ops.triplane.decoder import DecoderWeights
from fast3d.ops.triplane.triton import _add_plane_grad, _corner_values, _corners, _lerp2, _lerp2_bwd, _plane_uv

# The interpreter's tiles: 16 rays x 8 samples forward, x 4 backward (several tiles per ray and
# several ray blocks at test sizes).
BLOCK_R = 16        # rays per tile
FWD_BLOCK_S = 8     # samples per forward tile: N = 128 MLP rows
BWD_BLOCK_S = 4
BC = 16             # channels per gather (and the K of the first layer's dots)
OUT_P = 16          # the decoder's 4 outputs padded to a tl.dot width
BWD_PROGRAMS_PER_SM = 2
INTERPRET_PROGRAMS = 3  # persistent programs under TRITON_INTERPRET: several, so the row sum is exercised

# A GPU's launches: (fp32 operands, HP > 64, backward) -> (BLOCK_R, BLOCK_S, warps, stages).
# Chosen by the compiled shared memory and the static register use / spill stack (fast3d.triton_aot;
# no GPU has timed them yet). A dot stages its [N, HP] and [HP, HP] operands in shared memory, and
# more than one stage adds another [HP, HP] buffer (shared_memory_bytes): at 4 bytes an element,
# fp32 and tf32 decoders take one stage and, past HP = 64, 8 x 4 tiles, so that every accepted
# width fits sm_86/89's 101,376 B (HP = 128: 81,920 B forward, 90,112 B backward, where the
# 16 x 8 3-stage forward needed 196,608 B). The half-precision backward at HP <= 64 takes 8 x 4
# tiles: 856 B of spill stack a thread at HP = 64 (sm_86) where 16 x 4 spilled 1,384 B; at HP = 128
# 8 x 4 spilled more (2,864 B against 2,464 B), so 16 x 4 stays.
_GPU_CONFIGS = {
    (False, False, False): (16, 8, 8, 3), (False, True, False): (16, 8, 8, 3),
    (False, False, True): (8, 4, 8, 3), (False, True, True): (16, 4, 8, 3),
    (True, False, False): (16, 8, 8, 1), (True, True, False): (8, 4, 4, 1),
    (True, False, True): (16, 4, 8, 1), (True, True, True): (8, 4, 4, 1),
}
# The decoder's activation constants (fast3d.ops.triplane.decoder), as constexpr globals the kernels may read.
RGB_PAD = tl.constexpr(_decoder.RGB_PAD)
SOFTPLUS_THRESHOLD = tl.constexpr(_decoder.SOFTPLUS_THRESHOLD)


@triton.jit
def _layer0(planes_ptr, w0_ptr, b0_ptr, b, x, y, z, mask_n, C, H, W, HID,
            BLOCK_N: tl.constexpr, BC: tl.constexpr, HP: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
            UPCAST: tl.constexpr):
    """First layer's pre-activation [N, HP]: b0 + sum over planes and channel tiles of
    features [N, BC] @ W0[plane's rows] [BC, HP]."""
    hs = tl.arange(0, HP)
    b0 = tl.load(b0_ptr + hs, mask=hs < HID, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N, HP], dtype=tl.float32) + b0[None, :]
    for PLANE in tl.static_range(3):
        u, v = _plane_uv(x, y, z, PLANE)
        x0, y0, fx, fy, vx0, vx1, vy0, vy1 = _corners(u, v, W, H)
        fx2 = fx[:, None]
        fy2 = fy[:, None]
        base = planes_ptr + (b * 3 + PLANE) * H * W * C
        for c0 in range(0, C, BC):
            cc = c0 + tl.arange(0, BC)
            _, _, _, _, _, v00, v01, v10, v11 = _corner_values(base, x0, y0, vx0, vx1, vy0, vy1, cc, mask_n, C, W)
            f = _lerp2(v00, v01, v10, v11, fx2, fy2)
            wt = tl.load(w0_ptr + (PLANE * C + cc)[:, None] * HID + hs[None, :],
                         mask=(cc < C)[:, None] & (hs < HID)[None, :], other=0.0)
            acc += mm(f.to(DT), wt.to(DT), PREC, UPCAST)
    return acc


@triton.jit
def _dense(a, w_ptr, b_ptr, HID, HP: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
           UPCAST: tl.constexpr):
    """relu(a [N, HP] @ W [HID, HID] + b): one middle layer."""
    hs = tl.arange(0, HP)
    mh = hs < HID
    w = tl.load(w_ptr + hs[:, None] * HID + hs[None, :], mask=mh[:, None] & mh[None, :], other=0.0)
    bias = tl.load(b_ptr + hs, mask=mh, other=0.0).to(tl.float32)
    return tl.maximum(mm(a.to(DT), w.to(DT), PREC, UPCAST) + bias[None, :], 0.0)


@triton.jit
def _softplus(x):
    """F.softplus: x above the threshold, else log1p(exp(x)) (log1p by Kahan's log(u) e / (u - 1),
    u = 1 + e, exact where a plain log(1 + e) rounds e away: densities of empty space)."""
    e = tl.exp(tl.minimum(x, SOFTPLUS_THRESHOLD))
    u = 1.0 + e
    return tl.where(x > SOFTPLUS_THRESHOLD, x, tl.where(u == 1.0, e, tl.log(u) * e / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _column(x, j: tl.constexpr, OUT_P: tl.constexpr):
    """Column j of x [N, OUT_P] as [N]."""
    js = tl.arange(0, OUT_P)
    return tl.sum(tl.where(js[None, :] == j, x, 0.0), axis=1)


@triton.jit
def _ray_block(rays_o_ptr, rays_d_ptr, near_ptr, far_ptr, b, rb, R, BLOCK_R: tl.constexpr):
    """Rows (global ray indices) of ray block rb of scene b, their mask, origins, directions, far.
    Rays with an empty interval (far <= near: they miss the box) are masked: never sampled."""
    local = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rows = b * R + local
    mask_r = (local < R) & (tl.load(far_ptr + rows, mask=local < R, other=0.0)
                            > tl.load(near_ptr + rows, mask=local < R, other=0.0))
    o = rays_o_ptr + rows * 3
    d = rays_d_ptr + rows * 3
    return (rows, mask_r, tl.load(o, mask=mask_r, other=0.0), tl.load(o + 1, mask=mask_r, other=0.0),
            tl.load(o + 2, mask=mask_r, other=0.0), tl.load(d, mask=mask_r, other=0.0),
            tl.load(d + 1, mask=mask_r, other=0.0), tl.load(d + 2, mask=mask_r, other=0.0),
            tl.load(far_ptr + rows, mask=mask_r, other=1.0))


@triton.jit
def _tile(planes_ptr, t_ptr, w0_ptr, b0_ptr, wm_ptr, bm_ptr, wo_ptr, bo_ptr,
          b, rows, mask_r, ox, oy, oz, dx, dy, dz, far, carry, s0,
          S, C, H, W, HID, N_MID, inv_bound, density_bias, eps,
          BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BC: tl.constexpr, HP: tl.constexpr,
          OUT_P: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """The forward of one tile. Sample i of a ray spans [t_i, t_{i+1}) (the last ends at far).
    [BLOCK_R, BLOCK_S] tensors are per sample; [N, .] ones are the MLP's rows (ray-major)."""
    BLOCK_N: tl.constexpr = BLOCK_R * BLOCK_S
    cols = s0 + tl.arange(0, BLOCK_S)
    # Rays already below the cut-off load and contribute nothing more.
    m = (mask_r & (tl.exp(-carry) >= eps))[:, None] & (cols < S)[None, :]
    off = rows[:, None].to(tl.int64) * S + cols[None, :]
    t0 = tl.load(t_ptr + off, mask=m, other=0.0)
    has_next = (cols + 1 < S)[None, :]
    t1 = tl.where(has_next, tl.load(t_ptr + off + 1, mask=m & has_next, other=0.0), far[:, None])
    px = tl.reshape((ox[:, None] + t0 * dx[:, None]) * inv_bound, [BLOCK_N])
    py = tl.reshape((oy[:, None] + t0 * dy[:, None]) * inv_bound, [BLOCK_N])
    pz = tl.reshape((oz[:, None] + t0 * dz[:, None]) * inv_bound, [BLOCK_N])
    mask_n = tl.reshape(m, [BLOCK_N])

    a0 = tl.maximum(_layer0(planes_ptr, w0_ptr, b0_ptr, b, px, py, pz, mask_n, C, H, W, HID,
                            BLOCK_N, BC, HP, DT, PREC, UPCAST), 0.0)
    a = a0
    for l in range(N_MID):
        a = _dense(a, wm_ptr + l * HID * HID, bm_ptr + l * HID, HID, HP, DT, PREC, UPCAST)
    hs = tl.arange(0, HP)
    js = tl.arange(0, OUT_P)
    wo = tl.load(wo_ptr + hs[:, None] * 4 + js[None, :], mask=(hs < HID)[:, None] & (js < 4)[None, :], other=0.0)
    out = mm(a.to(DT), wo.to(DT), PREC, UPCAST) + \
        tl.load(bo_ptr + js, mask=js < 4, other=0.0).to(tl.float32)[None, :]

    x_sig = tl.reshape(_column(out, 0, OUT_P), [BLOCK_R, BLOCK_S]) + density_bias
    sigma = _softplus(x_sig)
    s_r = tl.sigmoid(tl.reshape(_column(out, 1, OUT_P), [BLOCK_R, BLOCK_S]))
    s_g = tl.sigmoid(tl.reshape(_column(out, 2, OUT_P), [BLOCK_R, BLOCK_S]))
    s_b = tl.sigmoid(tl.reshape(_column(out, 3, OUT_P), [BLOCK_R, BLOCK_S]))

    dt = t1 - t0
    tau = tl.where(m, sigma * dt, 0.0)
    incl = tl.cumsum(tau, axis=1) + carry[:, None]   # optical depth through sample i
    T = tl.exp(-(incl - tau))                        # T_i
    live = m & (T >= eps)
    w = tl.where(live, one_minus_exp_neg(tau) * T, 0.0)
    return (cols, off, m, live, t0, dt, 0.5 * (t0 + t1), px, py, pz, mask_n, a0, a, x_sig, s_r, s_g, s_b,
            tau, incl, w)


@triton.jit
def _march_fwd(planes_ptr,            # [B, 3, H, W, C] channels-last, planes' dtype
               rays_o_ptr, rays_d_ptr,  # [B * R, 3] float32
               t_ptr,                 # [B * R, S] float32 sorted sample starts
               near_ptr, far_ptr,     # [B * R], [B * R] float32 (far <= near: the ray is skipped)
               w0_ptr, b0_ptr,        # [3C, HID], [HID]   decoder dtype
               wm_ptr, bm_ptr,        # [N_MID, HID, HID], [N_MID, HID]
               wo_ptr, bo_ptr,        # [HID, 4], [4]
               color_ptr, opacity_ptr, depth_ptr,  # [B * R, 3], [B * R], [B * R] float32
               weights_ptr,           # [B * R, S] float32, zero-initialised (if STORE_W)
               R, S, C, H, W, HID, N_MID, inv_bound, density_bias, eps,
               STORE_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BC: tl.constexpr,
               HP: tl.constexpr, OUT_P: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
               UPCAST: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    rows, mask_r, ox, oy, oz, dx, dy, dz, far = _ray_block(rays_o_ptr, rays_d_ptr, near_ptr, far_ptr, b,
                                                           tl.program_id(0), R, BLOCK_R)
    carry = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_r = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_R], dtype=tl.float32)
    od_end = tl.zeros([BLOCK_R], dtype=tl.float32)   # optical depth through the last live sample
    acc_z = tl.zeros([BLOCK_R], dtype=tl.float32)
    s0 = tl.program_id(0) * 0
    n_live = tl.sum(mask_r.to(tl.int32))
    while (s0 < S) & (n_live > 0):
        (cols, off, m, live, t0, dt, mid, px, py, pz, mask_n, a0, a, x_sig, s_r, s_g, s_b,
         tau, incl, w) = _tile(planes_ptr, t_ptr, w0_ptr, b0_ptr, wm_ptr, bm_ptr, wo_ptr, bo_ptr,
                               b, rows, mask_r, ox, oy, oz, dx, dy, dz, far, carry, s0,
                               S, C, H, W, HID, N_MID, inv_bound, density_bias, eps,
                               BLOCK_R, BLOCK_S, BC, HP, OUT_P, DT, PREC, UPCAST)
        if STORE_W:
            tl.store(weights_ptr + off, w, mask=m)
        scale = 1.0 + 2.0 * RGB_PAD
        acc_r += tl.sum(w * (s_r * scale - RGB_PAD), axis=1)
        acc_g += tl.sum(w * (s_g * scale - RGB_PAD), axis=1)
        acc_b += tl.sum(w * (s_b * scale - RGB_PAD), axis=1)
        od_end = tl.maximum(od_end, tl.max(tl.where(live, incl, 0.0), axis=1))
        acc_z += tl.sum(w * mid, axis=1)
        carry += tl.sum(tau, axis=1)
        s0 += BLOCK_S
        n_live = tl.sum((mask_r & (tl.exp(-carry) >= eps)).to(tl.int32))
    # Skipped (empty-interval) rays store their zero sums too: no colour, opacity or depth.
    in_range = rows - b * R < R
    tl.store(color_ptr + rows * 3, acc_r, mask=in_range)
    tl.store(color_ptr + rows * 3 + 1, acc_g, mask=in_range)
    tl.store(color_ptr + rows * 3 + 2, acc_b, mask=in_range)
    # 1 - T after the last live sample (= the sum of the weights), without cancellation (one_minus_exp_neg).
    tl.store(opacity_ptr + rows, one_minus_exp_neg(od_end), mask=in_range)
    tl.store(depth_ptr + rows, acc_z, mask=in_range)


@triton.jit
def _accumulate(ptr, x, mask):
    """ptr += x where mask, in this program's private row of weight gradients. No other program
    writes the row, so nothing is contended and no ordering is needed: a relaxed reduction (red,
    fire and forget). A plain load-add-store, the other choice, keeps the loaded tile live as well:
    the sm_86 build spilled 3,872 B instead of 2,464 B (bf16, HP = 128) and 3,352 B instead of
    2,120 B (tf32, HP = 128, 8 x 4 tiles)."""
    tl.atomic_add(ptr, x, mask=mask, sem="relaxed")


@triton.jit
def _march_bwd(planes_ptr, rays_o_ptr, rays_d_ptr, t_ptr, near_ptr, far_ptr,    # as _march_fwd
               w0_ptr, b0_ptr, wm_ptr, bm_ptr, wo_ptr, bo_ptr,
               color_ptr, opacity_ptr, depth_ptr,        # [B * R, 3], [B * R], [B * R] saved outputs
               g_color_ptr, g_opacity_ptr, g_depth_ptr,  # [B * R, 3], [B * R], [B * R] float32
               g_planes_ptr,                             # [B, 3, H, W, C] float32, zero-initialised
               g_rays_o_ptr, g_rays_d_ptr,               # [B * R, 3] float32
               g_params_ptr,                             # [programs, P] float32, zero-initialised
               R, S, C, H, W, HID, N_MID, inv_bound, density_bias, eps, n_rblocks, n_blocks, P,
               BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BC: tl.constexpr,
               HP: tl.constexpr, OUT_P: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
               UPCAST: tl.constexpr):
    BLOCK_N: tl.constexpr = BLOCK_R * BLOCK_S
    hs = tl.arange(0, HP)
    mh = hs < HID
    js = tl.arange(0, OUT_P)
    # This program's row of weight gradients: W0 [3C, HID], b0, Wm [N_MID, HID, HID], bm, Wo [HID, 4], bo.
    gp = g_params_ptr + tl.program_id(0).to(tl.int64) * P
    OFF_B0 = 3 * C * HID
    OFF_WM = OFF_B0 + HID
    OFF_BM = OFF_WM + N_MID * HID * HID
    OFF_WO = OFF_BM + N_MID * HID
    OFF_BO = OFF_WO + HID * 4
    wo_t = tl.load(wo_ptr + hs[None, :] * 4 + js[:, None], mask=mh[None, :] & (js < 4)[:, None], other=0.0)  # Wo^T
    for blk in range(tl.program_id(0), n_blocks, tl.num_programs(0)):
        b = (blk // n_rblocks).to(tl.int64)
        rows, mask_r, ox, oy, oz, dx, dy, dz, far = _ray_block(rays_o_ptr, rays_d_ptr, near_ptr, far_ptr, b,
                                                               blk % n_rblocks, R, BLOCK_R)
        gc_r = tl.load(g_color_ptr + rows * 3, mask=mask_r, other=0.0)
        gc_g = tl.load(g_color_ptr + rows * 3 + 1, mask=mask_r, other=0.0)
        gc_b = tl.load(g_color_ptr + rows * 3 + 2, mask=mask_r, other=0.0)
        g_o = tl.load(g_opacity_ptr + rows, mask=mask_r, other=0.0)
        g_z = tl.load(g_depth_ptr + rows, mask=mask_r, other=0.0)
        total = (gc_r * tl.load(color_ptr + rows * 3, mask=mask_r, other=0.0)
                 + gc_g * tl.load(color_ptr + rows * 3 + 1, mask=mask_r, other=0.0)
                 + gc_b * tl.load(color_ptr + rows * 3 + 2, mask=mask_r, other=0.0)
                 + g_o * tl.load(opacity_ptr + rows, mask=mask_r, other=0.0)
                 + g_z * tl.load(depth_ptr + rows, mask=mask_r, other=0.0))
        carry = tl.zeros([BLOCK_R], dtype=tl.float32)
        prefix = tl.zeros([BLOCK_R], dtype=tl.float32)
        go_x = tl.zeros([BLOCK_R], dtype=tl.float32)
        go_y = tl.zeros([BLOCK_R], dtype=tl.float32)
        go_z = tl.zeros([BLOCK_R], dtype=tl.float32)
        gd_x = tl.zeros([BLOCK_R], dtype=tl.float32)
        gd_y = tl.zeros([BLOCK_R], dtype=tl.float32)
        gd_z = tl.zeros([BLOCK_R], dtype=tl.float32)
        s0 = blk * 0
        n_live = tl.sum(mask_r.to(tl.int32))
        while (s0 < S) & (n_live > 0):
            (cols, off, m, live, t0, dt, mid, px, py, pz, mask_n, a0, a_last, x_sig, s_r, s_g, s_b,
             tau, od, w) = _tile(planes_ptr, t_ptr, w0_ptr, b0_ptr, wm_ptr, bm_ptr, wo_ptr, bo_ptr,
                                 b, rows, mask_r, ox, oy, oz, dx, dy, dz, far, carry, s0,
                                 S, C, H, W, HID, N_MID, inv_bound, density_bias, eps,
                                 BLOCK_R, BLOCK_S, BC, HP, OUT_P, DT, PREC, UPCAST)
            scale = 1.0 + 2.0 * RGB_PAD
            # Compositing (module docstring): per-sample g, then dL/dtau by the suffix G - prefix.
            g = (gc_r[:, None] * (s_r * scale - RGB_PAD) + gc_g[:, None] * (s_g * scale - RGB_PAD)
                 + gc_b[:, None] * (s_b * scale - RGB_PAD) + g_o[:, None] + g_z[:, None] * mid)
            gw = g * w
            incl = tl.cumsum(gw, axis=1) + prefix[:, None]
            g_tau = tl.where(live, g * tl.exp(-od) - (total[:, None] - incl), 0.0)   # T_{i+1} = exp(-od_i)
            d_soft = tl.where(x_sig > SOFTPLUS_THRESHOLD, 1.0, tl.sigmoid(x_sig))
            g_x0 = tl.reshape(g_tau * dt * d_soft, [BLOCK_N])
            g_x1 = tl.reshape(w * gc_r[:, None] * scale * s_r * (1.0 - s_r), [BLOCK_N])
            g_x2 = tl.reshape(w * gc_g[:, None] * scale * s_g * (1.0 - s_g), [BLOCK_N])
            g_x3 = tl.reshape(w * gc_b[:, None] * scale * s_b * (1.0 - s_b), [BLOCK_N])
            g_out = tl.where(js[None, :] == 0, g_x0[:, None],
                             tl.where(js[None, :] == 1, g_x1[:, None],
                                      tl.where(js[None, :] == 2, g_x2[:, None],
                                               tl.where(js[None, :] == 3, g_x3[:, None], 0.0))))   # [N, OUT_P]
            prefix += tl.sum(gw, axis=1)
            carry += tl.sum(tau, axis=1)

            # Output layer, then the middle layers from the last to the first.
            m_wo = mh[:, None] & (js < 4)[None, :]
            _accumulate(gp + OFF_WO + hs[:, None] * 4 + js[None, :],
                        mm(tl.trans(a_last.to(DT)), g_out.to(DT), PREC, UPCAST), m_wo)
            _accumulate(gp + OFF_BO + js, tl.sum(g_out, axis=0), js < 4)
            g_a = mm(g_out.to(DT), wo_t.to(DT), PREC, UPCAST)                     # [N, HP]
            a_out = a_last
            for i in range(N_MID):
                layer = N_MID - 1 - i
                a_in = a0
                for j in range(layer):
                    a_in = _dense(a_in, wm_ptr + j * HID * HID, bm_ptr + j * HID, HID, HP, DT, PREC, UPCAST)
                g_pre = tl.where(a_out > 0.0, g_a, 0.0)
                m_hh = mh[:, None] & mh[None, :]
                _accumulate(gp + OFF_WM + layer * HID * HID + hs[:, None] * HID + hs[None, :],
                            mm(tl.trans(a_in.to(DT)), g_pre.to(DT), PREC, UPCAST), m_hh)
                _accumulate(gp + OFF_BM + layer * HID + hs, tl.sum(g_pre, axis=0), mh)
                w_t = tl.load(wm_ptr + layer * HID * HID + hs[None, :] * HID + hs[:, None], mask=m_hh, other=0.0)
                g_a = mm(g_pre.to(DT), w_t.to(DT), PREC, UPCAST)
                a_out = a_in
            g_pre0 = tl.where(a0 > 0.0, g_a, 0.0)                                             # [N, HP]
            _accumulate(gp + OFF_B0 + hs, tl.sum(g_pre0, axis=0), mh)

            # First layer and the sampler: features' gradient into the planes and the points.
            gpx = tl.zeros([BLOCK_N], dtype=tl.float32)
            gpy = tl.zeros([BLOCK_N], dtype=tl.float32)
            gpz = tl.zeros([BLOCK_N], dtype=tl.float32)
            for PLANE in tl.static_range(3):
                u, v = _plane_uv(px, py, pz, PLANE)
                x0, y0, fx, fy, vx0, vx1, vy0, vy1 = _corners(u, v, W, H)
                fx2 = fx[:, None]
                fy2 = fy[:, None]
                base = (b * 3 + PLANE) * H * W * C
                gix = tl.zeros([BLOCK_N], dtype=tl.float32)
                giy = tl.zeros([BLOCK_N], dtype=tl.float32)
                for c0 in range(0, C, BC):
                    cc = c0 + tl.arange(0, BC)
                    off0, m00, m01, m10, m11, v00, v01, v10, v11 = _corner_values(
                        planes_ptr + base, x0, y0, vx0, vx1, vy0, vy1, cc, mask_n, C, W)
                    f = _lerp2(v00, v01, v10, v11, fx2, fy2)
                    rows_w = PLANE * C + cc
                    m_w = (cc < C)[:, None] & mh[None, :]
                    _accumulate(gp + rows_w[:, None] * HID + hs[None, :],
                                mm(tl.trans(f.to(DT)), g_pre0.to(DT), PREC, UPCAST), m_w)
                    w0_t = tl.load(w0_ptr + rows_w[None, :] * HID + hs[:, None],
                                   mask=mh[:, None] & (cc < C)[None, :], other=0.0)                # W0^T [HP, BC]
                    g_f = mm(g_pre0.to(DT), w0_t.to(DT), PREC, UPCAST)                 # [N, BC]
                    dix, diy = _lerp2_bwd(g_planes_ptr + base, off0, m00, m01, m10, m11, v00, v01, v10, v11,
                                          fx2, fy2, g_f, C, W)
                    gix += dix
                    giy += diy
                gpx, gpy, gpz = _add_plane_grad(gpx, gpy, gpz, gix, giy, W, H, inv_bound, PLANE)
            gpx2 = tl.reshape(gpx, [BLOCK_R, BLOCK_S])
            gpy2 = tl.reshape(gpy, [BLOCK_R, BLOCK_S])
            gpz2 = tl.reshape(gpz, [BLOCK_R, BLOCK_S])
            go_x += tl.sum(gpx2, axis=1)
            go_y += tl.sum(gpy2, axis=1)
            go_z += tl.sum(gpz2, axis=1)
            gd_x += tl.sum(gpx2 * t0, axis=1)
            gd_y += tl.sum(gpy2 * t0, axis=1)
            gd_z += tl.sum(gpz2 * t0, axis=1)
            s0 += BLOCK_S
            n_live = tl.sum((mask_r & (tl.exp(-carry) >= eps)).to(tl.int32))
        tl.store(g_rays_o_ptr + rows * 3, go_x, mask=mask_r)
        tl.store(g_rays_o_ptr + rows * 3 + 1, go_y, mask=mask_r)
        tl.store(g_rays_o_ptr + rows * 3 + 2, go_z, mask=mask_r)
        tl.store(g_rays_d_ptr + rows * 3, gd_x, mask=mask_r)
        tl.store(g_rays_d_ptr + rows * 3 + 1, gd_y, mask=mask_r)
        tl.store(g_rays_d_ptr + rows * 3 + 2, gd_z, mask=mask_r)


# --- host side ------------------------------------------------------------------------------------

MAX_HIDDEN = 128   # a tile's activations are [N, HP] float32 register tiles; wider decoders use `torch`
_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """The dots' input precision: fp32 decoders multiply in tf32 where torch's matmuls would
    (backends.triton_tf32), else in full fp32 ("ieee"); half-precision operands ignore it."""
    return "tf32" if backends.triton_tf32(dtype, device) else "ieee"


def launch_config(hidden: int, dtype: torch.dtype, backward: bool) -> dict:
    """Tile (BLOCK_R rays x BLOCK_S samples), padded width HP (a power of two >= 16), warps and
    stages of a launch: the interpreter's unless a GPU's are asked for (fast3d.backends)."""
    hp = max(16, triton.next_power_of_2(hidden))
    if backends.triton_interpreter_configs():
        return dict(BLOCK_R=BLOCK_R, BLOCK_S=BWD_BLOCK_S if backward else FWD_BLOCK_S, HP=hp, num_warps=4,
                    num_stages=1)
    block_r, block_s, warps, stages = _GPU_CONFIGS[(dtype == torch.float32, hp > 64, backward)]
    return dict(BLOCK_R=block_r, BLOCK_S=block_s, HP=hp, num_warps=warps, num_stages=stages)


def shared_memory_bytes(cfg: dict, dtype: torch.dtype, backward: bool) -> int:
    """Shared memory a launch of `cfg` needs: e (N HP + s HP^2) bytes, plus 4 HP OUT_P in the
    backward, with N = BLOCK_R BLOCK_S, e the operand bytes, s = 1 for one stage, 2 for more (the
    middle layers' weights are prefetched). It equals Triton 3.8's compiled figure (sm_86) for
    every fp32 / tf32 configuration measured, and bounds the half-precision ones from above
    (tests/ops/test_triplane.py::COMPILED_SHARED lists the figures)."""
    n, hp = cfg["BLOCK_R"] * cfg["BLOCK_S"], cfg["HP"]
    elem = 4 if dtype == torch.float32 else 2
    stages = 1 if cfg["num_stages"] == 1 else 2
    return elem * (n * hp + stages * hp * hp) + (4 * hp * OUT_P if backward else 0)


def unsupported_decoder(n_layers: int, hidden: int, dtype: torch.dtype, device: torch.device) -> list[str]:
    """Why the fused marcher cannot run this decoder on `device` (empty if it can)."""
    why = []
    if n_layers < 2:
        why.append(f"decoder has {n_layers} layer (the fused marcher needs >= 2: a hidden layer)")
    if hidden > MAX_HIDDEN:
        why.append(f"decoder hidden width {hidden} > {MAX_HIDDEN}")
    if dtype not in _TL_DTYPE:
        why.append(f"decoder dtype {dtype} (fused marcher: float16, bfloat16, float32)")
    if why:
        return why
    if backends.triton_interpreter_configs():
        return why   # the interpreter has no shared memory
    limit = backends.shared_memory_limit(device)
    prec = _precision(dtype, device)
    for backward in (False, True):
        cfg = launch_config(hidden, dtype, backward)
        need = shared_memory_bytes(cfg, dtype, backward)
        if need > limit:
            why.append(f"{'backward' if backward else 'forward'} tile {cfg['BLOCK_R']}x{cfg['BLOCK_S']} at hidden "
                       f"width {hidden} ({dtype}, {prec} dots) needs {need} B of shared memory; {device} allows "
                       f"{limit} B a block")
    return why


def _meta(planes: Tensor, w0: Tensor, backward: bool) -> dict:
    """Compile-time parameters and launch options of a forward or backward launch."""
    prec = _precision(w0.dtype, planes.device)
    cfg = launch_config(w0.shape[1], w0.dtype, backward)
    return dict(cfg, BC=BC, OUT_P=OUT_P, DT=_TL_DTYPE[w0.dtype], PREC=prec, UPCAST=upcast(w0.dtype))


def _n_params(C: int, hid: int, n_mid: int) -> int:
    return 3 * C * hid + hid + n_mid * (hid * hid + hid) + hid * 4 + 4


@torch.library.custom_op("fast3d::render_triplane_triton_fwd", mutates_args=())
def march_fwd(planes: Tensor, rays_o: Tensor, rays_d: Tensor, t: Tensor, near: Tensor, far: Tensor,
              w0: Tensor, b0: Tensor, wm: Tensor, bm: Tensor, wo: Tensor, bo: Tensor,
              density_bias: float, bound: float, eps: float, store_weights: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # planes [B, 3, C, H, W]; rays_o, rays_d [B, R, 3] float32; t [B, R, S] float32 sorted;
    # near, far [B, R] float32 (far <= near: an empty ray); w0 [3C, HID], b0 [HID], wm [N_MID, HID, HID], bm [N_MID, HID],
    # wo [HID, 4], bo [4] (decoder dtype)
    # -> color [B, R, 3] (no background), opacity [B, R], depth [B, R], weights [B, R, S] or [0]
    B, _, C, H, W = planes.shape
    R, S = t.shape[1], t.shape[2]
    f32 = torch.float32
    color, opacity, depth = (t.new_empty(B, R, 3, dtype=f32), t.new_empty(B, R, dtype=f32),
                             t.new_empty(B, R, dtype=f32))
    weights = t.new_zeros((B, R, S) if store_weights else (0,), dtype=f32)
    if B * R == 0:
        return color, opacity, depth, weights
    planes_cl = planes.permute(0, 1, 3, 4, 2).contiguous()              # [B, 3, H, W, C]
    n_mid = wm.shape[0]
    meta = _meta(planes, w0, backward=False)
    with backends.cuda_device_guard(planes.device):
        _march_fwd[(triton.cdiv(R, meta["BLOCK_R"]), B)](
            planes_cl, rays_o, rays_d, t, near, far, w0, b0, wm if n_mid else w0, bm if n_mid else b0, wo, bo,
            color, opacity, depth, weights if store_weights else color,
            R, S, C, H, W, w0.shape[1], n_mid, 1.0 / bound, density_bias, eps, STORE_W=store_weights, **meta)
    return color, opacity, depth, weights


@march_fwd.register_fake
def _(planes, rays_o, rays_d, t, near, far, w0, b0, wm, bm, wo, bo, density_bias, bound, eps, store_weights):
    B, R, S = t.shape
    f32 = torch.float32
    return (t.new_empty(B, R, 3, dtype=f32), t.new_empty(B, R, dtype=f32), t.new_empty(B, R, dtype=f32),
            t.new_empty((B, R, S) if store_weights else (0,), dtype=f32))


@torch.library.custom_op("fast3d::render_triplane_triton_bwd", mutates_args=())
def march_bwd(planes: Tensor, rays_o: Tensor, rays_d: Tensor, t: Tensor, near: Tensor, far: Tensor,
              w0: Tensor, b0: Tensor, wm: Tensor, bm: Tensor, wo: Tensor, bo: Tensor,
              density_bias: float, bound: float, eps: float,
              color: Tensor, opacity: Tensor, depth: Tensor,
              g_color: Tensor, g_opacity: Tensor, g_depth: Tensor) -> list[Tensor]:
    # saved outputs and their gradients: [B, R, 3], [B, R], [B, R] float32
    # -> gradients of planes, rays_o, rays_d, w0, b0, wm, bm, wo, bo (each its input's shape and dtype)
    B, _, C, H, W = planes.shape
    R, S = t.shape[1], t.shape[2]
    hid, n_mid = w0.shape[1], wm.shape[0]
    f32 = torch.float32
    g_planes = torch.zeros(B, 3, H, W, C, dtype=f32, device=planes.device)
    g_o, g_d = torch.zeros_like(rays_o, dtype=f32), torch.zeros_like(rays_d, dtype=f32)
    meta = _meta(planes, w0, backward=True)
    n_rblocks = triton.cdiv(R, meta["BLOCK_R"])
    n_blocks = B * n_rblocks
    if planes.is_cuda:
        sms = torch.cuda.get_device_properties(planes.device).multi_processor_count
        programs = max(1, min(n_blocks, sms * BWD_PROGRAMS_PER_SM))
    else:
        programs = max(1, min(n_blocks, INTERPRET_PROGRAMS))
    P = _n_params(C, hid, n_mid)
    g_params = torch.zeros(programs, P, dtype=f32, device=planes.device)
    if n_blocks > 0:
        with backends.cuda_device_guard(planes.device):
            _march_bwd[(programs,)](
                planes.permute(0, 1, 3, 4, 2).contiguous(), rays_o, rays_d, t, near, far, w0, b0,
                wm if n_mid else w0, bm if n_mid else b0, wo, bo, color, opacity, depth,
                g_color.to(f32).contiguous(), g_opacity.to(f32).contiguous(), g_depth.to(f32).contiguous(),
                g_planes, g_o, g_d, g_params,
                R, S, C, H, W, hid, n_mid, 1.0 / bound, density_bias, eps, n_rblocks, n_blocks, P, **meta)
    sizes = [3 * C * hid, hid, n_mid * hid * hid, n_mid * hid, hid * 4, 4]
    parts = g_params.sum(0).split(sizes)
    g_w = [p.reshape(x.shape).to(x.dtype, copy=True) for p, x in zip(parts, (w0, b0, wm, bm, wo, bo))]
    return [g_planes.permute(0, 1, 4, 2, 3).to(planes.dtype).contiguous(), g_o.to(rays_o.dtype),
            g_d.to(rays_d.dtype), *g_w]


@march_bwd.register_fake
def _(planes, rays_o, rays_d, t, near, far, w0, b0, wm, bm, wo, bo, *rest):
    return [torch.empty_like(x) for x in (planes, rays_o, rays_d, w0, b0, wm, bm, wo, bo)]


def _setup_context(ctx, inputs, output):
    planes, rays_o, rays_d, t, near, far, w0, b0, wm, bm, wo, bo, density_bias, bound, eps, _ = inputs
    color, opacity, depth, _ = output
    ctx.save_for_backward(planes, rays_o, rays_d, t, near, far, w0, b0, wm, bm, wo, bo, color, opacity, depth)
    ctx.consts = (density_bias, bound, eps)


def _backward(ctx, g_color, g_opacity, g_depth, _g_weights):
    planes, rays_o, rays_d, t, near, far, w0, b0, wm, bm, wo, bo, color, opacity, depth = ctx.saved_tensors
    grads = march_bwd(planes, rays_o, rays_d, t, near, far, w0, b0, wm, bm, wo, bo, *ctx.consts, color, opacity,
                      depth, g_color, g_opacity, g_depth)
    g_planes, g_o, g_d, *g_w = grads
    return (g_planes, g_o, g_d, None, None, None, *g_w, None, None, None, None)


march_fwd.register_autograd(_backward, setup_context=_setup_context)


def _decoder_tensors(dec: DecoderWeights) -> tuple[Tensor, ...]:
    """The decoder's layers as the kernels read them (differentiable views of its weights):
    w0 [3C, HID], b0 [HID], wm [N_MID, HID, HID], bm [N_MID, HID], wo [HID, 4], bo [4]."""
    first, last = dec.weights[0], dec.weights[-1]
    hid = first.shape[0]
    if len(dec.weights) > 2:
        wm = torch.stack([w.t() for w in dec.weights[1:-1]]).contiguous()
        bm = torch.stack(dec.biases[1:-1]).contiguous()
    else:
        wm, bm = first.new_zeros(0, hid, hid), first.new_zeros(0, hid)
    return (first.t().contiguous(), dec.biases[0].contiguous(), wm, bm, last.t().contiguous(),
            dec.biases[-1].contiguous())


def render_triplane(planes: Tensor,            # [B, 3, C, H, W]
                    decoder: DecoderWeights,
                    rays_o: Tensor,            # [B, R, 3]
                    rays_d: Tensor,            # [B, R, 3]
                    near: Tensor,              # [B, R]
                    far: Tensor,               # [B, R] (far <= near: an empty ray, skipped)
                    n_samples: int, n_importance: int,
                    background: Tensor | None,  # [3] or [B, R, 3]
                    bound: float, deterministic: bool, generator: torch.Generator | None,
                    transmittance_eps: float) -> dict:
    """Same contract as reference.render_triplane: the reference's sample schedule (stratified,
    then importance samples from the coarse weights, both drawn in PyTorch from the same generator),
    each pass one fused kernel; sample positions are the only per-sample tensors ([B, R, S] float32)."""
    B, R, _ = rays_o.shape
    ctype = decoder.dtype
    f32 = torch.float32
    near, far = near.to(f32).contiguous(), far.to(f32).contiguous()
    rays_o, rays_d = rays_o.to(f32).contiguous(), rays_d.to(f32).contiguous()
    dec = _decoder_tensors(decoder)
    consts = (float(decoder.density_bias), float(bound), float(transmittance_eps))
    t = reference.stratified_samples(near, far, n_samples, deterministic, generator)      # [B, R, S_c]
    if n_importance > 0:
        with torch.no_grad():
            w = march_fwd(planes, rays_o, rays_d, t.contiguous(), near, far, *dec, *consts, True)[3]
            k = torch.arange(n_samples + 1, dtype=f32, device=t.device)
            edges = near[..., None] + (far - near)[..., None] * k / n_samples             # [B, R, S_c + 1]
            t_f = reference.sample_pdf(edges, w, n_importance, deterministic, generator)  # [B, R, S_f]
        t = torch.sort(torch.cat([t, t_f], -1), -1).values                                # [B, R, S]
    color, opacity, depth, _ = march_fwd(planes, rays_o, rays_d, t.contiguous(), near, far, *dec, *consts, False)
    if background is not None:
        color = color + (1.0 - opacity)[..., None] * background.to(f32)
    return dict(color=color.to(ctype), opacity=opacity[..., None].to(ctype), depth=depth[..., None].to(ctype))
