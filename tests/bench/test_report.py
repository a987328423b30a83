"""Tests for fast3d.bench.report (``fast3d report``): latest-run selection, malformed lines, tables,
plots, the empty case and deterministic output. CPU only, no benchmarks are run."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    from fast3d.bench.report import write_report
except ImportError:  # the package may be mid-build; report.py itself needs nothing from it
    _path = Path(__file__).resolve().parents[2] / "fast3d" / "bench" / "report.py"
    _spec = importlib.util.spec_from_file_location("fast3d_bench_report", _path)
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _mod
    _spec.loader.exec_module(_mod)
    write_report = _mod.write_report

# Fresh values each run; set FAST3D_TEST_SEED to replay a failure (the seed is in every message).
SEED = int(os.environ.get("FAST3D_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def rng() -> np.random.Generator:
    print(f"report test seed: {SEED}")
    return np.random.default_rng(SEED)


def make_row(rng: np.random.Generator, **over) -> dict:
    """A valid row with fresh random numbers; `over` replaces fields."""
    median = float(rng.uniform(0.5, 50.0))
    row = {
        "op": "gaussian_raster", "workload": "lrm", "backend": "triton", "pass": "forward",
        "median_ms": median, "p20_ms": median * 0.95, "p80_ms": median * 1.05,
        "peak_mem_bytes": int(rng.integers(1, 4096)) * 2**20,
        "gbps": float(rng.uniform(10, 3000)), "tflops": float(rng.uniform(0.1, 900)),
        "frac_peak_bw": float(rng.uniform(0.05, 0.95)),
        "frac_peak_flops": float(rng.uniform(0.01, 0.9)),
        "speedup_vs": {"torch": float(rng.uniform(1.1, 40))},
        "device": "NVIDIA H100 80GB HBM3", "device_slug": "h100",
        "peak_gbps": 3000.0, "peak_tflops": 989.0, "params": {"n": 1000}, "quick": False,
        "iters": 50, "torch": "2.5.1", "triton": "3.1.0", "cuda": "12.4",
        "commit": "a1b2c3d", "date": "2025-01-02T03:04:05Z", "run_id": "run-new",
    }
    row.update(over)
    return row


def write_rows(results: Path, slug: str, op: str, lines: list) -> Path:
    path = results / slug / f"{op}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def tables(md: str) -> list[dict]:
    """Every data row of every markdown table in `md`, as {header: cell}."""
    out, header = [], None
    for line in md.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set(line) <= set("|-: "):
            out.append(dict(zip(header, cells)))
    return out


def find(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def close(cell: str, value: float, msg: str) -> None:
    """`cell` shows `value` to about 3 significant digits."""
    assert cell != "-", msg
    assert float(cell.rstrip("%x")) == pytest.approx(value, rel=6e-3), f"{cell} != {value}; {msg}"


def test_latest_run_replaces_older(tmp_path, rng):
    msg = f"seed={SEED}"
    new = make_row(rng, date="2025-03-01T12:00:00Z", commit="newc0mm", run_id="run-new")
    old = make_row(rng, date="2025-02-01T12:00:00+00:00", commit="oldc0mm", run_id="run-old")
    # Same date twice: the later line must win.
    tie_a = make_row(rng, backend="cuda", date="2025-03-01T12:00:00Z", commit="newc0mm")
    tie_b = make_row(rng, backend="cuda", date="2025-03-01T12:00:00Z", commit="newc0mm")
    # The older run is written last: dates, not line order, decide.
    write_rows(tmp_path, "h100", "gaussian_raster", [new, tie_a, tie_b, old])

    md = Path(write_report(str(tmp_path))).read_text()
    rows = tables(md)
    got = find(rows, Workload="lrm", Pass="forward", Backend="triton")
    assert len(got) == 1, msg
    close(got[0]["Median ms"], new["median_ms"], msg)
    close(got[0]["GB/s"], new["gbps"], msg)
    close(got[0]["Peak mem (MiB)"], new["peak_mem_bytes"] / 2**20, msg)
    close(got[0]["% peak BW"], 100 * new["frac_peak_bw"], msg)
    assert got[0]["Speed-up"].endswith("x vs torch"), msg
    close(got[0]["Speed-up"].split()[0], new["speedup_vs"]["torch"], msg)
    cuda = find(rows, Backend="cuda")
    assert len(cuda) == 1, msg
    close(cuda[0]["Median ms"], tie_b["median_ms"], msg)
    assert "newc0mm" in md and "2025-03-01T12:00:00Z" in md, msg
    assert "oldc0mm" not in md and "run-old" not in md, msg


def test_malformed_lines_skipped_and_counted(tmp_path, rng):
    msg = f"seed={SEED}"
    good = make_row(rng)
    missing = make_row(rng)
    del missing["median_ms"]
    bad = [
        "{not json",
        json.dumps(missing),
        json.dumps(make_row(rng, median_ms="3.0")),        # wrong type
        json.dumps(make_row(rng, **{"pass": "sideways"})),  # unknown pass
        json.dumps(make_row(rng, quick=1)),                  # not a bool
        json.dumps(make_row(rng, speedup_vs={"torch": None})),
        json.dumps(make_row(rng, date="yesterday")),
        json.dumps(make_row(rng, gbps=float("nan"))),        # NaN is not JSON
        "[1, 2, 3]",
    ]
    write_rows(tmp_path, "h100", "gaussian_raster", [bad[0], good, *bad[1:], ""])
    write_rows(tmp_path, "h100", "other_op", [make_row(rng, op="other_op")])

    md = Path(write_report(str(tmp_path))).read_text()
    counts = {r["File"]: r for r in tables(md) if "File" in r}
    assert counts["`h100/gaussian_raster.jsonl`"]["Malformed lines skipped"] == str(len(bad)), msg
    assert counts["`h100/gaussian_raster.jsonl`"]["Rows read"] == "1", msg
    assert counts["`h100/other_op.jsonl`"]["Malformed lines skipped"] == "0", msg
    shown = find(tables(md), Backend="triton")
    assert len(shown) == 2, msg
    assert any(math.isclose(float(r["Median ms"]), good["median_ms"], rel_tol=6e-3) for r in shown), msg


def test_table_content_order_and_device_section(tmp_path, rng):
    msg = f"seed={SEED}"
    rows = [make_row(rng, backend=b, **{"pass": p}) for p in ("forward+backward", "backward", "forward")
            for b in ("torch", "triton", "cuda")]
    # Same workload, backend and pass as a full-size row: quick runs must not replace it.
    rows.append(make_row(rng, quick=True, backend="torch", gbps=None, tflops=None, frac_peak_bw=None,
                         frac_peak_flops=None, peak_mem_bytes=None, speedup_vs={}))
    write_rows(tmp_path, "h100", "gaussian_raster", rows)

    md = Path(write_report(str(tmp_path))).read_text()
    shown = [r for r in tables(md) if "Backend" in r]
    assert len(shown) == len(rows), msg
    full = [r for r in shown if r["Workload"] == "lrm"]
    order = [(r["Pass"], float(r["Median ms"])) for r in full]
    rank = {"forward": 0, "backward": 1, "forward+backward": 2}
    assert order == sorted(order, key=lambda t: (rank[t[0]], t[1])), f"{order}; {msg}"
    (quick,) = find(shown, Workload="lrm (quick)")
    for col in ("Speed-up", "GB/s", "TFLOP/s", "% peak BW", "% peak FLOP/s", "Peak mem (MiB)"):
        assert quick[col] == "-", f"{col}: {quick[col]}; {msg}"
    for line in ("NVIDIA H100 80GB HBM3", "3000", "989", "2.5.1", "3.1.0", "12.4", "a1b2c3d"):
        assert line in md, f"{line} missing; {msg}"
    assert "`fast3d report`" in md, msg


def test_plots_written_and_embedded(tmp_path, rng):
    msg = f"seed={SEED}"
    results = tmp_path / "results"
    write_rows(results, "h100", "gaussian_raster",
               [make_row(rng, backend=b, workload=w) for b in ("triton", "cuda") for w in ("lrm", "gs")])
    # Nothing to plot: no speed-ups, no fractions of peak.
    write_rows(results, "cpu-epyc", "knn", [make_row(
        rng, op="knn", device_slug="cpu-epyc", device="cpu: AMD EPYC", backend="cpu", speedup_vs={},
        frac_peak_bw=None, frac_peak_flops=None)])
    out_md = tmp_path / "docs" / "bench.md"  # elsewhere, so the relative links are exercised

    assert write_report(str(results), str(out_md)) == str(out_md)
    md = out_md.read_text()
    pngs = sorted((results / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["h100__gaussian_raster__roofline.png",
                                      "h100__gaussian_raster__speedup.png"], msg
    for p in pngs:
        data = p.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), f"{p}; {msg}"
    links = [line.split("](")[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert len(links) == 2, msg
    for link in links:
        assert not os.path.isabs(link), link
        assert (out_md.parent / link).resolve() in [p.resolve() for p in pngs], f"{link}; {msg}"
    assert "cpu: AMD EPYC" in md and "knn" in md, msg


@pytest.mark.parametrize("make_dir", [True, False])
def test_no_results(tmp_path, make_dir):
    results = tmp_path / "results"
    if make_dir:
        results.mkdir()
    md_path = write_report(str(results))
    assert md_path == str(results / "REPORT.md")
    md = Path(md_path).read_text()
    assert "No results" in md
    assert not (results / "plots").exists() or not any((results / "plots").iterdir())


def test_output_is_deterministic(tmp_path, rng):
    msg = f"seed={SEED}"
    write_rows(tmp_path, "h100", "gaussian_raster", [make_row(rng, backend=b) for b in ("triton", "cuda")]
               + ["garbage"])
    write_rows(tmp_path, "cpu-epyc", "knn", [make_row(rng, op="knn", device_slug="cpu-epyc")])
    first = Path(write_report(str(tmp_path))).read_text()
    second = Path(write_report(str(tmp_path))).read_text()
    assert first == second, msg
