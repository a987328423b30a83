"""fast3d.models.magicboost: the anchor-conditioned UNet with fast3d's attention equal to the same
UNet with diffusers' attention on the rearranged views (forward and gradients, with anchors
dropped), dropped anchors without influence, the camera inputs, starting from a Stable Diffusion
UNet, the config and argument checks, and model directories. Every model is a tiny random one
built from a config (no weights can be downloaded here)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from helpers import assert_close, randomize_

from fast3d import cameras as cams
from fast3d.bench.workloads.generate import RearrangedAttnProcessor
from fast3d.models import checkpoints, magicboost, mvdiff
from fast3d.models.magicboost import AnchorAttnProcessor, AnchorCondition, MagicBoost, MagicBoostConfig
from fast3d.models.mvdiff import MVDiffConfig, MVDiffusion
from fast3d.nn.attention import MultiViewAttnProcessor

# Tolerances, float32 (outputs O(1), gradients up to O(100)), fast3d's torch backend:
TOL = {
    # the same attention through another path (one SDPA call on the views' tokens side by side vs
    # fast3d.multiview_attention): measured bitwise equal on 5 seeds; the margin is for BLAS builds
    # that block the two calls' matmuls differently (as tests/models/test_mvdiff.py).
    "forward": dict(atol=2e-5, rtol=2e-5),
    # gradients summed over the UNet's layers and the groups of kept anchors: measured bitwise
    # equal on 5 seeds; the same margin as test_mvdiff.py's.
    "grad": dict(atol=1e-5, rtol=1e-5),
    # the same UNet call on the same values; the embedding projection runs on 4 anchors (one then
    # dropped) instead of 3, which BLAS may sum in another order: measured |diff| <= 3e-7.
    "left_out": dict(atol=1e-5, rtol=1e-5),
}
K = 4


def denoiser_inputs(cfg: MagicBoostConfig, gen: torch.Generator, B: int = 3) -> dict:
    C, h = cfg.latent_channels, cfg.latent_size
    target = cams.orbit16(gen, cfg.resolution).viewmats[:B]
    anchors = torch.stack([cams.orbit16(gen, cfg.resolution).viewmats[:K] for _ in range(B)])
    return dict(noisy=torch.randn(B, C, h, h, generator=gen), timesteps=torch.randint(0, 1000, (B,), generator=gen),
                anchor_latents=torch.randn(B, K, C, h, h, generator=gen),
                anchor_embeds=torch.randn(B, K, cfg.image_embed_dim, generator=gen),
                cameras=magicboost.camera_inputs(target, anchors))


def forward_and_grads(model, inputs: dict, weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    out = model(**inputs)
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def tiny():
    return MagicBoostConfig.preset("tiny", num_anchors=K)


# --- the UNet's attention ----------------------------------------------------------------------------


def test_fast3d_attention_equals_diffusers_attention_on_the_rearranged_views(tiny, gen):
    """Three targets: all anchors, one dropped, all dropped (the unconditional model): three UNet
    calls of 5, 4 and 1 views a sample."""
    model = randomize_(magicboost.build_denoiser(tiny, attention_backend="torch"), gen)
    procs = model.unet.attn_processors
    assert procs and all(isinstance(p, MultiViewAttnProcessor) and p.layout == "views" and p.num_views == K + 1
                         for p in procs.values())
    inputs = denoiser_inputs(tiny, gen)
    inputs["drop"] = torch.tensor([[False] * K, [False, True, False, False], [True] * K])
    weight = torch.randn(inputs["noisy"].shape, generator=gen)
    out, grads = forward_and_grads(model, inputs, weight)
    # the reference: diffusers' AttnProcessor2_0 on the views' tokens rearranged as the paper does it
    # ([B*V, L, C] -> [B, V*L, C]), V the call's num_views (the target and its kept anchors)
    model.unet.set_attn_processor(RearrangedAttnProcessor(K + 1, "views"))
    ref_out, ref_grads = forward_and_grads(model, inputs, weight)
    assert_close(out, ref_out, **TOL["forward"], name="prediction")
    assert grads.keys() == ref_grads.keys() == {n for n, _ in model.named_parameters()}
    for n in grads:
        assert_close(grads[n], ref_grads[n], **TOL["grad"], name=f"grad {n}")


def test_dropped_anchors_have_no_influence_and_kept_ones_do(tiny, gen):
    model = randomize_(magicboost.build_denoiser(tiny, attention_backend="torch"), gen).eval()
    x = denoiser_inputs(tiny, gen)
    x["drop"] = drop = torch.tensor([[False, True, False, True], [False] * K, [True] * K])

    def changed(which: torch.Tensor) -> dict:   # [B, K] bool: the anchors whose latent, embedding, camera change
        other = {k: v.clone() for k, v in x.items()}
        n = int(which.sum())
        other["anchor_latents"][which] += 3 * torch.randn(n, *x["anchor_latents"].shape[2:], generator=gen)
        other["anchor_embeds"][which] += 3.0
        other["cameras"][:, 1:][which] = torch.randn(n, magicboost.CAMERA_FEATURES, generator=gen)
        return other

    with torch.no_grad():
        base = model(**x)
        assert torch.equal(model(**changed(drop)), base), "a dropped anchor changed its target"
        kept = model(**changed(~drop))
    assert ((kept - base).abs().amax((1, 2, 3)) > 1e-4).tolist() == [True, True, False]
    # each kept anchor reaches its target (a gradient), no dropped one does
    lat = x["anchor_latents"].clone().requires_grad_(True)
    model(**dict(x, anchor_latents=lat)).sum().backward()
    assert (lat.grad[drop] == 0).all() and (lat.grad[~drop].abs().amax((1, 2, 3)) > 0).all()


def test_a_dropped_anchor_is_one_left_out(tiny, gen):
    model = randomize_(magicboost.build_denoiser(tiny, attention_backend="torch"), gen).eval()
    x = denoiser_inputs(tiny, gen, B=1)
    kept = torch.tensor([0, 2, 3])
    with torch.no_grad():
        dropped = model(**x, drop=torch.tensor([[False, True, False, False]]))
        left_out = model(x["noisy"], x["timesteps"], x["anchor_latents"][:, kept], x["anchor_embeds"][:, kept],
                         x["cameras"][:, torch.cat([torch.tensor([0]), kept + 1])])
    assert_close(dropped, left_out, **TOL["left_out"], name="anchor 1 dropped vs left out")


def test_the_model_predicts_targets_from_its_anchors(tiny, gen):
    """MagicBoost.condition / predict: the same anchors for every target, cameras relative to each
    target, the VAE's latents, what the denoiser gives on those inputs."""
    model = MagicBoost(tiny)
    randomize_(model.denoiser, gen)
    model.eval()
    rig = cams.orbit16(gen, tiny.resolution)
    images = torch.rand(K, 3, tiny.resolution, tiny.resolution, generator=gen)
    cond = model.condition(images, rig.viewmats[[0, 4, 8, 12]])
    assert isinstance(cond, AnchorCondition) and cond.latents.shape == (K, 48, 8, 8) and cond.embeds.shape == (K, 32)
    noisy = torch.randn(2, 48, 8, 8, generator=gen)
    t = torch.tensor([20, 700])
    drop = torch.tensor([[False, False, True, False], [True] * K])
    with torch.no_grad():
        out = model.predict(noisy, t, rig.viewmats[[2, 6]], cond, drop)
        want = model.denoiser(noisy, t, model.encode_latents(images).expand(2, K, 48, 8, 8),
                              mvdiff.image_embeds(model.image_encoder, images).expand(2, K, 32),
                              magicboost.camera_inputs(rig.viewmats[[2, 6]], rig.viewmats[[0, 4, 8, 12]].expand(2, K, 4, 4)),
                              drop)
    assert torch.equal(out, want)
    a = model.alphas_cumprod()
    assert a.dtype == torch.float64 and a.shape == (1000,)
    assert torch.equal(a, DDPMScheduler(**mvdiff.NOISE_SCHEDULE).alphas_cumprod.double())


