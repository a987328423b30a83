"""The `generate` bench workload (fast3d.bench.workloads.generate): its quick rows through the real
runner on the CPU, stage shares from one run, the gsplat baseline skipped with its reason where it
cannot run, and the baseline's attention (diffusers' processor on the rearranged views) computing
what fast3d's multi-view processor computes."""

from __future__ import annotations

import pytest
import torch

from fast3d.bench import runner
from fast3d.bench.workloads import generate as gen_bench
from fast3d.bench.workloads import specs

FAKE_PEAKS = dict(peak_gbps=10.0, peak_tflops=0.5, peak_how="test stub")


@pytest.mark.slow
def test_quick_row_through_the_runner_and_each_stage_runs(tmp_path, monkeypatch, gen):
    monkeypatch.setattr(runner.env, "measure_peaks", lambda device: dict(FAKE_PEAKS))
    logs = []
    cfg = runner.BenchConfig(ops=["generate"], workloads=["base"], backends=["torch", gen_bench.BASELINE],
                             passes=["forward"], quick=True, out=str(tmp_path), budget_s=0.02)
    rows, failures = runner.run(cfg, log=logs.append)
    log = "\n".join(logs)
    assert failures == 0, log
    ran = [("base", "torch", "forward", True)]
    if torch.cuda.is_available():  # the diffusers-attention + gsplat baseline runs where gsplat does
        ran.append(("base", gen_bench.BASELINE, "forward", True))
    assert [(r["workload"], r["backend"], r["pass"], r["quick"]) for r in rows] == ran
    assert rows[0]["median_ms"] > 0 and rows[0]["model_bytes"] > 0
    if not torch.cuda.is_available():
        assert "skipping backend diffusers-gsplat: gsplat's rasterizer runs on CUDA only" in log
    # each stage alone, from the inputs its workload makes: what it returns
    spec = specs()["generate"]
    shapes = {}
    for name in ("base-mv", "base-recon", "base-render"):
        p = spec.workload(name).quick
        (out,) = gen_bench.run("torch", gen_bench.make_inputs(p, torch.device("cpu"), gen))
        shapes[name] = tuple(out.shape)
    assert shapes == {"base-mv": (4, 3, 16, 16), "base-recon": (1, 4 * 8 * 8, 3), "base-render": (2, 3, 16, 16)}
    # the weights the whole pipeline reads are those of its stages
    by = {w.name: gen_bench.model(w.quick, "forward")[0] for w in spec.workloads}
    assert by["base"] == by["base-mv"] + by["base-recon"] > by["base-mv"] > 0 and by["base-render"] == 0


def test_workloads_listed_with_the_kernel_op():
    spec = specs()["generate"]
    assert [w.name for w in spec.workloads] == ["base", "base-mv", "base-recon", "base-render", "imagedream"]
    assert spec.backend_op == "multiview_attention" and spec.passes == ("forward",)
    assert spec.workload("base").params["steps"] == 30 and gen_bench.BASELINE in spec.baselines


@pytest.mark.parametrize("rig, layout", [("lgm4", "views"), ("era3d6", "rows")])
def test_baseline_attention_equals_fast3d_multiview_attention(rig, layout, gen):
    """The tiny UNet with diffusers' AttnProcessor2_0 on the rearranged views gives what it gives
    with MultiViewAttnProcessor (PyTorch reference backend), to float32 rounding."""
    from fast3d.models.mvdiff import MVDiffConfig, build_denoiser
    from fast3d.nn import MultiViewAttnProcessor

    cfg = MVDiffConfig.preset("tiny", rig=rig, layout=layout)
    torch.manual_seed(0)
    den = build_denoiser(cfg).eval()
    V, C, h = cfg.num_views, cfg.latent_channels, cfg.resolution // cfg.vae_downsample
    x = torch.randn(V, C, h, h, generator=gen)
    cond = torch.randn(1, C, h, h, generator=gen)
    emb = torch.randn(1, cfg.image_embed_dim, generator=gen)
    cams = torch.randn(1, V, 4, generator=gen)
    t = torch.full((1,), 500)
    out = {}
    for name, proc in (("fast3d", MultiViewAttnProcessor(V, layout, backend="torch")),
                       ("baseline", gen_bench.RearrangedAttnProcessor(V, layout))):
        den.unet.set_attn_processor(proc)
        with torch.no_grad():
            out[name] = den(x[None], cond, emb, cams, t, None)
    # float32 attention over a few hundred tokens: the two orders of summation differ by rounding
    torch.testing.assert_close(out["baseline"], out["fast3d"], atol=1e-4, rtol=1e-4)
    # and the layout matters: per-view attention alone is something else
    from diffusers.models.attention_processor import AttnProcessor2_0

    den.unet.set_attn_processor(AttnProcessor2_0())
    with torch.no_grad():
        per_view = den(x[None], cond, emb, cams, t, None)
    assert (per_view - out["fast3d"]).abs().max() > 1e-3


def test_imagedream_workload_runs_and_its_baseline_attention_agrees(gen):
    """The imagedream workload (quick): ImageDream's conditioning, whose baseline swaps only the
    self-attention (over the 4 views + the input image) and keeps the image-token cross-attention;
    both give the same views, and the whole pipeline runs to the turntable."""
    from fast3d.inference.mvdiff import sample_views
    from fast3d.nn import ImageTokenAttnProcessor

    p = specs()["generate"].workload("imagedream").quick
    x = gen_bench.make_inputs(p, torch.device("cpu"), gen)
    mv = x["bundle"]["mv"]
    assert mv.config.conditioning == "imagedream"
    views = {}
    for backend in ("torch", gen_bench.BASELINE):
        gen_bench.set_attention(x["bundle"], backend)
        procs = mv.denoiser.unet.attn_processors
        assert all(isinstance(v, ImageTokenAttnProcessor) for k, v in procs.items() if k.endswith("attn2.processor"))
        with torch.no_grad():
            views[backend] = sample_views(mv, x["image"], steps=1, guidance_scale=5.0, seed=0)["images"]
    torch.testing.assert_close(views[gen_bench.BASELINE], views["torch"], atol=1e-4, rtol=1e-4)
    (frames,) = gen_bench.run("torch", x)
    assert frames.shape == (2, 3, 16, 16) and torch.isfinite(frames).all()
    assert gen_bench.model(p, "forward")[0] > 0
