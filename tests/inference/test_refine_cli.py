"""``fast3d refine`` on the command line: a short run writes the outputs; each bad input (a PLY that
is not 3DGS, truncated or NaN; anchors whose count or size does not match the cameras; a model of
another kind; a timestep range outside (0, 1)) exits 2 with a message naming the argument and
leaves no OUT."""

from __future__ import annotations

import json
import re

import pytest

from fast3d.cli import main

ARG = {"ply": "--ply", "anchors": "--anchors", "cameras": "--cameras", "model_dir": "--model"}


def argv(scene_, model_path, out, **change) -> list[str]:
    args = {"ply": scene_["ply"], "anchors": scene_["anchors"], "cameras": scene_["cameras"], "model_dir": model_path}
    args.update(change)
    a = ["refine", "--out", str(out), "--steps", "2", "--views-per-step", "1", "--guidance", "1", "--aiu-every", "5",
         "--frames", "2", "--device", "cpu"]
    for k, v in args.items():
        a += [ARG[k], *(v if isinstance(v, list) else [v])]
    return a


def test_a_short_run_writes_the_outputs(scene, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(argv(scene, model_dir, out) + ["--no-aiu", "--t-range", "0.1", "0.3", "--seed", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["aiu"] is False and report["settings"]["t_range"] == [0.1, 0.3]
    assert report["settings"]["seed"] == 3 and report["last_losses"]["aiu"] == 0
    assert (out / "refined.ply").is_file() and (out / "turntable.gif").is_file()
    err = capsys.readouterr().err
    assert "fast3d refine: step 2/2" in err and "eta" in err and "wrote " + str(out / "refined.ply") in err


def test_bad_inputs_exit_2_naming_the_argument(scene, model_dir, tmp_path, bad_inputs, capsys):
    for name, (change, pattern) in bad_inputs.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        if "t_range" in change:
            extra = ["--t-range", *map(str, change["t_range"])]
            change = {}
        else:
            extra = []
        assert main(argv(scene, model_dir, out, **change) + extra) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("fast3d refine: error: "), (name, err)
        assert re.search(pattern, err), (name, err)
        assert not out.exists(), name


@pytest.mark.parametrize("flag, value, message", [
    ("--steps", "0", "--steps must be a positive integer"),
    ("--views-per-step", "0", "--views-per-step must be a positive integer"),
    ("--aiu-strength", "1.5", r"--aiu-strength must be a real number in \(0, 1\]"),
    ("--aiu-loss", "huber", "--aiu-loss must be one of"),
    ("--aiu-denoise-steps", "0", "--aiu-denoise-steps must be a positive integer"),
    ("--sds-weight", "-1", "--sds-weight must be a real number"),
    ("--elevation", "40 -10", "--elevation must have LO <= HI"),
])
def test_bad_settings_exit_2(scene, model_dir, tmp_path, capsys, flag, value, message):
    out = tmp_path / "out"
    assert main(argv(scene, model_dir, out) + [flag, *value.split()]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()