# --- cameras -------------------------------------------------------------------------------------------


def test_camera_inputs_are_relative_to_the_target(gen):
    az = torch.tensor([0.3, 1.2, -2.0, 2.9], dtype=torch.float64)
    el = torch.tensor([0.1, 0.4, -0.2, 0.0], dtype=torch.float64)
    dist = torch.tensor([2.0, 2.5, 1.6, 2.0], dtype=torch.float64)
    vm, _ = cams.orbit_cameras(az, el, 1.0, 40.0, 32)
    vm = vm.clone()
    vm[:, :3, 3] *= dist[:, None]                     # camera i at distance dist[i], still looking at the origin
    f = magicboost.camera_inputs(vm[:1], vm[None, 1:])   # target 0, anchors 1..3
    assert f.shape == (1, 4, 5)
    rel = torch.remainder(az - az[0] + math.pi, 2 * math.pi) - math.pi
    want = torch.stack([el.sin(), el.cos(), rel.sin(), rel.cos(), (dist / dist[0]).log()], -1).float()
    assert_close(f[0], want, atol=1e-5, rtol=0, name="camera inputs")
    # a world turned about its up axis gives the same inputs
    turn = torch.eye(4, dtype=torch.float64)
    c, s = math.cos(0.7), math.sin(0.7)
    turn[:2, :2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    turned = (vm.double() @ torch.linalg.inv(turn)).float()
    assert_close(magicboost.camera_inputs(turned[:1], turned[None, 1:]), f, atol=1e-5, rtol=0, name="turned world")


# --- config and arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(num_anchors=0), r"num_anchors must be a positive integer; got 0"),
    (dict(anchor_timestep=1000), r"anchor_timestep must be an integer in \[0, 999\] \(a training timestep\); got 1000"),
    (dict(prediction_type="sample"), r"prediction_type must be one of \('epsilon', 'v_prediction'\)"),
    (dict(resolution=36), r"resolution must be a multiple of vae_downsample \* 2\^\(levels - 1\) = 8"),
    (dict(latent_channels=12), r"latent_channels must be 3 \* vae_downsample\^2 = 48 with vae='pixel'"),
    (dict(attention_heads=(3, 4)), r"must be multiples of their attention_heads"),
    (dict(unet_init=""), r"unet_init must be a local directory"),
    (dict(rig="lgm4"), r"unknown keys \['rig'\]"),
])
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        MagicBoostConfig.preset("tiny", **kw)
    with pytest.raises(ValueError, match=r"preset must be one of \['base', 'tiny'\]; got 'huge'"):
        MagicBoostConfig.preset("huge")


