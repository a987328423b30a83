"""The server's speed switches (fast3d.serving.accel): bf16 answers close to fp32 and still the
same alone or batched (bitwise, within bf16); torch.compile matches eager; --cuda-graphs refused
clearly on the CPU (pipeline, fast3d serve, fast3d loadtest) and, on a GPU, replays what the eager
pipeline computes; the capacity-mode render a graph captures is LGM.render."""

import pytest
import torch

from fast3d.cli import main
from fast3d.models.lgm import LGM, LGMConfig
from fast3d.models.lrm import LRM, LRMConfig
from fast3d.serving import accel
from fast3d.serving.app import ServeOptions
from fast3d.serving.pipelines import load_pipeline

# Tolerances (one table, a reason each), as a fraction of the largest |value| of the fp32 output.
TOL = {
    # bf16 keeps 8 significant bits (2^-9 relative rounding per op); through the random-init tiny
    # networks' layers the outputs differ from fp32 by up to ~2-3% of their range (measured: LGM
    # positions 0.029 of 1.76, quaternions 0.031 of 1.0; LRM planes 0.014 of 2.2) and by well under
    # 1% on average.
    "bf16_max": 0.06,
    "bf16_mean": 0.01,
    # a turntable pixel on a silhouette edge changes with a Gaussian moved by bf16 (measured up to
    # 0.09 of 1); the mean stays within bf16_mean
    "bf16_image_max": 0.25,
    # inductor fuses and reorders float32 reductions: last-bit differences, amplified by the layers
    "compile": 1e-4,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("accel_models")
    torch.manual_seed(0)
    LGM(LGMConfig.preset("tiny")).save_pretrained(str(root / "lgm"))
    LRM(LRMConfig.preset("tiny")).save_pretrained(str(root / "lrm"))
    # smaller than tiny (two U-Net levels, 32 px): inductor's cold compile is ~2 min on 2 cores
    LGM(LGMConfig(input_size=32, splat_size=16, render_size=32, num_sup_views=4, down_channels=(16, 32),
                  up_channels=(32,), layers_per_block=1, attention_levels=1, attention_heads=4,
                  norm_groups=8)).save_pretrained(str(root / "lgm_small"))
    return root


def _close(a: torch.Tensor, b: torch.Tensor, max_frac: float, mean_frac: float | None = None) -> None:
    scale = b.abs().max().clamp_min(1e-6)
    d = (a - b).abs()
    assert d.max() <= max_frac * scale, f"max |bf16 - fp32| {float(d.max()):.4g} > {max_frac} x {float(scale):.4g}"
    if mean_frac is not None:
        assert d.mean() <= mean_frac * scale, f"mean |diff| {float(d.mean()):.4g} > {mean_frac} x {float(scale):.4g}"


def _requests(pipe, gen, sizes=(48, 40, 56)):
    return [pipe.prepare([torch.rand(3, s, s, generator=gen) for _ in range(pipe.num_images)], None, True)
            for s in sizes]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lgm", "lrm"])
def test_bf16_is_close_to_fp32_and_batch_invariant(models, kind, gen):
    fp32 = load_pipeline(str(models / kind), max_batch=3, turntable_frames=2, warmup=False)
    bf16 = load_pipeline(str(models / kind), max_batch=3, turntable_frames=2, warmup=False, dtype="bf16")
    assert bf16.describe()["dtype"] == "bf16" and fp32.describe()["dtype"] == "fp32"
    reqs = _requests(fp32, gen)
    ref = [fp32.run([r])[0] for r in reqs]
    alone = [bf16.run([r])[0] for r in reqs]
    # The network did run in bf16 (an autocast that did nothing would leave the outputs bitwise fp32).
    key = "means" if kind == "lgm" else "planes"
    assert not torch.equal(alone[0].scene[key], ref[0].scene[key])
    for a, r in zip(alone, ref):
        for k in (("means", "quats", "scales", "opacities", "colors") if kind == "lgm" else ("planes",)):
            assert a.scene[k].dtype == torch.float32
            _close(a.scene[k], r.scene[k], TOL["bf16_max"], TOL["bf16_mean"])
        _close(a.turntable, r.turntable, TOL["bf16_image_max"], TOL["bf16_mean"])
    batched = bf16.run([reqs[2], reqs[0], reqs[1]])
    for out, i in zip(batched, [2, 0, 1]):
        assert out.batch_size == 3
        for fmt in ("ply", "splat"):
            assert bf16.encode(out.scene, fmt) == bf16.encode(alone[i].scene, fmt), (i, fmt)
        for k in out.scene:
            assert torch.equal(out.scene[k], alone[i].scene[k]), (i, k)
        assert torch.equal(out.turntable, alone[i].turntable)


@pytest.mark.slow
def test_compile_matches_eager(models, gen):
    eager = load_pipeline(str(models / "lgm_small"), max_batch=2, turntable_frames=2, warmup=False)
    compiled = load_pipeline(str(models / "lgm_small"), max_batch=2, turntable_frames=2, compile=True)  # compiles
    assert compiled.describe()["compile"] is True
    reqs = _requests(eager, gen, (24, 40))
    alone = [compiled.run([r])[0] for r in reqs]
    for r, c in zip(reqs, alone):
        e = eager.run([r])[0]
        for k in e.scene:
            _close(c.scene[k], e.scene[k], TOL["compile"])
    both = compiled.run(reqs[::-1])
    for out, i in zip(both, [1, 0]):
        assert all(torch.equal(out.scene[k], alone[i].scene[k]) for k in out.scene), i


def test_switches_are_checked_naming_the_flag(models, monkeypatch):
    with pytest.raises(ValueError, match=r"--cuda-graphs needs a CUDA device.*runs on cpu"):
        load_pipeline(str(models / "lgm"), max_batch=1, device="cpu", warmup=False, cuda_graphs=True)
    with pytest.raises(ValueError, match=r"--cuda-graphs applies to an LGM.*lrm"):
        accel.check("fp32", False, True, torch.device("cuda"), "lrm")
    with pytest.raises(ValueError, match=r"--dtype must be one of \['fp32', 'bf16'\]; got 'fp16'"):
        load_pipeline(str(models / "lgm"), max_batch=1, warmup=False, dtype="fp16")
    with pytest.raises(ValueError, match="dtype"):
        ServeOptions(str(models / "lgm"), dtype="fp16").validate()
    with pytest.raises(ValueError, match="cuda_graphs"):
        ServeOptions(str(models / "lgm"), cuda_graphs=1).validate()


def test_cli_refuses_cuda_graphs_on_the_cpu(models, capsys, monkeypatch):
    assert main(["serve", "--checkpoint", str(models / "lgm"), "--device", "cpu", "--cuda-graphs"]) == 2
    err = capsys.readouterr().err
    assert "--cuda-graphs needs a CUDA device (--device cpu)" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["serve", "--checkpoint", str(models / "lgm"), "--cuda-graphs"]) == 2
    assert "this machine has no CUDA device" in capsys.readouterr().err
    assert main(["loadtest", "--checkpoint", str(models / "lgm"), "--mode", "batching_on",
                 "--variant", "cuda_graphs"]) == 2
    assert "variant cuda_graphs needs a CUDA device" in capsys.readouterr().err
    assert main(["loadtest", "--checkpoint", str(models / "lgm"), "--variant", "fp16"]) == 2
    assert "variants must be some of" in capsys.readouterr().err


