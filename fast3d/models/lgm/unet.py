"""LGM's asymmetric multi-view U-Net: ResNet blocks (GroupNorm, SiLU), strided-conv downsampling,
nearest + conv upsampling, skip connections scaled by sqrt(1/2), and cross-view self-attention at
the lowest-resolution levels. The views of a sample travel along the batch, ``(B V) C h w``;
everything is per view except :class:`CrossViewAttention`, where the tokens of all V views of a
sample attend to each other (through :func:`fast3d.multiview_attention`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fast3d.models.lgm.config import LGMConfig
from fast3d.ops.attention import multiview_attention

SKIP_SCALE = math.sqrt(0.5)   # LGM's: keeps residual sums at unit variance
IN_CHANNELS = 9               # ImageNet-normalised RGB + 6-channel Pluecker rays
OUT_CHANNELS = 14             # position 3, opacity 1, scale 3, rotation 4, colour 3


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:  # [N, cin, h, w] -> [N, cout, h, w]
        y = self.conv1(F.silu(self.norm1(x)))
        y = self.conv2(F.silu(self.norm2(y)))
        return (y + self.shortcut(x)) * SKIP_SCALE


class CrossViewAttention(nn.Module):
    """Self-attention over the tokens of all ``num_views`` views of a sample (LGM's MVAttention):
    pre-GroupNorm, ``to_q``/``to_k``/``to_v`` (no bias, as LGM), attention across the views,
    ``to_out``, scaled residual. The projections are plain Linear layers, for LoRA to target.
    ``backend`` is the :func:`fast3d.multiview_attention` backend it runs on (``LGM`` sets it)."""

    def __init__(self, dim: int, heads: int, groups: int, num_views: int, backend: str = "auto"):
        super().__init__()
        self.heads, self.num_views, self.backend = heads, num_views, backend
        self.norm = nn.GroupNorm(groups, dim, eps=1e-5)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # [B*V, C, h, w] -> [B*V, C, h, w]
        BV, C, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)                         # [B*V, L, C]
        q, k, v = (p(tokens).unflatten(-1, (self.heads, C // self.heads))       # [B*V, L, H, Dh]
                   for p in (self.to_q, self.to_k, self.to_v))
        out = multiview_attention(q, k, v, num_views=self.num_views, layout="views", backend=self.backend)
        out = self.to_out(out.flatten(2).to(tokens.dtype))                       # [B*V, L, C]
        return (out.transpose(1, 2).reshape(BV, C, h, w) + x) * SKIP_SCALE


class Layer(nn.Module):
    """A ResNet block, followed by cross-view attention at attention levels."""

    def __init__(self, cin: int, cout: int, cfg: LGMConfig, attention: bool):
        super().__init__()
        self.resnet = ResnetBlock(cin, cout, cfg.norm_groups)
        self.attn = (CrossViewAttention(cout, cfg.attention_heads, cfg.norm_groups, cfg.num_input_views)
                     if attention else None)

    def forward(self, x: Tensor) -> Tensor:  # [B*V, cin, h, w] -> [B*V, cout, h, w]
        x = self.resnet(x)
        return x if self.attn is None else self.attn(x)


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, cfg: LGMConfig, attention: bool, downsample: bool):
        super().__init__()
        self.layers = nn.ModuleList(Layer(cin if i == 0 else cout, cout, cfg, attention)
                                    for i in range(cfg.layers_per_block))
        self.downsample = nn.Conv2d(cout, cout, 3, stride=2, padding=1) if downsample else None

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:  # [N, cin, h, w] -> x, the skips
        skips = []
        for layer in self.layers:
            x = layer(x)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    def __init__(self, channels: int, cfg: LGMConfig, attention: bool):
        super().__init__()
        self.first = Layer(channels, channels, cfg, attention)
        self.second = ResnetBlock(channels, channels, cfg.norm_groups)

    def forward(self, x: Tensor) -> Tensor:  # [N, C, h, w] -> [N, C, h, w]
        return self.second(self.first(x))


class UpBlock(nn.Module):
    """``len(skip_channels)`` layers, each on the concatenation of x and one skip (popped from the
    end of the skip list), then nearest 2x upsampling and a conv."""

    def __init__(self, cin: int, skip_channels: list[int], cout: int, cfg: LGMConfig, attention: bool,
                 upsample: bool):
        super().__init__()
        self.layers = nn.ModuleList(Layer((cin if i == 0 else cout) + cs, cout, cfg, attention)
                                    for i, cs in enumerate(skip_channels))
        self.upsample = nn.Conv2d(cout, cout, 3, padding=1) if upsample else None

    def forward(self, x: Tensor, skips: list[Tensor]) -> Tensor:  # [N, cin, h, w] -> [N, cout, h', w']
        for layer, skip in zip(self.layers, reversed(skips)):
            x = layer(torch.cat([x, skip], 1))
        if self.upsample is not None:
            x = self.upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class UNet(nn.Module):
    """``[B*V, 9, s, s] -> [B*V, 14, p, p]`` with p = ``cfg.splat_size``: down blocks (the last
    without downsampling), a middle block, up blocks (the last without upsampling), fewer up than
    down blocks when p < s. Block calls are checkpointed in training when
    ``cfg.activation_checkpointing``."""

    def __init__(self, cfg: LGMConfig):
        super().__init__()
        self.checkpointing = cfg.activation_checkpointing
        down, up, k = cfg.down_channels, cfg.up_channels, cfg.attention_levels
        self.conv_in = nn.Conv2d(IN_CHANNELS, down[0], 3, padding=1)
        skips, cin = [down[0]], down[0]            # channels of the skip tensors, in push order
        self.down_blocks = nn.ModuleList()
        for i, c in enumerate(down):
            last = i == len(down) - 1
            self.down_blocks.append(DownBlock(cin, c, cfg, attention=i >= len(down) - k, downsample=not last))
            skips += [c] * (cfg.layers_per_block + (not last))
            cin = c
        self.mid_block = MidBlock(cin, cfg, attention=k > 0)
        self.up_blocks = nn.ModuleList()
        n = cfg.layers_per_block + 1
        for i, c in enumerate(up):
            block_skips, skips = skips[-n:], skips[:-n]
            self.up_blocks.append(UpBlock(cin, block_skips[::-1], c, cfg, attention=i < k,
                                          upsample=i != len(up) - 1))
            cin = c
        self.norm_out = nn.GroupNorm(cfg.norm_groups, cin, eps=1e-5)
        self.conv_out = nn.Conv2d(cin, OUT_CHANNELS, 3, padding=1)

    def _call(self, block: nn.Module, *args):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: Tensor) -> Tensor:  # [B*V, 9, s, s] -> [B*V, 14, p, p]
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = self._call(block, x)
            skips += block_skips
        x = self._call(self.mid_block, x)
        for block in self.up_blocks:
            n = len(block.layers)
            x, skips = self._call(block, x, skips[-n:]), skips[:-n]
        return self.conv_out(F.silu(self.norm_out(x)))
