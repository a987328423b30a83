"""The `triton` backends of triplane_sample and render_triplane.

triplane_sample: a program takes BLOCK_M points of one batch element and, per plane, gathers the
four bilinear corners of a BLOCK_C channel tile from a channels-last copy of the planes
([B, 3, H, W, C], so a corner's channels are contiguous). grid_sample's align_corners=False maps
the normalised coordinate g in [-1, 1] to the pixel coordinate ((g + 1) W - 1) / 2; corners outside
the plane read zero (padding_mode="zeros").

Backward, per point and plane, with corner values P_yx and fractions fx, fy:
    dL/dP_yx += w_yx g_c                                   (atomic adds into a float32 buffer)
    dL/dix    = sum_c g_c ((P_01 - P_00)(1 - fy) + (P_11 - P_10) fy)
    dL/diy    = sum_c g_c ((P_10 - P_00)(1 - fx) + (P_11 - P_01) fx)
and dix/du = W / (2 bound), diy/dv = H / (2 bound); u, v are (x, y), (x, z), (y, z) for planes 0-2.

render_triplane's `triton` backend is the fused marcher in march.py (it reuses _corners and
_plane_uv).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fast3d import backends
from fast3d.ops._triton_math import rne

BLOCK_M = 64
# Channels per gather. Chosen by the sm_90 build's static register use (fast3d.triton_aot; no GPU
# has timed it yet): 64 points x 16 channels at 4 warps spills nothing in the forward and 56 bytes
# a thread in the backward; 64 x 64 spilled 2.6 kB (forward) and 5.3 kB (backward).
MAX_BLOCK_C = 16
_REDUCE = {"concat": 0, "sum": 1, "mean": 2}


@triton.jit
def _corners(u, v, W, H):
    """Pixel corners of normalised (u, v): x0, y0 (int32), fx, fy, validity of x0, x1, y0, y1."""
    ix = ((u + 1.0) * W - 1.0) * 0.5
    iy = ((v + 1.0) * H - 1.0) * 0.5
    # Far outside the plane every corner is padding; clamping keeps the int conversion in range.
    ix = tl.minimum(tl.maximum(ix, -2.0), W + 1.0)
    iy = tl.minimum(tl.maximum(iy, -2.0), H + 1.0)
    x0f = tl.floor(ix)
    y0f = tl.floor(iy)
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    return (x0, y0, ix - x0f, iy - y0f, (x0 >= 0) & (x0 < W), (x0 + 1 >= 0) & (x0 + 1 < W),
            (y0 >= 0) & (y0 < H), (y0 + 1 >= 0) & (y0 + 1 < H))


@triton.jit
def _plane_uv(x, y, z, PLANE: tl.constexpr):
    if PLANE == 0:
        return x, y
    elif PLANE == 1:
        return x, z
    else:
        return y, z


@triton.jit
def _corner_values(base, x0, y0, vx0, vx1, vy0, vy1, cc, mask_n, C, W):
    """Offsets (of corner 00) and masks of a [N, BC] channel tile's four bilinear corners in one
    channels-last plane ([H, W, C] at `base`), and their values in float32."""
    mc = mask_n[:, None] & (cc < C)[None, :]
    off = ((y0 * W + x0).to(tl.int64) * C)[:, None] + cc[None, :]
    m00 = mc & (vy0 & vx0)[:, None]
    m01 = mc & (vy0 & vx1)[:, None]
    m10 = mc & (vy1 & vx0)[:, None]
    m11 = mc & (vy1 & vx1)[:, None]
    v00 = tl.load(base + off, mask=m00, other=0.0).to(tl.float32)
    v01 = tl.load(base + off + C, mask=m01, other=0.0).to(tl.float32)
    v10 = tl.load(base + off + W * C, mask=m10, other=0.0).to(tl.float32)
    v11 = tl.load(base + off + W * C + C, mask=m11, other=0.0).to(tl.float32)
    return off, m00, m01, m10, m11, v00, v01, v10, v11


@triton.jit
def _lerp2(v00, v01, v10, v11, fx2, fy2):
    """Bilinear value from the corner values [N, BC] and fractions [N, 1]."""
    return (v00 * (1.0 - fx2) + v01 * fx2) * (1.0 - fy2) + (v10 * (1.0 - fx2) + v11 * fx2) * fy2


@triton.jit
def _lerp2_bwd(g_base, off, m00, m01, m10, m11, v00, v01, v10, v11, fx2, fy2, g, C, W):
    """Backward of _lerp2 for the feature gradient g [N, BC]: atomic adds into the plane gradient
    at g_base (channels-last, float32), and d/d(ix), d/d(iy) summed over the tile's channels [N]."""
    # Relaxed: only the sums matter, nothing is read back in this kernel (acq_rel's fences buy nothing).
    tl.atomic_add(g_base + off, g * (1.0 - fx2) * (1.0 - fy2), mask=m00, sem="relaxed")
    tl.atomic_add(g_base + off + C, g * fx2 * (1.0 - fy2), mask=m01, sem="relaxed")
    tl.atomic_add(g_base + off + W * C, g * (1.0 - fx2) * fy2, mask=m10, sem="relaxed")
    tl.atomic_add(g_base + off + W * C + C, g * fx2 * fy2, mask=m11, sem="relaxed")
    gix = tl.sum(g * ((v01 - v00) * (1.0 - fy2) + (v11 - v10) * fy2), axis=1)
    giy = tl.sum(g * ((v10 - v00) * (1.0 - fx2) + (v11 - v01) * fx2), axis=1)
    return gix, giy


