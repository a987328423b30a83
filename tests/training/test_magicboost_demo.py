"""Magic-Boost's demonstration pipeline (fast3d.inference.refine_demo, ``fast3d magicboost demo``)
on a random-init tiny model for a few steps: the evaluation renders the true asset as the views were
rendered, sees the degradation, and both refinements run and change the asset (what a random
model's guidance does to the PSNR is not asserted; the README gives the trained model's figures)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.slow
def test_the_demonstration_pipeline(tmp_path):
    from fast3d.datagen import procedural
    from fast3d.inference.refine_demo import demo
    from fast3d.models.magicboost import MagicBoost, MagicBoostConfig

    held = str(tmp_path / "heldout")
    procedural.run(held, procedural.ProceduralConfig(num_objects=1, seed=7, views=16, rig="orbit16", resolution=32,
                                                     gaussians_per_object=800, samples_per_shard=1))
    MagicBoost(MagicBoostConfig.preset("tiny")).save_pretrained(str(tmp_path / "model"))
    r = demo(str(tmp_path / "model"), held, str(tmp_path / "out"), steps=3, device="cpu")
    print(r)
    assert r["true asset"] > 35.0, r                      # renders as the procedural views were rendered
    assert r["degraded"] < r["true asset"] - 5.0, r       # the degradation is seen
    for name in ("AIU on", "AIU off"):
        assert r[f"moved, {name}"] > 1e-5 and torch.isfinite(torch.tensor(r[f"refined, {name}"])), r


def test_bad_arguments_are_named(tmp_path):
    from fast3d.inference.refine_demo import demo

    with pytest.raises(ValueError, match="steps"):
        demo(str(tmp_path), str(tmp_path), str(tmp_path / "out"), steps=0)
    with pytest.raises(ValueError, match="heldout must be a folder of procedural shards"):
        demo(str(tmp_path), str(tmp_path), str(tmp_path / "out"), steps=2)