def test_base_preset_is_stable_diffusion_2_at_256px():
    cfg = MagicBoostConfig.preset("base")
    kw = magicboost.unet_kwargs(cfg)
    assert (kw["block_out_channels"], kw["attention_head_dim"], kw["cross_attention_dim"], kw["layers_per_block"]) == \
        ((320, 640, 1280, 1280), (5, 10, 20, 20), 1024, 2)
    assert (cfg.resolution, cfg.latent_size, kw["in_channels"], kw["out_channels"], cfg.num_anchors) == (256, 32, 4, 4, 4)
    assert kw["projection_class_embeddings_input_dim"] == magicboost.CAMERA_FEATURES


def test_bad_arguments_are_named(tiny, gen):
    model = MagicBoost(tiny).eval()
    rig = cams.orbit16(gen, 32)
    images = torch.rand(K, 3, 32, 32, generator=gen)
    with pytest.raises(ValueError, match=r"anchor_images must hold the model's num_anchors = 4 views; got 3"):
        model.condition(images[:3], rig.viewmats[:3])
    with pytest.raises(ValueError, match=r"anchor_images must have shape \[N, 3, 32, 32\]; got \[4, 3, 64, 64\]"):
        model.condition(torch.rand(K, 3, 64, 64), rig.viewmats[:K])
    with pytest.raises(ValueError, match=r"anchor_viewmats must have shape \[K, 4, 4\] with K = 4; got \[3, 4, 4\]"):
        model.condition(images, rig.viewmats[:3])
    cond = model.condition(images, rig.viewmats[:K])
    noisy, t, vm = torch.randn(2, 48, 8, 8), torch.tensor([1, 2]), rig.viewmats[4:6]
    with pytest.raises(ValueError, match=r"noisy must have shape \[B, C, h, w\] with C = 48, h = 8, w = 8; got \[2, 4, 8, 8\]"):
        model.predict(torch.randn(2, 4, 8, 8), t, vm, cond)
    with pytest.raises(ValueError, match=r"target_viewmats must have shape \[B, 4, 4\] with B = 2; got \[3, 4, 4\]"):
        model.predict(noisy, t, rig.viewmats[:3], cond)
    with pytest.raises(ValueError, match=r"timesteps must be an integer tensor \[B\]; got torch.float32"):
        model.predict(noisy, t.float(), vm, cond)
    with pytest.raises(ValueError, match=r"timesteps must have shape \[B\] with B = 2; got \[1\]"):
        model.predict(noisy, t[:1], vm, cond)
    with pytest.raises(ValueError, match=r"drop must have shape \[B, K\] with B = 2, K = 4; got \[2, 3\]"):
        model.predict(noisy, t, vm, cond, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"drop must be a bool tensor \[B, K\]; got torch.int64"):
        model.predict(noisy, t, vm, cond, torch.zeros(2, K, dtype=torch.long))
    with pytest.raises(ValueError, match=r"cond must be an AnchorCondition \(MagicBoost.condition\); got tuple"):
        model.predict(noisy, t, vm, (cond.latents, cond.embeds, cond.viewmats))
    with pytest.raises(ValueError, match=r"z must have shape \[N, 48, 8, 8\]; got \[1, 4, 8, 8\]"):
        model.decode_latents(torch.randn(1, 4, 8, 8))


