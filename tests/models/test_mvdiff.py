"""fast3d.models.mvdiff: the multi-view UNet with fast3d's attention equal to the same UNet with
diffusers' attention on the rearranged input (both layouts, forward and gradients), the rigs'
cameras, the config checks, starting from a Stable Diffusion UNet, and model directories. Every
model is a tiny random one built from a config (no weights can be downloaded here)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from helpers import assert_close, randomize_

from fast3d import cameras as cams
from fast3d.inference.lgm import default_input_cameras
from fast3d.models import checkpoints, mvdiff
from fast3d.models.lgm import LGMConfig
from fast3d.models.mvdiff import MVDiffConfig, MVDiffusion
from fast3d.nn.attention import MultiViewAttnProcessor

# Tolerances, float32 (outputs O(0.5), gradients up to O(100)), fast3d's torch backend:
TOL = {
    # the same attention through another path (one SDPA call on the views' tokens side by side vs
    # fast3d.multiview_attention): measured bitwise equal on 3 seeds per layout; the margin is for
    # BLAS builds that block the two calls' matmuls differently.
    "forward": dict(atol=2e-5, rtol=2e-5),
    # gradients summed over the UNet's layers, in another order for the row layout's rearranged
    # backward: measured |diff| <= 1e-6 (rows), 0 (views) on 3 seeds.
    "grad": dict(atol=1e-5, rtol=1e-5),
}
TINY_KL = dict(vae=mvdiff.RANDOM_TINY, vae_downsample=4, latent_channels=4, vae_scaling_factor=0.18215)


class RearrangedAttention:
    """The reference: diffusers' AttnProcessor2_0 on the views' tokens rearranged as the papers do
    it, [B*V, L, C] -> [B, V*L, C] ("views") or [B*h, V*w, C] ("rows"), and back."""

    def __init__(self, num_views: int, layout: str):
        self.V, self.layout, self.attn = num_views, layout, AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        if encoder_hidden_states is not None:
            return self.attn(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        BV, L, C = hidden_states.shape
        B, V = BV // self.V, self.V
        if self.layout == "views":
            out = self.attn(attn, hidden_states.reshape(B, V * L, C))
            return out.reshape(BV, L, C)
        h = w = math.isqrt(L)
        x = hidden_states.reshape(B, V, h, w, C).permute(0, 2, 1, 3, 4).reshape(B * h, V * w, C)
        out = self.attn(attn, x)
        return out.reshape(B, h, V, w, C).permute(0, 2, 1, 3, 4).reshape(BV, L, C)



def denoiser_inputs(cfg: MVDiffConfig, gen: torch.Generator, B: int = 2) -> dict:
    V, C, h = cfg.num_views, cfg.latent_channels, cfg.latent_size
    return dict(noisy=torch.randn(B, V, C, h, h, generator=gen), cond_latent=torch.randn(B, C, h, h, generator=gen),
                image_embeds=torch.randn(B, cfg.image_embed_dim, generator=gen),
                cameras=torch.randn(B, V, 4, generator=gen), timesteps=torch.randint(0, 1000, (B,), generator=gen))


def forward_and_grads(model, inputs: dict, weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    out = model(**inputs)
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# --- the UNet's attention ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout, rig", [("views", "lgm4"), ("rows", "era3d6")])
def test_fast3d_attention_equals_diffusers_attention_on_the_rearranged_views(layout, rig, gen):
    cfg = MVDiffConfig.preset("tiny", layout=layout, rig=rig)
    ours = randomize_(mvdiff.build_denoiser(cfg, attention_backend="torch"), gen)
    procs = ours.unet.attn_processors
    assert procs and all(isinstance(p, MultiViewAttnProcessor) and p.layout == layout and p.num_views == cfg.num_views
                         for p in procs.values())
    inputs = denoiser_inputs(cfg, gen)
    weight = torch.randn(inputs["noisy"].shape, generator=gen)
    out, grads = forward_and_grads(ours, inputs, weight)
    ours.unet.set_attn_processor(RearrangedAttention(cfg.num_views, layout))
    ref_out, ref_grads = forward_and_grads(ours, inputs, weight)
    assert_close(out, ref_out, **TOL["forward"], name=f"output ({layout})")
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert_close(grads[n], ref_grads[n], **TOL["grad"], name=f"grad {n} ({layout})")


def test_views_see_each_other_and_the_image_condition_can_be_dropped(gen):
    cfg = MVDiffConfig.preset("tiny")
    model = randomize_(mvdiff.build_denoiser(cfg, attention_backend="torch"), gen).eval()
    x = denoiser_inputs(cfg, gen, B=1)
    with torch.no_grad():
        base = model(**x)
        other = dict(x, noisy=x["noisy"].clone())
        other["noisy"][:, 3] += 1.0
        changed = model(**other)
        assert (changed[:, 0] - base[:, 0]).abs().max() > 1e-4, "view 0 must depend on view 3 (cross-view attention)"
        dropped = model(**x, drop=torch.tensor([True]))
        zeroed = model(**dict(x, cond_latent=torch.zeros_like(x["cond_latent"])),
                       drop=torch.tensor([True]))
        assert torch.equal(dropped, zeroed)     # a dropped condition ignores the image latent
        assert (dropped - base).abs().max() > 1e-4
        assert torch.equal(model(**x, drop=torch.tensor([False])), base)


# --- rigs ----------------------------------------------------------------------------------------


def test_lgm4_rig_is_what_an_lgm_takes_by_default():
    model = MVDiffusion(MVDiffConfig.preset("tiny", rig="lgm4"))
    vm, Ks = model.rig_cameras(64)
    want_vm, want_Ks = default_input_cameras(LGMConfig(), 64)
    assert model.num_views == 4 and model.config.rig == "lgm4"
    assert_close(vm, want_vm, atol=1e-6, rtol=0, name="viewmats")
    assert_close(Ks, want_Ks, atol=1e-5, rtol=0, name="Ks")


def test_era3d6_rig_is_six_level_views_around_the_input_framing_the_object_alike():
    cfg = MVDiffConfig.preset("tiny", rig="era3d6")
    model = MVDiffusion(cfg)
    vm, Ks = model.rig_cameras(32)
    assert vm.shape == (6, 4, 4) and Ks.shape == (6, 3, 3) and model.num_views == 6
    az, el = mvdiff.azimuth_elevation(vm)
    assert_close(torch.rad2deg(az) % 360, torch.tensor([0.0, 45, 90, 180, 270, 315], dtype=torch.float64), atol=1e-4,
                 rtol=0, name="azimuths")
    assert_close(el, torch.zeros(6, dtype=torch.float64), atol=1e-6, rtol=0, name="elevations")
    # orthographic-like: a narrow field of view, the unit box framed as the default lgm4 camera frames it
    half_width = cams.camera_centers(vm).norm(dim=-1) * (0.5 * 32 / Ks[:, 1, 1])
    assert_close(half_width, torch.full((6,), 2.2 * math.tan(math.radians(49.1 / 2))), atol=1e-4, rtol=0,
                 name="half width at the origin")
    assert 2 * math.degrees(math.atan(16 / Ks[0, 1, 1])) < 11
    # OpenCV convention: every camera looks at the origin (z forward), upright (+Z world up is -y)
    centre = (vm[:, :3, :3] @ torch.zeros(3) + vm[:, :3, 3])
    assert_close(centre[:, :2], torch.zeros(6, 2), atol=1e-5, rtol=0, name="origin on the optical axis")
    assert (centre[:, 2] > 0).all() and (vm[:, 1, 2] < -0.99).all()


def test_camera_features_are_relative_to_the_input():
    model = MVDiffusion(MVDiffConfig.preset("tiny"))
    f = model.rig_camera_features()
    assert_close(f, torch.tensor([[0.0, 1, 0, 1], [0, 1, 1, 0], [0, 1, 0, -1], [0, 1, -1, 0]]), atol=1e-7, rtol=0,
                 name="lgm4 camera features")


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(rig="zero123"), r"rig must be one of \('lgm4', 'era3d6'\); got 'zero123'"),
    (dict(layout="grid"), r"layout must be one of \('views', 'rows'\)"),
    (dict(prediction_type="sample"), r"prediction_type must be one of"),
    (dict(resolution=36), r"resolution must be a multiple of vae_downsample \* 2\^\(levels - 1\) = 8"),
    (dict(latent_channels=12), r"latent_channels must be 3 \* vae_downsample\^2 = 48 with vae='pixel'"),
    (dict(attention_heads=(2,)), r"attention_heads must be a list of 2 entries"),
    (dict(attention_heads=(3, 4)), r"must be multiples of their attention_heads"),
    (dict(vae_downsample=3), r"vae_downsample must be a power of two; got 3"),
    (dict(fov_y_deg=180.0), r"fov_y_deg must be None or a real number in \(0, 180\)"),
    (dict(background=2.0), r"background must be a real number in \[0, 1\]; got 2.0"),
    (dict(unet_init=""), r"unet_init must be a local directory"),
    (dict(depth=3), r"unknown keys \['depth'\]"),
])
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        MVDiffConfig.preset("tiny", **kw)


def test_base_preset_is_stable_diffusion_2_at_256px():
    cfg = MVDiffConfig.preset("base")
    kw = mvdiff.unet_kwargs(cfg)
    assert (kw["block_out_channels"], kw["attention_head_dim"], kw["cross_attention_dim"], kw["layers_per_block"]) == \
        ((320, 640, 1280, 1280), (5, 10, 20, 20), 1024, 2)
    assert (cfg.resolution, cfg.latent_size, kw["in_channels"], kw["out_channels"], cfg.num_views) == (256, 32, 8, 4, 4)


def test_missing_sources_are_named():
    with pytest.raises(ValueError, match="vae must be a local directory or a random source; got '/nonexistent'"):
        mvdiff.build_vae(MVDiffConfig.preset("tiny", **dict(TINY_KL, vae="/nonexistent")))
    with pytest.raises(ValueError, match="image_encoder must be a local directory"):
        mvdiff.build_image_encoder(MVDiffConfig.preset("tiny", image_encoder="/nonexistent"))


# --- initialisation from Stable Diffusion, model directories ------------------------------------------


def test_unet_init_starts_as_the_image_model(tmp_path, gen):
    """From an SD-layout UNet (4 input channels, no camera input): the denoiser equals that UNet on
    the noisy latent alone (the image-latent channels and the camera MLP start at zero)."""
    cfg = MVDiffConfig.preset("tiny", **TINY_KL)
    kw = {k: v for k, v in mvdiff.unet_kwargs(cfg).items()
          if k not in ("class_embed_type", "projection_class_embeddings_input_dim")}
    sd = randomize_(UNet2DConditionModel(**dict(kw, in_channels=cfg.latent_channels)), gen)
    sd.save_pretrained(str(tmp_path / "sd" / "unet"))
    model = mvdiff.build_denoiser(MVDiffConfig.preset("tiny", **TINY_KL, unet_init=str(tmp_path / "sd")),
                                  attention_backend="torch")
    sd.set_attn_processor(MultiViewAttnProcessor(cfg.num_views, backend="torch"))
    x = denoiser_inputs(cfg, gen)
    with torch.no_grad():
        ours = model(**x)
        tokens = model.image_proj(x["image_embeds"])[:, None].repeat_interleave(cfg.num_views, 0)
        want = sd(x["noisy"].flatten(0, 1), x["timesteps"].repeat_interleave(cfg.num_views),
                  encoder_hidden_states=tokens).sample.unflatten(0, (2, cfg.num_views))
    assert_close(ours, want, **TOL["forward"], name="denoiser from unet_init vs the SD UNet")
    other = MVDiffConfig.preset("tiny", **dict(TINY_KL, layers_per_block=2), unet_init=str(tmp_path / "sd"))
    with pytest.raises(ValueError, match=r"unet_init .* is another UNet than the config's: .*'layers_per_block': \(1, 2\)"):
        mvdiff.build_denoiser(other)


@pytest.mark.parametrize("overrides", [{}, dict(TINY_KL, rig="era3d6", layout="rows")])
def test_model_directory_round_trip(tmp_path, gen, overrides):
    cfg = MVDiffConfig.preset("tiny", **overrides)
    model = MVDiffusion(cfg)
    randomize_(model.denoiser, gen)
    model.save_pretrained(str(tmp_path / "m"))
    assert checkpoints.model_type(str(tmp_path / "m")) == "mvdiff"
    loaded = MVDiffusion.from_pretrained(str(tmp_path / "m"))
    assert loaded.config == cfg
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    images = torch.rand(2, 3, cfg.resolution, cfg.resolution, generator=gen)
    with torch.no_grad():
        assert torch.equal(model.image_embeds(images), loaded.image_embeds(images))
        z = model.encode_latents(images)
        assert torch.equal(z, loaded.encode_latents(images))
        assert torch.equal(model.decode_latents(z), loaded.decode_latents(z))


def test_pixel_latents_decode_exactly(gen):
    model = MVDiffusion(MVDiffConfig.preset("tiny"))
    images = torch.rand(3, 3, 32, 32, generator=gen)
    z = model.encode_latents(images)
    assert z.shape == (3, 48, 8, 8)
    assert_close(model.decode_latents(z), images, atol=1e-6, rtol=0, name="pixel round trip")


def test_loading_another_model_type_is_refused(tmp_path):
    checkpoints.save_pretrained(str(tmp_path / "lgm"), "lgm", LGMConfig(), {})
    with pytest.raises(ValueError, match="holds a 'lgm' model, not 'mvdiff'"):
        MVDiffusion.from_pretrained(str(tmp_path / "lgm"))
