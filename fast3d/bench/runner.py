"""`fast3d bench`: every registered op x workload x backend x pass, timed, modelled, recorded.

Each row is one (op, workload, backend, pass) measured in this run; `speedup_vs` compares it with
the reference (`torch`) and the op's other baselines measured in the same run on the same inputs.
Rows are appended to `<out>/<device-slug>/<op>.jsonl`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
import uuid
from dataclasses import dataclass, field

import torch

from fast3d import backends
from fast3d.bench import environment as env
from fast3d.bench.spec import PASSES, BenchSpec
from fast3d.bench.timing import time_pass, upstream_grads
from fast3d.bench.workloads import specs
from fast3d.inference.common import default_device

REFERENCE = "torch"
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "profiling", "results")


def n_input_sets(set_bytes: int) -> int:
    """How many input sets to rotate among (at most 4, and ~1 GiB of inputs in total): sets of
    tens of MB are evicted from the last-level cache before their next use; a set larger than any
    cache needs no rotation. Four sets of a few MB can all stay cached (an H100's L2 is 50 MB):
    at those sizes launches, not bytes, set the time."""
    if set_bytes >= 256 * 2**20:
        return 1
    return max(1, min(4, (2**30) // max(set_bytes, 1)))


def _tensor_bytes(inputs: dict) -> int:
    return sum(x.numel() * x.element_size() for x in inputs.values() if isinstance(x, torch.Tensor))


@dataclass
class BenchConfig:
    ops: list = field(default_factory=list)         # empty: all
    workloads: list = field(default_factory=list)   # empty: all
    backends: list = field(default_factory=list)    # empty: all available, plus baselines
    passes: list = field(default_factory=lambda: list(PASSES))
    quick: bool = False
    out: str = DEFAULT_OUT
    seed: int = 0
    budget_s: float | None = None                    # per measurement; default 0.3 quick, 2.0 full


def validate(cfg: BenchConfig) -> None:
    """Unknown names raise ValueError listing the valid ones (the CLI turns it into exit code 2)."""
    all_specs = specs()
    for op in cfg.ops:
        if op not in all_specs:
            raise ValueError(f"unknown op {op!r}; valid: {', '.join(all_specs)}")
    chosen = [all_specs[o] for o in (cfg.ops or all_specs)]
    valid_w = sorted({w.name for s in chosen for w in s.workloads})
    for w in cfg.workloads:
        if w not in valid_w:
            raise ValueError(f"unknown workload {w!r}; valid: {', '.join(valid_w)}")
    valid_b = sorted(set(backends.BACKEND_NAMES) | {b for s in chosen for b in s.baselines})
    for b in cfg.backends:
        if b not in valid_b:
            raise ValueError(f"unknown backend {b!r}; valid: {', '.join(valid_b)}")
    for p in cfg.passes:
        if p not in PASSES:
            raise ValueError(f"unknown pass {p!r}; valid: {', '.join(PASSES)}")


def candidates(spec: BenchSpec, device: torch.device, wanted: list) -> list[tuple[str, str | None]]:
    """The op's backends and baselines, each with the reason it cannot run here.

    Args:
        spec: the op's benchmark spec.
        device: where it would run.
        wanted: backend names asked for (empty: all).

    Returns:
        ``(name, reason or None)`` pairs, backends by priority, then the baselines.
    """
    out = []
    for name, b in sorted(backends.backends(spec.backend_op).items(), key=lambda kv: kv[1].priority):
        reason = b.available()
        if reason is None and device.type not in b.devices:
            reason = f"runs on {list(b.devices)}, not {device.type}"
        if reason is None and name == "triton" and device.type == "cpu" and name not in wanted:
            reason = "Triton on the CPU runs in its interpreter, which is no timing (name --backend triton to run it)"
        out.append((name, reason))
    for name, available in spec.baselines.items():
        out.append((name, available(device)))
    return [(n, r) for n, r in out if not wanted or n in wanted]


def _log(msg: str) -> None:
    print(msg, flush=True)  # progress shows as it happens, also when piped to a file


def run(cfg: BenchConfig, log=_log) -> tuple[list[dict], int]:
    """Runs the benchmark; returns (rows, number of failed measurements)."""
    validate(cfg)
    t0 = time.monotonic()
    device = default_device()
    budget = cfg.budget_s if cfg.budget_s is not None else (0.3 if cfg.quick else 2.0)
    vers = env.versions()
    log(f"fast3d bench on {env.device_name(device)}; measuring peaks ...")
    peaks = env.measure_peaks(device)
    log(f"  peak bandwidth {peaks['peak_gbps']:.1f} GB/s, matmul {peaks['peak_tflops']:.2f} TFLOP/s "
        f"({peaks['peak_how']})")
    common = dict(device=env.device_name(device), device_slug=env.device_slug(device), **peaks,
                  torch=vers["torch"], triton=vers["triton"], cuda=vers["cuda_runtime"], commit=vers["commit"],
                  date=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                  run_id=uuid.uuid4().hex[:12])
    rows, failures = [], 0
    all_specs = specs()
    for op in (cfg.ops or all_specs):
        spec = all_specs[op]
        cands = candidates(spec, device, cfg.backends)
        runnable = [n for n, r in cands if r is None]
        for n, r in cands:
            if r is not None:
                log(f"  {op}: skipping backend {n}: {r}")
        if not runnable:
            log(f"  {op}: no backend can run on {device.type}; going on with the rest")
            continue
        for w in spec.workloads:
            if not cfg.workloads or w.name in cfg.workloads:
                new_rows, failed = _bench_workload(cfg, spec, w, runnable, device, budget, peaks, log)
                new_rows = [dict(r, **common) for r in new_rows]
                write_rows(new_rows, cfg.out)  # per workload: a killed run keeps what it measured
                rows += new_rows
                failures += failed
    if rows:
        log(format_table(rows))
        log(f"appended {len(rows)} rows under {os.path.join(cfg.out, common['device_slug'])}/ "
            f"(the run took {time.monotonic() - t0:.0f} s)")
    return rows, failures


def _bench_workload(cfg: BenchConfig, spec: BenchSpec, w, runnable: list, device: torch.device, budget: float,
                    peaks: dict, log) -> tuple[list[dict], int]:
    """Every runnable backend x pass on one workload, all on the same input sets; speed-ups
    against the baselines measured here."""
    params = w.quick if cfg.quick else w.params
    gen = torch.Generator().manual_seed(cfg.seed)
    try:
        first = spec.make_inputs(params, device, gen)
        sets = [first] + [spec.make_inputs(params, device, gen)
                          for _ in range(n_input_sets(_tensor_bytes(first)) - 1)]
    except Exception as e:  # a missing package, out of memory: report, count, go on with the next workload
        log(f"  {spec.op}/{w.name}: FAILED making the inputs: {type(e).__name__}: {e}")
        sets = None
    if sets is None:  # out of the except block, whose traceback held the partial inputs
        _release(device)
        return [], 1
    measured: dict[tuple[str, str], dict] = {}
    failures = 0
    for name in runnable:
        call = lambda x, name=name: spec.run(name, x)  # noqa: E731
        try:
            grads = [upstream_grads(call, s, gen) for s in sets]
        except ValueError as e:  # the registry says this backend cannot serve these inputs
            log(f"  {spec.op}/{w.name}: skipping backend {name}: {e}")
            continue
        except Exception as e:  # out of memory, a failing baseline: report, count, go on with the next backend
            failures += 1
            log(f"  {spec.op}/{w.name}/{name}: FAILED: {type(e).__name__}: {e}")
            grads = None
        if grads is None:
            _release(device)
            continue
        for p in [p for p in cfg.passes if p in spec.passes]:
            where = f"{spec.op}/{w.name}/{name}/{p}"
            try:
                t = time_pass(p, call, sets, grads, device, budget_s=budget, min_iters=3 if cfg.quick else 5)
            except Exception as e:  # report, count, go on with the other measurements
                failures += 1
                log(f"  {where}: FAILED: {type(e).__name__}: {e}")
                t = None
            if t is None:
                _release(device)
                continue
            noisy = (t.p80_ms - t.p20_ms) > 0.5 * t.median_ms
            log(f"  {where}: {t.median_ms:.3f} ms median of {t.iters}"
                + ("  (NOISY: p20-p80 spread over half the median; is the machine busy?)" if noisy else ""))
            nbytes, flops = spec.model(params, p)
            gbps, tflops = nbytes / t.median_ms / 1e6, flops / t.median_ms / 1e9
            measured[(name, p)] = dict(
                op=spec.op, workload=w.name, backend=name, **{"pass": p}, median_ms=t.median_ms, p20_ms=t.p20_ms,
                p80_ms=t.p80_ms, peak_mem_bytes=t.peak_mem_bytes, gbps=gbps, tflops=tflops,
                frac_peak_bw=gbps / peaks["peak_gbps"], frac_peak_flops=tflops / peaks["peak_tflops"],
                speedup_vs={}, params=params, quick=cfg.quick, iters=t.iters, model_bytes=nbytes,
                model_flops=flops)
    for (name, p), row in measured.items():
        for b in [REFERENCE, *spec.baselines]:
            if b != name and (b, p) in measured:
                row["speedup_vs"][b] = measured[(b, p)]["median_ms"] / row["median_ms"]
    return list(measured.values()), failures


def _release(device: torch.device) -> None:
    """After a failure (out of memory, say), give the allocator's cache back before going on; called
    outside the except block, whose traceback would keep the failed call's tensors alive."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def write_rows(rows: list[dict], out: str) -> None:
    by_file: dict[str, list[dict]] = {}
    for r in rows:
        by_file.setdefault(os.path.join(out, r["device_slug"], f"{r['op']}.jsonl"), []).append(r)
    for path, rs in by_file.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # One write per file of whole lines: an interrupted run never leaves half a row.
        with open(path, "a") as f:
            f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rs))


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: list[dict]) -> str:
    head = ["op", "workload", "backend", "pass", "median ms", "p20-p80 ms", "GB/s", "TFLOP/s", "%bw",
            "speedup", "peak MiB"]
    lines = []
    for r in rows:
        sp = ", ".join(f"{v:.2f}x vs {k}" for k, v in r["speedup_vs"].items()) or "-"
        lines.append([r["op"], r["workload"] + (" (quick)" if r["quick"] else ""), r["backend"], r["pass"],
                      _fmt(r["median_ms"], ".3f"), f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}", _fmt(r["gbps"], ".1f"),
                      _fmt(r["tflops"], ".3f"), _fmt(r["frac_peak_bw"] * 100, ".1f"), sp,
                      _fmt(None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20, ".1f")])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*l) for l in lines])
