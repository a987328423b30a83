"""``fast3d report``: turn the benchmark rows under a results folder into REPORT.md plus PNG plots.

Rows live in ``<results>/<device-slug>/<op>.jsonl`` (one JSON object a line, appended run after
run). For every (device, op, workload, quick, backend, pass) only the latest row is shown, so
re-running a benchmark replaces its old numbers. Malformed lines are skipped and counted, never
fatal. The output depends only on the rows (no generation timestamp), so re-running does not churn
git.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PASS_ORDER = ("forward", "backward", "forward+backward")
REFERENCE = "torch"  # the baseline the speed-up plot prefers
PLOTS_DIR = "plots"


# ---------------------------------------------------------------------------------------------
# Row schema and loading
# ---------------------------------------------------------------------------------------------

def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_speedups(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and _is_num(x) for k, x in v.items())


_SCHEMA: dict[str, Callable[[Any], bool]] = {
    "op": _is_str, "workload": _is_str, "backend": _is_str,
    "pass": lambda v: v in PASS_ORDER,
    "median_ms": _is_num, "p20_ms": _is_num, "p80_ms": _is_num,
    "peak_mem_bytes": _opt(_is_int),
    "gbps": _opt(_is_num), "tflops": _opt(_is_num),
    "frac_peak_bw": _opt(_is_num), "frac_peak_flops": _opt(_is_num),
    "speedup_vs": _is_speedups,
    "device": _is_str, "device_slug": _is_str,
    "peak_gbps": _opt(_is_num), "peak_tflops": _opt(_is_num),
    "params": lambda v: isinstance(v, dict),
    "quick": lambda v: isinstance(v, bool),
    "iters": _is_int,
    "torch": _opt(_is_str), "triton": _opt(_is_str), "cuda": _opt(_is_str),
    "commit": _opt(_is_str), "date": _is_str, "run_id": _is_str,
}


@dataclass(frozen=True)
class _Row:
    d: dict     # the validated JSON object
    when: datetime  # parsed `date`, timezone-aware UTC
    seq: int    # global read order: among equal dates the later line wins


def _parse_date(s: str) -> datetime | None:
    try:
        # Python 3.10's fromisoformat does not take a trailing "Z".
        t = datetime.fromisoformat(s[:-1] + "+00:00" if s.endswith("Z") else s)
    except ValueError:
        return None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")  # NaN/Infinity are not valid JSON numbers


def _parse_line(line: str) -> tuple[dict, datetime] | None:
    try:
        d = json.loads(line, parse_constant=_reject_constant)
    except ValueError:
        return None
    if not isinstance(d, dict) or any(k not in d or not ok(d[k]) for k, ok in _SCHEMA.items()):
        return None
    when = _parse_date(d["date"])
    return None if when is None else (d, when)


def _load(results: Path) -> tuple[list[_Row], list[tuple[str, int, int]]]:
    """All valid rows, plus (file relative to results, rows read, lines skipped) per file."""
    rows: list[_Row] = []
    files: list[tuple[str, int, int]] = []
    if not results.is_dir():
        return rows, files
    for path in sorted(results.glob("*/*.jsonl")):
        good = bad = 0
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue  # blank lines (a trailing newline) are not errors
                parsed = _parse_line(line)
                if parsed is None:
                    bad += 1
                    continue
                rows.append(_Row(parsed[0], parsed[1], len(rows)))
                good += 1
        files.append((path.relative_to(results).as_posix(), good, bad))
    return rows, files


def _latest(rows: list[_Row]) -> dict[tuple[str, str], list[_Row]]:
    """(device_slug, op) -> the latest row per (workload, quick, backend, pass), sorted for display."""
    best: dict[tuple, _Row] = {}
    for r in rows:
        d = r.d
        key = (d["device_slug"], d["op"], d["workload"], d["quick"], d["backend"], d["pass"])
        old = best.get(key)
        if old is None or (r.when, r.seq) >= (old.when, old.seq):
            best[key] = r
    groups: dict[tuple[str, str], list[_Row]] = {}
    for key, r in best.items():
        groups.setdefault(key[:2], []).append(r)
    for g in groups.values():
        g.sort(key=lambda r: (r.d["workload"], r.d["quick"], PASS_ORDER.index(r.d["pass"]),
                              r.d["median_ms"], r.d["backend"]))
    return dict(sorted(groups.items()))


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------

def _fmt(v: float | None, sig: int = 4) -> str:
    """`sig` significant digits, never in exponent form; "-" for None."""
    if v is None:
        return "-"
    if v == 0:
        return "0"
    decimals = max(0, sig - 1 - math.floor(math.log10(abs(v))))
    return f"{v:.{decimals}f}"


def _pct(frac: float | None) -> str:
    return "-" if frac is None else _fmt(100.0 * frac, 3) + "%"


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _label(d: dict) -> str:
    return d["workload"] + (" (quick)" if d["quick"] else "")


def _uniq(values) -> list:
    return sorted({v for v in values if v is not None}, key=str)


def _safe(name: str) -> str:
    """A file-name-safe form of a slug or op name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "_"


