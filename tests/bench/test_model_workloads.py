"""The model-level workloads of `fast3d bench` (fast3d.bench.workloads): lgm-step, lgm-infer, lrm-step,
ttr-step. Each quick variant runs through the real runner on the CPU; the full sizes are checked
for presence (`--list`), their baselines for a reason where they cannot run, the flop model of
ttr-step against the model config's step_flops."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from fast3d import backends
from fast3d.bench import runner
from fast3d.bench.spec import PASSES
from fast3d.bench.workloads import _common, lgm, lrm, specs, ttr

CPU = torch.device("cpu")
MODEL_OPS = {"lgm-step": ["big", "big-render"], "lgm-infer": ["big"],
             "lrm-step": [f"large-{r}" for r in (128, 192, 256, 320, 384)], "ttr-step": ["xl-512"]}
KERNEL_OP = {"lgm-step": "rasterization", "lgm-infer": "multiview_attention", "lrm-step": "render_triplane",
             "ttr-step": "multiview_attention"}
FAKE_PEAKS = dict(peak_gbps=10.0, peak_tflops=0.5, peak_how="test stub")


@pytest.fixture
def quick_peaks(monkeypatch):
    # The device's peaks are not what these tests check; measuring them costs seconds a run.
    monkeypatch.setattr(runner.env, "measure_peaks", lambda device: dict(FAKE_PEAKS))


def _bench(tmp_path, ops, workloads=(), backends_=("torch",), passes=("forward+backward",)):
    logs = []
    cfg = runner.BenchConfig(ops=list(ops), workloads=list(workloads), backends=list(backends_), passes=list(passes),
                             quick=True, out=str(tmp_path), budget_s=0.02)
    rows, failures = runner.run(cfg, log=logs.append)
    return rows, failures, "\n".join(logs)


def test_model_workloads_run_on_their_kernel_ops_backends():
    """A model step is a bench workload, not an op: the registry (and `fast3d info`) holds the kernel
    ops alone, and the step is timed on its hot kernel op's backends."""
    all_specs = specs()
    for op, workloads in MODEL_OPS.items():
        assert [w.name for w in all_specs[op].workloads] == workloads
        assert op not in backends.ops()
        assert all_specs[op].backend_op == KERNEL_OP[op] in backends.ops()
    assert all_specs["datagen"].backend_op == "rasterization" and "datagen" not in backends.ops()


@pytest.mark.parametrize("op, workload", [(op, w) for op, ws in MODEL_OPS.items() for w in ws])
def test_quick_variant_runs_through_the_runner(op, workload, tmp_path, quick_peaks):
    rows, failures, log = _bench(tmp_path, [op], [workload])
    assert failures == 0, log
    assert len(rows) == 1, log
    r = rows[0]
    assert (r["op"], r["workload"], r["backend"], r["pass"], r["quick"]) == (op, workload, "torch", "forward+backward",
                                                                          True)
    assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    assert r["model_flops"] > 0 and r["model_bytes"] > 0
    assert r["params"] == specs()[op].workload(workload).quick
    # The rows went to the given folder, nowhere else.
    written = [json.loads(line) for f in tmp_path.glob("*/*.jsonl") for line in f.read_text().splitlines()]
    assert [(w["op"], w["workload"]) for w in written] == [(op, workload)]


def test_lgm_step_and_its_render_share_in_one_run(tmp_path, quick_peaks):
    name = "cpu" if backends.availability("rasterization")["cpu"] is None else "torch"
    rows, failures, log = _bench(tmp_path, ["lgm-step"], backends_=(name,), passes=PASSES)
    assert failures == 0, log
    got = {(r["workload"], r["pass"]): r for r in rows}
    assert set(got) == {(w, p) for w in ("big", "big-render") for p in PASSES}
    for p in PASSES:  # the render is a part of the step
        assert got[("big-render", p)]["model_flops"] < got[("big", p)]["model_flops"]
    fb = got[("big", "forward+backward")]["model_flops"]
    assert fb == got[("big", "forward")]["model_flops"] + got[("big", "backward")]["model_flops"]


def test_list_shows_the_full_size_workloads_with_their_sources(capsys):
    from fast3d.cli import main

    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for op, workloads in MODEL_OPS.items():
        for name in workloads:
            w = specs()[op].workload(name)
            assert f"{op}:{name}  {w.params}  (quick: {w.quick})  -- {w.source}" in out
    assert "'preset': 'big'" in out and "'preset': 'large'" in out and "'preset': 'xl-512'" in out
    assert "'resolution': 128" in out and "'resolution': 384" in out


def test_gsplat_baselines_are_present_and_skipped_with_a_reason(tmp_path, quick_peaks):
    spec = specs()["lgm-step"]
    assert {"gsplat", "gsplat-packed"} <= set(spec.baselines)
    reason = spec.baselines["gsplat"](CPU)
    assert reason and "CUDA" in reason
    if torch.cuda.is_available():
        try:
            import gsplat  # noqa: F401
        except Exception:
            assert "gsplat not importable" in spec.baselines["gsplat"](torch.device("cuda"))
        else:
            pytest.skip("gsplat runs on this machine: nothing is skipped")
    rows, failures, log = _bench(tmp_path, ["lgm-step"], ["big"], backends_=("gsplat", "gsplat-packed"))
    assert rows == [] and failures == 0
    for name in ("gsplat", "gsplat-packed"):
        assert f"lgm-step: skipping backend {name}: {spec.baselines[name](CPU)}" in log