@triton.jit
def _add_plane_grad(gx, gy, gz, gix, giy, W, H, inv_bound, PLANE: tl.constexpr):
    """Add one plane's pixel-coordinate gradient to the point's (x, y, z) gradient:
    d(ix)/du = W / 2, d(iy)/dv = H / 2, d(u, v)/d(point) = 1 / bound on the plane's two axes."""
    gu = gix * (0.5 * W) * inv_bound
    gv = giy * (0.5 * H) * inv_bound
    if PLANE == 0:
        return gx + gu, gy + gv, gz
    elif PLANE == 1:
        return gx + gu, gy, gz + gv
    else:
        return gx, gy + gu, gz + gv


@triton.jit
def _point_block(points_ptr, M, inv_bound, BLOCK_M: tl.constexpr):
    """This program's scene b and BLOCK_M points of it, scaled to the planes' [-1, 1] box."""
    b = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    pt = points_ptr + (b * M + offs_m) * 3
    x = tl.load(pt + 0, mask=mask_m, other=0.0).to(tl.float32) * inv_bound
    y = tl.load(pt + 1, mask=mask_m, other=0.0).to(tl.float32) * inv_bound
    z = tl.load(pt + 2, mask=mask_m, other=0.0).to(tl.float32) * inv_bound
    return b, offs_m, mask_m, x, y, z