_COLUMNS = ("Workload", "Pass", "Backend", "Median ms", "p20–p80 ms", "Speed-up", "GB/s",
            "TFLOP/s", "% peak BW", "% peak FLOP/s", "Peak mem (MiB)")


def _table(rows: list[_Row]) -> list[str]:
    out = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for r in rows:
        d = r.d
        speedups = ", ".join(f"{_fmt(x, 3)}x vs {b}" for b, x in sorted(d["speedup_vs"].items()))
        mem = None if d["peak_mem_bytes"] is None else d["peak_mem_bytes"] / 2**20
        cells = (_label(d), d["pass"], d["backend"], _fmt(d["median_ms"]),
                 f"{_fmt(d['p20_ms'])}–{_fmt(d['p80_ms'])}", speedups or "-", _fmt(d["gbps"]),
                 _fmt(d["tflops"]), _pct(d["frac_peak_bw"]), _pct(d["frac_peak_flops"]), _fmt(mem))
        out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return out


def _runs_line(rows: list[_Row]) -> str:
    """The runs the shown rows come from: run id, commit and date (range) of each."""
    runs: dict[str, list[_Row]] = {}
    for r in rows:
        runs.setdefault(r.d["run_id"], []).append(r)
    parts = []
    for run_id, rs in sorted(runs.items(), key=lambda kv: (min(r.when for r in kv[1]), kv[0])):
        dates = sorted({r.d["date"] for r in rs}, key=lambda s: _parse_date(s))
        when = dates[0] if len(dates) == 1 else f"{dates[0]} – {dates[-1]}"
        commits = ", ".join(f"`{c}`" for c in _uniq(r.d["commit"] for r in rs))
        parts.append(f"run `{run_id}` (commit {commits}, {when})")
    return "Rows shown come from: " + "; ".join(parts) + "."


def _device_lines(rows: list[_Row]) -> list[str]:
    def vals(key: str, unit: str = "") -> str:
        v = _uniq(r.d[key] for r in rows)
        # Peaks read better without trailing zeros ("989 TFLOP/s", not "989.0").
        text = [_fmt(x).rstrip("0").rstrip(".") if isinstance(x, float) and "." in _fmt(x)
                else (_fmt(x) if isinstance(x, float) else x) for x in v]
        return ", ".join(t + unit for t in text) or "-"

    dates = sorted({r.when for r in rows})
    date_of = {r.when: r.d["date"] for r in rows}
    span = date_of[dates[0]] if len(dates) == 1 else f"{date_of[dates[0]]} – {date_of[dates[-1]]}"
    return [
        f"- Measured peak: {vals('peak_gbps', ' GB/s')} memory bandwidth, "
        f"{vals('peak_tflops', ' TFLOP/s')} compute",
        f"- Versions: torch {vals('torch')}, triton {vals('triton')}, cuda {vals('cuda')}",
        f"- Commit(s): {', '.join(f'`{c}`' for c in _uniq(r.d['commit'] for r in rows))}",
        f"- Date(s): {span}",
    ]


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def _bars(ax, groups: list[str], series: dict[str, dict[str, float]], colors: dict[str, Any]) -> None:
    """Grouped bars: one group per entry of `groups`, one bar per series (missing values left out)."""
    n = max(1, len(series))
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g, key in enumerate(groups) if key in values]
        ys = [values[key] for key in groups if key in values]
        ax.bar(xs, ys, width, label=name, color=colors[name])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _reference(rows: list[_Row]) -> str | None:
    """"torch" where some row has a speed-up against it, else the most common baseline."""
    counts = Counter(b for r in rows for b in r.d["speedup_vs"])
    if not counts:
        return None
    if REFERENCE in counts:
        return REFERENCE
    return min(counts, key=lambda b: (-counts[b], b))


def _save(fig, path: Path) -> None:
    # No "Software" metadata: the PNG bytes then do not change with the matplotlib version.
    fig.savefig(path, dpi=100, metadata={"Software": None})


