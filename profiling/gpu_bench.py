"""The headline benchmarks of a GPU session (gpu_session.sh's bench stage), sized for one command.

Runs ``fast3d bench``'s runner on the workloads the GPU validation run reports (full sizes; the
forward and forward+backward passes; every available fast3d backend beside the PyTorch reference and the peers measured in the
same run: gsplat for rasterization, SDPA's flash / efficient / cudnn / math backends and xformers
for multi-view attention), with a shorter time budget per measurement than ``fast3d bench``'s 2 s,
then prints a compact table: per (op, workload, pass) the fastest fast3d backend, the fastest peer
and the reference, and the speed-up against each.

    python3 profiling/gpu_bench.py --out DIR [--budget 0.5] [--ops ...] [--workloads ...] [--passes ...]
                                   [--summary FILE] [--quick]

Rows go to DIR/<device-slug>/<op>.jsonl, as ``fast3d bench --out DIR`` writes them, one op at a
time; stopped by SIGTERM (gpu_session.sh's time limit), it still prints the table of the rows it
has, and exits 1.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from fast3d.bench import runner
from fast3d.bench.workloads import specs

# op -> the workloads the validation run reports (issue 14: lgm, scene, lrm, mvdream/era3d/pixart-mv, composite)
# (in the order they run: a run cut short by its time limit keeps the first ones)
HEADLINE = {
    "rasterization": ["lgm", "scene"],
    "multiview_attention": ["mvdream", "mvdream-halfmask", "era3d", "pixart-mv"],
    "composite": ["lrm"],
    "render_triplane": ["lrm"],
    "triplane_sample": ["lrm"],
}
# forward (inference) and forward+backward (training); backward alone is left to `fast3d bench`
PASSES = ["forward", "forward+backward"]


class Stopped(BaseException):
    """SIGTERM during the run; a BaseException so that the runner's per-measurement ``except
    Exception`` (which counts a failure and goes on) lets it through."""


def summary(rows: list[dict]) -> list[str]:
    """The compact table: one line per (op, workload, pass) with the fastest fast3d backend, the
    fastest peer (a baseline of the op's spec) and the reference (``torch``), with speed-ups.

    Args:
        rows: the runner's rows of one run.
    Returns:
        The table's lines (header first).
    """
    all_specs = specs()
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["workload"], r["pass"]), {})[r["backend"]] = r["median_ms"]

    def best(times: dict[str, float], names) -> tuple[str, float] | None:
        got = [(times[n], n) for n in names if n in times]
        return (min(got)[1], min(got)[0]) if got else None

    lines = [f"{'op/workload':<38} {'pass':<16} {'fast3d (ms)':<22} {'best peer (ms)':<26} {'torch (ms)':<11} speed-up"]
    for (op, workload, pass_), times in groups.items():
        peers = set(all_specs[op].baselines)
        ours = best(times, [n for n in times if n not in peers and n != runner.REFERENCE])
        peer = best(times, peers)
        ref = times.get(runner.REFERENCE)
        speed = []
        if ours and peer:
            speed.append(f"{peer[1] / ours[1]:.2f}x vs {peer[0]}")
        if ours and ref:
            speed.append(f"{ref / ours[1]:.2f}x vs torch")
        lines.append(f"{op + '/' + workload:<38} {pass_:<16} "
                     f"{(f'{ours[0]} {ours[1]:.3f}' if ours else '-'):<22} "
                     f"{(f'{peer[0]} {peer[1]:.3f}' if peer else '-'):<26} "
                     f"{(f'{ref:.3f}' if ref is not None else '-'):<11} {', '.join(speed) or '-'}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="results folder")
    ap.add_argument("--budget", type=float, default=0.5, help="seconds of timing per measurement")
    ap.add_argument("--ops", nargs="*", default=list(HEADLINE), help="ops (default: the headline ones)")
    ap.add_argument("--workloads", nargs="*", default=None, help="workload names (default: the headline ones)")
    ap.add_argument("--summary", default=None, help="also write the compact table to this file")
    ap.add_argument("--quick", action="store_true", help="the --quick shapes (a CPU rehearsal of the plan)")
    ap.add_argument("--passes", nargs="*", default=PASSES, help=f"passes (default: {' '.join(PASSES)})")
    a = ap.parse_args()
    if a.budget <= 0:
        print(f"gpu_bench.py: --budget must be > 0 seconds; got {a.budget}", file=sys.stderr)
        return 2
    cfgs = [runner.BenchConfig(ops=[op], workloads=a.workloads if a.workloads is not None else HEADLINE.get(op, []),
                               passes=a.passes, out=a.out, budget_s=a.budget, quick=a.quick) for op in a.ops]
    try:
        for cfg in cfgs:
            runner.validate(cfg)
    except ValueError as e:
        print(f"gpu_bench.py: {e}", file=sys.stderr)
        return 2

    def stop(signum, frame):   # `timeout` ends the run: still print the table of what was measured
        raise Stopped(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    t0 = time.monotonic()
    rows, failures, note = [], 0, ""
    try:
        for cfg in cfgs:   # one op at a time, so a cut-short run keeps the ops it finished
            new_rows, failed = runner.run(cfg)
            rows += new_rows
            failures += failed
    except Stopped as e:
        note, failures = f" ({e}: the table holds the ops finished before it)", failures + 1
    lines = summary(rows) + [f"{len(rows)} rows, {failures} failed measurement(s), "
                             f"{time.monotonic() - t0:.0f} s{note}"]
    if a.summary:
        with open(a.summary, "a") as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
