"""LGM inference and evaluation: files written, what they hold, and the errors on bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fast3d.data.dataset import MultiViewDataset
from fast3d.datagen import procedural
from fast3d.inference import common, lgm
from fast3d.io import load_ply
from fast3d.models.lgm import LGM, LGMConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lgm_infer")
    data = str(root / "data")
    procedural.run(data, procedural.ProceduralConfig(num_objects=2, views=16, rig="orbit16", resolution=64,
                                                     gaussians_per_object=800, samples_per_shard=2, batch_size=2))
    torch.manual_seed(0)
    model = str(root / "model")
    LGM(LGMConfig.preset("tiny")).save_pretrained(model)
    s = next(iter(MultiViewDataset(data, views=16, resolution=64)))
    paths = []
    for i in (0, 4, 8, 12):
        paths.append(str(root / f"in{i}.png"))
        common.save_image(s["images"][i], paths[-1])
    cams = str(root / "cams.json")
    with open(cams, "w") as f:
        json.dump({"viewmats": s["viewmats"][[0, 4, 8, 12]].tolist(), "Ks": s["Ks"][[0, 4, 8, 12]].tolist()}, f)
    return dict(root=root, data=data, model=model, paths=paths, cams=cams, sample=s)


def test_infer_writes_a_ply_whose_gaussians_render_like_the_model_output(setup, tmp_path):
    r = lgm.infer(setup["model"], setup["paths"], str(tmp_path), cameras_json=setup["cams"], turntable_frames=6)
    g = load_ply(r["ply"])
    assert g["means"].shape == (4 * 32 * 32, 3) and g["sh"].shape[1] == 1
    model = LGM.from_pretrained(setup["model"])
    s = setup["sample"]
    idx = [0, 4, 8, 12]
    pred, T = lgm.reconstruct(model, common.load_images(setup["paths"])[None], s["viewmats"][idx][None],
                              s["Ks"][idx][None])
    from fast3d.models.lgm import apply_transform_to_gaussians

    world = apply_transform_to_gaussians(pred, torch.linalg.inv(T.double()).float())
    assert torch.allclose(g["means"], world["means"][0], atol=1e-5)
    colour = g["sh"][:, 0] * lgm.SH_C0 + 0.5  # the rasterizer's degree-0 colour
    assert torch.allclose(colour, world["colors"][0], atol=1e-5)
    from PIL import Image

    gif = Image.open(r["turntable"])
    assert gif.n_frames == 6 and gif.size == (64, 64)
    assert set(r["latency_ms"]) >= {"model", "write ply", "turntable"}


def test_infer_rejects_bad_inputs(setup, tmp_path):
    with pytest.raises(ValueError, match="takes 4 views; got 3"):
        lgm.infer(setup["model"], setup["paths"][:3], str(tmp_path))
    small = str(tmp_path / "small.png")
    common.save_image(torch.rand(3, 32, 32), small)
    with pytest.raises(ValueError, match="different sizes"):
        lgm.infer(setup["model"], setup["paths"][:3] + [small], str(tmp_path))
    bad = tmp_path / "cams.json"
    bad.write_text(json.dumps({"viewmats": [[[1, 0, 0, 0]] * 4] * 3, "Ks": [[[1, 0, 0]] * 3] * 3}))
    with pytest.raises(ValueError, match="does not match the 4 images"):
        lgm.infer(setup["model"], setup["paths"], str(tmp_path), cameras_json=str(bad))
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        lgm.infer(setup["model"], setup["paths"][:3] + [str(tmp_path / "junk.png")], str(tmp_path))


def test_evaluate_reports_image_and_geometry_metrics(setup, tmp_path):
    out = str(tmp_path / "report.json")
    r = lgm.evaluate(setup["model"], setup["data"], out, lpips_backbone="random")
    assert r["samples"] == 2 and len(r["held_out_views"]) == 12
    row = r["per_sample"][0]
    for k in ("psnr", "ssim", "lpips_random", "chamfer", "fscore"):
        assert k in row and row[k] == row[k], k  # present and not NaN
    assert json.load(open(out))["mean"]["psnr"] == pytest.approx(r["mean"]["psnr"])


def test_cli_refuses_a_checkpoint_of_another_model(setup, tmp_path):
    from fast3d.models.checkpoints import save_pretrained
    from fast3d.training.config import RunConfig

    save_pretrained(str(tmp_path / "other"), "mvdit", RunConfig(recipe="ttr"), {"w": torch.ones(1)})
    p = subprocess.run([sys.executable, "-m", "fast3d.cli", "infer", "--checkpoint", str(tmp_path / "other"),
                        "--images", *setup["paths"], "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 2 and "holds a 'mvdit' model" in p.stderr
    p = subprocess.run([sys.executable, "-m", "fast3d.cli", "infer", "--checkpoint", str(tmp_path / "nothing"),
                        "--images", *setup["paths"], "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 2 and "is not a directory" in p.stderr
    assert not os.path.exists(tmp_path / "o")


def test_pose_refinement_recovers_a_perturbed_camera(gen):
    """Render a scene from a camera, perturb the camera, refine: LPIPS falls and the camera moves back."""
    from fast3d import cameras
    from fast3d.evaluation.image_metrics import load_lpips
    from fast3d.training import augment

    N = 400
    g = dict(means=(torch.rand(1, N, 3, generator=gen) - 0.5) * 0.8,
             quats=torch.nn.functional.normalize(torch.randn(1, N, 4, generator=gen), dim=-1),
             scales=torch.full((1, N, 3), 0.06), opacities=torch.full((1, N), 0.8),
             colors=torch.rand(1, N, 3, generator=gen))
    rig = cameras.mvdream(resolution=48)
    vm, K = rig.viewmats[:2], rig.Ks[:2]
    target, _ = LGM.render(g, vm[None], K[None], 48, 48, backgrounds=torch.ones(1, 2, 3))
    off = augment.camera_jitter(vm, gen, max_deg=4.0, max_shift=0.05)
    refined, before, after = lgm.refine_input_poses(g, target[0], off, K, load_lpips("random"), steps=80, lr=5e-3)
    assert (after < before).all(), f"LPIPS {before.tolist()} -> {after.tolist()}"
    err = lambda v: (cameras.camera_centers(v) - cameras.camera_centers(vm)).norm(dim=-1)  # noqa: E731
    assert (err(refined) < err(off)).all(), f"camera error {err(off).tolist()} -> {err(refined).tolist()}"