def test_capacity_render_is_lgm_render(gen):
    """The function --cuda-graphs captures: LGM.render with a capacity (on the CPU every backend
    renders all Gaussians; a capacity below the intersections sets the overflow flag)."""
    B, F, N, res = 2, 3, 300, 24
    g = dict(means=torch.randn(B, N, 3, generator=gen) * 0.3, quats=torch.randn(B, N, 4, generator=gen),
             scales=torch.rand(B, N, 3, generator=gen) * 0.05 + 0.01, opacities=torch.rand(B, N, generator=gen),
             colors=torch.rand(B, N, 3, generator=gen))
    from fast3d import cameras as cams

    vm, K = cams.turntable(F, res, 20.0, 2.2, 49.1)
    vm, K = vm.expand(B, -1, -1, -1).contiguous(), K.expand(B, -1, -1, -1).contiguous()
    bg = torch.rand(B, F, 3, generator=gen)
    ref_rgb, ref_alpha = LGM.render(g, vm, K, res, res, backgrounds=bg)
    keys = ("means", "quats", "scales", "opacities", "colors")
    rgb, alpha, overflow = accel.raster(*(g[k] for k in keys), vm, K, bg, res, res, capacity=B * F * N * 16)
    assert torch.equal(rgb, ref_rgb) and torch.equal(alpha, ref_alpha) and not bool(overflow)
    rgb, _, overflow = accel.raster(*(g[k] for k in keys), vm, K, bg, res, res, capacity=1)
    assert bool(overflow) and torch.equal(rgb, ref_rgb)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_graphs_replay_the_eager_pipeline(models, dtype, gen):
    """Every batch size captured at warm-up; a replay on new requests equals the eager pipeline's
    answer to them (the same kernels on the same inputs), alone and batched, turntables included."""
    eager = load_pipeline(str(models / "lgm"), max_batch=3, turntable_frames=2, device="cuda", fixed_batch=False,
                          warmup=False, dtype=dtype)
    graphed = load_pipeline(str(models / "lgm"), max_batch=3, turntable_frames=2, device="cuda", fixed_batch=False,
                            dtype=dtype, cuda_graphs=True)
    forward = graphed.model.forward.__wrapped__
    assert sorted(k[0][0][0] for k in forward.graphs) == [1, 2, 3]       # a graph per batch size
    reqs = _requests(eager, gen)
    for batch in ([0], [2, 0, 1], [1, 2]):
        want = eager.run([reqs[i] for i in batch])
        got = graphed.run([reqs[i] for i in batch])
        for w, o in zip(want, got):
            for k in w.scene:
                torch.testing.assert_close(o.scene[k], w.scene[k], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(o.turntable, w.turntable, atol=1e-5, rtol=1e-5)
    assert graphed.rasterize.overflows == 0