# --- initialisation from Stable Diffusion, model directories ---------------------------------------------


def test_unet_init_starts_as_the_image_model(tiny, tmp_path, gen):
    """From an SD-layout UNet (no camera input): with every anchor dropped, the denoiser equals that
    UNet on the noisy latent with the null token as its one cross-attention token (the camera MLP
    starts at zero); a UNet of another layout is named."""
    kl = dict(vae=mvdiff.RANDOM_TINY, latent_channels=4, vae_scaling_factor=0.18215)
    cfg = MagicBoostConfig.preset("tiny", **kl)
    kw = {k: v for k, v in magicboost.unet_kwargs(cfg).items()
          if k not in ("class_embed_type", "projection_class_embeddings_input_dim")}
    sd = randomize_(UNet2DConditionModel(**kw), gen)
    sd.save_pretrained(str(tmp_path / "sd" / "unet"))
    model = magicboost.build_denoiser(MagicBoostConfig.preset("tiny", **kl, unet_init=str(tmp_path / "sd")),
                                      attention_backend="torch")
    with torch.no_grad():
        model.null_token.copy_(torch.randn(model.null_token.shape, generator=gen))
    x = denoiser_inputs(cfg, gen)
    with torch.no_grad():
        ours = model(**x, drop=torch.ones(3, K, dtype=torch.bool))
        want = sd(x["noisy"], x["timesteps"], encoder_hidden_states=model.null_token.expand(3, 1, -1)).sample
        conditioned = model(**x)
    assert_close(ours, want, **TOL["forward"], name="denoiser from unet_init vs the SD UNet")
    assert (conditioned - want).abs().max() > 1e-4, "the anchors condition the target"
    other = MagicBoostConfig.preset("tiny", **dict(kl, layers_per_block=2), unet_init=str(tmp_path / "sd"))
    with pytest.raises(ValueError, match=r"unet_init .* is another UNet than the config's: .*'layers_per_block': \(1, 2\)"):
        magicboost.build_denoiser(other)


def test_model_directory_round_trip(tmp_path, gen):
    cfg = MagicBoostConfig.preset("tiny", num_anchors=2, anchor_timestep=10, prediction_type="v_prediction")
    model = MagicBoost(cfg)
    randomize_(model.denoiser, gen)
    model.eval().save_pretrained(str(tmp_path / "m"))
    assert checkpoints.model_type(str(tmp_path / "m")) == "magicboost"
    loaded = MagicBoost.from_pretrained(str(tmp_path / "m"), attention_backend="torch")
    assert loaded.config == cfg and not loaded.training
    assert all(isinstance(p, AnchorAttnProcessor) for p in loaded.denoiser.unet.attn_processors.values())
    assert model.state_dict().keys() == loaded.state_dict().keys()
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    rig = cams.orbit16(gen, 32)
    images = torch.rand(2, 3, 32, 32, generator=gen)
    noisy = torch.randn(2, 48, 8, 8, generator=gen)
    with torch.no_grad():
        c1, c2 = model.condition(images, rig.viewmats[:2]), loaded.condition(images, rig.viewmats[:2])
        assert torch.equal(c1.latents, c2.latents) and torch.equal(c1.embeds, c2.embeds)
        assert torch.equal(model.predict(noisy, torch.tensor([3, 400]), rig.viewmats[5:7], c1),
                           loaded.predict(noisy, torch.tensor([3, 400]), rig.viewmats[5:7], c2))


def test_loading_another_model_type_is_refused(tmp_path):
    MVDiffusion(MVDiffConfig.preset("tiny")).save_pretrained(str(tmp_path / "mv"))
    with pytest.raises(ValueError, match="holds a 'mvdiff' model, not 'magicboost'"):
        MagicBoost.from_pretrained(str(tmp_path / "mv"))
    with pytest.raises(ValueError, match="has no config.yaml"):
        MagicBoost.from_pretrained(str(tmp_path))
