"""The LRM recipe (VFusion3D's): a 2-rank CPU run of lrm_tiny with a resume, the render-resolution
stages and the learning-rate restart, camera noise on the input camera alone, LPIPS-only
supervision, patches and random backgrounds, the source check before training, config errors."""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import assert_close

from fast3d import cameras
from fast3d.datagen import procedural
from fast3d.evaluation.image_metrics import load_lpips
from fast3d.models.lrm import LRM, LRMConfig
from fast3d.training.config import load_config, run_config_from_dict
from fast3d.training.loop import StepContext
from fast3d.training.metrics import read_metrics
from fast3d.training.recipes.lrm import LRMRecipe
from fast3d.training.recipes.lrm_data import SourceFiltered

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "train", "configs")
TINY = os.path.join(CONFIGS, "lrm_tiny.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 procedural objects (source rendered3d), 4 orbit views of 32 px, 2 a shard."""
    out = str(tmp_path_factory.mktemp("lrm_data"))
    procedural.run(out, procedural.ProceduralConfig(num_objects=8, views=4, rig="orbit16", resolution=32,
                                                    gaussians_per_object=600, samples_per_shard=2, batch_size=2))
    return out


def tiny_dict(train="unused", **sections) -> dict:
    """lrm_tiny.yaml as a dict, with data.train and any section keys replaced."""
    with open(TINY) as f:
        d = yaml.safe_load(f)
    d["deepspeed"] = os.path.join(CONFIGS, d["deepspeed"])
    d["data"]["train"] = train
    for name, kw in sections.items():
        d[name] = {**d[name], **kw}
    return d


def recipe(run: dict | None = None, **sections) -> LRMRecipe:
    """LRMRecipe of lrm_tiny with top-level keys ``run`` and section keys replaced."""
    return LRMRecipe(run_config_from_dict({**tiny_dict(**sections), **(run or {})}))


@pytest.fixture(scope="module")
def tiny_lrm():
    """The tiny LRM the recipe builds (seeded): tests take copies, building one costs seconds."""
    return recipe().build_model()


def fake_batch(gen, B=4, V=3, R=16) -> dict:
    """Random images over white, with orbit16 cameras."""
    alphas = (torch.rand(B, V, 1, R, R, generator=gen) > 0.5).float()
    images = torch.rand(B, V, 3, R, R, generator=gen) * alphas + (1 - alphas)
    rigs = [cameras.orbit16(gen, resolution=R, n_views=V) for _ in range(B)]
    return {"images": images, "alphas": alphas, "viewmats": torch.stack([r.viewmats for r in rigs]),
            "Ks": torch.stack([r.Ks for r in rigs]), "key": [f"s{i}" for i in range(B)]}


def ctx(gen, step=0) -> StepContext:
    return StepContext(step, torch.device("cpu"), torch.float32, gen, 0, 1)


class Spy(torch.nn.Module):
    """Wraps an LRM as the DeepSpeed engine does (``.module``), recording the cameras it is given."""

    def __init__(self, lrm: LRM):
        super().__init__()
        self.module = lrm
        self.renders = []
        render = lrm.render

        def spy_render(planes, viewmats, Ks, *args, **kw):
            self.renders.append(dict(viewmats=viewmats.clone(), Ks=Ks.clone(), **kw))
            return render(planes, viewmats, Ks, *args, **kw)

        lrm.render = spy_render

    def forward(self, image, viewmat, K):
        self.input = (viewmat.clone(), K.clone())
        return self.module(image, viewmat, K)


@pytest.mark.slow
def test_two_rank_run_resumes_and_switches_resolution_at_the_stage_boundary(tmp_path, data):
    cfg = tmp_path / "lrm_tiny.yaml"
    cfg.write_text(json.dumps(tiny_dict(train=data)))  # JSON is YAML
    out = tmp_path / "run"

    def train(*extra):
        cmd = [sys.executable, "-m", "fast3d.cli", "train", "lrm", "--config", str(cfg), "--output", str(out),
               "--ranks", "2", *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-3000:]}"

    train("--max-steps", "3")
    assert open(out / "checkpoints" / "latest").read() == "step00000003"
    train("--max-steps", "5", "--resume")
    rows = read_metrics(str(out))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5], "metrics.jsonl should hold one curve across the resume"
    for r in rows:
        for k in ("loss", "loss_mse", "loss_lpips", "loss_opacity", "psnr"):
            assert r[k] is not None and math.isfinite(r[k]), f"step {r['step']}: {k} = {r[k]}"
    assert [r["render_resolution"] for r in rows] == [16, 16, 24, 24, 24]  # stages: 16 px x 2 steps, then 24 px
    model = LRM.from_pretrained(str(out / "checkpoints" / "step00000005" / "model"))
    assert model.config == LRMConfig.preset("tiny")


