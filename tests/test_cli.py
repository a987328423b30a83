"""The `fast3d` command end to end, as a user runs it (the installed console script)."""

import json
import shutil
import subprocess

import pytest
import torch

import fast3d
from fast3d.bench.spec import PASSES

FAST3D = shutil.which("fast3d")
pytestmark = pytest.mark.skipif(FAST3D is None, reason="the fast3d console script is not installed (pip install -e .)")


def cli(*args, check=True):
    r = subprocess.run([FAST3D, *args], capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"fast3d {' '.join(args)} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


def test_info_json_schema():
    info = json.loads(cli("info", "--json").stdout)
    for key in ("python", "torch", "cuda_runtime", "cuda_toolkit", "triton", "gpu"):
        assert key in info["versions"]
    assert set(info["ops"]) == set(fast3d.backends.ops())
    for op, table in info["ops"].items():
        assert list(table) == list(fast3d.backends.BACKEND_NAMES), op  # every backend: available, or why not
        registered = fast3d.backends.backends(op)
        for name, entry in table.items():
            assert set(entry) == {"available", "reason", "doc"}
            assert entry["available"] == (entry["reason"] is None)
            # every registered backend says in one line how it works; an unimplemented one has no doc
            if name in registered:
                assert entry["doc"] == registered[name].doc and entry["doc"].strip() and "\n" not in entry["doc"]
            else:
                assert entry["doc"] is None
    assert info["ops"]["composite"]["torch"]["available"]
    if info["versions"]["gpu"] == "no GPU":
        assert "no CUDA GPU" in info["ops"]["composite"]["cuda"]["reason"]


def test_info_table_lists_every_op_and_reason():
    out = cli("info").stdout
    assert "composite" in out and "torch" in out
    for op in fast3d.backends.ops():
        for reason in fast3d.backends.availability(op).values():
            if reason:
                assert reason in out
        for name, b in fast3d.backends.backends(op).items():
            assert f"{op}/{name}: {b.doc}" in out


@pytest.mark.parametrize("args, what", [
    (["bench", "nope"], "unknown op 'nope'; valid: composite"),
    (["bench", "--workload", "nope"], "unknown workload 'nope'; valid: "),
    (["bench", "--backend", "nope"], "unknown backend 'nope'; valid: "),
    (["bench", "--pass", "nope"], "unknown pass 'nope'; valid: forward, backward, forward+backward"),
    (["profile", "nope"], "unknown workload 'nope'; valid: composite:lrm"),
    (["profile", "lrm", "--op", "nope"], "unknown op 'nope'; valid: "),
    (["profile", "composite:lrm", "--backend", "nope"], "unknown backend 'nope' for composite; valid: cpu, cuda, "),
    (["train", "lgm", "--config", "nope.yaml", "--output", "o"], "config 'nope.yaml' does not exist"),
    (["train", "lgm", "--config", "train/configs/ttr_tiny.yaml", "--output", "o"], "is for recipe 'ttr', not 'lgm'"),
    (["train", "ttr", "--config", "train/configs/ttr_tiny.yaml", "--output", "o", "--init-from", "x"],
     "--init-from takes the lgm, lrm or mvdiff recipe; got 'ttr'"),
    (["train", "lrm", "--config", "train/configs/lrm_tiny.yaml", "--output", "o", "--init-from", "/nonexistent"],
     "model.init_from '/nonexistent' is not a directory"),
    (["train", "lgm", "--config", "train/configs/lgm_tiny.yaml", "--output", "o", "--init-from", "/nonexistent"],
     "model.init_from '/nonexistent' is not a directory"),
    (["infer", "--checkpoint", "/nonexistent", "--images", "a.png", "--out", "o"], "is not a directory"),
    (["eval", "--checkpoint", "/nonexistent", "--data", "d", "--out", "o.json"], "is not a directory"),
    (["sample", "ttr", "--checkpoint", "/nonexistent", "--prompt", "x", "--out", "g.png"], "is not a directory"),
    (["datagen", "pipeline", "--config", "nope.yaml", "--out", "o"], "nope.yaml"),
    (["datagen", "train-filter", "--data", "d", "--labels", "/nonexistent.json", "--out", "o"], "does not exist"),
    (["demo", "--config", "nope.yaml", "--out", "/nonexistent/demo"], "--config 'nope.yaml' not found"),
])
def test_unknown_names_exit_2_with_one_line(args, what):
    r = cli(*args, check=False)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and what in lines[0], r.stderr


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    r = cli("bench", "--quick", "--out", str(out))
    return out, r.stdout


def _rows(out):
    files = list(out.glob("*/*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def test_quick_bench_writes_every_op_workload_backend_pass(quick_run):
    out, stdout = quick_run
    rows = _rows(out)
    from fast3d.bench.workloads import specs

    for op, spec in specs().items():
        # Triton on the CPU is its interpreter: the bench leaves it out unless named.
        runnable = [n for n, r in fast3d.backends.availability(spec.backend_op).items()
                    if r is None and not (n == "triton" and not torch.cuda.is_available())]
        for w in spec.workloads:
            for b in runnable:
                for p in PASSES:
                    match = [r for r in rows if (r["op"], r["workload"], r["backend"], r["pass"]) == (op, w.name, b, p)]
                    assert len(match) == (1 if p in spec.passes else 0), (op, w.name, b, p)
    assert "median ms" in stdout


def test_quick_bench_rows_are_consistent(quick_run):
    out, _ = quick_run
    keys = {"op", "workload", "backend", "pass", "median_ms", "p20_ms", "p80_ms", "peak_mem_bytes", "gbps",
            "tflops", "speedup_vs", "device", "torch", "triton", "cuda", "commit", "date", "peak_gbps", "peak_tflops"}
    rows = _rows(out)
    assert rows
    for r in rows:
        assert keys <= set(r), keys - set(r)
        assert r["quick"] is True and r["iters"] >= 3
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["gbps"] == pytest.approx(r["model_bytes"] / (r["median_ms"] / 1e3) / 1e9)
        assert r["peak_gbps"] > 0 and r["frac_peak_bw"] == pytest.approx(r["gbps"] / r["peak_gbps"])
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
        if r["backend"] != "torch":
            ref = [x for x in rows if (x["op"], x["workload"], x["pass"], x["backend"]) ==
                   (r["op"], r["workload"], r["pass"], "torch")][0]
            assert r["speedup_vs"]["torch"] == pytest.approx(ref["median_ms"] / r["median_ms"])
    assert len({r["run_id"] for r in rows}) == 1


def test_report_from_bench_rows(quick_run, tmp_path):
    out, _ = quick_run
    results = tmp_path / "results"
    shutil.copytree(out, results)
    cli("report", "--results", str(results))
    md = (results / "REPORT.md").read_text()
    assert "composite" in md and "(quick)" in md
    assert list((results / "plots").glob("*.png"))


def test_profile_writes_a_chrome_trace(tmp_path):
    r = cli("profile", "composite:nerf", "--quick", "--out", str(tmp_path))
    traces = list(tmp_path.glob("*/composite-nerf-quick-*.json"))
    assert len(traces) == 1
    trace = json.loads(traces[0].read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert any(n and n.startswith("fast3d.composite[") for n in names)  # the op's named range
    assert "Self CPU" in r.stdout or "Self CUDA" in r.stdout


def test_profile_auto_is_what_the_registry_picks():
    """`auto` profiles the backend a user's call would get: never Triton's interpreter (which the
    test session enables), and a named backend that cannot run here is an error, not a crash."""
    from fast3d.bench import profile

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for spec, _w, name in profile.plan("lrm"):
        assert name != "triton" or device == "cuda", (spec.op, name)
        b = fast3d.backends.backends(spec.backend_op)[name]
        assert b.available() is None and device in b.devices
    if device == "cpu":
        r = cli("profile", "composite:nerf", "--quick", "--backend", "cuda", check=False)
        assert r.returncode == 2 and "backend 'cuda' cannot run composite on cpu" in r.stderr


def test_bench_list_names_every_workload():
    out = cli("bench", "--list").stdout
    assert "composite:lrm" in out and "composite:nerf" in out
