"""VFusion3D's video-model fine-tuning: the orbit it renders, SVD's EDM loss, that exactly the
temporal convolution and attention layers train, and a tiny end-to-end run against the untuned model."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fast3d.models import mvvideo
from fast3d.training.config import run_config_from_dict
from fast3d.training.loop import StepContext
from fast3d.training.recipes.mvvideo import DataSection, MVVideoRecipe, ProceduralOrbits, render_orbit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DS = os.path.join(ROOT, "train", "configs", "ds_zero2.json")
DATA = {"resolution": 16, "objects_per_epoch": 4, "gaussians": 300}


def run_config(**kw):
    d = dict(recipe="mvvideo", deepspeed=DS, precision="fp32", batch_size=1, max_steps=2, lr=1e-3, weight_decay=0.0,
             warmup_steps=0, log_every=1, ckpt_every=2, model={"pretrained": "random-tiny", "views": 16}, data=DATA)
    d.update(kw)
    return d


def test_temporal_parameters_are_the_temporal_conv_and_attention_blocks():
    unet = mvvideo.tiny_pipeline(16).unet
    names = set(mvvideo.temporal_parameter_names(unet))
    assert names and all(".temporal_res_block." in n or ".temporal_transformer_blocks." in n for n in names)
    # Every parameter of those blocks, nothing of the spatial ones, the blend factors or frame embeddings.
    for n, _ in unet.named_parameters():
        temporal = ".temporal_res_block." in n or ".temporal_transformer_blocks." in n
        assert (n in names) == temporal, n
    kinds = {n.split(".temporal_")[1].split(".")[0] for n in names}
    assert kinds == {"res_block", "transformer_blocks"}
    n = mvvideo.freeze_all_but_temporal(unet)
    assert n == sum(p.numel() for name, p in unet.named_parameters() if name in names)
    assert {name for name, p in unet.named_parameters() if p.requires_grad} == names
    with pytest.raises(ValueError, match="no parameters under"):
        mvvideo.temporal_parameter_names(torch.nn.Linear(2, 2))


def test_orbit_is_vfusion3ds(seed):
    d = DataSection(**DATA)
    images, el = render_orbit(torch.Generator().manual_seed(seed), d, 16)
    assert images.shape == (16, 3, 16, 16) and 0.0 <= el <= math.pi / 4
    again, el2 = render_orbit(torch.Generator().manual_seed(seed), d, 16)
    assert torch.equal(images, again) and el == el2
    assert (images < 0.99).any(dim=(1, 2, 3)).all()                      # the object is in every view
    els = [render_orbit(torch.Generator().manual_seed(seed + i), DataSection(**{**DATA, "gaussians": 16}), 16)[1]
           for i in range(8)]
    assert all(0 <= e <= math.pi / 4 for e in els) and len(set(els)) == 8
    a = ProceduralOrbits(d, 16, seed=1, rank=0, world=2)
    b = ProceduralOrbits(d, 16, seed=1, rank=1, world=2)
    assert a.object_seed(0) != b.object_seed(0)
    first = a.object_seed(0)
    a.set_epoch(1)
    assert a.object_seed(0) != first


class _ZeroUNet(torch.nn.Module):
    """Predicts 0 and records what it was given."""

    def forward(self, x, t, encoder_hidden_states, added_time_ids):
        self.seen = (x, t, encoder_hidden_states, added_time_ids)
        return type("Out", (), {"sample": torch.zeros(x.shape[0], x.shape[1], 4, *x.shape[-2:])})()


def test_edm_loss_is_svds_preconditioned_denoising_loss(gen):
    B, F = 2, 5
    x = torch.randn(B, F, 4, 3, 3, generator=gen)
    n = torch.randn(B, F, 4, 3, 3, generator=gen)
    cond = torch.randn(B, 4, 3, 3, generator=gen)
    emb, ids = torch.randn(B, 1, 8, generator=gen), torch.randn(B, 3, generator=gen)
    sigma = torch.rand(B, generator=gen) * 5 + 0.1
    unet = _ZeroUNet()
    loss = mvvideo.edm_loss(unet, x, cond, emb, ids, sigma, n)
    xin, t, _, _ = unet.seen
    for b in range(B):
        s = float(sigma[b])
        noisy = x[b] + s * n[b]
        torch.testing.assert_close(xin[b, :, :4], noisy / math.sqrt(s * s + 1))
        torch.testing.assert_close(xin[b, :, 4:], cond[b].expand(F, -1, -1, -1))
        assert math.isclose(float(t[b]), math.log(s) / 4, rel_tol=1e-6)
        # F = 0: D = c_skip * noisy; weight (1 + s^2) / s^2.
        want = ((1 + s * s) / (s * s) * (noisy / (s * s + 1) - x[b]).pow(2)).mean()
        torch.testing.assert_close(loss[b], want)


def test_recipe_loss_conditions_on_the_first_frame(gen):
    r = MVVideoRecipe(run_config_from_dict(run_config(loss={"condition_dropout": 0.0})))
    unet = r.build_model()
    r.prepare(torch.device("cpu"))
    frames = torch.rand(1, 16, 3, 16, 16, generator=gen)
    ctx = StepContext(0, torch.device("cpu"), torch.float32, torch.Generator().manual_seed(0), 0, 1)
    loss, m = r.loss(unet, {"images": frames, "key": ["a"]}, ctx)
    assert torch.isfinite(loss) and m["trainable_params"] == r.n_trainable > 0
    other = frames.clone()
    other[:, 0] = torch.rand(3, 16, 16, generator=gen)                   # another condition frame
    loss2, _ = r.loss(unet, {"images": other, "key": ["a"]}, StepContext(0, torch.device("cpu"), torch.float32,
                                                                         torch.Generator().manual_seed(0), 0, 1))
    assert not torch.equal(loss, loss2)
    with pytest.raises(ValueError, match="batch has 8 views per orbit; model.views is 16"):
        r.loss(unet, {"images": frames[:, :8], "key": ["a"]}, ctx)


@pytest.mark.parametrize("section,change,match", [
    ("model", {"pretrained": "/nonexistent"}, "model.pretrained must be 'random-tiny' or a local Stable Video"),
    ("model", {"views": 1}, r"model.views must be >= 2"),
    ("data", {"resolution": 12}, "data.resolution must be a multiple of 8"),
    ("data", {"elevation_max_deg": 90.0}, r"data.elevation_max_deg must be a real number in \[0, 89\]"),
    ("data", {"jitter": -0.1}, "data.jitter must be a real number >= 0"),
    ("loss", {"condition_dropout": 1.5}, r"loss.condition_dropout must be a real number in \[0, 1\]"),
    ("loss", {"p_sdt": 1.0}, "p_sdt"),
])
def test_bad_sections_are_named(section, change, match):
    d = run_config()
    d[section] = {**d.get(section, {}), **change}
    with pytest.raises(ValueError, match=match):
        MVVideoRecipe(run_config_from_dict(d))


def test_a_directory_that_is_no_pipeline_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a diffusers pipeline directory"):
        MVVideoRecipe(run_config_from_dict(run_config(model={"pretrained": str(tmp_path)})))


def _train(tmp_path, d, name):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(json.dumps(d))
    out = tmp_path / name
    cmd = [sys.executable, "-m", "fast3d.cli", "train", "mvvideo", "--config", str(cfg), "--output", str(out),
           "--ranks", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return out / "checkpoints" / f"step{d['max_steps']:08d}" / "model"


@pytest.mark.slow
def test_only_the_temporal_layers_change(tmp_path):
    model_dir = _train(tmp_path, run_config(), "run")
    trained = mvvideo.load_pipeline(str(model_dir), 16)
    init = mvvideo.tiny_pipeline(16)
    before = dict(init.unet.named_parameters())
    changed = {n for n, p in trained.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(mvvideo.temporal_parameter_names(init.unet))
    for part in ("vae", "image_encoder"):   # the frozen encoders are exported as they came
        a, b = getattr(trained, part).state_dict(), getattr(init, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), part
