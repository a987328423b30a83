"""``fast3d infer --refine-pose``: the refined input cameras reach the output (MVBoost's input-view
optimisation): the reconstruction is redone from them and gaussians.ply / the turntable are its."""

import json

import pytest
import torch

from fast3d.data.dataset import MultiViewDataset
from fast3d.datagen import procedural
from fast3d.evaluation.image_metrics import load_lpips
from fast3d.inference import common, lgm
from fast3d.io import load_ply
from fast3d.models.lgm import LGM, LGMConfig
from fast3d.training import augment

INPUTS = [0, 4, 8, 12]


# A random-init tiny LGM is not camera-faithful: whether the reconstruction redone from the refined
# cameras renders closer to the inputs depends on the draw (about 1 draw in 6 it comes out marginally
# worse, and the original is kept: test_a_worse_redone_reconstruction_keeps_the_original). This test
# pins one draw (object, network, perturbation) where the redo helps, so it checks that path every run:
# draw 3, mean LPIPS (random VGG) 0.0311 before, 0.0297 after (draws 0-2 help by 1-2 %, less margin).
DRAW = 3


@pytest.mark.slow
def test_refined_cameras_make_the_written_reconstruction(tmp_path):
    gen = torch.Generator().manual_seed(DRAW)
    procedural.run(str(tmp_path / "data"), procedural.ProceduralConfig(
        num_objects=1, views=16, rig="orbit16", resolution=64, gaussians_per_object=800, samples_per_shard=1,
        batch_size=1, seed=DRAW))
    s = next(iter(MultiViewDataset(str(tmp_path / "data"), views=16, resolution=64)))
    paths = []
    for i in INPUTS:
        paths.append(str(tmp_path / f"in{i}.png"))
        common.save_image(s["images"][i], paths[-1])
    torch.manual_seed(DRAW)
    LGM(LGMConfig.preset("tiny")).save_pretrained(str(tmp_path / "model"))
    vm, Ks = s["viewmats"][INPUTS], s["Ks"][INPUTS]
    off = vm.clone()  # the views after the first deliberately mis-posed
    off[1:] = augment.camera_jitter(vm[1:], gen, max_deg=8.0, max_shift=0.1)
    cams = tmp_path / "cams.json"
    cams.write_text(json.dumps({"viewmats": off.tolist(), "Ks": Ks.tolist()}))

    plain = lgm.infer(str(tmp_path / "model"), paths, str(tmp_path / "plain"), cameras_json=str(cams),
                      turntable_frames=3)
    r = lgm.infer(str(tmp_path / "model"), paths, str(tmp_path / "refined"), cameras_json=str(cams),
                  turntable_frames=3, refine_pose_steps=40, lpips_backbone="random")
    before, after = torch.tensor(r["lpips_before"]), torch.tensor(r["lpips_after"])
    assert r["kept"] == "refined" and after.mean() <= before.mean(), (r["kept"], before.tolist(), after.tolist())
    report = json.loads((tmp_path / "refined" / "cameras_refined.json").read_text())
    assert report["kept"] == "refined" and report["lpips"]["after"] == pytest.approx(r["lpips_after"])
    assert report["lpips"]["before"] == pytest.approx(r["lpips_before"])
    refined = torch.tensor(report["refined_viewmats"])
    assert torch.equal(torch.tensor(report["viewmats"]), refined) and not torch.allclose(refined, off, atol=1e-5)

    # the file written is the reconstruction from the refined cameras, not the first one
    got, first = load_ply(r["ply"]), load_ply(plain["ply"])
    assert not torch.allclose(got["means"], first["means"], atol=1e-4)
    model = LGM.from_pretrained(str(tmp_path / "model"))
    redone = lgm.world_gaussians(model, common.load_images(paths)[None], refined[None], Ks[None])
    assert torch.allclose(got["means"], redone["means"][0], atol=1e-5)
    assert torch.allclose(got["sh"][:, 0] * lgm.SH_C0 + 0.5, redone["colors"][0], atol=1e-5)
    # and its LPIPS at the refined cameras is the one reported as "after"
    lp = lgm.input_view_lpips(redone, common.load_images(paths), refined, Ks, load_lpips("random"))
    assert torch.allclose(lp, after, atol=1e-5)
    from PIL import Image

    a, b = Image.open(r["turntable"]), Image.open(plain["turntable"])
    assert a.n_frames == b.n_frames == 3 and a.tobytes() != b.tobytes()


