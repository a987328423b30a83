"""The side-by-side report (``fast3d eval --baseline``, ``fast3d boost demo``) on reports whose rows
are drawn here: each model's means, its difference to the baseline and on how many samples it is
better, recomputed independently; the paper's row labelled as the paper's; backbones that differ
are not compared; and the errors for reports that are not of one held-out set."""

import json

import pytest
import torch

from fast3d.evaluation.report import (
    PAPER_NUMBERS,
    evaluate_side_by_side,
    mean_metrics,
    model_report_path,
    side_by_side,
    side_by_side_markdown,
    write_report,
)

# Differences are of float64 means of the same float rows: exact up to the summation order.
DIFF_ATOL = 1e-12

LOWER_IS_BETTER = ("lpips_random", "chamfer")


def _rows(gen, keys, shift):
    """Per-sample rows with metric values drawn from ``gen``, shifted by ``shift``."""
    rows = []
    for k in keys:
        v = torch.rand(4, generator=gen, dtype=torch.float64).tolist()
        rows.append({"key": k, "psnr": 15 + 5 * v[0] + shift, "ssim": v[1], "lpips_random": v[2],
                     "chamfer": 0.05 + v[3] / 10, "fscore": v[0] * v[1], "precision": v[2]})
    return rows


def _report(tmp_path, name, rows, data="heldout", lpips_net="lpips-vgg-random"):
    return write_report(str(tmp_path / f"{name}.json"), rows, model=str(tmp_path / name), data=str(tmp_path / data),
                        backbones={"ssim": "torchmetrics-gaussian11-sigma1.5", "lpips_random": lpips_net}, kind="lgm")


def test_differences_and_per_sample_wins_match_a_direct_computation(tmp_path, gen):
    keys = [f"obj{i}" for i in range(7)]
    base_rows = _rows(gen, keys, 0.0)
    boosted_rows = _rows(gen, keys[::-1], 0.3)  # another order: samples are paired by key
    base, boosted = _report(tmp_path, "base", base_rows), _report(tmp_path, "boosted", boosted_rows)
    r = side_by_side([("base", base), ("boosted", boosted)], paper="mvboost")
    assert r["kind"] == "side_by_side" and r["baseline"] == "base" and r["samples"] == 7
    mb, mo = mean_metrics(base_rows), mean_metrics(boosted_rows)
    by_key = {row["key"]: row for row in base_rows}
    for k in ("psnr", "ssim", "lpips_random", "chamfer", "fscore"):
        assert abs(r["difference"]["boosted"][k] - (mo[k] - mb[k])) <= DIFF_ATOL, k
        wins = 0
        for row in boosted_rows:
            a, b = row[k], by_key[row["key"]][k]
            wins += (a < b) if k in LOWER_IS_BETTER else (a > b)
        assert r["better_on"]["boosted"][k] == [wins, 7], k
    assert "precision" not in r["difference"]["boosted"], "hidden in the table, not compared"
    assert [m["name"] for m in r["models"]] == ["base", "boosted"]
    assert r["models"][1]["mean"]["psnr"] == mo["psnr"]
    assert r["paper"]["mean"] == PAPER_NUMBERS["mvboost"]["mean"]

    md = side_by_side_markdown(r)
    lines = md.splitlines()
    assert lines[0] == "| Model | Data | PSNR ↑ | SSIM ↑ | LPIPS (random VGG) ↓ | CD ↓ | F-Score ↑ |"
    assert lines[2].startswith("| base | heldout (7) | ") and lines[3].startswith("| boosted | heldout (7) | ")
    d = r["difference"]["boosted"]["psnr"]
    assert lines[4].startswith(f"| boosted − base |  | {d:+.4g} ({r['better_on']['boosted']['psnr'][0]}/7 better)")
    # the paper's row: labelled as the paper's, its numbers under the metrics this run has, none
    # under the random-VGG stand-in (its LPIPS is another network's), all five quoted below
    assert lines[5] == "| MVBoost (paper, GSO) † | Google Scanned Objects | 18.561 | 0.859 | - | 0.1011 | 0.7977 |"
    assert "- † MVBoost (paper, GSO): PSNR 18.561, SSIM 0.859, LPIPS 0.131, CD 0.1011, F-Score 0.7977." in md
    assert "not measured by this run" in md and "the paper's LPIPS has no column here" in md


def test_without_a_paper_and_with_backbones_that_differ(tmp_path, gen):
    keys = ["a", "b"]
    base = _report(tmp_path, "base", _rows(gen, keys, 0.0))
    other = _report(tmp_path, "other", _rows(gen, keys, 0.0), lpips_net="lpips-vgg-other")
    r = side_by_side([("base", base), ("other", other)])
    assert r["paper"] is None and "†" not in side_by_side_markdown(r)
    assert r["difference"]["other"]["lpips_random"] is None and "lpips_random" not in r["better_on"]["other"]
    assert r["difference"]["other"]["psnr"] is not None


def test_reports_of_other_sets_are_refused(tmp_path, gen):
    base = _report(tmp_path, "base", _rows(gen, ["a", "b"], 0.0))
    cases = [
        ([("base", base)], "at least two reports"),
        ([("base", base), ("base", base)], "names must differ"),
        ([("base", base), ("x", _report(tmp_path, "x", _rows(gen, ["a", "c"], 0.0)))], "not the same ones"),
        ([("base", base), ("y", _report(tmp_path, "y", _rows(gen, ["a"], 0.0)))], "has 1 samples, 'base' 2"),
        ([("base", base), ("z", _report(tmp_path, "z", _rows(gen, ["a", "b"], 0.0), data="gso"))],
         "side by side needs one held-out set"),
    ]
    for reports, match in cases:
        with pytest.raises(ValueError, match=match):
            side_by_side(reports)
    with pytest.raises(ValueError, match=r"--paper must be one of \['mvboost'\]; got 'lgm'"):
        side_by_side([("base", base), ("b2", base)], paper="lgm")


def test_evaluate_side_by_side_keeps_each_models_report_and_checks_first(tmp_path, gen):
    keys = ["o1", "o2", "o3"]
    rows = {"m/base": _rows(gen, keys, 0.0), "m/boost": _rows(gen, keys, 1.0)}
    calls = []

    def evaluate(model_dir, out_json):
        calls.append((model_dir, out_json))
        return write_report(out_json, rows[model_dir], model_dir, str(tmp_path / "heldout"), kind="lgm")

    out = str(tmp_path / "eval" / "report.json")
    with pytest.raises(ValueError, match="--paper must be one of"):
        evaluate_side_by_side(evaluate, [("base", "m/base"), ("boost s=0.95", "m/boost")], out, paper="nope")
    assert calls == [], "a bad --paper stops before any model is scored"
    with pytest.raises(ValueError, match="must differ after reduction to file names"):
        evaluate_side_by_side(evaluate, [("a b", "m/base"), ("a_b", "m/boost")], out)
    r = evaluate_side_by_side(evaluate, [("base", "m/base"), ("boost s=0.95", "m/boost")], out, paper="mvboost")
    assert calls == [("m/base", str(tmp_path / "eval" / "report.base.json")),
                     ("m/boost", str(tmp_path / "eval" / "report.boost_s_0.95.json"))]
    assert model_report_path(out, "boost s=0.95") == calls[1][1]
    written = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert written == r and (tmp_path / "eval" / "report.md").read_text() == side_by_side_markdown(r)
    assert abs(r["difference"]["boost s=0.95"]["psnr"]
               - (mean_metrics(rows["m/boost"])["psnr"] - mean_metrics(rows["m/base"])["psnr"])) <= DIFF_ATOL
