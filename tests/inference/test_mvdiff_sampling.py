"""fast3d.inference.mvdiff: loading a model directory (or a training run), sampling the rig's views
with each scheduler (shapes, range, the rig's cameras, seeds), SDEdit from given views, and the
argument checks. The model is a tiny random one saved once per module."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

from fast3d.inference.mvdiff import load_mvdiff, sample_views
from fast3d.models import checkpoints, mvdiff
from fast3d.models.lgm import LGMConfig
from fast3d.models.mvdiff import MVDiffConfig, MVDiffusion

STEPS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mvdiff") / "model")
    model = MVDiffusion(MVDiffConfig.preset("tiny"))
    with torch.no_grad():   # a non-zero output layer, so the samples depend on the model
        for p in model.denoiser.unet.conv_out.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return load_mvdiff(model_dir, device="cpu")


def counting(model) -> list:
    """Count the denoiser's forward calls (one per sampler step, guidance batched into it)."""
    calls = []
    model.denoiser.register_forward_hook(lambda m, args, out: calls.append(out.shape[0]))
    return calls


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm"])
def test_views_and_the_rigs_cameras_seeded(model, scheduler, gen):
    image = torch.rand(3, 40, 28, generator=gen)   # not square, not the model's size
    calls = counting(model)
    a = sample_views(model, image, steps=STEPS, guidance_scale=3.0, scheduler=scheduler, seed=7)
    assert calls == [2] * STEPS      # one call per step: the conditional and the unconditional sample together
    R = model.config.resolution
    assert a["images"].shape == (4, 3, R, R) and a["images"].dtype == torch.float32
    assert 0 <= a["images"].min() and a["images"].max() <= 1
    vm, Ks = model.rig_cameras(R)
    assert torch.equal(a["viewmats"], vm) and torch.equal(a["Ks"], Ks)
    b = sample_views(model, image, steps=STEPS, guidance_scale=3.0, scheduler=scheduler, seed=7)
    assert torch.equal(a["images"], b["images"])
    c = sample_views(model, image, steps=STEPS, guidance_scale=3.0, scheduler=scheduler, seed=8)
    assert (a["images"] - c["images"]).abs().max() > 1e-3


def test_no_guidance_runs_the_conditional_model_alone(model, gen):
    calls = counting(model)
    sample_views(model, torch.rand(3, 32, 32, generator=gen), steps=STEPS, guidance_scale=1.0)
    assert calls == [1] * STEPS


def test_sdedit_runs_the_last_steps_from_the_given_views(model, gen):
    image = torch.rand(3, 32, 32, generator=gen)
    init = torch.rand(4, 3, 32, 32, generator=gen)
    calls = counting(model)
    out = sample_views(model, image, steps=10, init_views=init, strength=0.3, seed=1)
    assert len(calls) == 3   # int(10 * 0.3) steps
    full = sample_views(model, image, steps=10, init_views=init, strength=1.0, seed=1)
    near = (out["images"] - init).abs().mean()
    assert near < 0.5 * (full["images"] - init).abs().mean(), "a low strength keeps the given views"
    again = sample_views(model, image, steps=10, init_views=init, strength=0.3, seed=1)
    assert torch.equal(out["images"], again["images"])


def test_a_training_run_directory_loads_its_newest_weights(model_dir, tmp_path):
    model = MVDiffusion.from_pretrained(model_dir)
    step = tmp_path / "run" / "checkpoints" / "step00000002"
    model.save_pretrained(str(step / "model"))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step00000002")
    loaded = load_mvdiff(str(tmp_path / "run"), device="cpu")
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_load_refuses_another_model_kind(tmp_path):
    checkpoints.save_pretrained(str(tmp_path / "lgm"), "lgm", LGMConfig(), {})
    with pytest.raises(ValueError, match=r"model_dir .* holds a 'lgm' model, not a multi-view diffusion model"):
        load_mvdiff(str(tmp_path / "lgm"))
    with pytest.raises(ValueError, match="model_dir '/nonexistent' is not a directory"):
        load_mvdiff("/nonexistent")