def test_refine_pose_rejects_a_negative_step_count(tmp_path):
    with pytest.raises(ValueError, match="--refine-pose must be a number of steps >= 0; got -1"):
        lgm.infer(str(tmp_path / "none"), [], str(tmp_path), refine_pose_steps=-1)


def test_generate_passes_refine_pose_through_and_writes_the_kept_reconstruction(tmp_path, gen):
    """generate's LGM stage with --refine-pose: cameras_refined.json names the cameras the written
    gaussians.ply was reconstructed from (whichever of the two was kept) and the LPIPS before/after."""
    from fast3d.cli import build_parser
    from fast3d.inference import generate

    args = build_parser().parse_args(["generate", "--image", "a.png", "--mv-model", "m", "--recon", "r", "--out", "o",
                                      "--refine-pose", "3", "--lpips-backbone", "random"])
    assert (args.refine_pose, args.lpips_backbone) == (3, "random")
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = LGM(LGMConfig.preset("tiny")).eval()
    recon = generate.Reconstructor("lgm", "tiny", model)
    images = torch.rand(4, 3, 64, 64, generator=gen)
    vm, Ks = recon.input_cameras(64)
    vm = vm.clone()
    vm[1:] = augment.camera_jitter(vm[1:], gen, max_deg=8.0, max_shift=0.1)
    settings = generate.Settings(turntable_frames=2, refine_pose=3, lpips_backbone="random")
    out = generate._reconstruct(recon, images, vm, Ks, str(tmp_path), settings, common.StageTimer())
    report = json.loads((tmp_path / "cameras_refined.json").read_text())
    assert out["kept"] == report["kept"] in ("refined", "original")
    assert out["lpips_before"] == pytest.approx(report["lpips"]["before"]) and len(out["lpips_after"]) == 4
    used = torch.tensor(report["viewmats"])
    assert torch.equal(used, torch.tensor(report["refined_viewmats"]) if report["kept"] == "refined" else vm)
    written = load_ply(str(tmp_path / "gaussians.ply"))
    assert torch.allclose(written["means"], lgm.world_gaussians(model, images[None], used[None], Ks[None])["means"][0], atol=1e-5)
    with pytest.raises(ValueError, match="--refine-pose"):
        generate._reconstruct(recon, images, vm, Ks, str(tmp_path), generate.Settings(refine_pose=-2),
                              common.StageTimer())


def test_a_worse_redone_reconstruction_keeps_the_original(gen, monkeypatch):
    """The decision: when the reconstruction from the refined cameras renders further from the inputs
    (mean LPIPS) than the first one did, the first is kept with the given cameras, and the report says so."""
    from fast3d import cameras

    N = 400
    g = dict(means=(torch.rand(1, N, 3, generator=gen) - 0.5) * 0.8,
             quats=torch.nn.functional.normalize(torch.randn(1, N, 4, generator=gen), dim=-1),
             scales=torch.full((1, N, 3), 0.06), opacities=torch.full((1, N), 0.8),
             colors=torch.rand(1, N, 3, generator=gen))
    rig = cameras.mvdream(resolution=48)
    vm, K = rig.viewmats[:2], rig.Ks[:2]
    target, _ = LGM.render(g, vm[None], K[None], 48, 48, backgrounds=torch.ones(1, 2, 3))
    off = augment.camera_jitter(vm, gen, max_deg=4.0, max_shift=0.05)
    # a stand-in for the network whose second reconstruction comes out with inverted colours
    monkeypatch.setattr(lgm, "world_gaussians", lambda model, imgs, v, k: {**g, "colors": 1 - g["colors"]})
    world, used, report = lgm.refine_and_reconstruct(None, target[0], off, K, g, load_lpips("random"), steps=10)
    assert report["kept"] == "original" and world is g and torch.equal(used, off)
    lp = report["lpips"]
    assert lp["mean_after"] > lp["mean_before"] and len(lp["before"]) == len(lp["after"]) == 2
    # and with an honest redo (the same Gaussians: a network that ignores the cameras) the refined cameras are kept
    monkeypatch.setattr(lgm, "world_gaussians", lambda model, imgs, v, k: g)
    world, used, report = lgm.refine_and_reconstruct(None, target[0], off, K, g, load_lpips("random"), steps=10)
    assert report["kept"] == "refined" and torch.equal(used, torch.tensor(report["refined_viewmats"]))
    assert report["lpips"]["mean_after"] <= report["lpips"]["mean_before"]
