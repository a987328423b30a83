"""Image and geometry metrics against hand-computed values."""

import json
import math
import os

import pytest
import torch

from fast3d.evaluation.geometry_metrics import chamfer_fscore
from fast3d.evaluation.image_metrics import load_lpips, ms_ssim, ms_ssim_min_size, psnr, ssim
from fast3d.evaluation.report import git_commit, write_report


def test_psnr_of_a_known_error(gen):
    a = torch.rand(2, 3, 16, 16, generator=gen)
    b = a + 0.1  # MSE 0.01 -> 20 dB
    assert torch.allclose(psnr(b, a), torch.full((2,), 20.0), atol=1e-3)


def _valid_window_ssim(x, y):  # [N, 3, H, W] x2 -> [N]: Wang et al.'s SSIM over the valid 11x11 windows only
    t = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-t * t / (2 * 1.5 ** 2))
    w = (g / g.sum())[:, None] * (g / g.sum())[None, :]
    x, y = x.double(), y.double()

    def blur(u):
        return torch.nn.functional.conv2d(u, w.expand(3, 1, 11, 11), groups=3)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def test_ssim_is_the_library_one_on_the_old_cases(gen):
    """torchmetrics' SSIM on the removed hand-written SSIM's test cases: equal images 1, a constant
    shift the luminance formula, noise < 0.9; and its SSIM map's interior is the valid-window SSIM
    the hand-written one computed (the library averages over every pixel, border windows
    reflect-padded, hence a different mean)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    a = torch.rand(2, 3, 32, 32, generator=gen)
    assert torch.allclose(ssim(a, a), torch.ones(2), atol=1e-6)
    noisy = (a + 0.2 * torch.randn(2, 3, 32, 32, generator=gen)).clamp(0, 1)
    assert (ssim(noisy, a) < 0.9).all()
    _, full = tm_ssim(noisy, a, data_range=1.0, reduction="none", return_full_image=True)
    interior = full[..., 5:-5, 5:-5].flatten(1).mean(1)
    assert torch.allclose(interior.double(), _valid_window_ssim(noisy, a), atol=1e-5)  # float32 vs float64 sums
    c = torch.full((3, 16, 16), 0.5), torch.full((3, 16, 16), 0.6)
    expected = (2 * 0.5 * 0.6 + 0.01 ** 2) / (0.5 ** 2 + 0.6 ** 2 + 0.01 ** 2)  # variances 0: luminance only
    assert abs(float(ssim(c[1], c[0])) - expected) < 1e-4  # float32 cancellation in E[x^2] - E[x]^2
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[..., :8, :8], a[..., :8, :8])


def test_ms_ssim_is_one_for_equal_images_and_names_its_minimum_size(gen):
    need = ms_ssim_min_size()
    assert need == 176
    a = torch.rand(1, 3, need, need, generator=gen)
    assert abs(float(ms_ssim(a, a)) - 1.0) < 1e-5
    noisy = (a + 0.3 * torch.randn(a.shape, generator=gen)).clamp(0, 1)
    assert float(ms_ssim(noisy, a)) < float(ms_ssim((a + 0.05 * torch.randn(a.shape, generator=gen)).clamp(0, 1), a))
    with pytest.raises(ValueError, match="at least 176x176"):
        ms_ssim(a[..., :175, :175], a[..., :175, :175])


def test_lpips_random_backbone_is_zero_on_equal_images_and_positive_otherwise(gen):
    m = load_lpips("random")
    a, b = torch.rand(2, 3, 32, 32, generator=gen), torch.rand(2, 3, 32, 32, generator=gen)
    assert m(a, a).abs().max() < 1e-6 and (m(a, b) > 0).all()
    torch.rand(1)  # the global generator moves on; the stand-in is one fixed net all the same
    assert torch.equal(load_lpips("random")(a, b), m(a, b)), "a resumed evaluation scores with the same net"
    with pytest.raises(ValueError, match="backbone must be"):
        load_lpips("vgg19")


def test_chamfer_and_fscore_of_known_point_sets(gen):
    ref = torch.rand(500, 3, generator=gen)
    same = chamfer_fscore(ref, ref)
    assert same["chamfer"] == 0 and same["fscore"] == 1.0
    shifted = chamfer_fscore(ref + torch.tensor([0.01, 0, 0]), ref, threshold=0.02)
    assert shifted["chamfer"] <= 0.01 + 1e-6 and shifted["fscore"] == 1.0
    far = chamfer_fscore(ref + torch.tensor([0.5, 0, 0]), ref, threshold=0.02)
    assert far["fscore"] < 0.2


def test_chamfer_weights_ignore_transparent_outliers(gen):
    ref = torch.rand(200, 3, generator=gen)
    outliers = torch.full((50, 3), 10.0)
    pred = torch.cat([ref, outliers])
    w = torch.cat([torch.ones(200), torch.zeros(50)])
    r = chamfer_fscore(pred, ref, weights=w)
    assert r["chamfer"] == 0 and r["precision"] == 1.0
    assert chamfer_fscore(pred, ref)["chamfer"] > 1.0  # unweighted, the outliers count
    with pytest.raises(ValueError, match="point sets"):
        chamfer_fscore(pred[:, :2], ref)
    assert math.isinf(chamfer_fscore(pred, ref, weights=torch.zeros(250))["chamfer"])


def test_the_report_averages_each_metric_over_the_samples_that_have_it(tmp_path, gen):
    p = torch.rand(3, generator=gen).tolist()
    rows = [{"key": "a", "psnr": p[0], "chamfer": 1.0, "prompt": "a mug"}, {"key": "b", "psnr": p[1]},
            {"key": "c", "psnr": p[2], "chamfer": 3.0}]
    out = tmp_path / "sub" / "eval.json"
    report = write_report(str(out), rows, "model", "data", backbones={"ssim": "x"}, set_metrics={"fid:y": 2.5},
                          resolution=8)
    assert list(report) == ["model", "data", "samples", "commit", "resolution", "backbones", "set_metrics", "mean",
                            "per_sample"]
    assert report["samples"] == 3 and report["mean"]["chamfer"] == 2.0 and "prompt" not in report["mean"]
    assert abs(report["mean"]["psnr"] - sum(p) / 3) < 1e-12
    assert json.loads(out.read_text()) == report and sorted(os.listdir(out.parent)) == ["eval.json", "eval.md"]
    assert report["commit"] == git_commit() and report["commit"]  # a commit, or "unknown" in an export
