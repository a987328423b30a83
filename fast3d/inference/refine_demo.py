"""Magic-Boost's demonstration (issue 19): a held-out procedural object's Gaussians deliberately
degraded (colours blurred over each Gaussian's neighbours, positions jittered), refined by
:func:`fast3d.inference.refine.refine` with the Anchor Iterative Update on and off, and the held-out
views' PSNR against the object's true views before and after, for both (``fast3d magicboost demo``).

The anchors are 4 true views of the object (views 0, 4, 8, 12 of its orbit16 rig: the ideal
stand-in for a generator's multi-view images); the held-out views are its other 12.
"""

from __future__ import annotations

import json
import os

import torch

import fast3d
from fast3d import checks
from fast3d.data.dataset import MultiViewDataset
from fast3d.evaluation.image_metrics import psnr
from fast3d.inference.common import save_image
from fast3d.inference.refine import RefineSettings, refine
from fast3d.io.ply import load_ply, save_ply

ANCHORS = [0, 4, 8, 12]
HELD_OUT = [i for i in range(16) if i not in ANCHORS]


def render(g: dict,                 # load_ply's: means [N, 3], quats [N, 4], scales [N, 3], opacities [N], sh [N, S, 3]
           viewmats: torch.Tensor,  # [V, 4, 4]
           Ks: torch.Tensor,        # [V, 3, 3] pixels of R x R images
           R: int) -> torch.Tensor:  # -> [V, 3, R, R] on white
    """The asset's renders on a white background, as the procedural views are rendered."""
    with torch.no_grad():
        rgb, _, _ = fast3d.rasterization(g["means"], g["quats"], g["scales"], g["opacities"], g["sh"], viewmats, Ks,
                                         R, R, sh_degree=g["sh_degree"], backgrounds=torch.ones(len(viewmats), 3))
    return rgb.permute(0, 3, 1, 2).clamp(0, 1)


def degrade(g: dict, gen: torch.Generator, neighbours: int = 32, jitter: float = 0.03) -> dict:
    """The coarse asset: each Gaussian's colour the mean of its ``neighbours`` nearest Gaussians'
    (a spatial blur), then every position moved by N(0, jitter^2) per axis (world units; the
    object fills about the unit box)."""
    near = torch.cdist(g["means"], g["means"]).topk(neighbours, largest=False).indices   # [N, neighbours]
    return dict(g, sh=g["sh"][near].mean(1), means=g["means"] + jitter * torch.randn(g["means"].shape, generator=gen))


def demo(model: str, heldout: str, out: str, steps: int, seed: int = 0, device: str | None = None) -> dict:
    """Degrade the first object of procedural shards ``heldout`` (its PLY in ``heldout/assets``),
    refine it with ``model`` (a Magic-Boost model or training run) with AIU on and off for
    ``steps`` steps into ``out/aiu`` and ``out/sds`` (``device``: :func:`fast3d.inference.common.default_device`
    when None).

    Returns:
        Held-out-view PSNR (dB, mean over the 12 held-out views) of the true asset, the degraded
        one and both refined ones.
    """
    checks.positive_int("steps", steps)
    if not os.path.isfile(os.path.join(heldout, "dataset.json")):
        raise ValueError(f"heldout must be a folder of procedural shards (with dataset.json and assets/); got {heldout!r}")
    sample = next(iter(MultiViewDataset(heldout, views=16, resolution=_resolution(heldout))))
    views, vm, Ks = sample["images"], sample["viewmats"], sample["Ks"]
    R = views.shape[-1]
    anchors = os.path.join(out, "anchors")
    os.makedirs(anchors, exist_ok=True)
    for i in ANCHORS:
        save_image(views[i], os.path.join(anchors, f"view{i:02d}.png"))
    cameras = os.path.join(out, "cameras.json")
    with open(cameras, "w") as f:
        json.dump({"viewmats": vm[ANCHORS].tolist(), "Ks": Ks[ANCHORS].tolist()}, f)
    truth = load_ply(os.path.join(heldout, "assets", f"{sample['key']}.ply"))
    bad = degrade(truth, torch.Generator().manual_seed(seed))
    coarse_ply = os.path.join(out, "coarse.ply")
    save_ply(coarse_ply, bad["means"], bad["quats"], bad["scales"], bad["opacities"], bad["sh"])
    coarse = load_ply(coarse_ply)

    def score(g: dict) -> float:
        return psnr(render(g, vm[HELD_OUT], Ks[HELD_OUT], R), views[HELD_OUT]).mean().item()

    result = {"true asset": score(truth), "degraded": score(coarse)}
    for name, aiu in (("AIU on", True), ("AIU off", False)):
        run = os.path.join(out, "aiu" if aiu else "sds")
        refine(coarse_ply, [anchors], cameras, model, run,
               RefineSettings(steps=steps, aiu=aiu, seed=seed, turntable_frames=4), device=device)
        refined = load_ply(os.path.join(run, "refined.ply"))
        result[f"refined, {name}"] = score(refined)
        result[f"moved, {name}"] = (refined["means"] - coarse["means"]).abs().max().item()
    return result


def _resolution(shards: str) -> int:
    with open(os.path.join(shards, "dataset.json")) as f:
        return int(json.load(f)["config"]["resolution"])
