"""The shared training loop: DeepSpeed on 2 CPU ranks, exact resume after a kill, ZeRO-3 with EMA,
NaN guard, config checks, checkpoint safety. The recipe is tests/training/toy_recipe.py."""

import glob
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from fast3d.training import config as run_config
from fast3d.training.ema import EMA
from fast3d.training.engine import _safe_checkpoint_engine, deepspeed_config
from fast3d.training.metrics import MetricsWriter, read_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOY = dict(recipe="toy", precision="fp32", batch_size=4, max_steps=12, lr=0.01, warmup_steps=3, ema_decay=0.9,
           log_every=1, ckpt_every=4)


def write_config(tmp_path, zero=2, **kw):
    d = dict(TOY, deepspeed=os.path.join(ROOT, "train", "configs", f"ds_zero{zero}.json"), **kw)
    path = tmp_path / f"toy_zero{zero}.yaml"
    path.write_text(json.dumps(d))  # JSON is YAML
    return str(path)


def train(config, out, *extra, ranks=2, env=None, check=True):
    cmd = [sys.executable, "-m", "fast3d.cli", "train", "toy_recipe:ToyRecipe", "--config", config,
           "--output", str(out), "--ranks", str(ranks), *extra]
    e = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


def losses(out):
    return [(r["step"], r["loss"], r["noise"], r["lr"]) for r in read_metrics(str(out))]


def shm_buffers() -> set:
    return set(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"))


@pytest.mark.slow
def test_killed_and_resumed_run_computes_the_same_losses(tmp_path):
    cfg = write_config(tmp_path)
    before = shm_buffers()
    train(cfg, tmp_path / "whole")
    p = train(cfg, tmp_path / "killed", env={"TOY_KILL_AT": "6"}, check=False)
    assert p.returncode != 0, "the run should have died at step 6"
    # DeepSpeed's CPU all-reduce segments of both runs, the killed one's included, are gone.
    assert shm_buffers() <= before
    assert open(tmp_path / "killed" / "checkpoints" / "latest").read() == "step00000004"
    train(cfg, tmp_path / "killed", "--resume")
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "killed")
    assert [s for s, *_ in resumed] == list(range(1, 13)), "metrics.jsonl should hold one curve"
    assert resumed == whole  # same data order, RNG streams, optimizer and LR schedule: bitwise
    ckpts = sorted(os.listdir(tmp_path / "whole" / "checkpoints"))
    assert [c for c in ckpts if c.startswith("step")] == ["step00000008", "step00000012"]  # keep_checkpoints=2


@pytest.mark.slow
def test_zero3_with_ema_trains_resumes_and_exports_whole_weights(tmp_path):
    z2, z3 = write_config(tmp_path, zero=2), write_config(tmp_path, zero=3)
    train(z2, tmp_path / "z2", "--max-steps", "8")
    train(z3, tmp_path / "z3", "--max-steps", "4")
    train(z3, tmp_path / "z3", "--max-steps", "8", "--resume")
    a, b = losses(tmp_path / "z2"), losses(tmp_path / "z3")
    assert [s for s, *_ in b] == list(range(1, 9))
    for (s, l2, *_), (_, l3, *_) in zip(a, b):
        assert abs(l2 - l3) <= 1e-5 * max(1.0, abs(l2)), f"step {s}: ZeRO-2 loss {l2} vs ZeRO-3 {l3}"
    from safetensors.torch import load_file

    for run in ("z2", "z3"):
        ck = tmp_path / run / "checkpoints" / "step00000008"
        w, e = load_file(ck / "model" / "model.safetensors"), load_file(ck / "model_ema" / "model.safetensors")
        assert w["0.weight"].shape == (16, 4) and e["0.weight"].shape == (16, 4), "export must be gathered"
        assert 0 < (w["0.weight"] - e["0.weight"]).abs().max() < 0.5, "the EMA trails the weights"
    e2 = load_file(tmp_path / "z2" / "checkpoints" / "step00000008" / "model_ema" / "model.safetensors")
    e3 = load_file(tmp_path / "z3" / "checkpoints" / "step00000008" / "model_ema" / "model.safetensors")
    for k in e2:
        assert torch.allclose(e2[k], e3[k], atol=1e-5), f"EMA {k} differs between ZeRO-2 and partitioned ZeRO-3"


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_named_and_the_last_checkpoint_intact(tmp_path):
    cfg = write_config(tmp_path, loss={"nan_at": 7})
    p = train(cfg, tmp_path / "run", ranks=1, check=False)
    assert p.returncode != 0
    assert "non-finite loss at step 7" in p.stderr and "step00000004" in p.stderr
    assert open(tmp_path / "run" / "checkpoints" / "latest").read() == "step00000004"
    assert [r["step"] for r in read_metrics(str(tmp_path / "run"))] == list(range(1, 7))


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_model_config(tmp_path):
    train(write_config(tmp_path), tmp_path / "run", "--max-steps", "4", ranks=1)
    other = write_config(tmp_path, model={"width": 32})
    p = train(other, tmp_path / "run", "--resume", ranks=1, check=False)
    assert p.returncode != 0 and "was trained with model={}" in p.stderr


