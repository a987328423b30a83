"""LRM inference on a saved tiny model: the point cloud, the turntable and the stage latencies of
`infer`; the per-sample PSNR/SSIM/LPIPS report of `evaluate`; bad inputs named."""

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fast3d.datagen import procedural
from fast3d.inference import lrm as lrm_infer
from fast3d.inference.common import save_image
from fast3d.models import checkpoints
from fast3d.models.lrm import LRM, LRMConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny LRM whose density is above the surface threshold everywhere: its point cloud is the
    grid's outer shell, whatever the image."""
    torch.manual_seed(0)
    model = LRM(LRMConfig.preset("tiny"))
    with torch.no_grad():
        model.renderer.decoder.layers[-1].bias[0] = 8.0
    path = str(tmp_path_factory.mktemp("lrm_model"))
    model.save_pretrained(path)
    return path


@pytest.fixture
def image(tmp_path, gen):
    path = str(tmp_path / "input.png")
    save_image(torch.rand(3, 40, 40, generator=gen), path)
    return path


def read_points_ply(path):
    """The vertex count and (x, y, z) of a save_points_ply file, checking its layout."""
    raw = open(path, "rb").read()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    header = raw[:end].decode("ascii").splitlines()
    assert header[:2] == ["ply", "format binary_little_endian 1.0"]
    n = int(header[2].split()[-1])
    assert len(raw) - end == 15 * n, "15 bytes a point: float x y z, uchar r g b"
    rec = np.frombuffer(raw[end:], dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "u1", 3)])
    return n, np.stack([rec["x"], rec["y"], rec["z"]], -1)


def test_infer_writes_points_turntable_and_latencies(model_dir, image, tmp_path, capsys):
    out = tmp_path / "out"
    r = lrm_infer.infer(model_dir, image, str(out), device="cpu", turntable_frames=5, resolution=16, point_grid=12,
                        mesh_grid=8)
    n, xyz = read_points_ply(out / "points.ply")
    assert n == r["num_points"] == 12 ** 3 - 10 ** 3, "the grid's outer shell of voxels"
    assert np.abs(xyz).max() <= 0.6, "points inside the triplane box [-bound, bound]^3"
    gif = Image.open(out / "turntable.gif")
    assert gif.size == (16, 16) and gif.n_frames == 5
    assert r["mesh"] == str(out / "mesh.ply") and (r["num_vertices"], r["num_faces"]) == (6 * 8 ** 2, 12 * 8 ** 2 - 4)
    assert list(r["latency_ms"]) == ["load", "encode", "planes", "export", "mesh", "turntable"]
    assert all(v > 0 for v in r["latency_ms"].values()), r["latency_ms"]
    printed = capsys.readouterr().out
    assert "encode" in printed and "turntable" in printed and "total" in printed
    assert r["camera"] == lrm_infer.CANONICAL_CAMERA


def test_camera_overrides_the_canonical_source_camera(model_dir, image, tmp_path):
    r = lrm_infer.infer(model_dir, image, str(tmp_path / "out"), camera={"elevation_deg": 5, "distance": 2.5},
                        device="cpu", turntable_frames=1, resolution=16, point_grid=4, mesh_grid=4)
    assert r["camera"] == dict(lrm_infer.CANONICAL_CAMERA, elevation_deg=5.0, distance=2.5)
    vm, K, _ = lrm_infer.source_camera({"azimuth_deg": 90}, 40)
    centre = -(vm[0, :3, :3].T @ vm[0, :3, 3])
    el = math.radians(lrm_infer.CANONICAL_CAMERA["elevation_deg"])
    d = lrm_infer.CANONICAL_CAMERA["distance"]
    assert torch.allclose(centre, torch.tensor([0.0, d * math.cos(el), d * math.sin(el)]), atol=1e-5)
    assert K[0, 0, 2] == 20 and K[0, 1, 2] == 20
    posed = {"viewmats": vm.tolist(), "Ks": K.tolist()}                 # LGM's cameras-file layout, one view
    vm2, K2, cam = lrm_infer.source_camera(posed, 40)
    assert torch.equal(vm2, vm) and torch.equal(K2, K)
    for k, v in dict(lrm_infer.CANONICAL_CAMERA, azimuth_deg=90.0).items():
        assert math.isclose(cam[k], v, abs_tol=1e-4), (k, cam[k], v)


