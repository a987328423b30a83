"""The ``magicboost`` recipe (fast3d.training.recipes.magicboost): anchors and targets found among a
sample's views, the paper's three anchor augmentations (noise disturbance, random scale, random
view drop) each doing what it says and each switchable, the recipe's step, the config checks, and
a 2-rank CPU DeepSpeed run of train/configs/magicboost_tiny.yaml whose model directory loads with
MagicBoost.from_pretrained. Data are procedural orbit16 objects or hand-made views at orbit16
cameras: their content is not what is tested."""

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
from fast3d.data.shards import MultiViewSample, ShardWriter
from fast3d.datagen import procedural
from fast3d.models import mvdiff
from fast3d.models.magicboost import MagicBoost
from fast3d.training import config as run_config
from fast3d.training.loop import StepContext
from fast3d.training.metrics import read_metrics
from fast3d.training.recipes import magicboost as recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_YAML = os.path.join(ROOT, "train", "configs", "magicboost_tiny.yaml")
AUG_OFF = dict(noise=False, scale=False, drop=False)


def make_config(directory, train: str, name: str = "run", **changes) -> str:
    """magicboost_tiny.yaml with the test data and ``changes`` (``section__key=value`` for a key of
    the model / data / loss section); returns its path."""
    d = run_config.load_config(TINY_YAML, "magicboost").to_dict()
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


def hand_shards(directory, gen: torch.Generator, n: int = 2) -> str:
    """``n`` objects of smooth random views (alpha: a centred disc) at orbit16 cameras."""
    data = str(directory / "data")
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    disc = ((xs ** 2 + ys ** 2) < 0.5).float()[None, None].expand(16, 1, 32, 32)
    with ShardWriter(data, prefix="hand", samples_per_shard=2) as w:
        for i in range(n):
            rig = cams.orbit16(gen, 32)
            colour = F.interpolate(torch.rand(16, 3, 4, 4, generator=gen), size=(32, 32), mode="bilinear")
            w.write(MultiViewSample(key=f"obj{i}", images=colour * disc + (1 - disc), alphas=disc.clone(),
                                    viewmats=rig.viewmats, Ks=rig.Ks, caption="", source="rendered3d"))
    return data


# --- anchors and targets -----------------------------------------------------------------------------


def test_ring_anchors_and_targets_on_orbit16_views(gen):
    vm = torch.stack([cams.orbit16(gen, 32).viewmats for _ in range(64)])
    anchors, target, on = recipe.select_anchors(vm, 4, "ring", 10.0, 0.25, gen)
    assert torch.equal(anchors, (anchors[:, :1] + torch.tensor([0, 4, 8, 12])) % 16)
    assert len(anchors[:, 0].unique()) > 8, "the first anchor is drawn from all 16 views"
    rows = torch.arange(64)
    assert (on >= 0).any() and (on < 0).any()
    assert torch.equal(target[on >= 0], anchors[rows[on >= 0], on[on >= 0]]), "an anchor target is that anchor's view"
    assert not (anchors[on < 0] == target[on < 0, None]).any(), "other targets are no anchor"
    _, _, never = recipe.select_anchors(vm, 4, "ring", 10.0, 0.0, gen)
    _, _, always = recipe.select_anchors(vm, 4, "ring", 10.0, 1.0, gen)
    assert (never == -1).all() and (always >= 0).all()
    rand, target, on = recipe.select_anchors(vm, 3, "random", 10.0, 0.0, gen)
    assert rand.shape == (64, 3) and all(len(r.unique()) == 3 for r in rand)
    assert not (rand == target[:, None]).any()


def test_a_sample_without_a_ring_of_anchors_is_named(gen):
    vm = torch.stack([cams.orbit16(gen, 32).viewmats[:6]])   # 6 views 22.5 degrees apart: no 90 degree ring
    with pytest.raises(ValueError, match=r"sample 'obj3': no view has the rig's views"):
        recipe.select_anchors(vm, 4, "ring", 10.0, 0.0, gen, ["obj3"])


# --- augmentations --------------------------------------------------------------------------------