def cosine(step, a, b):
    return 0.5 * (1 + math.cos(math.pi * (step - a - 1) / (b - a)))


def test_stage_schedule_and_cosine_learning_rate_with_restart():
    """VFusion3D: cosine annealing with a restart to the initial rate after the 192 px stage, and no
    second warm-up (the old schedule was constant, and its restart re-ran the warm-up)."""
    r = recipe(loss={"stages": [{"resolution": 8, "steps": 2}, {"resolution": 16, "steps": 3},
                                {"resolution": 24, "steps": 3}], "lr_reset_after": 16, "lpips_weight": 0.0},
               data={"resolution": 24},
               run={"warmup_steps": 2})
    assert [r.stage_resolution(s) for s in range(1, 10)] == [8, 8, 16, 16, 16, 24, 24, 24, 24]
    # warm-up (the scheduler's ramp) to step 2; cycle (2, 5]; restart at the peak at step 6; cycle (5, 8]
    want = [1, 1, 1, cosine(4, 2, 5), cosine(5, 2, 5), 1, cosine(7, 5, 8), cosine(8, 5, 8), cosine(8, 5, 8)]
    assert [r.lr_factor(s) for s in range(1, 10)] == pytest.approx(want, abs=1e-12)
    assert 0 < r.lr_factor(8) < r.lr_factor(7) < r.lr_factor(6) == 1  # anneals, never to 0
    one = recipe(loss={"lr_reset_after": None}, run={"warmup_steps": 1})     # stages 2 + 4 steps: one cycle
    assert [one.lr_factor(s) for s in range(1, 8)] == pytest.approx(
        [1] + [cosine(s, 1, 6) for s in range(2, 7)] + [cosine(6, 1, 6)], abs=1e-12)
    with pytest.raises(ValueError, match=r"warmup_steps \(5\) must end before the first cosine cycle does \(step 5"):
        recipe(loss={"stages": [{"resolution": 8, "steps": 2}, {"resolution": 16, "steps": 3},
                                {"resolution": 24, "steps": 3}], "lr_reset_after": 16, "lpips_weight": 0.0},
               data={"resolution": 24}, run={"warmup_steps": 5})


@pytest.mark.parametrize("name", ["lrm_small.yaml", "lrm_base.yaml", "lrm_large.yaml"])
def test_shipped_pretraining_configs_follow_the_paper(name):
    """Stages 128..384 px of 5 epochs each but the last (10), the restart after the 192 px stage
    (after 10 of the 30 epochs), 3000 warm-up steps, initial rate 4e-4, max_steps = all stages."""
    paper = LRMRecipe(load_config(os.path.join(CONFIGS, name), "lrm"))
    assert [res for res, _ in paper.stages] == [128, 192, 256, 320, 384]
    epoch = paper.stages[0][1]
    assert [steps / epoch for _, steps in paper.stages] == [1, 1, 1, 1, 2]
    assert paper.restart_step == 2 * epoch and paper.total_steps == 6 * epoch == paper.cfg.max_steps
    assert paper.cfg.warmup_steps == 3000 and paper.cfg.lr == 4e-4
    assert [paper.stage_resolution(s) for s in (1, epoch, epoch + 1, 2 * epoch + 1, 6 * epoch, 7 * epoch)] == \
        [128, 128, 192, 256, 384, 384]
    r = paper.restart_step
    assert paper.lr_factor(3000) == 1 and paper.lr_factor(3001) == 1 and paper.lr_factor(r + 1) == 1
    assert paper.lr_factor(r) < 1e-6 and paper.lr_factor(r + 2) > 0.99999   # down to ~0, back to the peak
    assert paper.lr_factor(6 * epoch) < 1e-6


def test_shipped_finetune_config_is_vfusion3d_second_stage():
    """VFusion3D's fine-tuning on 3D renders: rendered3d data, MSE + LPIPS (no image_level), the last
    stage's 384 px, a smaller rate than pre-training, from the pre-training run."""
    cfg = load_config(os.path.join(CONFIGS, "lrm_finetune3d.yaml"), "lrm")
    pre = load_config(os.path.join(CONFIGS, "lrm_small.yaml"), "lrm")
    assert cfg.model["preset"] == pre.model["preset"] and cfg.model["init_from"] == "../../runs/lrm_small"
    assert list(cfg.data["sources"]) == ["rendered3d"] and cfg.loss["image_level"] is False
    assert list(cfg.loss["stages"]) == [{"resolution": 384, "steps": cfg.max_steps}] and cfg.lr < pre.lr
    with pytest.raises(ValueError, match="model.init_from"):
        LRMRecipe(cfg)  # no pre-training run here