def _plots(rows: list[_Row], slug: str, op: str, plots: Path) -> list[tuple[str, Path]]:
    """Write this (device, op)'s plots; returns (caption, path) for each one written."""
    import matplotlib

    matplotlib.use("Agg")  # headless; set here so importing this module has no side effects
    import matplotlib.pyplot as plt

    backends = _uniq(r.d["backend"] for r in rows)
    cmap = plt.get_cmap("tab10")
    colors = {b: cmap(i % 10) for i, b in enumerate(backends)}
    groups: list[str] = []
    for r in rows:  # rows are already in display order
        g = f"{_label(r.d)}\n{r.d['pass']}"
        if g not in groups:
            groups.append(g)

    def series(value: Callable[[dict], float | None]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for r in rows:
            v = value(r.d)
            if v is not None:
                out.setdefault(r.d["backend"], {})[f"{_label(r.d)}\n{r.d['pass']}"] = v
        return dict(sorted(out.items()))

    written: list[tuple[str, Path]] = []
    stem = f"{_safe(slug)}__{_safe(op)}"

    ref = _reference(rows)
    speed = series(lambda d: d["speedup_vs"].get(ref)) if ref else {}
    if speed:
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) + 2), 4.5))
        _bars(ax, groups, speed, colors)
        ax.axhline(1.0, color="black", linewidth=0.8)
        vals = [v for s in speed.values() for v in s.values()]
        if min(vals) > 0 and max(vals) / min(vals) > 20:
            ax.set_yscale("log")
        ax.set_ylabel(f"speed-up vs {ref} (x)")
        ax.set_title(f"{op} on {slug}: speed-up vs {ref}")
        fig.tight_layout()
        path = plots / f"{stem}__speedup.png"
        _save(fig, path)
        plt.close(fig)
        written.append((f"speed-up vs {ref}", path))

    metrics = [(name, s) for name, s in (
        ("% of peak bandwidth", series(lambda d: None if d["frac_peak_bw"] is None else 100 * d["frac_peak_bw"])),
        ("% of peak FLOP/s", series(lambda d: None if d["frac_peak_flops"] is None else 100 * d["frac_peak_flops"])),
    ) if s]
    if metrics:
        fig, axes = plt.subplots(len(metrics), 1, squeeze=False,
                                 figsize=(max(6.0, 1.2 * len(groups) + 2), 3.5 * len(metrics) + 1))
        for ax, (name, s) in zip(axes[:, 0], metrics):
            _bars(ax, groups, s, colors)
            ax.set_ylabel(name)
        axes[0, 0].set_title(f"{op} on {slug}: achieved fraction of measured peak")
        fig.tight_layout()
        path = plots / f"{stem}__roofline.png"
        _save(fig, path)
        plt.close(fig)
        written.append(("achieved fraction of peak", path))
    return written


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def write_report(results_dir: str, out_md: str | None = None) -> str:
    """Write the markdown report (default ``<results_dir>/REPORT.md``) and its plots under
    ``<results_dir>/plots/``; returns the markdown's path."""
    results = Path(results_dir)
    md_path = Path(out_md) if out_md is not None else results / "REPORT.md"
    md_dir = md_path.parent.resolve()
    rows, files = _load(results)
    groups = _latest(rows)

    lines = ["# fast3d benchmark report", "",
             "Generated by `fast3d report` from the benchmark rows under the results folder; "
             "each row shown is the latest run of its (workload, backend, pass).", ""]
    if not groups:
        lines += ["No results: no valid benchmark rows were found.", ""]

    by_device: dict[str, dict[str, list[_Row]]] = {}
    for (slug, op), rs in groups.items():
        by_device.setdefault(slug, {})[op] = rs
    if groups:
        (results / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    for slug, ops in by_device.items():
        every = [r for rs in ops.values() for r in rs]
        names = ", ".join(_uniq(r.d["device"] for r in every))
        lines += [f"## {names} (`{slug}`)", ""] + _device_lines(every) + [""]
        for op, rs in ops.items():
            lines += [f"### {op}", "", _runs_line(rs), ""] + _table(rs) + [""]
            for caption, path in _plots(rs, slug, op, results / PLOTS_DIR):
                rel = Path(os.path.relpath(path.resolve(), md_dir)).as_posix()
                lines += [f"![{op} on {slug}: {caption}]({rel})", ""]

    if files:
        lines += ["## Input files", "", "| File | Rows read | Malformed lines skipped |",
                  "|---|---|---|"]
        lines += [f"| `{name}` | {good} | {bad} |" for name, good, bad in files]
        lines.append("")

    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines), encoding="utf-8")
    return str(md_path)