@triton.jit
def _triplane_fwd(planes_ptr,   # [B, 3, H, W, C] channels-last
                  points_ptr,   # [B, M, 3]
                  out_ptr,      # [B, M, 3, C] (concat) or [B, M, C]
                  M, C, H, W, inv_bound,
                  REDUCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    b, offs_m, mask_m, x, y, z = _point_block(points_ptr, M, inv_bound, BLOCK_M)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        mc = mask_m[:, None] & (cc < C)[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for PLANE in tl.static_range(3):
            u, v = _plane_uv(x, y, z, PLANE)
            x0, y0, fx, fy, vx0, vx1, vy0, vy1 = _corners(u, v, W, H)
            base = planes_ptr + (b * 3 + PLANE) * H * W * C
            _, _, _, _, _, v00, v01, v10, v11 = _corner_values(base, x0, y0, vx0, vx1, vy0, vy1, cc, mask_m, C, W)
            val = _lerp2(v00, v01, v10, v11, fx[:, None], fy[:, None])
            if REDUCE == 0:
                o = out_ptr + ((b * M + offs_m) * 3 + PLANE)[:, None] * C + cc[None, :]
                tl.store(o, rne(val, out_ptr.dtype.element_ty), mask=mc)
            else:
                acc += val
        if REDUCE != 0:
            if REDUCE == 2:
                acc = acc * (1.0 / 3.0)
            o = out_ptr + (b * M + offs_m)[:, None] * C + cc[None, :]
            tl.store(o, rne(acc, out_ptr.dtype.element_ty), mask=mc)


@triton.jit
def _triplane_bwd(planes_ptr,    # [B, 3, H, W, C] channels-last
                  points_ptr,    # [B, M, 3]
                  g_out_ptr,     # [B, M, 3, C] (concat) or [B, M, C], contiguous
                  g_planes_ptr,  # [B, 3, H, W, C] float32, zero-initialised (atomic adds)
                  g_points_ptr,  # [B, M, 3] float32
                  M, C, H, W, inv_bound,
                  REDUCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    b, offs_m, mask_m, x, y, z = _point_block(points_ptr, M, inv_bound, BLOCK_M)
    gx = tl.zeros([BLOCK_M], dtype=tl.float32)
    gy = tl.zeros([BLOCK_M], dtype=tl.float32)
    gz = tl.zeros([BLOCK_M], dtype=tl.float32)
    for PLANE in tl.static_range(3):
        u, v = _plane_uv(x, y, z, PLANE)
        x0, y0, fx, fy, vx0, vx1, vy0, vy1 = _corners(u, v, W, H)
        fx2 = fx[:, None]
        fy2 = fy[:, None]
        gix = tl.zeros([BLOCK_M], dtype=tl.float32)
        giy = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            mc = mask_m[:, None] & (cc < C)[None, :]
            if REDUCE == 0:
                go = g_out_ptr + ((b * M + offs_m) * 3 + PLANE)[:, None] * C + cc[None, :]
            else:
                go = g_out_ptr + (b * M + offs_m)[:, None] * C + cc[None, :]
            g = tl.load(go, mask=mc, other=0.0).to(tl.float32)
            if REDUCE == 2:
                g = g * (1.0 / 3.0)
            plane = (b * 3 + PLANE) * H * W * C
            off, m00, m01, m10, m11, v00, v01, v10, v11 = _corner_values(planes_ptr + plane, x0, y0, vx0, vx1, vy0,
                                                                         vy1, cc, mask_m, C, W)
            dix, diy = _lerp2_bwd(g_planes_ptr + plane, off, m00, m01, m10, m11, v00, v01, v10, v11, fx2, fy2, g,
                                  C, W)
            gix += dix
            giy += diy
        gx, gy, gz = _add_plane_grad(gx, gy, gz, gix, giy, W, H, inv_bound, PLANE)
    gp = g_points_ptr + (b * M + offs_m) * 3
    tl.store(gp + 0, gx, mask=mask_m)
    tl.store(gp + 1, gy, mask=mask_m)
    tl.store(gp + 2, gz, mask=mask_m)


def _block_c(C: int) -> int:
    return min(triton.next_power_of_2(C), MAX_BLOCK_C)


def _out_shape(B: int, M: int, C: int, reduce: str) -> tuple:
    return (B, M, 3 * C) if reduce == "concat" else (B, M, C)


@torch.library.custom_op("fast3d::triplane_sample_triton_fwd", mutates_args=())
def triplane_fwd(planes: Tensor, points: Tensor, reduce: str, bound: float) -> Tensor:
    # planes [B, 3, C, H, W], points [B, M, 3] -> [B, M, 3C] or [B, M, C] in planes' dtype
    B, _, C, H, W = planes.shape
    M = points.shape[1]
    out = planes.new_empty(_out_shape(B, M, C, reduce))
    if B * M == 0:
        return out
    planes_cl = planes.permute(0, 1, 3, 4, 2).contiguous()              # [B, 3, H, W, C]
    with backends.cuda_device_guard(planes.device):
        _triplane_fwd[(triton.cdiv(M, BLOCK_M), B)](
            planes_cl, points.contiguous(), out, M, C, H, W, 1.0 / bound,
            REDUCE=_REDUCE[reduce], BLOCK_M=BLOCK_M, BLOCK_C=_block_c(C))
    return out


@triplane_fwd.register_fake
def _(planes, points, reduce, bound):
    B, _, C, H, W = planes.shape
    return planes.new_empty(_out_shape(B, points.shape[1], C, reduce))


@torch.library.custom_op("fast3d::triplane_sample_triton_bwd", mutates_args=())
def triplane_bwd(planes: Tensor, points: Tensor, reduce: str, bound: float, g_out: Tensor) -> tuple[Tensor, Tensor]:
    # -> g_planes [B, 3, C, H, W] (planes' dtype), g_points [B, M, 3] (points' dtype)
    B, _, C, H, W = planes.shape
    M = points.shape[1]
    g_planes_cl = torch.zeros(B, 3, H, W, C, dtype=torch.float32, device=planes.device)
    g_points = torch.empty(B, M, 3, dtype=torch.float32, device=points.device)
    if B * M > 0:
        with backends.cuda_device_guard(planes.device):
            _triplane_bwd[(triton.cdiv(M, BLOCK_M), B)](
                planes.permute(0, 1, 3, 4, 2).contiguous(), points.contiguous(), g_out.contiguous(), g_planes_cl,
                g_points, M, C, H, W, 1.0 / bound, REDUCE=_REDUCE[reduce], BLOCK_M=BLOCK_M, BLOCK_C=_block_c(C))
    return g_planes_cl.permute(0, 1, 4, 2, 3).to(planes.dtype).contiguous(), g_points.to(points.dtype)


@triplane_bwd.register_fake
def _(planes, points, reduce, bound, g_out):
    return torch.empty_like(planes), torch.empty_like(points)


def _setup_context(ctx, inputs, output):
    planes, points, reduce, bound = inputs
    ctx.save_for_backward(planes, points)
    ctx.reduce, ctx.bound = reduce, bound


def _backward(ctx, g_out):
    planes, points = ctx.saved_tensors
    g_planes, g_points = triplane_bwd(planes, points, ctx.reduce, ctx.bound, g_out)
    return g_planes, g_points, None, None


triplane_fwd.register_autograd(_backward, setup_context=_setup_context)


def triplane_sample(planes: Tensor,   # [B, 3, C, H, W]
                    points: Tensor,   # [B, M, 3]
                    reduce: str, bound: float) -> Tensor:
    """Same contract as reference.triplane_sample; float32 arithmetic, planes' dtype out."""
    return triplane_fwd(planes, points, reduce, float(bound))