def test_init_from_flag_starts_an_lrm_run_from_a_training_run(tmp_path, monkeypatch):
    """`fast3d train lrm --init-from RUN` (as for lgm): the run starts from RUN's newest weights and
    its config.json names them."""
    from fast3d.training import launch

    cfg = tmp_path / "lrm_tiny.yaml"
    cfg.write_text(json.dumps(tiny_dict(train=str(tmp_path), loss={"lpips_weight": 0.0})))  # data: not read
    pre = LRM(LRMConfig.preset("tiny"))
    weights = tmp_path / "pre" / "checkpoints" / "step00000007" / "model"
    pre.save_pretrained(str(weights))
    (tmp_path / "pre" / "checkpoints" / "latest").write_text("step00000007")
    seen = {}

    def fake_train(recipe, output, resume=False):
        seen["recipe"], seen["model"] = recipe, recipe.build_model()

    import fast3d.training.loop as loop

    monkeypatch.setattr(loop, "train", fake_train)  # the run itself is test_two_rank_run_...'s
    assert launch.run("lrm", str(cfg), str(tmp_path / "run"), ranks=1, init_from=str(tmp_path / "pre")) == 0
    assert seen["recipe"].cfg.model["init_from"] == os.path.abspath(str(weights))
    for (k, a), b in zip(seen["model"].state_dict().items(), pre.state_dict().values()):
        assert_close(a, b, atol=0, rtol=0, name=k)
    with pytest.raises(ValueError, match="--init-from takes the lgm, lrm or mvdiff recipe"):
        launch.run("ttr", os.path.join(CONFIGS, "ttr_tiny.yaml"), str(tmp_path / "x"), ranks=1, init_from="x")


def test_camera_noise_reaches_the_input_camera_alone(gen, tiny_lrm):
    batch = fake_batch(gen)
    stages = {"stages": [{"resolution": 16, "steps": 4}], "lr_reset_after": None, "lpips_weight": 0.0,
              "random_background": False}
    for noise in (0.02, 0.0):
        r = recipe(loss={**stages, "camera_noise": noise}, data={"resolution": 16})
        spy = Spy(copy.deepcopy(tiny_lrm))
        loss, _ = r.loss(spy, batch, ctx(gen))
        assert torch.isfinite(loss)
        vm, K = spy.input
        vm0, K0 = batch["viewmats"][:, 0], batch["Ks"][:, 0]
        dt = (vm[:, :3, 3] - vm0[:, :3, 3]).abs()                      # translation: plain uniform noise
        dR = (vm[:, :3, :3] - vm0[:, :3, :3]).abs()
        dk = (LRM.camera_vector(vm, K, 16, 16) - LRM.camera_vector(vm0, K0, 16, 16))[:, 12:].abs()
        if noise == 0:
            assert dt.max() == 0 and dR.max() == 0 and dk.max() == 0
        else:
            assert 0.005 < dt.max() <= noise + 1e-6, f"translation noise {dt.max():.4f} for camera_noise {noise}"
            assert 0 < dk.max() <= noise + 1e-6, f"normalised intrinsics noise {dk.max():.4f}"
            assert 0 < dR.max() < 4 * noise, f"rotation change {dR.max():.4f}"
        (call,) = spy.renders
        assert_close(call["viewmats"], batch["viewmats"], atol=0, rtol=0, name="render viewmats")
        assert_close(call["Ks"], batch["Ks"], atol=0, rtol=0, name="render Ks")


def test_image_level_supervision_has_no_mse_term(gen, tiny_lrm):
    batch = fake_batch(gen, R=20)
    lpips = load_lpips("random")
    got = {}
    for image_level in (True, False):
        r = recipe(loss={"stages": [{"resolution": 16, "steps": 4}], "lr_reset_after": None, "image_level": image_level,
                         "lpips_weight": 0.7, "opacity_weight": 0.3}, data={"resolution": 20})
        r.lpips = lpips
        loss, m = r.loss(tiny_lrm, batch, ctx(torch.Generator().manual_seed(1)))
        got[image_level] = (loss, m)
    loss, m = got[True]
    assert "loss_mse" not in m
    assert_close(loss, 0.7 * m["loss_lpips"] + 0.3 * m["loss_opacity"], atol=0, rtol=1e-6, name="image-level loss")
    loss, m = got[False]
    assert m["loss_mse"] > 0 and m["render_resolution"] == 16  # 20 px targets resized to the stage's 16
    assert_close(loss, m["loss_mse"] + 0.7 * m["loss_lpips"] + 0.3 * m["loss_opacity"], atol=0, rtol=1e-6,
                 name="MSE + LPIPS loss")
    assert_close(got[True][1]["loss_lpips"], m["loss_lpips"], atol=0, rtol=0, name="same renders either way")