def square(size: float, colour=(0.2, 0.5, 0.8), R: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A centred square object of half-width ``size`` (in [-1, 1] image units) over white."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, R), torch.linspace(-1, 1, R), indexing="ij")
    a = ((xs.abs() < size) & (ys.abs() < size)).float()[None, None]
    img = torch.tensor(colour)[None, :, None, None] * a + (1 - a)
    return img, a


def test_random_scale_zooms_the_object_about_the_centre_onto_the_background():
    img, a = square(0.5, R=128)
    grey = torch.full((1, 3), 0.5)
    same = recipe.scale_views(img, a, torch.ones(1), torch.ones(1, 3))
    assert_close(same, img, atol=1e-6, rtol=0, name="scale 1 on white")
    for s in (0.6, 1.4):
        out = recipe.scale_views(img, a, torch.tensor([s]), grey)
        # the object's coverage (its alpha, read off the blue channel: 0.8 on, 0.5 off) scales by s^2,
        # up to the point-sampled edges of a 38-90 px square: measured 2.1% (0.6), 0.4% (1.4)
        area = ((out[0, 2] - 0.5) / 0.3).sum()
        assert abs(area.item() / a.sum().item() / (s * s) - 1) < 0.04, (s, area.item(), a.sum().item())
        assert_close(out[0, :, 64, 64], torch.tensor([0.2, 0.5, 0.8]), atol=1e-5, rtol=0, name="colour at the centre")
        assert_close(out[0, :, 0, 0], torch.full((3,), 0.5), atol=1e-6, rtol=0, name="corner is background")


def test_noise_disturbance_is_the_forward_process_to_its_timestep(gen):
    ac = DDPMScheduler(**mvdiff.NOISE_SCHEDULE).alphas_cumprod
    z = torch.randn(2, 3, 48, 8, 8, generator=gen)
    noise = torch.randn(z.shape, generator=gen)
    steps = torch.tensor([[0, 10, 150], [199, 0, 1]])
    out = recipe.disturb_latents(z, steps, ac, noise)
    for b in range(2):
        for k in range(3):
            s = int(steps[b, k])
            if s == 0:
                assert torch.equal(out[b, k], z[b, k])
            else:
                a = ac[s].double()
                assert_close(out[b, k], (a.sqrt() * z[b, k] + (1 - a).sqrt() * noise[b, k]).float(), atol=1e-6,
                             rtol=0, name=f"disturbed latent at s={s}")
                assert (out[b, k] - z[b, k]).abs().max() > 1e-3


def test_view_drop_drops_at_its_rate_and_always_the_targets_own_anchor(gen):
    B, K, p = 4000, 4, 0.25
    aug = recipe.AugmentSection(drop_prob=p)
    none = torch.full((B,), -1)
    drop = recipe.drop_mask(B, K, aug, 0.0, none, gen)
    # binomial: 16000 draws at p, std 0.0034; 5 std
    assert abs(drop.float().mean().item() - p) < 0.017
    assert not recipe.drop_mask(B, K, recipe.AugmentSection(drop=False), 0.0, none, gen).any()
    uncond = recipe.drop_mask(B, K, recipe.AugmentSection(drop=False), 0.1, none, gen)
    assert (uncond.all(1) | ~uncond.any(1)).all() and abs(uncond.all(1).float().mean().item() - 0.1) < 0.025
    own = torch.randint(-1, K, (B,), generator=gen)
    d = recipe.drop_mask(B, K, recipe.AugmentSection(drop=False), 0.0, own, gen)
    rows = (own >= 0).nonzero()[:, 0]
    assert d[rows, own[rows]].all() and d.sum() == len(rows)


def test_augmentations_switch_off_and_on(tmp_path, gen):
    data = hand_shards(tmp_path, gen)
    off = recipe.MagicBoostRecipe(run_config.load_config(make_config(tmp_path, data, "off", data__augment=AUG_OFF)))
    on = recipe.MagicBoostRecipe(run_config.load_config(make_config(
        tmp_path, data, "on", data__augment=dict(scale_prob=1.0, noise_prob=1.0))))
    batch = off.collate(list(off.dataset(0, 1)))
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    v_off = off.views(batch, torch.Generator().manual_seed(seed))
    rows = torch.arange(2)[:, None]
    raw = batch["images"][rows, recipe.select_anchors(batch["viewmats"], 4, "ring", 10.0, 0.25,
                                                      torch.Generator().manual_seed(seed))[0]]
    assert torch.equal(v_off["anchors"], raw) and (v_off["scales"] == 1).all(), "no scale: the anchors as read"
    assert not off.noise_steps(2, 4, gen).any()
    v_on = on.views(batch, torch.Generator().manual_seed(seed))
    assert ((v_on["scales"] - 1).abs() > 0).all() and (v_on["scales"] >= 0.85).all() and (v_on["scales"] <= 1.15).all()
    assert (v_on["anchors"] - raw).abs().amax((2, 3, 4)).min() > 1e-3, "every anchor rescaled"
    s = on.noise_steps(2, 4, gen)
    assert (s >= 1).all() and (s <= 200).all()


# --- the step -------------------------------------------------------------------------------------------


def test_the_recipes_step_conditions_targets_on_anchors(tmp_path, gen):
    data = hand_shards(tmp_path, gen)
    r = recipe.MagicBoostRecipe(run_config.load_config(make_config(tmp_path, data)))
    model = r.build_model()
    r.prepare(torch.device("cpu"))
    batch = r.collate(list(r.dataset(0, 1)))
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(args))
    loss, m = r.loss(model, batch, StepContext(1, torch.device("cpu"), torch.float32, gen, 0, 1))
    loss.backward()
    assert torch.isfinite(loss) and {"loss", "mse", "mean_t", "kept_anchors"} <= set(m)
    assert any(k.startswith("loss_t") for k in m) and 0 <= m["kept_anchors"] <= 4
    noisy, t, anchors, embeds, cameras, drop = seen[0]
    assert noisy.shape == (2, 48, 8, 8) and anchors.shape == (2, 4, 48, 8, 8) and embeds.shape == (2, 4, 32)
    assert cameras.shape == (2, 5, 5) and drop.shape == (2, 4) and drop.dtype == torch.bool
    # the target's own camera: elevation only, no azimuth difference, distance ratio 1
    assert_close(cameras[:, 0, 2:], torch.tensor([0.0, 1.0, 0.0]).expand(2, 3), atol=1e-6, rtol=0, name="own camera")
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("changes, match", [
    ({"data__bogus": 1}, r"data: unknown keys \['bogus'\]"),
    ({"data__views": 4}, r"data.views must be an integer >= 5 \(more than the model's num_anchors\); got 4"),
    ({"data__anchors": "grid"}, r"data.anchors must be one of \('ring', 'random'\); got 'grid'"),
    ({"data__target_anchor_prob": 2.0}, r"data.target_anchor_prob must be a real number in \[0, 1\]; got 2.0"),
    ({"data__augment": {"blur": True}}, r"data.augment: unknown keys \['blur'\]"),
    ({"data__augment": {"noise": "yes"}}, r"data.augment.noise must be"),
    ({"data__augment": {"drop_prob": -0.1}}, r"data.augment.drop_prob must be a real number in \[0, 1\]"),
    ({"data__augment": {"noise_max_timestep": 1000}}, r"data.augment.noise_max_timestep must be an integer in \[1, 999\]"),
    ({"data__augment": {"scale_range": [1.2, 0.8]}}, r"data.augment.scale_range must be \[lo, hi\] with 0 < lo <= hi"),
    ({"loss__uncond_prob": 1.5}, r"loss.uncond_prob must be a real number in \[0, 1\]; got 1.5"),
    ({"loss__timestep_buckets": [0, 500]}, r"loss.timestep_buckets must be increasing ints from 0 to 1000"),
    ({"model__overrides": {"num_anchors": 0}}, r"model: num_anchors must be a positive integer; got 0"),
    ({"data__train": ""}, r"data.train must name a shard directory"),
])
def test_bad_sections_are_named(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        recipe.MagicBoostRecipe(run_config.load_config(make_config(tmp_path, "/data", **changes)))


def test_the_configs_parse():
    for name in ("magicboost_tiny.yaml", "magicboost_base.yaml"):
        model, data, aug, loss = recipe.sections(run_config.load_config(os.path.join(ROOT, "train", "configs", name)))
        assert model.num_anchors == 4 and data.views > 4 and aug.noise and aug.scale and aug.drop
    base = recipe.sections(run_config.load_config(os.path.join(ROOT, "train", "configs", "magicboost_base.yaml")))[0]
    assert (base.resolution, base.block_out_channels, base.cross_attention_dim) == (256, (320, 640, 1280, 1280), 1024)


# --- training -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_rank_training_saves_a_loadable_model(tmp_path):
    train = str(tmp_path / "train")
    procedural.run(train, procedural.ProceduralConfig(num_objects=8, seed=0, views=16, rig="orbit16", resolution=32,
                                                      gaussians_per_object=300, samples_per_shard=2, save_ply=False))
    out = tmp_path / "run"
    cfg_path = make_config(tmp_path, train, max_steps=4, ckpt_every=4, log_every=2, batch_size=2)
    cmd = [sys.executable, "-m", "fast3d.cli", "train", "magicboost", "--config", cfg_path, "--output", str(out),
           "--ranks", "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-3000:]}"
    rows = read_metrics(str(out))
    assert [r["step"] for r in rows] == [2, 4]
    assert all({"loss", "mse", "mean_t", "kept_anchors", "lr"} <= set(r) and math.isfinite(r["loss"]) for r in rows)
    model_dir = os.path.join(out, "checkpoints", "step00000004", "model")
    model = MagicBoost.from_pretrained(model_dir)
    assert model.config.num_anchors == 4 and model.config.prediction_type == "v_prediction"
    untrained = MagicBoost(model.config)
    moved = [n for (n, a), (_, b) in zip(model.denoiser.state_dict().items(), untrained.denoiser.state_dict().items())
             if not torch.equal(a, b)]
    assert moved, "training changed the denoiser's weights"