def test_dense_reference_rasterizer_is_skipped_with_its_reason(tmp_path, quick_peaks, monkeypatch):
    # Full size, the dense PyTorch rasterizer would need petabytes; here a tiny "device" stands in.
    import fast3d.ops.rasterization as raster

    monkeypatch.setattr(raster, "_device_memory", lambda device: 2**20)
    rows, failures, log = _bench(tmp_path, ["lgm-step"], ["big-render"])
    assert rows == [] and failures == 0
    assert "lgm-step/big-render: skipping backend torch: " in log and "the dense reference needs" in log


def test_torch_renderer_is_skipped_where_it_cannot_hold_the_samples(tmp_path, quick_peaks, monkeypatch):
    monkeypatch.setattr(_common, "device_memory", lambda device: 2**20)
    rows, failures, log = _bench(tmp_path, ["lrm-step"], ["large-128"])
    assert rows == [] and failures == 0
    assert "lrm-step/large-128: skipping backend torch: the PyTorch renderer would keep" in log


def test_torch_renderer_estimate_at_full_size():
    large_128, large_384 = (lrm.SPEC.workload(n).params for n in ("large-128", "large-384"))
    assert lrm.sample_points(large_128) == 4 * 4 * 128 ** 2 * 128
    assert lrm.sample_points(large_384) == 16 * 4 * 384 ** 2 * 128
    per_channel, other = lrm.TORCH_RENDER_BYTES_PER_POINT
    assert lrm.torch_render_bytes(large_128) == lrm.sample_points(large_128) * (per_channel * 80 // 2 + other)
    # 80 GiB: the 128 px stage fits the PyTorch renderer, the 384 px one does not.
    assert lrm.torch_render_bytes(large_128) < lrm.TORCH_RENDER_MEMORY_SHARE * 80 * 2**30 < \
        lrm.torch_render_bytes(large_384)


def test_diffusers_baseline_runs_or_says_why(tmp_path, quick_peaks, monkeypatch):
    spec = specs()["ttr-step"]
    assert "diffusers" in spec.baselines
    assert spec.baselines["diffusers"](CPU) is None  # diffusers builds the model: it is importable here
    rows, failures, log = _bench(tmp_path, ["ttr-step"], backends_=("torch", "diffusers"))
    assert failures == 0, log
    by = {r["backend"]: r for r in rows}
    assert set(by) == {"torch", "diffusers"}
    ratio = by["torch"]["median_ms"] / by["diffusers"]["median_ms"]
    assert by["diffusers"]["speedup_vs"]["torch"] == pytest.approx(ratio)
    monkeypatch.setitem(sys.modules, "diffusers.models.attention_processor", None)
    assert spec.baselines["diffusers"](CPU).startswith("diffusers not importable")


def test_diffusers_baseline_swaps_the_self_attention_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0

    from fast3d.nn import MultiViewAttnProcessor

    x = ttr.make_inputs(ttr.SPEC.workload("xl-512").quick, CPU, torch.Generator().manual_seed(0))
    model = x["model"]
    ttr.run("diffusers", x)
    assert all(type(b.attn1.processor) is AttnProcessor2_0 for b in model.transformer_blocks)
    ttr.run("torch", x)
    assert all(isinstance(b.attn1.processor, MultiViewAttnProcessor) and b.attn1.processor.backend == "torch"
               for b in model.transformer_blocks)


@pytest.mark.parametrize("which", ["params", "quick"])
def test_ttr_flop_model_is_step_flops(which):
    w = ttr.SPEC.workload("xl-512")
    p = getattr(w, which)
    flops = ttr.config(p).step_flops(p["batch"])
    assert ttr.SPEC.model(p, "forward+backward")[1] == flops
    assert ttr.SPEC.model(p, "forward")[1] + ttr.SPEC.model(p, "backward")[1] == pytest.approx(flops)
    assert ttr.SPEC.model(p, "forward")[1] == pytest.approx(flops / 3)


def test_ttr_row_mfu_is_step_flops_over_time_over_peak(tmp_path, quick_peaks):
    rows, failures, log = _bench(tmp_path, ["ttr-step"])
    assert failures == 0 and len(rows) == 1, log
    r = rows[0]
    p = r["params"]
    mfu = ttr.config(p).step_flops(p["batch"]) / (r["median_ms"] / 1e3) / (FAKE_PEAKS["peak_tflops"] * 1e12)
    assert r["frac_peak_flops"] == pytest.approx(mfu)


def test_lgm_infer_outputs_are_ply_ready():
    p = lgm.INFER_SPEC.workload("big").quick
    x = lgm.make_infer_inputs(p, CPU, torch.Generator().manual_seed(0))
    with torch.no_grad():
        means, quats, scales, opacities, sh = lgm.run_infer("torch", x)
    N = lgm.config(p).num_gaussians
    assert means.shape == (1, N, 3) and quats.shape == (1, N, 4) and scales.shape == (1, N, 3)
    assert opacities.shape == (1, N) and sh.shape == (1, N, 1, 3)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in (means, quats, scales, opacities, sh))
    assert bool(((opacities > 0) & (opacities < 1)).all())
    # The attention backend is put back after the call.
    assert x["model"].attention_backend == "auto"
