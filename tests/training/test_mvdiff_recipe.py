"""The ``mvdiff`` recipe (fast3d.training.recipes.mvdiff): the rig's views found among a sample's
cameras, the camera inputs relative to the condition, the optics check, the diffusion loss (noise
and velocity targets, min-SNR weights, condition dropout), the config checks, and a 2-rank CPU run
of train/configs/mvdiff_tiny.yaml whose model denoises and samples held-out objects better than its
untrained self. The data are procedural orbit16 objects from fixed seeds: their content is not
what is tested."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from helpers import assert_close

from fast3d import cameras as cams
from fast3d.data.dataset import MultiViewDataset
from fast3d.data.shards import MultiViewSample, ShardWriter
from fast3d.datagen import procedural
from fast3d.evaluation.image_metrics import psnr
from fast3d.inference.mvdiff import denoise, load_mvdiff
from fast3d.models import mvdiff
from fast3d.models.mvdiff import MVDiffConfig
from fast3d.training import config as run_config
from fast3d.training.loop import StepContext
from fast3d.training.metrics import read_metrics
from fast3d.training.recipes import mvdiff as recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_YAML = os.path.join(ROOT, "train", "configs", "mvdiff_tiny.yaml")
LGM4 = torch.deg2rad(torch.tensor([0.0, 90, 180, 270], dtype=torch.float64))
ERA3D6 = torch.deg2rad(torch.tensor([0.0, 45, 90, 180, 270, 315], dtype=torch.float64))


def orbit(gen: torch.Generator, B: int, resolution: int = 32) -> torch.Tensor:  # -> [B, 16, 4, 4]
    return torch.stack([cams.orbit16(gen, resolution).viewmats for _ in range(B)])


def make_config(directory, train: str, name: str = "run", **changes) -> str:
    """mvdiff_tiny.yaml with the test data and ``changes`` (``section__key=value`` for a key of the
    model / data / loss section); returns its path."""
    d = run_config.load_config(TINY_YAML, "mvdiff").to_dict()
    del d["source"]
    d["deepspeed"] = os.path.join(ROOT, "train", "configs", "ds_zero2.json")
    d["data"] = dict(d["data"], train=train)
    for k, v in changes.items():
        section, _, key = k.partition("__")
        if key:
            d[section] = dict(d[section], **{key: v})
        else:
            d[k] = v
    path = directory / f"{name}.yaml"
    path.write_text(json.dumps(d))  # JSON is YAML
    return str(path)


# --- views and cameras ---------------------------------------------------------------------------


def test_orbit16_views_hold_the_lgm4_and_era3d6_rigs_for_any_condition_view(gen):
    vm = orbit(gen, 3)
    cond, targets = recipe.select_views(vm, LGM4, -1, 10.0, gen)
    assert torch.equal(targets, (cond[:, None] + torch.tensor([0, 4, 8, 12])) % 16)
    cond, targets = recipe.select_views(vm, ERA3D6, 5, 10.0, gen)
    assert (cond == 5).all() and torch.equal(targets, (5 + torch.tensor([0, 2, 4, 8, 12, 14])).expand(3, 6) % 16)
    conds = torch.cat([recipe.select_views(vm, LGM4, -1, 10.0, gen)[0] for _ in range(20)])
    assert len(conds.unique()) > 8, "a random condition view is drawn from all 16"


def test_a_sample_without_the_rigs_views_is_named(gen):
    vm = torch.stack([cams.mvdream(32).viewmats])     # 4 views 90 degrees apart: no 45 degree views
    with pytest.raises(ValueError, match=r"sample 'obj7': no view has the rig's views \(azimuths \[0.0, 45.0"):
        recipe.select_views(vm, ERA3D6, -1, 10.0, gen, ["obj7"])


def test_camera_inputs_are_relative_to_the_condition(gen):
    vm = orbit(gen, 2)
    cond, targets = recipe.select_views(vm, LGM4, -1, 10.0, gen)
    f = recipe.camera_inputs(vm, cond, targets, MVDiffConfig.preset("tiny"))   # [2, 4, 4]
    az, el = mvdiff.azimuth_elevation(vm)
    rel = torch.atan2(f[..., 2], f[..., 3]).double()
    want = torch.remainder(torch.stack([az[b, targets[b]] - az[b, cond[b]] for b in range(2)]) + math.pi,
                           2 * math.pi) - math.pi
    assert_close(rel, want, atol=1e-6, rtol=0, name="relative azimuths")
    assert_close(rel.abs(), LGM4.abs().expand(2, 4).clone().where(LGM4 <= math.pi, 2 * math.pi - LGM4),
                 atol=0.1, rtol=0, name="near the rig's")
    assert_close(torch.atan2(f[..., 0], f[..., 1]).double(), torch.stack([el[b, targets[b]] for b in range(2)]),
                 atol=1e-6, rtol=0, name="elevations")


def test_optics_other_than_the_rigs_are_named(gen):
    cfg = MVDiffConfig.preset("tiny")
    rig = cams.orbit16(gen, 32)
    recipe.check_optics(cfg, rig.viewmats[None], rig.Ks[None])
    with pytest.raises(ValueError, match=r"field of view of .* the model's rig 'era3d6' has 10.00 \(set model.overrides.fov_y_deg"):
        recipe.check_optics(MVDiffConfig.preset("tiny", rig="era3d6"), rig.viewmats[None], rig.Ks[None])
    with pytest.raises(ValueError, match=r"cameras at distance .* \(set model.overrides.camera_distance"):
        recipe.check_optics(MVDiffConfig.preset("tiny", camera_distance=3.0), rig.viewmats[None], rig.Ks[None])


# --- the loss ------------------------------------------------------------------------------------


class KnowsTheAnswer(torch.nn.Module):
    """A stand-in denoiser that knows the clean latents ``z`` and the noise: it predicts the exact
    target (noise or velocity) plus ``offset``, so the loss must be offset**2 (times the weight).
    It records what it was given."""

    def __init__(self, z, noise, scheduler, prediction_type: str, offset: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.z, self.noise, self.sched, self.type, self.offset = z, noise, scheduler, prediction_type, offset

    def forward(self, noisy, cond_latent, image_embeds, cameras, timesteps, drop=None):
        self.seen = dict(noisy=noisy, cond_latent=cond_latent, timesteps=timesteps, drop=drop)
        target = self.noise if self.type == "epsilon" else self.sched.get_velocity(self.z, self.noise, timesteps)
        return target + self.offset + self.w


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_targets_and_min_snr_weights(prediction_type, gen):
    cfg = MVDiffConfig.preset("tiny", prediction_type=prediction_type)
    sched = DDPMScheduler(**mvdiff.NOISE_SCHEDULE, prediction_type=prediction_type)
    B, V, C, h = 3, 4, cfg.latent_channels, cfg.latent_size
    z, noise = torch.randn(B, V, C, h, h, generator=gen), torch.randn(B, V, C, h, h, generator=gen)
    t = torch.tensor([5, 400, 990])
    model = KnowsTheAnswer(z, noise, sched, prediction_type, offset=0.25)
    args = (z, torch.randn(B, C, h, h, generator=gen), torch.randn(B, 32, generator=gen), torch.zeros(B, V, 4), t, noise)
    weighted, mse = recipe.denoising_loss(model, sched, cfg, *args)
    assert_close(mse, torch.full((B,), 0.0625), atol=1e-6, rtol=0, name="unweighted loss")
    assert torch.equal(weighted, mse)
    a = sched.alphas_cumprod[t].double()
    assert_close(model.seen["noisy"], a.sqrt().view(B, 1, 1, 1, 1) * z + (1 - a).sqrt().view(B, 1, 1, 1, 1) * noise,
                 atol=1e-5, rtol=0, name="the DDPM forward process")
    weighted, mse = recipe.denoising_loss(model, sched, cfg, *args, snr_gamma=5.0)
    snr = a / (1 - a)
    w = snr.clamp(max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)
    assert_close(weighted, mse * w.float(), atol=1e-7, rtol=1e-6, name="min-SNR weighted loss")
    assert w[0] < 0.1 and w[2] > 0.9 if prediction_type == "epsilon" else w[0] < 0.1


# ImageDream's conditioning at the tiny preset's sizes (the pixel-controller view, image tokens, 16 camera numbers)
IMAGEDREAM_TINY = dict(conditioning="imagedream", image_tokens=4, resampler_depth=1, resampler_heads=2,
                       resampler_head_dim=16, text_tokens=4)


@pytest.mark.parametrize("overrides, embeds_shape, camera_dim",
                         [({}, (2, 32), 4), (IMAGEDREAM_TINY, (2, 17, 32), 16)], ids=["zero123", "imagedream"])
def test_the_recipes_step_drops_conditions_and_logs_buckets(tmp_path, gen, overrides, embeds_shape, camera_dim):
    data = str(tmp_path / "data")
    with ShardWriter(data, prefix="hand", samples_per_shard=2) as w:   # smooth random views at orbit16 cameras
        for i in range(2):
            rig = cams.orbit16(gen, 32)
            low = torch.rand(16, 3, 4, 4, generator=gen)
            w.write(MultiViewSample(key=f"obj{i}", images=F.interpolate(low, size=(32, 32), mode="bilinear"),
                                    alphas=torch.ones(16, 1, 32, 32), viewmats=rig.viewmats, Ks=rig.Ks,
                                    caption="", source="rendered3d"))
    cfg = run_config.load_config(make_config(tmp_path, data, loss__condition_dropout=0.5, model__overrides=overrides))
    r = recipe.MVDiffRecipe(cfg)
    model = r.build_model()
    r.prepare(torch.device("cpu"))
    samples = list(r.dataset(0, 1))
    batch = r.collate(samples)
    ctx = StepContext(1, torch.device("cpu"), torch.float32, gen, 0, 1)
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(args))
    loss, m = r.loss(model, batch, ctx)
    loss.backward()
    assert torch.isfinite(loss) and {"loss", "mse", "mean_t"} <= set(m)
    assert any(k.startswith("loss_t") for k in m)
    noisy, cond_latent, embeds, cameras, t, drop = seen[0]
    assert noisy.shape == (2, 4, 48, 8, 8) and cond_latent.shape == (2, 48, 8, 8)
    assert embeds.shape == embeds_shape and cameras.shape == (2, 4, camera_dim)
    assert drop.dtype == torch.bool and drop.shape == (2,)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("changes, match", [
    ({"data__bogus": 1}, r"data: unknown keys \['bogus'\]"),
    ({"data__views": 3}, r"data.views must be an integer >= 4"),
    ({"data__condition_view": 16}, r"data.condition_view must be an integer in \[-1, 15\]"),
    ({"loss__condition_dropout": 1.5}, r"loss.condition_dropout must be a real number in \[0, 1\]; got 1.5"),
    ({"loss__snr_gamma": -1}, r"loss.snr_gamma must be a real number >= 0"),
    ({"loss__timestep_buckets": [0, 500]}, r"loss.timestep_buckets must be increasing ints from 0 to 1000"),
    ({"model__preset": "huge"}, r"model: preset must be one of \['base', 'tiny'\]"),
    ({"model__overrides": {"rig": "zero123"}}, r"model: rig must be one of"),
    ({"data__train": ""}, r"data.train must name a shard directory"),
])
def test_bad_sections_are_named(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        recipe.MVDiffRecipe(run_config.load_config(make_config(tmp_path, "/data", **changes)))


def test_the_configs_parse():
    for name in ("mvdiff_tiny.yaml", "mvdiff_base.yaml"):
        model, data, loss = recipe.sections(run_config.load_config(os.path.join(ROOT, "train", "configs", name)))
        assert model.num_views == 4 and data.views >= 4
    base = recipe.sections(run_config.load_config(os.path.join(ROOT, "train", "configs", "mvdiff_base.yaml")))[0]
    assert (base.resolution, base.block_out_channels, base.cross_attention_dim) == (256, (320, 640, 1280, 1280), 1024)


# --- training ------------------------------------------------------------------------------------

TRAIN_STEPS = 200
HELDOUT_T = list(range(50, 1000, 100))   # the held-out loss: 10 timesteps over the schedule, fixed noise


def heldout_views(model_cfg: MVDiffConfig, data: str) -> tuple:
    """Condition view 0 of each held-out object, its lgm4 views and their camera inputs."""
    samples = list(MultiViewDataset(data, views=16, resolution=model_cfg.resolution))
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("images", "alphas", "viewmats", "Ks")}
    cond, targets = recipe.select_views(batch["viewmats"], model_cfg.rig_angles()[0], 0, 10.0, torch.Generator())
    return recipe.views_and_condition(batch, model_cfg, cond, targets)


def heldout_loss(model, cond_img, views, cameras) -> float:
    cfg, B, V = model.config, views.shape[0], views.shape[1]
    sched = DDPMScheduler(**mvdiff.NOISE_SCHEDULE, prediction_type=cfg.prediction_type)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        z = model.encode_latents(views.flatten(0, 1)).unflatten(0, (B, V))
        c, e = model.encode_latents(cond_img), model.image_embeds(cond_img)
        losses = [recipe.denoising_loss(model.denoiser, sched, cfg, z, c, e, cameras, torch.full((B,), t),
                                        torch.randn(z.shape, generator=g))[1].mean() for t in HELDOUT_T]
    return torch.stack(losses).mean().item()


def sampled_psnr(model, cond_img, views, cameras, steps: int = 10) -> float:
    """Mean PSNR of the views sampled (DDIM, no guidance) at the held-out views' cameras."""
    B, V = views.shape[:2]
    with torch.no_grad():
        c, e = model.encode_latents(cond_img), model.image_embeds(cond_img)
        noise = torch.randn((B, V, *c.shape[1:]), generator=torch.Generator().manual_seed(2))
        z = denoise(model, c, e, cameras, noise, steps=steps, guidance_scale=1.0, scheduler="ddim")
        images = model.decode_latents(z.flatten(0, 1))
    return psnr(images, views.flatten(0, 1)).mean().item()


