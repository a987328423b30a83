"""Pure-PyTorch twins of :func:`fast3d.triplane_sample` and :func:`fast3d.render_triplane`: the
executable specification, written the way OpenLRM / EG3D write their renderer (grid_sample on each
plane, an MLP on the concatenated features, cumprod compositing), with NeRF's inverse-CDF
importance sampling (``sample_pdf``).

Triplane sampling. Plane 0 is XY (u = x, v = y), plane 1 XZ (u = x, v = z), plane 2 YZ
(u = y, v = z); u indexes the width, v the height. The value for plane i is
``F.grid_sample(planes[:, i], (u, v) / bound, bilinear, zeros padding, align_corners=False)``:
pixel centres at ((k + 0.5) / W) * 2 - 1, corners outside the plane read as zero.

Rendering one ray (o, d) between near and far:

    t_c    = near + (far - near) (k + u_k) / S_c, k < S_c      stratified (u_k = 1/2 if deterministic)
    sigma, rgb = decode(weights, triplane_sample(planes, o + t d))   on the coarse samples
    t_f    = sample_pdf(stratum edges, coarse weights, S_f)     importance samples (no gradient)
    sigma, rgb on t_f too; all samples merged and sorted by t; sample k spans [t_k, t_{k+1}]
    (the last one ends at far); color, opacity, depth = composite(...)

The sample positions are constants of the backward (as in NeRF and OpenLRM): gradients reach rays_o
and rays_d through the points o + t d, not through t. The public function clips [near, far] to the
planes' box before it calls a backend (api.box_interval); a ray that misses the box arrives with
near = far, an empty interval: every sample has dt = 0, so nothing is composited (opacity 0, the
background, zero gradients).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fast3d.ops.composite import reference as composite_reference
from fast3d.ops.triplane.decoder import DecoderWeights, decode

# (u, v) coordinate axes of planes 0 (XY), 1 (XZ) and 2 (YZ).
PLANE_AXES = ((0, 1), (0, 2), (1, 2))
_HALF = (torch.float16, torch.bfloat16)


def triplane_sample(planes: Tensor,   # [B, 3, C, H, W]
                    points: Tensor,   # [B, M, 3]
                    reduce: str = "concat",
                    bound: float = 1.0) -> Tensor:
    """Bilinear features of M points per batch: [B, M, 3C] ("concat", plane-major), [B, M, C]
    ("sum" | "mean" over the planes). Computed in float32 at least; returned in planes' dtype."""
    B, _, C, H, W = planes.shape
    M = points.shape[1]
    ctype = torch.promote_types(torch.promote_types(planes.dtype, points.dtype), torch.float32)
    coords = points.to(ctype) / bound                                            # [B, M, 3]
    grid = torch.stack([coords[..., list(ax)] for ax in PLANE_AXES], 1)          # [B, 3, M, 2]
    feats = F.grid_sample(planes.to(ctype).reshape(B * 3, C, H, W), grid.reshape(B * 3, 1, M, 2),
                          mode="bilinear", padding_mode="zeros", align_corners=False)  # [B*3, C, 1, M]
    feats = feats.reshape(B, 3, C, M).permute(0, 3, 1, 2)                        # [B, M, 3, C]
    if reduce == "concat":
        out = feats.reshape(B, M, 3 * C)
    elif reduce == "sum":
        out = feats.sum(2)
    else:
        out = feats.mean(2)
    return out.to(planes.dtype)


def stratified_samples(near: Tensor,   # [B, R]
                       far: Tensor,    # [B, R]
                       n: int, deterministic: bool, generator: torch.Generator | None) -> Tensor:
    """n sorted samples per ray, one in each of n equal strata of [near, far]: [B, R, n]."""
    B, R = near.shape
    if deterministic:
        u = torch.full((B, R, n), 0.5, dtype=near.dtype, device=near.device)
    else:
        dev = generator.device if generator is not None else near.device
        u = torch.rand((B, R, n), generator=generator, dtype=near.dtype, device=dev).to(near.device)
    k = torch.arange(n, dtype=near.dtype, device=near.device)
    return near[..., None] + (far - near)[..., None] * (k + u) / n