def test_patch_and_random_background(gen, tiny_lrm):
    batch = fake_batch(gen)
    r = recipe(loss={"stages": [{"resolution": 16, "steps": 4}], "lr_reset_after": None, "patch": 6,
                     "random_background": True,
                     "lpips_weight": 0.0}, data={"resolution": 16})
    spy = Spy(copy.deepcopy(tiny_lrm))
    loss, m = r.loss(spy, batch, ctx(gen))
    (call,) = spy.renders
    y0, x0, size = call["patch"]
    assert size == 6 and 0 <= y0 <= 10 and 0 <= x0 <= 10
    bg = call["background"]
    assert bg.shape == (4, 3) and not torch.allclose(bg, torch.ones(4, 3)), "backgrounds should be random colours"
    assert torch.isfinite(loss) and math.isfinite(m["psnr"])


def test_a_dataset_without_the_requested_source_fails_before_training(data):
    pretrain = recipe(train=data, data={"sources": ["synthetic"]})
    with pytest.raises(ValueError, match=r"holds no sample of data.sources \['synthetic'\].*rendered3d"):
        pretrain.prepare(torch.device("cpu"))
    assert list(pretrain.dataset(0, 1)) == []
    finetune = recipe(train=data, data={"sources": ["rendered3d"]})
    finetune.prepare(torch.device("cpu"))
    samples = list(finetune.dataset(0, 1))
    assert len(samples) == 8 and set(samples[0]) == {"images", "alphas", "viewmats", "Ks", "key"}
    assert isinstance(finetune.dataset(0, 1), SourceFiltered)


def test_init_from_loads_the_weights_and_refuses_another_configuration(tmp_path):
    src = LRM(LRMConfig.preset("tiny"))
    src.save_pretrained(str(tmp_path / "pre"))
    model = recipe(model={"init_from": str(tmp_path / "pre")}).build_model()
    for (k, a), b in zip(model.state_dict().items(), src.state_dict().values()):
        assert_close(a, b, atol=0, rtol=0, name=k)
    with pytest.raises(ValueError, match="holds another LRM configuration"):
        recipe(model={"init_from": str(tmp_path / "pre"), "overrides": {"width": 32}}).build_model()
    with pytest.raises(ValueError, match="model.init_from"):
        recipe(model={"init_from": str(tmp_path / "missing")}).build_model()


@pytest.mark.parametrize("section, kw, match", [
    ("model", {"bogus": 1}, r"model: unknown keys \['bogus'\]"),
    ("model", {"overrides": {"widht": 32}}, r"model.overrides: unknown keys \['widht'\]"),
    ("data", {"view": 3}, r"data: unknown keys \['view'\]"),
    ("data", {"sources": ["image2d"]}, "data.sources must be"),
    ("data", {"views": 1}, "data.views must be an integer >= 2"),
    ("data", {"resolution": 20}, r"data.resolution \(20\) must be at least the largest stage resolution \(24\)"),
    ("loss", {"stagez": []}, r"loss: unknown keys \['stagez'\]"),
    ("loss", {"stages": [{"resolution": 16, "step": 2}]}, r"loss.stages\[0\] must be a mapping"),
    ("loss", {"stages": [{"resolution": 0, "steps": 2}]}, r"loss.stages\[0\].resolution must be a positive"),
    ("loss", {"lr_reset_after": 24}, "loss.lr_reset_after must be the resolution of a stage before the last"),
    ("loss", {"patch": 17}, "loss.patch must be null or an integer"),
    ("loss", {"image_level": True, "lpips_weight": 0}, "needs lpips_weight > 0"),
    ("loss", {"camera_noise": -0.1}, "loss.camera_noise must be a number >= 0"),
    ("loss", {"patch": 12}, r"loss.lpips_weight > 0 needs renders of at least 16 px"),
])
def test_config_errors_name_the_key(section, kw, match):
    with pytest.raises(ValueError, match=match):
        recipe(**{section: kw})