@pytest.mark.slow
def test_two_rank_training_denoises_and_samples_held_out_objects_better(tmp_path):
    train, held = str(tmp_path / "train"), str(tmp_path / "heldout")
    common = dict(views=16, rig="orbit16", resolution=32, gaussians_per_object=800, samples_per_shard=4,
                  save_ply=False)
    procedural.run(train, procedural.ProceduralConfig(num_objects=32, seed=0, **common))
    procedural.run(held, procedural.ProceduralConfig(num_objects=4, seed=1, **common))
    out = tmp_path / "run"
    cfg_path = make_config(tmp_path, train, max_steps=TRAIN_STEPS, ckpt_every=TRAIN_STEPS, log_every=20)
    cmd = [sys.executable, "-m", "fast3d.cli", "train", "mvdiff", "--config", cfg_path, "--output", str(out),
           "--ranks", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=800)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-3000:]}"
    rows = read_metrics(str(out))
    assert [r["step"] for r in rows] == list(range(20, TRAIN_STEPS + 1, 20))
    assert all({"loss", "mse", "mean_t", "lr"} <= set(r) for r in rows)

    trained = load_mvdiff(str(out), device="cpu")
    untrained = mvdiff.MVDiffusion(trained.config).eval()   # the run's initial weights (drawn from random_seed)
    cond_img, views, cameras = heldout_views(trained.config, held)
    loss = {name: heldout_loss(m, cond_img, views, cameras) for name, m in (("untrained", untrained),
                                                                             ("trained", trained))}
    quality = {name: sampled_psnr(m, cond_img, views, cameras) for name, m in (("untrained", untrained),
                                                                               ("trained", trained))}
    print(f"held-out denoising MSE {loss}, sampled-view PSNR (dB) {quality}")
    # Measured (fixed seeds; 200 steps): MSE 1.03 -> 0.40, PSNR 4.6 -> 9.3 dB. The trained views are
    # still below a blank white image (14 dB) at this size: asserted is the gain over the untrained
    # model, with margin.
    assert loss["trained"] < 0.75 * loss["untrained"], loss
    assert quality["trained"] > quality["untrained"] + 2.0, quality
