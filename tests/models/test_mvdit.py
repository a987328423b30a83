"""fast3d.models.mvdit and fast3d.inference.ttr: config presets and validation, the transformer
with fast3d's attention equal to diffusers' default, grids, prompt encoding as PixArt's pipeline does
it, fingerprints, checkpoints (ours and PixArt-alpha's), and sampling a tiny checkpoint to PNGs.
Every model is a tiny random one built from a config (no weights can be downloaded here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, PixArtAlphaPipeline, PixArtTransformer2DModel
from diffusers.models.attention_processor import AttnProcessor2_0
from helpers import assert_close
from PIL import Image

from fast3d import backends
from fast3d.models import mvdit
from fast3d.models.mvdit import MVDiTConfig
from fast3d.nn.attention import MultiViewAttnProcessor

TINY = MVDiTConfig.preset("tiny")
# The Triton kernels where they can run (under TRITON_INTERPRET=1 on the CPU), and the reference.
ATTENTION_BACKENDS = ["torch"] + (["triton"] if backends.availability("multiview_attention")["triton"] is None else [])


def randomize_(module: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Random weights from the test's generator, biases and ada-norm tables included, so that no
    parameter is trivially zero; matrices scaled by 1/sqrt(fan-in) to keep activations O(1)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (p[0].numel() ** -0.5 if p.dim() > 1 else 0.1))
    return module.eval()


def transformer_inputs(gen: torch.Generator, cfg: MVDiTConfig = TINY, B: int = 2) -> dict:
    mask = torch.ones(B, cfg.max_caption_tokens)
    mask[0, 5:] = 0                                                   # a padded caption
    return dict(hidden_states=torch.randn(B, cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=gen),
                encoder_hidden_states=torch.randn(B, cfg.max_caption_tokens, cfg.caption_channels, generator=gen),
                encoder_attention_mask=mask, timestep=torch.randint(0, 1000, (B,), generator=gen))


def forward(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


# --- config ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, grid, latent", [("xl-256", 256, 32), ("xl-512", 512, 64)])
def test_xl_presets_are_pixart_alpha_dit_xl_2(name, grid, latent):
    cfg = MVDiTConfig.preset(name)
    assert (cfg.num_layers, cfg.width, cfg.num_heads, cfg.head_dim, cfg.patch_size) == (28, 1152, 16, 72, 2)
    assert (cfg.caption_channels, cfg.max_caption_tokens) == (4096, 120)
    assert (cfg.grid_size, cfg.view_size, cfg.latent_size) == (grid, grid // 2, latent)
    assert cfg.num_tokens == (latent // 2) ** 2
    assert (cfg.latent_channels, cfg.vae_downsample, cfg.vae_scaling_factor, cfg.learn_sigma) == (4, 8, 0.18215, True)


def test_tiny_preset_and_overrides():
    assert (TINY.grid_size, TINY.latent_size, TINY.num_layers, TINY.width, TINY.num_heads, TINY.patch_size,
            TINY.caption_channels, TINY.max_caption_tokens) == (64, 8, 2, 64, 2, 2, 32, 32)
    cfg = MVDiTConfig.preset("xl-512", vae="/models/pixart", text_encoder="/models/pixart")
    assert (cfg.vae, cfg.text_encoder, cfg.num_layers) == ("/models/pixart", "/models/pixart", 28)


@pytest.mark.parametrize("kw, match", [
    (dict(grid_size=72), "grid_size must be a multiple of 2 \\* vae_downsample \\* patch_size = 32"),
    (dict(num_heads=0), "num_heads must be a positive integer; got 0"),
    (dict(num_layers=2.0), "num_layers must be a positive int"),
    (dict(patch_size=True), "patch_size must be a positive int"),
    (dict(vae_downsample=6), "vae_downsample must be a power of two >= 2; got 6"),
    (dict(vae_scaling_factor=float("nan")), "vae_scaling_factor must be a positive finite number"),
    (dict(vae=""), "vae must be a local directory"),
    (dict(random_seed=-1), "random_seed must be an int >= 0"),
    (dict(learn_sigma="yes"), "learn_sigma must be a bool"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        MVDiTConfig.preset("tiny", **kw)


def test_unknown_preset_and_keys_are_named():
    with pytest.raises(ValueError, match="preset must be one of \\['tiny', 'xl-256', 'xl-512'\\]; got 'xl-1024'"):
        MVDiTConfig.preset("xl-1024")
    with pytest.raises(ValueError, match="unknown keys \\['depth'\\]"):
        MVDiTConfig.preset("tiny", depth=3)


# --- the transformer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("attention_backend", ATTENTION_BACKENDS)
def test_transformer_equals_diffusers_default_attention(attention_backend, gen):
    model = randomize_(mvdit.build_transformer(TINY, attention_backend=attention_backend), gen)
    blocks = model.transformer_blocks
    assert len(blocks) == 2 and all(isinstance(b.attn1.processor, MultiViewAttnProcessor) for b in blocks)
    assert all(b.attn1.processor.num_views == 1 and not isinstance(b.attn2.processor, MultiViewAttnProcessor)
               for b in blocks)
    assert model.config.out_channels == 8 and model.config.caption_channels == 32 and model.config.sample_size == 8
    inputs = transformer_inputs(gen)
    ours = forward(model, inputs)
    for b in blocks:
        b.attn1.set_processor(AttnProcessor2_0())
    # float32 outputs of O(1-10): the same attention summed in another order (Triton tiles vs one SDPA
    # call); measured relative |diff| <= 3e-7.
    assert_close(ours, forward(model, inputs), atol=2e-5, rtol=2e-5, name=f"output ({attention_backend})")


def test_random_models_are_a_function_of_the_config():
    a, b = mvdit.build_transformer(TINY), mvdit.build_transformer(TINY)
    assert mvdit.fingerprint(a) == mvdit.fingerprint(b)
    assert mvdit.fingerprint(mvdit.build_vae(TINY)) == mvdit.fingerprint(mvdit.build_vae(TINY))
    other = MVDiTConfig.preset("tiny", random_seed=1)
    assert mvdit.fingerprint(mvdit.build_transformer(other)) != mvdit.fingerprint(a)
    assert mvdit.fingerprint(mvdit.build_vae(other)) != mvdit.fingerprint(mvdit.build_vae(TINY))


def test_save_load_round_trip(tmp_path, gen):
    model = randomize_(mvdit.build_transformer(TINY), gen)
    mvdit.save_transformer(str(tmp_path / "ckpt"), TINY, model)
    cfg, loaded = mvdit.load_transformer(str(tmp_path / "ckpt"))
    assert cfg == TINY and isinstance(loaded.transformer_blocks[0].attn1.processor, MultiViewAttnProcessor)
    inputs = transformer_inputs(gen)
    assert_close(forward(loaded, inputs), forward(model, inputs), atol=0, rtol=0, name="loaded output")
    with pytest.raises(ValueError, match="transformer does not match cfg"):
        mvdit.save_transformer(str(tmp_path / "bad"), MVDiTConfig.preset("tiny", num_layers=3), model)


def test_transformer_init_from_a_pixart_checkpoint(tmp_path, gen):
    """A diffusers PixArt-alpha pipeline directory (transformer/ inside) initialises the weights."""
    pixart = randomize_(PixArtTransformer2DModel(**mvdit.transformer_kwargs(TINY)), gen)
    pixart.save_pretrained(str(tmp_path / "pixart" / "transformer"))
    model = mvdit.build_transformer(MVDiTConfig.preset("tiny", transformer_init=str(tmp_path / "pixart")))
    inputs = transformer_inputs(gen)
    assert_close(forward(model, inputs), forward(pixart, inputs), atol=2e-5, rtol=2e-5, name="initialised output")
    with pytest.raises(ValueError, match="does not match the model"):
        mvdit.build_transformer(MVDiTConfig.preset("tiny", head_dim=16, transformer_init=str(tmp_path / "pixart")))
    with pytest.raises(ValueError, match="not a directory"):
        mvdit.build_transformer(MVDiTConfig.preset("tiny", transformer_init=str(tmp_path / "absent")))


# --- grids -------------------------------------------------------------------------------------------


def test_grid_layout_and_inverse(gen):
    views = torch.randn(2, 4, 3, 5, 7, generator=gen)     # [B, 4, C, H, W], not square
    grid = mvdit.make_grid(views)
    assert grid.shape == (2, 3, 10, 14)
    for v, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):   # row-major quadrants
        assert torch.equal(grid[:, :, i * 5:(i + 1) * 5, j * 7:(j + 1) * 7], views[:, v]), f"view {v}"
    assert torch.equal(mvdit.split_grid(grid), views)
    other = torch.randn(3, 4, 6, 8, generator=gen)
    assert torch.equal(mvdit.make_grid(mvdit.split_grid(other)), other)


def test_grid_rejects_bad_shapes():
    with pytest.raises(ValueError, match="views must be a tensor \\[B, 4, C, H, W\\]; got \\(2, 3, 3, 4, 4\\)"):
        mvdit.make_grid(torch.zeros(2, 3, 3, 4, 4))
    with pytest.raises(ValueError, match="grid must be a tensor \\[B, C, 2H, 2W\\] of even .*; got \\(1, 3, 5, 4\\)"):
        mvdit.split_grid(torch.zeros(1, 3, 5, 4))


# --- prompts -----------------------------------------------------------------------------------------


def test_encode_prompts_shapes_masks_and_pipeline_equality():
    text_encoder, tokenizer = mvdit.build_text_encoder(TINY)
    captions = ["  A Red Cube", "x" * 100]
    embeds, mask = mvdit.encode_prompts(text_encoder, tokenizer, captions, 32)
    assert embeds.shape == (2, 32, 32) and mask.shape == (2, 32) and embeds.dtype == torch.float32
    # ByT5: one token per byte of the lower-cased, stripped caption, then </s>; truncated to 32.
    assert mask.sum(1).tolist() == [len("a red cube") + 1, 32]
    assert mask[0, :11].all() and not mask[0, 11:].any()
    lower, _ = mvdit.encode_prompts(text_encoder, tokenizer, ["a red cube"], 32)
    # float32 matmuls of other batch sizes may round differently: a few ulps of O(1) values.
    assert_close(embeds[0], lower[0], atol=1e-5, rtol=0, name="case-insensitive embeds")
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=mvdit.build_vae(TINY),
                               transformer=mvdit.build_transformer(TINY), scheduler=None)
    p_embeds, p_mask, _, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, clean_caption=False,
                                                max_sequence_length=32)
    assert torch.equal(p_mask, mask)
    assert_close(embeds, p_embeds, atol=1e-5, rtol=0, name="embeds vs PixArtAlphaPipeline.encode_prompt")
    with pytest.raises(ValueError, match="captions must be a non-empty list of str; got str"):
        mvdit.encode_prompts(text_encoder, tokenizer, "a cube", 32)


# --- fingerprints ------------------------------------------------------------------------------------


def test_fingerprint_changes_with_any_weight_and_the_vocabulary(gen):
    vae = mvdit.build_vae(TINY)
    before = mvdit.fingerprint(vae)
    assert len(before) == 16 and int(before, 16) >= 0
    params = list(vae.parameters())
    p = params[int(torch.randint(len(params), (1,), generator=gen))]
    with torch.no_grad():
        p.view(-1)[int(torch.randint(p.numel(), (1,), generator=gen))] += 1e-3
    assert mvdit.fingerprint(vae) != before
    text_encoder, tokenizer = mvdit.build_text_encoder(TINY)
    assert mvdit.fingerprint(text_encoder, tokenizer) != mvdit.fingerprint(text_encoder)
    with pytest.raises(ValueError, match="module must be a torch.nn.Module; got dict"):
        mvdit.fingerprint({})


def test_local_vae_loads_with_the_same_fingerprint_and_is_checked(tmp_path):
    vae = mvdit.build_vae(TINY)
    vae.save_pretrained(str(tmp_path / "pipe" / "vae"))
    loaded = mvdit.build_vae(MVDiTConfig.preset("tiny", vae=str(tmp_path / "pipe")))
    assert mvdit.fingerprint(loaded) == mvdit.fingerprint(vae)
    AutoencoderKL.from_config({**vae.config, "scaling_factor": 0.13025}).save_pretrained(str(tmp_path / "sdxl"))
    with pytest.raises(ValueError, match="does not match the config: .*'vae_scaling_factor': 0.13025"):
        mvdit.build_vae(MVDiTConfig.preset("tiny", vae=str(tmp_path / "sdxl")))


def test_local_text_encoder_loads_in_float32_with_the_same_fingerprint(tmp_path):
    text_encoder, tokenizer = mvdit.build_text_encoder(TINY)
    text_encoder.save_pretrained(str(tmp_path / "pipe" / "text_encoder"))
    tokenizer.save_pretrained(str(tmp_path / "pipe" / "tokenizer"))
    loaded, loaded_tokenizer = mvdit.build_text_encoder(MVDiTConfig.preset("tiny", text_encoder=str(tmp_path / "pipe")))
    assert mvdit.fingerprint(loaded, loaded_tokenizer) == mvdit.fingerprint(text_encoder, tokenizer)
    text_encoder.to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))   # transformers loads "auto" dtypes
    tokenizer.save_pretrained(str(tmp_path / "bf16"))
    bf16 = MVDiTConfig.preset("tiny", text_encoder=str(tmp_path / "bf16"))
    assert mvdit.build_text_encoder(bf16)[0].dtype == torch.float32
    with pytest.raises(ValueError, match="has width d_model=32; the config expects caption_channels=48"):
        mvdit.build_text_encoder(MVDiTConfig.preset("tiny", caption_channels=48, text_encoder=str(tmp_path / "pipe")))


# --- sampling ----------------------------------------------------------------------------------------


def test_sampling_a_tiny_checkpoint_writes_the_grid_and_views(tmp_path, seed):
    from fast3d.inference.ttr import sample

    mvdit.save_transformer(str(tmp_path / "ckpt"), TINY, mvdit.build_transformer(TINY))
    out = str(tmp_path / "out" / "cube.png")
    paths = sample(str(tmp_path / "ckpt"), "a red cube", out, steps=2, seed=seed)
    assert paths == [out] + [str(tmp_path / "out" / f"cube_view{v}.png") for v in range(4)]
    images = [np.asarray(Image.open(p)) for p in paths]
    assert images[0].shape == (64, 64, 3) and all(im.shape == (32, 32, 3) for im in images[1:])
    assert images[0].std() > 0, "a constant image"
    views = torch.from_numpy(np.stack(images[1:])).permute(0, 3, 1, 2)[None]   # [1, 4, 3, 32, 32]
    assert torch.equal(mvdit.make_grid(views)[0].permute(1, 2, 0), torch.from_numpy(images[0].copy()))
    with pytest.raises(ValueError, match="out_png must be a path ending in .png; got 'x.jpg'"):
        sample(str(tmp_path / "ckpt"), "a red cube", "x.jpg")