def test_deepspeed_config_fills_auto_values_from_the_run_config(tmp_path):
    cfg = run_config.load_config(write_config(tmp_path, batch_size=3, grad_accum=2, lr=0.002, grad_clip=0.5))
    ds = deepspeed_config(cfg, world_size=4)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 2, 24)
    assert ds["optimizer"]["params"]["lr"] == 0.002 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False and ds["zero_optimization"]["stage"] == 2
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 3


def test_deepspeed_config_names_a_batch_size_that_does_not_add_up(tmp_path):
    js = tmp_path / "ds.json"
    js.write_text(json.dumps({"train_batch_size": 7, "zero_optimization": {"stage": 2}}))
    cfg = run_config.load_config(write_config(tmp_path)).replace(deepspeed=str(js))
    with pytest.raises(ValueError, match="train_batch_size 7"):
        deepspeed_config(cfg, world_size=2)


@pytest.mark.parametrize("bad, match", [
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"precision": "fp8"}, "precision must be one of"),
    ({"lr": "fast"}, "lr must be a number"),
    ({"ema_decay": 1.0}, "ema_decay must be in"),
    ({"bogus": 1}, "unknown keys \\['bogus'\\]"),
    ({"model": [1]}, "model must be a mapping"),
])
def test_config_errors_name_the_key(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        run_config.run_config_from_dict(dict(TOY, **bad))


def test_config_of_another_recipe_or_missing_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="for recipe 'toy', not 'lgm'"):
        run_config.load_config(write_config(tmp_path), recipe="lgm")
    with pytest.raises(ValueError, match="does not exist"):
        run_config.load_config(str(tmp_path / "nope.yaml"))
    (tmp_path / "bad.yaml").write_text("recipe: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        run_config.load_config(str(tmp_path / "bad.yaml"))


def test_metrics_writer_keeps_one_curve_across_a_resume(tmp_path):
    w = MetricsWriter(str(tmp_path), None)
    for s in range(1, 6):
        w.write({"step": s, "loss": 1.0 / s})
    w.close()
    w = MetricsWriter(str(tmp_path), resume_step=3)
    w.write({"step": 4, "loss": 0.2, "bad": float("nan")})
    w.close()
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["bad"] is None


def test_ema_is_the_exponential_average_and_swaps_in_and_out(gen):
    m = torch.nn.Linear(3, 2)
    ema = EMA(m, decay=0.5)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update()
    assert torch.allclose(ema.state_dict()["ema.weight"], w0 + 0.5)
    with ema.swapped_in():
        assert torch.allclose(m.weight, w0 + 0.5)
    assert torch.allclose(m.weight, w0 + 1.0)
    with pytest.raises(ValueError, match="ema.bias"):
        EMA(m, 0.5).load_state_dict({"ema.weight": w0})


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_engine_refuses_pickled_code(tmp_path):
    f = tmp_path / "evil.pt"
    with open(f, "wb") as fh:
        pickle.dump({"x": _Boom()}, fh)
    with pytest.raises(ValueError, match="not a plain DeepSpeed checkpoint"):
        _safe_checkpoint_engine().load(str(f))
    ok = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2), "step": 3}, ok)
    assert _safe_checkpoint_engine().load(str(ok))["step"] == 3