def sample_pdf(bins: Tensor,      # [..., K + 1] sorted bin edges
               weights: Tensor,   # [..., K] non-negative bin weights
               n: int, deterministic: bool, generator: torch.Generator | None) -> Tensor:
    """NeRF's inverse-CDF sampling of a piecewise-constant PDF: n samples [..., n], sorted.

    pdf = (w + 1e-5) / sum (the 1e-5 keeps empty rays uniform), cdf with 0 prepended; u uniform in
    [0, 1) (evenly spaced ``linspace(0, 1, n)`` if deterministic); bin j with cdf_j <= u < cdf_{j+1}
    and the linear inverse inside it."""
    weights = weights.detach() + 1e-5
    pdf = weights / weights.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[..., :1]), torch.cumsum(pdf, -1)], -1)    # [..., K + 1]
    shape = (*cdf.shape[:-1], n)
    if deterministic:
        u = torch.linspace(0.0, 1.0, n, dtype=cdf.dtype, device=cdf.device).expand(shape)
    else:
        dev = generator.device if generator is not None else cdf.device
        u = torch.rand(shape, generator=generator, dtype=cdf.dtype, device=dev).to(cdf.device)
    u = u.contiguous()
    K = weights.shape[-1]
    idx = torch.searchsorted(cdf.contiguous(), u, right=True)                      # [..., n] in [1, K+1]
    below = (idx - 1).clamp(0, K)
    above = idx.clamp(0, K)
    cdf_lo, cdf_hi = cdf.gather(-1, below), cdf.gather(-1, above)
    bin_lo, bin_hi = bins.gather(-1, below), bins.gather(-1, above)
    denom = cdf_hi - cdf_lo
    frac = torch.where(denom < 1e-5, torch.zeros_like(u), (u - cdf_lo) / denom.clamp_min(1e-5))
    return (bin_lo + frac * (bin_hi - bin_lo)).detach()


def render_triplane(planes: Tensor,                # [B, 3, C, H, W]
                    decoder: DecoderWeights,       # [..., 3C] -> sigma [...], rgb [..., 3]
                    rays_o: Tensor,                # [B, R, 3]
                    rays_d: Tensor,                # [B, R, 3]
                    near: Tensor,                  # [B, R]
                    far: Tensor,                   # [B, R]
                    n_samples: int,
                    n_importance: int,
                    background: Tensor | None,     # [3] or [B, R, 3]
                    bound: float,
                    deterministic: bool,
                    generator: torch.Generator | None,
                    transmittance_eps: float,
                    sample_fn: Callable = triplane_sample,
                    composite_fn: Callable = composite_reference.composite) -> dict:
    """Stratified + importance sampling, decoding and compositing (see the module docstring).
    ``sample_fn`` and ``composite_fn`` are the triplane sampler and the compositor; the reference
    uses grid_sample and cumprod, the `triton` backend passes its kernels."""
    B, R, _ = rays_o.shape
    ctype = decoder.dtype
    near, far = near.to(ctype), far.to(ctype)

    def decode_at(t: Tensor) -> tuple[Tensor, Tensor]:             # t [B, R, S] -> [B, R, S], [B, R, S, 3]
        S = t.shape[-1]
        pts = rays_o.to(ctype)[:, :, None] + t[..., None] * rays_d.to(ctype)[:, :, None]   # [B, R, S, 3]
        feats = sample_fn(planes, pts.reshape(B, R * S, 3), "concat", bound)               # [B, R*S, 3C]
        sigma, rgb = decode(decoder, feats.to(ctype))
        return sigma.reshape(B, R, S), rgb.reshape(B, R, S, 3)

    def comp(sigma, rgb, t, bg, eps):                           # [B, R, S] samples -> [B*R, ...] outputs
        S = t.shape[-1]
        t_ends = torch.cat([t[..., 1:], far[..., None]], -1)
        return composite_fn(sigma.reshape(B * R, S), rgb.reshape(B * R, S, 3), t.reshape(B * R, S),
                            t_ends.reshape(B * R, S), bg, eps)

    t = stratified_samples(near, far, n_samples, deterministic, generator)         # [B, R, S_c]
    sigma, rgb = decode_at(t)
    if n_importance > 0:
        with torch.no_grad():
            w = comp(sigma, rgb, t, None, transmittance_eps)[3].reshape(B, R, n_samples)
            k = torch.arange(n_samples + 1, dtype=ctype, device=t.device)
            edges = near[..., None] + (far - near)[..., None] * k / n_samples    # [B, R, S_c + 1]
            t_f = sample_pdf(edges, w, n_importance, deterministic, generator)  # [B, R, S_f]
        sigma_f, rgb_f = decode_at(t_f)
        t, order = torch.sort(torch.cat([t, t_f], -1), -1)                         # [B, R, S]
        sigma = torch.cat([sigma, sigma_f], -1).gather(-1, order)
        rgb = torch.cat([rgb, rgb_f], -2).gather(-2, order[..., None].expand(*order.shape, 3))
    bg = None
    if background is not None:
        bg = background.to(ctype)
        bg = bg if bg.dim() == 1 else bg.reshape(B * R, 3)
    color, opacity, depth, _ = comp(sigma, rgb, t, bg, transmittance_eps)
    return dict(color=color.reshape(B, R, 3), opacity=opacity.reshape(B, R, 1), depth=depth.reshape(B, R, 1))
