"""A hand-written reference of ImageDream's multi-view UNet, for tests only.

Re-derived (facts only: module names, order of operations, key names, shapes, eps values) from
reading ashawkey/mvdream_diffusers mv_unet.py at commit 8b318ef (`MultiViewUNetModel` with
ip_dim > 0, the "pixel controller" variant; ip_dim = 0 gives MVDream) and ImageDream's
camera_utils.py. Plain fp32 PyTorch; `RefMultiViewUNet().state_dict()` has exactly the
original's keys, so tests can feed it to fast3d's converter and compare outputs. Parameters
keep PyTorch's default init (the original zero-inits some output layers) so that a random
instance exercises every path. Dropouts are nn.Identity where their index counts.

Shapes: B samples of F = num_frames views each (the last view is the reference image for
ImageDream), h x w latents, T text tokens, N_img CLIP image tokens.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def get_camera(num_frames: int, elevation: float = 0.0, extra_view: bool = False) -> Tensor:
    """Camera-to-world matrices, flattened, of views orbiting the origin at radius 1, azimuths
    0, 360/F, ... degrees: OpenGL axes (x right, y up, z back) then turned into Blender's world
    (z up). extra_view appends an all-zero row (ImageDream's reference view). -> [F(+1), 16]"""
    az = torch.deg2rad(torch.arange(num_frames, dtype=torch.float64) * (360.0 / num_frames))
    el = torch.tensor(math.radians(elevation), dtype=torch.float64).expand_as(az)
    pos = torch.stack([el.cos() * az.sin(), el.sin(), el.cos() * az.cos()], -1)  # [F, 3]
    right = torch.stack([az.cos(), torch.zeros_like(az), -az.sin()], -1)  # [F, 3]
    up = torch.linalg.cross(pos, right)  # [F, 3]
    c2w = torch.eye(4, dtype=torch.float64).repeat(num_frames, 1, 1)  # [F, 4, 4]
    c2w[:, :3, :4] = torch.stack([right, up, pos, pos], -1)
    c2w = c2w[:, [0, 2, 1, 3]]  # OpenGL -> Blender: new y = -old z, new z = old y
    c2w[:, 1] *= -1
    cams = c2w.reshape(num_frames, 16).float()
    return torch.cat([cams, cams.new_zeros(1, 16)]) if extra_view else cams


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """t: [N] -> [N, dim] as [cos, sin] of t * 10000^(-i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs.to(t.device)
    return torch.cat([args.cos(), args.sin()], -1)


def _mha(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """q: [N, Lq, H*d], k, v: [N, Lk, H*d] -> [N, Lq, H*d]; softmax scale d**-0.5."""
    n, lq, _ = q.shape
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, lq, -1)


def _mlp(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, cout), nn.SiLU(), nn.Linear(cout, cout))


def _ff(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: Tensor, lat: Tensor) -> Tensor:  # x [N, N_img, D], lat [N, Q, D]
        x, lat = self.norm1(x), self.norm2(lat)
        k, v = self.to_kv(torch.cat([x, lat], 1)).chunk(2, -1)  # keys: image tokens, then latents
        return self.to_out(_mha(self.to_q(lat), k, v, self.heads))


class Resampler(nn.Module):
    """CLIP image tokens -> `queries` learned tokens of width out_dim (IP-Adapter-Plus style)."""

    def __init__(self, dim, depth, dim_head, heads, queries, embedding_dim, out_dim, ff_mult=4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _ff(dim, ff_mult)]) for _ in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:  # x [N, N_img, embedding_dim] -> [N, Q, out_dim]
        x = self.proj_in(x)
        lat = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            lat = attn(x, lat) + lat
            lat = ff(lat) + lat
        return self.norm_out(self.proj_out(lat))


class Attention(nn.Module):
    """Self- (ctx_dim None) or cross-attention; with n_ip > 0 the last n_ip context tokens are
    attended separately through to_k_ip / to_v_ip and added with weight ip_weight."""

    def __init__(self, dim, ctx_dim, heads, dim_head, n_ip=0, ip_weight=1.0):
        super().__init__()
        inner, ctx_dim = heads * dim_head, ctx_dim or dim
        self.heads, self.n_ip, self.ip_weight = heads, n_ip, ip_weight
        if n_ip > 0:
            self.to_k_ip = nn.Linear(ctx_dim, inner, bias=False)
            self.to_v_ip = nn.Linear(ctx_dim, inner, bias=False)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(ctx_dim, inner, bias=False)
        self.to_v = nn.Linear(ctx_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))

    def forward(self, x: Tensor, ctx: Tensor | None = None) -> Tensor:
        # x [N, L, dim]; ctx [N, T (+ n_ip), ctx_dim] or None (self-attention)
        ctx = x if ctx is None else ctx
        q = self.to_q(x)
        txt = ctx[:, : ctx.shape[1] - self.n_ip]
        out = _mha(q, self.to_k(txt), self.to_v(txt), self.heads)
        if self.n_ip > 0:
            img = ctx[:, -self.n_ip :]
            out = out + self.ip_weight * _mha(q, self.to_k_ip(img), self.to_v_ip(img), self.heads)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.proj = nn.Linear(cin, 2 * cout)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, -1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock3D(nn.Module):
    def __init__(self, dim, heads, dim_head, ctx_dim, n_ip, ip_weight):
        super().__init__()
        self.attn1 = Attention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, ctx_dim, heads, dim_head, n_ip, ip_weight)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, ctx: Tensor, num_frames: int) -> Tensor:
        # x [(B F), L, dim]; ctx [(B F), T + n_ip, ctx_dim]
        bf, L, c = x.shape
        x = x.reshape(bf // num_frames, num_frames * L, c)  # self-attention across the F views
        x = (self.attn1(self.norm1(x)) + x).reshape(bf, L, c)
        x = self.attn2(self.norm2(x), ctx) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer3D(nn.Module):
    """depth > 1 builds here; the original only builds depth 1 for an int context_dim."""

    def __init__(self, ch, dim_head, ctx_dim, depth, n_ip, ip_weight):
        super().__init__()
        heads = ch // dim_head  # inner width heads * dim_head == ch
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock3D(ch, heads, dim_head, ctx_dim, n_ip, ip_weight) for _ in range(depth)
        )
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: Tensor, ctx: Tensor, num_frames: int) -> Tensor:
        # x [(B F), C, h, w]; ctx [(B F), T + n_ip, ctx_dim]
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # [(B F), h*w, inner]
        for block in self.transformer_blocks:
            t = block(t, ctx, num_frames)
        return x + self.proj_out(t).transpose(1, 2).reshape(b, c, h, w)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(  # [2] is the original's Dropout
            nn.GroupNorm(32, cout), nn.SiLU(), nn.Identity(), nn.Conv2d(cout, cout, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # x [N, cin, h, w]; emb [N, emb_dim]
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Blocks(nn.Sequential):
    def forward(self, h: Tensor, emb: Tensor, ctx: Tensor, num_frames: int) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer3D):
                h = layer(h, ctx, num_frames)
            else:
                h = layer(h)
        return h


class RefMultiViewUNet(nn.Module):
    """ip_dim: the number of image-prompt tokens (the Resampler's queries); 0 gives MVDream."""

    def __init__(
        self, *, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions, channel_mult,
        num_head_channels, context_dim, camera_dim, ip_dim, ip_weight=1.0, transformer_depth=1,
        resampler_depth=4, resampler_dim_head=64, resampler_heads=12, resampler_embedding_dim=1280,
    ):  # fmt: skip
        super().__init__()
        self.model_channels, self.ip_dim = model_channels, ip_dim
        if ip_dim > 0:
            self.image_embed = Resampler(
                context_dim, resampler_depth, resampler_dim_head, resampler_heads, ip_dim,
                resampler_embedding_dim, context_dim,
            )  # fmt: skip
        emb = 4 * model_channels
        self.time_embed = _mlp(model_channels, emb)
        self.camera_embed = _mlp(camera_dim, emb)
        res = partial(ResBlock, emb_dim=emb)
        st = partial(
            SpatialTransformer3D, dim_head=num_head_channels, ctx_dim=context_dim, depth=transformer_depth,
            n_ip=ip_dim, ip_weight=ip_weight,
        )  # fmt: skip

        self.input_blocks = nn.ModuleList([Blocks(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skips, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(st(ch))
                self.input_blocks.append(Blocks(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(Blocks(Downsample(ch)))
                skips.append(ch)
                ds *= 2
        self.middle_block = Blocks(res(ch, ch), st(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(st(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Blocks(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(
        self, x: Tensor, timesteps: Tensor, context: Tensor, camera: Tensor, num_frames: int,
        ip: Tensor | None = None, ip_img: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        # x [(B F), C, h, w]
        # timesteps [(B F)]
        # context [(B F), T, context_dim]
        # camera [(B F), camera_dim]
        # ip [(B F), N_img, resampler_embedding_dim]: CLIP penultimate hidden states
        # ip_img [B, C, h, w]: the reference image's latents, put in as view F - 1 of each sample
        # -> [(B F), out_channels, h, w]
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        emb = emb + self.camera_embed(camera)
        if self.ip_dim > 0:
            x = x.clone()
            x[num_frames - 1 :: num_frames] = ip_img
            context = torch.cat([context, self.image_embed(ip)], 1)  # text tokens, then ip tokens
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context, num_frames)
            hs.append(h)
        h = self.middle_block(h, emb, context, num_frames)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], 1), emb, context, num_frames)
        return self.out(h)
