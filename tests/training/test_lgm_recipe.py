"""The LGM recipe: 2-rank DeepSpeed training with exact resume, MVBoost's LoRA boost, its
augmentations and its config checks."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fast3d.datagen import procedural
from fast3d.models.lgm import LGM
from fast3d.training import augment
from fast3d.training.config import run_config_from_dict
from fast3d.training.loop import StepContext
from fast3d.training.metrics import read_metrics
from fast3d.training.recipes.lgm import LGMRecipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DS = os.path.join(ROOT, "train", "configs", "ds_zero2.json")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lgm_data"))
    procedural.run(out, procedural.ProceduralConfig(num_objects=8, views=16, rig="orbit16", resolution=64,
                                                    gaussians_per_object=800, samples_per_shard=2, batch_size=4))
    return out


def run_config(data, **kw):
    d = dict(recipe="lgm", deepspeed=DS, precision="fp32", batch_size=1, max_steps=4, lr=1e-3, warmup_steps=1,
             log_every=1, ckpt_every=2, model={"preset": "tiny"}, data={"train": data},
             loss={"lpips": 0.2, "lpips_backbone": "random"})
    d.update(kw)
    return d


def write(tmp_path, d, name="lgm.yaml"):
    p = tmp_path / name
    p.write_text(json.dumps(d))
    return str(p)


def train(config, out, *extra, ranks=2):
    cmd = [sys.executable, "-m", "fast3d.cli", "train", "lgm", "--config", config, "--output", str(out),
           "--ranks", str(ranks), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-3000:]}"


@pytest.mark.slow
def test_two_rank_training_resumes_to_the_same_losses(tmp_path, data):
    cfg = write(tmp_path, run_config(data))
    train(cfg, tmp_path / "whole")
    train(cfg, tmp_path / "resumed", "--max-steps", "2")
    train(cfg, tmp_path / "resumed", "--resume")
    whole, resumed = read_metrics(str(tmp_path / "whole")), read_metrics(str(tmp_path / "resumed"))
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(whole, resumed):
        for k in ("loss", "loss_mse", "loss_alpha", "loss_lpips", "psnr", "lr"):
            assert a[k] == b[k], f"step {a['step']} {k}: {a[k]} uninterrupted vs {b[k]} resumed"
    model = LGM.from_pretrained(str(tmp_path / "whole" / "checkpoints" / "step00000004" / "model"))
    assert model.config.input_size == 64


@pytest.mark.slow
def test_lora_boost_changes_only_the_cross_view_attention(tmp_path, data):
    torch.manual_seed(0)
    base = LGM(LGMRecipe(run_config_from_dict(run_config(data))).lgm)
    base.save_pretrained(str(tmp_path / "base"))
    cfg = write(tmp_path, run_config(data, max_steps=2, model={"preset": "tiny", "init_from": str(tmp_path / "base")}))
    train(cfg, tmp_path / "boost", "--lora", "4", ranks=1)
    boosted = LGM.from_pretrained(str(tmp_path / "boost" / "checkpoints" / "step00000002" / "model"))
    changed = [k for k, v in boosted.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed, "the LoRA update should reach the merged weights"
    assert all(".attn" in k and k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "to_out") for k in changed), changed


def test_init_from_takes_a_training_run_and_finds_its_newest_weights(tmp_path, data):
    """model.init_from (and `--init-from`) takes what `fast3d infer --checkpoint` takes: a training
    run's directory means its newest checkpoint's EMA weights where it kept them."""
    run = tmp_path / "run"
    for step, which in ((2, "model"), (4, "model"), (4, "model_ema")):
        LGM(LGMRecipe(run_config_from_dict(run_config(data))).lgm).save_pretrained(
            str(run / "checkpoints" / f"step{step:08d}" / which))
    (run / "checkpoints" / "latest").write_text("step00000004")
    r = LGMRecipe(run_config_from_dict(run_config(data, model={"preset": "tiny", "init_from": str(run), "lora_rank": 2})))
    assert r.init_dir == str(run / "checkpoints" / "step00000004" / "model_ema")
    assert r.cfg.model["init_from"] == r.init_dir  # config.json names the weights the run started from
    with pytest.raises(ValueError, match="model.init_from .* holds no model"):
        LGMRecipe(run_config_from_dict(run_config(data, model={"preset": "tiny", "init_from": str(tmp_path)})))


def test_loss_is_finite_and_reports_its_terms(data, gen):
    r = LGMRecipe(run_config_from_dict(run_config(data)))
    model = r.build_model()
    r.prepare(torch.device("cpu"))
    batch = r.collate([s for s, _ in zip(r.dataset(0, 1), range(2))])
    loss, m = r.loss(model, batch, StepContext(0, torch.device("cpu"), torch.float32, gen, 0, 1))
    assert torch.isfinite(loss) and {"loss", "loss_mse", "loss_alpha", "loss_lpips", "psnr"} <= set(m)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("change, match", [
    ({"data": {"train": "x", "input_views": [0, 1, 2]}}, "input_views must be 4 distinct"),
    ({"data": {"train": "x", "views": 6, "input_views": [0, 1, 2, 3]},
      "model": {"preset": "tiny", "overrides": {"num_sup_views": 8}}}, "num_sup_views \\(8\\) must be in"),
    ({"data": {}}, "data.train must name"),
    ({"model": {"preset": "tiny", "lora_rank": 4}}, "LoRA needs model.init_from"),
    ({"model": {"preset": "tiny", "overrides": {"nope": 1}}}, "model.overrides"),
    ({"loss": {"lpips_weight": 1}}, "unknown keys"),
])
def test_config_errors_name_the_key(change, match):
    with pytest.raises(ValueError, match=match):
        LGMRecipe(run_config_from_dict(dict(run_config("x"), **change)))


def test_recomposite_swaps_the_background_exactly(gen):
    fg, a = torch.rand(2, 3, 8, 8, generator=gen), torch.rand(2, 1, 8, 8, generator=gen)
    white = fg * a + (1 - a)
    bg = torch.rand(2, 3, generator=gen)
    expected = fg * a + (1 - a) * bg[:, :, None, None]
    assert torch.allclose(augment.recomposite(white, a, bg), expected, atol=1e-6)


def test_camera_jitter_is_rigid_and_small(gen):
    from fast3d import cameras

    vm = cameras.orbit16(gen).viewmats
    j = augment.camera_jitter(vm, gen, max_deg=3.0, max_shift=0.02)
    R = j[:, :3, :3].double()
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(16, 3, 3), atol=1e-5)
    moved = (cameras.camera_centers(j) - cameras.camera_centers(vm)).norm(dim=-1)
    assert 0 < moved.max() < 2.2 * 3.0 * 3.1416 / 180 + 0.02 * 3 ** 0.5 + 1e-4


def test_camera_noise_stays_within_its_amount(gen):
    from fast3d import cameras

    rig = cameras.mvdream(resolution=64)
    vm, K = augment.camera_noise(rig.viewmats, rig.Ks, gen, amount=0.02, size=64)
    assert (K - rig.Ks).abs().max() <= 0.02 * 64 + 1e-4 and (K - rig.Ks).abs().max() > 0
    assert (vm[:, :3, 3] - rig.viewmats[:, :3, 3]).abs().max() <= 0.02 + 1e-6
    R = vm[:, :3, :3].double()
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(4, 3, 3), atol=1e-5)


def test_grid_distortion_is_smooth_and_keeps_the_image_range(gen):
    x = torch.rand(3, 3, 32, 32, generator=gen)
    y = augment.grid_distortion(x, gen, strength=0.5)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert not torch.equal(x, y)
    assert torch.equal(augment.grid_distortion(x, gen, strength=0.0), x) or \
        torch.allclose(augment.grid_distortion(x, gen, strength=0.0), x, atol=1e-5)


def test_lora_adapters_sit_only_on_the_cross_view_self_attention_and_merge_at_export(tmp_path, gen):
    """MVBoost's boost: rank-32 adapters on to_q/to_k/to_v/to_out of each CrossViewAttention and
    nowhere else, only they train, and the export is a plain LGM whose output is the adapted one."""
    from fast3d.models.lgm import LGMConfig, lora_target_modules
    from fast3d.models.lgm.unet import CrossViewAttention

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    base = LGM(LGMConfig.preset("tiny")).eval()
    base.save_pretrained(str(tmp_path / "base"))
    r = LGMRecipe(run_config_from_dict(run_config("x", model={"preset": "tiny", "init_from": str(tmp_path / "base"),
                                                              "lora_rank": 32})))
    model = r.build_model().eval()
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
    attention = {n for n, m in base.named_modules() if isinstance(m, CrossViewAttention)}
    assert adapted == set(lora_target_modules(base)) and len(adapted) == 4 * len(attention) > 0
    assert all(n.rsplit(".", 1)[0] in attention for n in adapted)
    assert all(m.lora_A["default"].out_features == 32 for n, m in model.named_modules() if hasattr(m, "lora_A"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with torch.no_grad():  # as if trained: lora_B starts at zero
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    x = (torch.rand(1, 4, 3, 64, 64, generator=gen), *lgm_inputs())
    with torch.no_grad():
        want = model(*x)
    r.export(model, str(tmp_path / "export"))
    merged = LGM.from_pretrained(str(tmp_path / "export")).eval()
    assert type(merged) is LGM and not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        got = merged(*x)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-4), k
    changed = {k.rsplit(".", 1)[0] for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed == adapted


def lgm_inputs():  # -> viewmats [1, 4, 4, 4], Ks [1, 4, 3, 3]: LGM's default input rig at 64 px
    from fast3d.inference.lgm import default_input_cameras
    from fast3d.models.lgm import LGMConfig

    vm, K = default_input_cameras(LGMConfig.preset("tiny"), 64)
    return vm[None], K[None]


def test_lora_flag_defaults_to_rank_32_and_refuses_a_rank_below_1(tmp_path):
    from fast3d.cli import build_parser
    from fast3d.training import launch

    parse = lambda *a: build_parser().parse_args(["train", "lgm", "--config", "c.yaml", *a]).lora  # noqa: E731
    assert (parse("--lora"), parse("--lora", "8"), parse()) == (32, 8, None)
    cfg = write(tmp_path, run_config("x"))
    for rank in (0, -4):
        with pytest.raises(ValueError, match=f"--lora takes a positive rank.*got {rank}"):
            launch.run("lgm", cfg, str(tmp_path / "out"), lora=rank)
    with pytest.raises(ValueError, match="model.lora_rank must be >= 0"):
        LGMRecipe(run_config_from_dict(run_config("x", model={"preset": "tiny", "lora_rank": -1, "init_from": "b"})))


def test_boost_config_names_pseudo_ground_truth_and_rank_32(tmp_path):
    """train/configs/lgm_boost_tiny.yaml: LoRA rank 32 from base weights, on `datagen boost` shards
    of the tiny multi-view model's 4-view rig (all inputs)."""
    from fast3d.models.lgm import LGMConfig
    from fast3d.training.config import load_config

    cfg = load_config(os.path.join(ROOT, "train", "configs", "lgm_boost_tiny.yaml"), recipe="lgm")
    assert cfg.model["lora_rank"] == 32 and cfg.model["init_from"].endswith("runs/lgm")
    assert cfg.data["train"].endswith("data/boost") and cfg.data["views"] == 4
    LGM(LGMConfig.preset("tiny")).save_pretrained(str(tmp_path / "base"))
    r = LGMRecipe(cfg.replace(model={**cfg.model, "init_from": str(tmp_path / "base")},
                              data={**cfg.data, "train": str(tmp_path)}))
    assert r.model_section.lora_rank == 32 and list(r.data_section.input_views) == [0, 1, 2, 3]