def test_evaluate_reports_finite_metrics_per_sample(model_dir, tmp_path):
    data = str(tmp_path / "data")
    procedural.run(data, procedural.ProceduralConfig(num_objects=3, views=4, rig="orbit16", resolution=24,
                                                     gaussians_per_object=600, samples_per_shard=2, batch_size=2))
    out = str(tmp_path / "report" / "eval.json")
    r = lrm_infer.evaluate(model_dir, data, out, views=3, resolution=16, lpips_backbone="random", device="cpu",
                           max_samples=2, point_grid=0)
    assert json.load(open(out)) == r
    assert r["samples"] == 2 and r["held_out_views"] == [1, 2] and r["lpips_backbone"] == "random"
    assert [row["key"] for row in r["per_sample"]] == ["obj00000000", "obj00000001"]
    for row in r["per_sample"]:
        assert set(row) == {"key", "psnr", "ssim", "lpips_random"}
        assert 0 < row["psnr"] < 100 and -1 <= row["ssim"] <= 1 and 0 <= row["lpips_random"] < 10, row
    for k in ("psnr", "ssim", "lpips_random"):
        assert math.isclose(r["mean"][k], sum(row[k] for row in r["per_sample"]) / 2, rel_tol=1e-9)


def test_evaluate_scores_geometry_against_the_asset(model_dir, tmp_path, monkeypatch):
    """With a density whose surface is exactly the asset's Gaussian centres, Chamfer is 0 and F 1."""
    from fast3d.io import load_ply
    from fast3d.models.lrm import LRM

    data = str(tmp_path / "data")
    procedural.run(data, procedural.ProceduralConfig(num_objects=2, views=3, rig="orbit16", resolution=24,
                                                     gaussians_per_object=600, samples_per_shard=2, batch_size=2))
    current = {}

    def perfect(self, planes, resolution=64, threshold=3.0, chunk=1 << 18):
        means = load_ply(os.path.join(data, "assets", f"{current['key']}.ply"))["means"]
        return means, torch.zeros_like(means)

    from fast3d.data import dataset as ds_module

    real_prepare = ds_module.MultiViewDataset._prepare

    def remember(self, s):
        current["key"] = s.key
        return real_prepare(self, s)

    monkeypatch.setattr(LRM, "extract_points", perfect)
    monkeypatch.setattr(ds_module.MultiViewDataset, "_prepare", remember)
    r = lrm_infer.evaluate(model_dir, data, str(tmp_path / "eval.json"), views=3, resolution=16,
                           lpips_backbone="random", device="cpu", point_grid=8)
    for row in r["per_sample"]:
        assert row["chamfer"] == 0 and row["fscore"] == 1.0, row
    assert r["mean"]["chamfer"] == 0


def test_bad_inputs_are_named(model_dir, image, tmp_path, gen):
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="missing.png' is not a file"):
        lrm_infer.infer(model_dir, str(tmp_path / "missing.png"), out, device="cpu")
    wide = str(tmp_path / "wide.png")
    save_image(torch.rand(3, 24, 32, generator=gen), wide)
    with pytest.raises(ValueError, match="is 32x24; LRM takes a square image"):
        lrm_infer.infer(model_dir, wide, out, device="cpu")
    other = str(tmp_path / "lgm")
    checkpoints.save_pretrained(other, "lgm", LRMConfig.preset("tiny"), {})
    with pytest.raises(ValueError, match="holds a 'lgm' model; LRM inference needs an 'lrm' checkpoint"):
        lrm_infer.infer(other, image, out, device="cpu")
    with pytest.raises(ValueError, match="holds a 'lgm' model"):
        lrm_infer.evaluate(other, str(tmp_path), str(tmp_path / "e.json"), device="cpu")
    with pytest.raises(ValueError, match=r"camera: unknown keys \['elevation'\]"):
        lrm_infer.infer(model_dir, image, out, camera={"elevation": 10}, device="cpu")
    with pytest.raises(ValueError, match=r"viewmats must be \[1, 4, 4\] and Ks \[1, 3, 3\]"):
        lrm_infer.infer(model_dir, image, out, camera={"viewmats": [[1.0]], "Ks": [[1.0]]}, device="cpu")
    with pytest.raises(ValueError, match="camera.elevation_deg must be in"):
        lrm_infer.infer(model_dir, image, out, camera={"elevation_deg": 90}, device="cpu")
    with pytest.raises(ValueError, match="turntable_frames must be a positive integer"):
        lrm_infer.infer(model_dir, image, out, turntable_frames=0, device="cpu")
    with pytest.raises(ValueError, match="views must be an integer >= 2"):
        lrm_infer.evaluate(model_dir, str(tmp_path), str(tmp_path / "e.json"), views=1, device="cpu")
    assert not os.path.exists(out), "no output for a refused input"