@pytest.mark.parametrize("kw, match", [
    (dict(image=torch.rand(4, 32, 32)), r"image must be a float tensor \[3, H, W\] in \[0, 1\]; got torch.float32 \(4, 32, 32\)"),
    (dict(image=torch.zeros(3, 32, 32, dtype=torch.uint8)), r"image must be a float tensor .*torch.uint8"),
    (dict(image=torch.rand(3, 0, 32)), r"image must be a float tensor"),
    (dict(image="a.png"), r"image must be a float tensor \[3, H, W\] in \[0, 1\]; got str"),
    (dict(strength=0.0, init_views=torch.rand(4, 3, 32, 32)), r"strength must be a real number in \(0, 1\]; got 0.0"),
    (dict(strength=1.5, init_views=torch.rand(4, 3, 32, 32)), r"strength must be a real number in \(0, 1\]; got 1.5"),
    (dict(strength=0.5), r"strength applies to init_views \(SDEdit\); without them it must be 1; got 0.5"),
    (dict(strength=0.1, steps=5, init_views=torch.rand(4, 3, 32, 32)), r"strength \* steps must reach one sampler step"),
    (dict(init_views=torch.rand(6, 3, 32, 32)), r"init_views must be a float tensor \[V, 3, R, R\] = \[4, 3, 32, 32\]"),
    (dict(scheduler="pndm"), r"scheduler must be one of \('ddim', 'euler', 'dpm'\); got 'pndm'"),
    (dict(steps=0), r"steps must be a positive integer; got 0"),
    (dict(guidance_scale=-1.0), r"guidance_scale must be a real number >= 0; got -1.0"),
    (dict(seed=-1), r"seed must be an integer >= 0; got -1"),
])
def test_bad_arguments_are_named(model, kw, match):
    args = dict(image=torch.rand(3, 32, 32)) | kw
    image = args.pop("image")
    with pytest.raises(ValueError, match=match):
        sample_views(model, image, **args)


def test_cameras_are_the_models_rig_for_era3d6(tmp_path, gen):
    model = MVDiffusion(MVDiffConfig.preset("tiny", rig="era3d6", layout="rows"))
    out = sample_views(model, torch.rand(3, 32, 32, generator=gen), steps=2, scheduler="dpm")
    assert out["images"].shape == (6, 3, 32, 32)
    vm, Ks = model.rig_cameras(32)
    assert_close(out["viewmats"], vm, atol=0, rtol=0, name="viewmats")
    assert_close(out["Ks"], Ks, atol=0, rtol=0, name="Ks")
    assert model.config.rig == "era3d6" and model.num_views == 6 == len(mvdiff.RIGS["era3d6"]["azimuths"])


def test_sample_mvdiff_command_writes_the_views_and_the_rigs_cameras(model_dir, model, tmp_path, gen, capsys):
    import json

    from fast3d.cli import main
    from fast3d.inference.common import load_image, save_image

    save_image(torch.rand(3, 32, 32, generator=gen), str(tmp_path / "in.png"))
    args = ["sample", "mvdiff", "--checkpoint", model_dir, "--image", str(tmp_path / "in.png"), "--steps", "2",
            "--seed", "3"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    cams = json.loads((tmp_path / "a" / "cameras.json").read_text())
    vm, Ks = model.rig_cameras()
    assert torch.equal(torch.tensor(cams["viewmats"]), vm) and torch.equal(torch.tensor(cams["Ks"]), Ks)
    assert (cams["width"], cams["height"], cams["rig"]) == (32, 32, "lgm4")
    want = sample_views(model, load_image(str(tmp_path / "in.png")), steps=2, seed=3)["images"]
    for i in range(4):
        got = load_image(str(tmp_path / "a" / f"view{i}.png"))
        assert (got - want[i]).abs().max() <= 0.5 / 255 + 1e-6, f"view {i}: the 8-bit PNG of the sampled view"
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "b"), "--scheduler", "pndm"]) == 2
    assert "fast3d sample mvdiff: error: scheduler must be one of" in capsys.readouterr().err
    assert main(["sample", "mvdiff", "--checkpoint", str(tmp_path), "--image", str(tmp_path / "in.png"),
                 "--out", str(tmp_path / "c")]) == 2
    assert f"--checkpoint {str(tmp_path)!r} holds no model" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
