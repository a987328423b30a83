"""The `refine` bench workload (fast3d.bench.workloads.refine): its quick rows through the real runner
on the CPU (the step and its rasterizer and attention parts in one run), the gsplat + diffusers
baseline skipped with its reason where it cannot run, the recorded attention calls equal to the
byte/flop model's, and the baseline's attention (diffusers' processor on the rearranged views)
computing what fast3d's anchor processor computes."""

from __future__ import annotations

import pytest
import torch

from fast3d.bench import runner
from fast3d.bench.workloads import refine as refine_bench
from fast3d.bench.workloads import specs

CPU = torch.device("cpu")
FAKE_PEAKS = dict(peak_gbps=10.0, peak_tflops=0.5, peak_how="test stub")


def test_workloads_listed_with_the_kernel_op():
    spec = specs()["refine"]
    assert [w.name for w in spec.workloads] == ["base", "base-render", "base-attn"]
    assert spec.backend_op == "multiview_attention" and spec.passes == ("forward",)
    base = spec.workload("base").params
    assert (base["model"], base["gaussians"], base["views"]) == ("base", 65_536, 4)
    assert refine_bench.BASELINE in spec.baselines
    reason = spec.baselines[refine_bench.BASELINE](CPU)
    assert reason and "CUDA" in reason


@pytest.mark.slow
def test_quick_rows_through_the_runner_step_and_its_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(runner.env, "measure_peaks", lambda device: dict(FAKE_PEAKS))
    logs = []
    cfg = runner.BenchConfig(ops=["refine"], workloads=[], backends=["torch", refine_bench.BASELINE],
                             passes=["forward"], quick=True, out=str(tmp_path), budget_s=0.02)
    rows, failures = runner.run(cfg, log=logs.append)
    log = "\n".join(logs)
    assert failures == 0, log
    got = {(r["workload"], r["backend"]) for r in rows}
    want = {(w, "torch") for w in ("base", "base-render", "base-attn")}
    if torch.cuda.is_available():  # the baseline runs where gsplat does
        want |= {(w, refine_bench.BASELINE) for w in ("base", "base-render", "base-attn")}
    else:
        assert "skipping backend gsplat-diffusers: gsplat's rasterizer runs on CUDA only" in log
    assert got == want
    by = {r["workload"]: r for r in rows if r["backend"] == "torch"}
    assert all(r["median_ms"] > 0 and r["model_bytes"] > 0 and r["quick"] for r in by.values())
    # the parts are parts of the step: the byte model says so; their flops are modelled
    assert by["base"]["model_bytes"] > by["base-render"]["model_bytes"]
    assert by["base-render"]["model_flops"] > 0 and by["base-attn"]["model_flops"] > 0


def test_recorded_attention_calls_are_the_models(gen):
    """The attn part replays exactly the self-attention calls of one step (recorded), and the
    byte/flop model derives the same calls from the UNet's layout."""
    p = specs()["refine"].workload("base-attn").quick
    x = refine_bench.make_inputs(p, CPU, gen)
    recorded = [(tuple(q.shape), V) for (q, _, _), V, _ in x["calls"]]
    assert sorted(recorded) == sorted(refine_bench._attention_calls(p["model"], p["views"], p["guidance"]))
    K = x["refiner"].K
    assert {V for _, V in recorded} == {K + 1, 1}   # conditional: target + K anchors; unconditional: alone
    (out,) = refine_bench.run("torch", x)
    (q, k, v), V, scale = x["calls"][-1]
    torch.testing.assert_close(out, refine_bench._sdpa_rearranged(q, k, v, V, scale), atol=1e-5, rtol=1e-5)


def test_baseline_attention_equals_the_anchor_processor(gen):
    """The tiny model's predictions with the bench baselines' processor (diffusers' AttnProcessor2_0 on
    the rearranged views, each call's num_views) equal those with fast3d's AnchorAttnProcessor
    (PyTorch reference backend), anchors dropped or not."""
    from fast3d import cameras as cams
    from fast3d.bench.workloads.generate import RearrangedAttnProcessor
    from fast3d.models.magicboost import AnchorAttnProcessor, MagicBoost, MagicBoostConfig

    model = MagicBoost(MagicBoostConfig.preset("tiny")).eval()
    cfg, K = model.config, model.num_anchors
    R, h = cfg.resolution, cfg.latent_size
    az = torch.rand(K + 3, generator=gen, dtype=torch.float64) * 6.28
    vm, _ = cams.orbit_cameras(az, torch.zeros_like(az), 2.2, 49.1, R)
    with torch.no_grad():
        cond = model.condition(torch.rand(K, 3, R, R, generator=gen), vm[:K])
    noisy = torch.randn(3, cfg.latent_channels, h, h, generator=gen)
    t = torch.randint(0, 1000, (3,), generator=gen)
    drop = torch.tensor([[False] * K, [True] + [False] * (K - 1), [True] * K])
    out = {}
    for name, proc in (("fast3d", AnchorAttnProcessor(K + 1, "views", backend="torch")),
                       ("baseline", RearrangedAttnProcessor(K + 1, "views"))):
        model.denoiser.unet.set_attn_processor(proc)
        with torch.no_grad():
            out[name] = model.predict(noisy, t, vm[K:], cond, drop=drop)
    # float32 attention over a few hundred tokens: the two orders of summation differ by rounding
    torch.testing.assert_close(out["baseline"], out["fast3d"], atol=1e-4, rtol=1e-4)
