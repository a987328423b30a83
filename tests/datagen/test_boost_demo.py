"""``fast3d boost demo``: the stages on given tiny random models (the pseudo ground truth at two noise
strengths, a LoRA boost from the base for each, the side-by-side evaluation with the paper's row),
a rerun that skips every finished stage, a third strength that adds only its own stages, stage
settings that changed are named, and bad arguments exit 2 naming the argument."""

import json
import os

import pytest
import torch

from fast3d.cli import _boost_demo as boost_demo
from fast3d.cli import main as cli_main
from fast3d.models.lgm import LGM, LGMConfig
from fast3d.models.mvdiff import MVDiffConfig, MVDiffusion

# the smoke sizes, smaller still: one rank in this process, a batch of boost images, one held-out object
TINY = dict(train_objects=1, boost_images=2, heldout_objects=1, resolution=32, gaussians=100, boost_steps=2,
            sampler_steps=2, ranks=1, lora=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("boost_demo_models")
    torch.manual_seed(0)
    d = {k: str(root / k) for k in ("mv", "lgm")}
    MVDiffusion(MVDiffConfig.preset("tiny")).save_pretrained(d["mv"])
    LGM(LGMConfig.preset("tiny")).save_pretrained(d["lgm"])
    return d


def _mtimes(folder):
    return {f: os.stat(os.path.join(folder, f)).st_mtime_ns for f in sorted(os.listdir(folder))}


@pytest.mark.slow
def test_stages_report_and_resume(models, tmp_path, capsys):
    out = str(tmp_path / "demo")
    cfg = boost_demo.preset("smoke", strengths=(1.0,), mv_model=models["mv"], base=models["lgm"], **TINY)
    r = boost_demo.run(out, cfg, device="cpu")
    assert set(r["stages"]) == {"data", "pseudo_s1", "boost_s1", "eval"}
    rep = r["report"]
    assert [m["name"] for m in rep["models"]] == ["base", "boost s1"] and rep["samples"] == 1
    assert rep["paper"]["key"] == "mvboost" and "MVBoost (paper, GSO) †" in r["table"]
    run_cfg = json.loads((tmp_path / "demo" / "runs" / "boost" / "s1" / "config.json").read_text())
    assert run_cfg["model"]["init_from"] == os.path.abspath(models["lgm"]) and run_cfg["model"]["lora_rank"] == 4
    own = json.loads((tmp_path / "demo" / "eval" / "report.boost_s1.json").read_text())
    shown = {k: v for k, v in own["mean"].items() if k not in ("precision", "recall")}  # the table's metrics
    assert shown == rep["models"][1]["mean"] and own["model"] == os.path.abspath(r["models"]["boost s1"])
    ds = json.loads((tmp_path / "demo" / "data" / "pseudo" / "s1" / "dataset.json").read_text())
    assert ds["config"]["strength"] == 1.0 and ds["mv_model"] == os.path.abspath(models["mv"])
    boosted = LGM.from_pretrained(r["models"]["boost s1"]).state_dict()
    base = LGM.from_pretrained(models["lgm"]).state_dict()
    changed = [k for k in base if not torch.equal(base[k], boosted[k])]
    assert changed and all(".attn." in k for k in changed), "the merged LoRA changes the cross-view attention only"

    marks = _mtimes(os.path.join(out, "stages"))
    capsys.readouterr()
    again = boost_demo.run(out, cfg, device="cpu")
    err = capsys.readouterr().err
    for key in ("data", "pseudo_s1", "boost_s1"):
        assert f"{key}: done" in err and again["stages"][key] == r["stages"][key], key
    assert again["report"]["models"] == rep["models"]
    assert {k: v for k, v in _mtimes(os.path.join(out, "stages")).items() if k != "eval.json"} == \
        {k: v for k, v in marks.items() if k != "eval.json"}

    # another strength: its own two stages run, the others are kept, the table has both boosts
    more = boost_demo.run(out, boost_demo.preset("smoke", strengths=(1.0, 0.5), mv_model=models["mv"],
                                                 base=models["lgm"], **TINY), device="cpu")
    err = capsys.readouterr().err
    assert "pseudo_s0.5: finished" in err and "boost_s0.5: finished" in err and "boost_s1: done" in err
    assert [m["name"] for m in more["report"]["models"]] == ["base", "boost s1", "boost s0.5"]
    assert more["report"]["models"][:2] == rep["models"]


def test_changed_settings_are_named_and_redo_reruns(tmp_path):
    out = str(tmp_path / "demo")
    small = dict(train_objects=4, boost_images=2, heldout_objects=1, resolution=16, gaussians=16, ranks=1)
    boost_demo.run(out, boost_demo.preset("smoke", **small), until="data")
    first = _mtimes(os.path.join(out, "data", "heldout"))
    boost_demo.run(out, boost_demo.preset("smoke", **small), until="data")
    assert _mtimes(os.path.join(out, "data", "heldout")) == first, "a finished stage is not redone"
    images = sorted(os.listdir(os.path.join(out, "data", "images")))
    assert images == ["obj00000000.png", "obj00000000.txt", "obj00000001.png", "obj00000001.txt"]
    other = boost_demo.preset("smoke", **{**small, "heldout_objects": 2})
    with pytest.raises(ValueError, match=r"stage 'data' in this --out ran with other settings \(heldout_objects: "
                                         r"1 -> 2\): pass --redo data"):
        boost_demo.run(out, other, until="data")
    boost_demo.run(out, other, until="data", redo="data")
    with open(os.path.join(out, "stages", "data.json")) as f:
        assert json.load(f)["settings"]["heldout_objects"] == 2


def test_bad_arguments_exit_2_naming_them(models, tmp_path, capsys):
    out = str(tmp_path / "demo")
    cases = [
        (["--strengths", "0.8", "1.5"], "--strengths must be a real number in (0, 1] (every strength); got 1.5"),
        (["--strengths", "0"], "--strengths must be a real number in (0, 1] (every strength); got 0.0"),
        (["--strengths", "0.9", "0.9"], "--strengths must not repeat a strength; got [0.9, 0.9]"),
        (["--until", "train"], "--until must be one of ('data', 'mvdiff', 'lgm', 'pseudo', 'boost', 'eval'); got 'train'"),
        (["--redo", "lora"], "--redo must be one of"),
        (["--preset", "huge"], "--preset must be one of ('demo', 'smoke'); got 'huge'"),
        (["--lora", "0"], "--lora must be a positive integer; got 0"),
        (["--ranks", "-1"], "--ranks must be a positive integer; got -1"),
        (["--strengths", "0.1", "--sampler-steps", "4"],
         "--strengths x --sampler-steps must reach one sampler step; got --strengths 0.1, --sampler-steps 4"),
        (["--base", models["mv"]], f"--base {models['mv']!r} holds a 'mvdiff' model; expected an 'lgm' one"),
        (["--mv-model", models["lgm"]], f"--mv-model {models['lgm']!r} holds a 'lgm' model; expected an 'mvdiff' one"),
        (["--mv-model", str(tmp_path / "missing")], "--mv-model must be a model, checkpoint or run directory"),
        (["--strengths", "0.9", "0.95", "--sampler-steps", "8"],
         "--sampler-steps 8 makes --strengths 0.9 and 0.95 the same refinement (the last 7 steps each)"),
        (["--boost-images", "3"], "--boost-images must be at least 4 (2 rank(s) x the boost training's batch of 2"),
        (["--train-objects", "7", "--base", models["lgm"]], "--train-objects must be at least 8 (2 rank(s) x the "
                                                            "mvdiff training's batch of 4"),
    ]
    for args, match in cases:
        assert cli_main(["boost", "demo", "--out", out, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("fast3d boost demo: error: ") and match in err, (args, err)
    assert not os.path.exists(out), "refused before anything is written"
