"""Shared fixtures of ``fast3d refine``'s tests (test_refine.py, test_refine_cli.py): a tiny
random-init Magic-Boost model, a procedural scene (the truth, its degraded copy as the coarse PLY,
K anchor views of the truth and their cameras) and the bad inputs. test_lrm_inference.py and
test_mvdiff_sampling.py define their own ``model_dir`` / ``model``, which pytest prefers in those
modules."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from fast3d import cameras as cams
from fast3d import rasterization
from fast3d.datagen.assets import make_asset
from fast3d.inference import refine as rf
from fast3d.inference.common import save_image
from fast3d.io import save_ply
from fast3d.models.magicboost import MagicBoost, MagicBoostConfig

TINY = MagicBoostConfig.preset("tiny")
R, K = TINY.resolution, TINY.num_anchors   # 32 px, 4 anchors


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random-init Magic-Boost model directory (weights drawn from the config's random_seed)."""
    path = str(tmp_path_factory.mktemp("model") / "magicboost")
    MagicBoost(MagicBoostConfig.preset("tiny")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return rf.load_model(model_dir, torch.device("cpu"))[0]


def anchor_cameras(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # -> [K, 4, 4], [K, 3, 3]
    """K orbit cameras 90 degrees apart from a random start, a random elevation in [0, 30] degrees."""
    az = float(torch.rand((), generator=gen)) * 2 * math.pi + torch.arange(K, dtype=torch.float64) * (math.pi / 2)
    el = torch.full((K,), math.radians(30 * float(torch.rand((), generator=gen))), dtype=torch.float64)
    return cams.orbit_cameras(az, el, cams.DEFAULT_DISTANCE, cams.DEFAULT_FOV_Y_DEG, R)


def render(g: dict, vm: torch.Tensor, Ks: torch.Tensor) -> torch.Tensor:  # -> [C, 3, R, R] on white
    rgb, _, _ = rasterization(g["means"], g["quats"], g["scales"], g["opacities"], g["sh"], vm, Ks, R, R,
                              sh_degree=0, backgrounds=torch.ones(vm.shape[0], 3))
    return rgb.permute(0, 3, 1, 2).clamp(0, 1)


@pytest.fixture
def scene(tmp_path, gen):
    """A procedural object (the truth), its degraded copy (jittered positions, blurred colours)
    as the coarse PLY, K anchor views of the truth with cameras.json, in tmp_path; ``render`` is how
    the anchors were rendered (on white, clamped)."""
    a = make_asset(gen, 256)
    truth = dict(means=a.means, quats=a.quats, scales=a.scales, opacities=a.opacities, sh=a.sh)
    coarse = dict(truth, means=a.means + 0.02 * torch.randn(a.means.shape, generator=gen),
                  sh=0.5 * a.sh + 0.5 * a.sh.mean(0, keepdim=True))
    save_ply(tmp_path / "coarse.ply", coarse["means"], coarse["quats"], coarse["scales"], coarse["opacities"],
             coarse["sh"])
    vm, Ks = anchor_cameras(gen)
    os.makedirs(tmp_path / "anchors")
    for i, img in enumerate(render(truth, vm, Ks)):
        save_image(img, str(tmp_path / "anchors" / f"view{i}.png"))
    with open(tmp_path / "cameras.json", "w") as f:
        json.dump({"viewmats": vm.tolist(), "Ks": Ks.tolist(), "width": R, "height": R}, f)
    return dict(ply=str(tmp_path / "coarse.ply"), anchors=[str(tmp_path / "anchors")],
                cameras=str(tmp_path / "cameras.json"), viewmats=vm, Ks=Ks, truth=truth, coarse=coarse,
                render=render)


@pytest.fixture
def bad_inputs(scene, tmp_path, gen, model_dir) -> dict:
    """name -> (refine() keyword overrides or a settings dict, the message's pattern): each bad input
    of ``fast3d refine`` made in tmp_path."""
    from fast3d.io.ply import save_points_ply

    raw = open(scene["ply"], "rb").read()
    (tmp_path / "truncated.ply").write_bytes(raw[:-7])
    points = tmp_path / "points.ply"
    save_points_ply(points, torch.rand(10, 3, generator=gen), torch.rand(10, 3, generator=gen))
    header_end = raw.index(b"end_header\n") + len(b"end_header\n")
    nan = bytearray(raw)
    nan[header_end:header_end + 4] = bytes.fromhex("0000c07f")   # x of the first Gaussian: NaN
    (tmp_path / "nan.ply").write_bytes(bytes(nan))
    three = sorted(os.path.join(scene["anchors"][0], n) for n in os.listdir(scene["anchors"][0]))[:3]
    big = tmp_path / "big"
    os.makedirs(big)
    for i in range(K):
        save_image(torch.rand(3, 2 * R, 2 * R, generator=gen), str(big / f"v{i}.png"))
    other = str(tmp_path / "mvdiff")
    from fast3d.models.mvdiff import MVDiffConfig, MVDiffusion

    MVDiffusion(MVDiffConfig.preset("tiny")).save_pretrained(other)
    return {
        "ply not 3DGS": (dict(ply=str(points)), r"--ply .*missing properties"),
        "ply truncated": (dict(ply=str(tmp_path / "truncated.ply")), r"--ply .*truncated"),
        "ply NaN": (dict(ply=str(tmp_path / "nan.ply")), r"--ply .*non-finite"),
        "anchor count": (dict(anchors=three), r"--anchors has 3 images but --cameras .* has 4 cameras"),
        "anchor size": (dict(anchors=[str(big)]), r"--anchors are 64x64 px but --cameras .* width 32"),
        "model kind": (dict(model_dir=other), r"--model .* holds a 'mvdiff' model, not a Magic-Boost model"),
        "t-range": ({"t_range": (0.02, 1.0)}, r"--t-range HI must be a real number in \(0, 1\)"),
        "t-range order": ({"t_range": (0.5, 0.1)}, r"--t-range must have LO <= HI"),
    }
