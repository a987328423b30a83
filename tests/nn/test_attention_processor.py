"""fast3d.nn.attention.MultiViewAttnProcessor in tiny random-weight diffusers modules.

The claim: a diffusers block with the processor on the multi-view batch ``(B V) L C`` gives the
same output as the same block with diffusers' default processor on the rearranged input
``B (V L) C`` (layout "views") or ``(B h) (V w) C`` (layout "rows"), which is how MVDream,
multi-view PixArt and Era3D run. Blocks: a UNet-style BasicTransformerBlock (layer norm, cross-
attention) and a PixArt-style one (ada_norm_single, cross-attention with a text mask); and a whole
tiny UNet2DConditionModel through ``set_attn_processor`` against a processor that rearranges
around diffusers' default. float32 on the CPU; attention runs on the Triton kernels where they can
run (under TRITON_INTERPRET=1 here), else on the reference.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from helpers import assert_close

from fast3d import backends
from fast3d.nn.attention import MultiViewAttnProcessor

# `auto` leaves the Triton interpreter alone on CPU tensors; name it so the kernels are what is tested.
BACKEND = "triton" if backends.availability("multiview_attention")["triton"] is None else "auto"

# float32 block outputs: the processor and the default one compute the same attention with
# different summation orders (tiles vs one SDPA call); measured |diff| <= 2e-6 on O(1) outputs.
ATOL, RTOL = 2e-5, 2e-5


def _seeded(module: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Random weights from the test's generator (no pretrained weights on this machine); ada-norm
    tables and biases too, so no parameter is trivially zero."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.1))
    return module.eval()


def _to_rows(x, B, V, h, w):    # (B V) (h w) C -> (B h) (V w) C
    C = x.shape[-1]
    return x.reshape(B, V, h, w, C).permute(0, 2, 1, 3, 4).reshape(B * h, V * w, C)


def _from_rows(y, B, V, h, w):  # (B h) (V w) C -> (B V) (h w) C
    C = y.shape[-1]
    return y.reshape(B, h, V, w, C).permute(0, 2, 1, 3, 4).reshape(B * V, h * w, C)


@pytest.mark.parametrize("norm_type", ["layer_norm", "ada_norm_single"], ids=["unet-block", "pixart-block"])
@pytest.mark.parametrize("layout", ["views", "rows"])
def test_block_matches_default_processor_on_rearranged_input(layout, norm_type, gen):
    B, V, dim, heads, T, cross = 2, 3, 32, 2, 5, 24
    h, w = (3, 5) if layout == "rows" else (1, 7)     # rows: a non-square grid
    L = h * w
    block = _seeded(BasicTransformerBlock(dim, heads, dim // heads, cross_attention_dim=cross, norm_type=norm_type,
                                          num_embeds_ada_norm=None, activation_fn="gelu-approximate"), gen)
    x = torch.randn(B * V, L, dim, generator=gen)                    # [B*V, L, C]
    text = torch.randn(B, T, cross, generator=gen)                   # one caption per sample
    text_mask = torch.ones(B, T)
    text_mask[0, 3:] = 0                                              # a padded caption
    t_emb = torch.randn(B, 6 * dim, generator=gen) if norm_type == "ada_norm_single" else None

    def run(hidden, n):  # n: how many times each sample's condition is repeated
        kw = dict(encoder_hidden_states=text.repeat_interleave(n, 0),
                  encoder_attention_mask=text_mask.repeat_interleave(n, 0) if norm_type == "ada_norm_single" else None)
        if t_emb is not None:
            kw["timestep"] = t_emb.repeat_interleave(n, 0)
        with torch.no_grad():
            return block(hidden, **kw)

    for a in (block.attn1, block.attn2):
        a.set_processor(AttnProcessor2_0())
    if layout == "views":
        expected = run(x.reshape(B, V * L, dim), 1).reshape(B * V, L, dim)
    else:
        expected = _from_rows(run(_to_rows(x, B, V, h, w), h), B, V, h, w)

    proc = MultiViewAttnProcessor(V, layout, image_size=(h, w) if layout == "rows" else None, backend=BACKEND)
    for a in (block.attn1, block.attn2):
        a.set_processor(proc)
    actual = run(x, V)
    assert_close(actual, expected, atol=ATOL, rtol=RTOL, name=f"{norm_type} {layout}")


class _RearrangingProcessor:
    """What MVDream / Era3D do: rearrange around diffusers' default processor (self-attention
    only; cross-attention per view)."""

    def __init__(self, V, layout):
        self.V, self.layout, self.default = V, layout, AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if encoder_hidden_states is not None:
            return self.default(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        BV, L, C = hidden_states.shape
        B = BV // self.V
        if self.layout == "views":
            out = self.default(attn, hidden_states.reshape(B, self.V * L, C))
            return out.reshape(BV, L, C)
        side = int(L ** 0.5)
        out = self.default(attn, _to_rows(hidden_states, B, self.V, side, side))
        return _from_rows(out, B, self.V, side, side)


@pytest.mark.parametrize("layout", ["views", "rows"])
def test_unet_set_attn_processor(layout, gen):
    """A whole tiny UNet2DConditionModel (down, mid and up cross-attention blocks at 8x8 and 4x4
    latents): MultiViewAttnProcessor everywhere vs rearranging around the default processor."""
    from diffusers import UNet2DConditionModel

    V, B = 2, 1
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 32), norm_num_groups=8, cross_attention_dim=16,
                                attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet = _seeded(unet, gen)
    sample = torch.randn(B * V, 4, 8, 8, generator=gen)
    text = torch.randn(B, 3, 16, generator=gen).repeat_interleave(V, 0)
    t = torch.tensor([10] * (B * V))
    with torch.no_grad():
        unet.set_attn_processor(_RearrangingProcessor(V, layout))
        expected = unet(sample, t, text).sample
        unet.set_attn_processor(MultiViewAttnProcessor(V, layout, backend=BACKEND))
        actual = unet(sample, t, text).sample
    assert_close(actual, expected, atol=1e-4, rtol=1e-4, name=f"unet {layout}")
    # The views really interact: per-view self-attention gives something else.
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        per_view = unet(sample, t, text).sample
    assert (per_view - expected).abs().max() > 1e-3


def test_four_dim_input_rows_grid_from_shape(gen):
    """A VAE-style attention on [B*V, C, h, w] (residual connection, output rescale): the rows
    grid comes from the input's shape (non-square), and the result equals the default processor
    on the rearranged tokens."""
    from diffusers.models.attention_processor import Attention

    B, V, C, h, w = 1, 3, 16, 2, 5
    attn = _seeded(Attention(query_dim=C, heads=2, dim_head=8, residual_connection=True,
                             rescale_output_factor=2.0), gen)
    x = torch.randn(B * V, C, h, w, generator=gen)
    tokens = x.flatten(2).transpose(1, 2)                                 # [B*V, h*w, C]
    with torch.no_grad():
        actual = MultiViewAttnProcessor(V, "rows", backend=BACKEND)(attn, x)
        expected = _from_rows(AttnProcessor2_0()(attn, _to_rows(tokens, B, V, h, w)), B, V, h, w)
    assert actual.shape == x.shape
    assert_close(actual.flatten(2).transpose(1, 2), expected, atol=ATOL, rtol=RTOL, name="4-D rows")


def test_processor_rejects_what_it_cannot_do(gen):
    from diffusers.models.attention_processor import Attention

    attn = _seeded(Attention(query_dim=16, heads=2, dim_head=8), gen)
    x = torch.randn(4, 6, 16, generator=gen)
    with pytest.raises(ValueError, match=r"attention_mask is not supported"):
        MultiViewAttnProcessor(2)(attn, x, attention_mask=torch.ones(4, 6))
    with pytest.raises(ValueError, match=r"needs image_size=\(h, w\)"):
        MultiViewAttnProcessor(2, "rows")(attn, x)
    with pytest.raises(ValueError, match=r"layout must be 'views' or 'rows'"):
        MultiViewAttnProcessor(2, "grid")
    with pytest.raises(ValueError, match=r"num_views=3 must divide the batch of q"):
        MultiViewAttnProcessor(3)(attn, x)
