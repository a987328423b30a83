"""The report ``fast3d eval`` writes, and what makes a long evaluation resumable.

* ``write_report``: one JSON (per-sample rows, their means, set-level metrics such as FID, the model,
  data, every metric's backbone and the git commit) and beside it a Markdown table laid out as the
  papers' tables are (one row per model, one column per metric with its direction).
* ``SampleLog``: per-sample rows appended to ``<report>.rows.jsonl`` as they are computed, so a
  killed run resumes where it stopped (a rerun with the same settings skips the samples it has;
  other settings or another model start afresh).
* ``Progress``: one line per sample on stderr (count, rate, time left).
* ``compare_reports``: two reports side by side with the differences (``fast3d eval --compare``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time

from fast3d.io.atomic import atomic_open

# name in the papers' tables, and whether larger is better; a metric "name:backbone" takes its base's entry
METRICS = {
    "psnr": ("PSNR", True), "ssim": ("SSIM", True), "ms_ssim": ("MS-SSIM", True), "lpips": ("LPIPS", False),
    "lpips_random": ("LPIPS (random VGG)", False), "chamfer": ("CD", False), "fscore": ("F-Score", True),
    "clip_r": ("CLIP-R@1", True), "clip_text": ("CLIP text sim.", True), "clip_image": ("CLIP image sim.", True),
    "fid": ("FID", False),
}
TABLE_HIDDEN = ("precision", "recall")  # in the JSON rows, not in the paper-style table


def mean_metrics(rows: list[dict]) -> dict:
    """Each metric's mean over the rows that have it (a metric may be absent from some rows, e.g.
    geometry where a sample has no asset); ``key`` and other non-numbers (a prompt, file names)
    are not metrics."""
    keys = dict.fromkeys(k for r in rows for k, v in r.items()
                         if k != "key" and isinstance(v, (int, float)) and not isinstance(v, bool))
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


def git_commit() -> str:
    """The commit of the fast3d source tree (``-dirty`` with uncommitted changes), or "unknown"."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        r = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty", "--abbrev=12"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"


def _label(metric: str) -> tuple[str, bool | None]:
    base, _, backbone = metric.partition(":")
    name, higher = METRICS.get(base, (base, None))
    return (f"{name} ({backbone})" if backbone else name), higher


def _fmt(v) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.2f}" if abs(v) >= 10 else f"{v:.4f}"


def markdown_table(report: dict) -> str:
    """The report as the papers lay out their tables: a row for the model, a column per metric
    (with its arrow), then the data, backbones and commit."""
    values = {**report.get("mean", {}), **report.get("set_metrics", {})}
    cols = [k for k in values if k not in TABLE_HIDDEN]
    head = ["Model", "Data"] + [f"{lab} {'↑' if up else '↓' if up is not None else ''}".strip()
                                for lab, up in map(_label, cols)]
    model = os.path.basename(os.path.normpath(report["model"])) or report["model"]
    data = f"{os.path.basename(os.path.normpath(report['data']))} ({report['samples']})"
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| " + " | ".join([model, data] + [_fmt(values[k]) for k in cols]) + " |", ""]
    lines.append(f"- model: `{report['model']}`" + (f" ({report['kind']})" if "kind" in report else ""))
    lines.append(f"- data: `{report['data']}`, {report['samples']} samples")
    for metric, backbone in report.get("backbones", {}).items():
        lines.append(f"- {metric}: {backbone}")
    if report.get("skipped"):
        lines.append(f"- skipped: {len(report['skipped'])} unreadable inputs (listed in the JSON)")
    lines.append(f"- commit: {report.get('commit', 'unknown')}")
    return "\n".join(lines) + "\n"


def write_report(out_json: str, rows: list[dict], model: str, data: str, backbones: dict | None = None,
                 set_metrics: dict | None = None, **fields) -> dict:
    """Write and return the evaluation report, and its Markdown table beside it (``.md``).

    Args:
        out_json: the JSON file, written atomically (its directory is made).
        rows: one dict of metrics per sample, with its ``key``.
        model, data: the model and dataset evaluated (written as absolute paths).
        backbones: {metric: backbone name} for every metric that has one (``lpips``: ``lpips-vgg``).
        set_metrics: metrics of the whole set rather than of a sample (FID).
        fields: what else the report records (held-out views, resolution, ...), in order.

    Returns:
        ``{"model", "data", "samples", "commit", **fields, "backbones", "set_metrics", "mean",
        "per_sample"}``.
    """
    report = {"model": os.path.abspath(model), "data": os.path.abspath(data), "samples": len(rows),
              "commit": git_commit(), **fields, "backbones": dict(backbones or {}),
              "set_metrics": dict(set_metrics or {}), "mean": mean_metrics(rows), "per_sample": rows}
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    with atomic_open(out_json) as f:
        json.dump(report, f, indent=1)
    with atomic_open(markdown_path(out_json)) as f:
        f.write(markdown_table(report))
    return report


def markdown_path(out_json: str) -> str:
    return (out_json[:-5] if out_json.endswith(".json") else out_json) + ".md"


def fingerprint(path: str) -> str:
    """A digest of the names, sizes and modification times of the files of ``path`` (a file, or a
    directory and its subdirectories): a rerun against changed weights does not resume."""
    items = []
    if os.path.isfile(path):
        st = os.stat(path)
        items.append((os.path.basename(path), st.st_size, st.st_mtime_ns))
    else:
        for dirpath, _, names in os.walk(path):
            for n in sorted(names):
                st = os.stat(os.path.join(dirpath, n))
                items.append((os.path.relpath(os.path.join(dirpath, n), path), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(sorted(items)).encode()).hexdigest()[:16]


class SampleLog:
    """Per-sample rows of a run, appended to ``<out_json>.rows.jsonl`` as they are computed.

    The file's first line is the run's ``settings``; a rerun with equal settings keeps the rows
    already there (a line cut short by a kill is dropped) and ``done(key)`` says which samples to
    skip; different settings start a new file.
    """

    def __init__(self, out_json: str, settings: dict):
        self.path = out_json + ".rows.jsonl"
        self.rows: list[dict] = []
        header = json.dumps({"settings": settings}, sort_keys=True)
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8", errors="replace") as f:
                lines = f.read().split("\n")
            if lines and lines[0] == header:
                for ln in lines[1:]:
                    try:
                        row = json.loads(ln)
                    except ValueError:
                        continue  # the line a kill cut short
                    if isinstance(row, dict) and isinstance(row.get("key"), str):
                        self.rows.append(row)
        self.resumed = len(self.rows)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with atomic_open(self.path) as f:  # the header and the whole rows only
            f.write("".join([header + "\n"] + [json.dumps(r) + "\n" for r in self.rows]))
        self._keys = {r["key"] for r in self.rows}

    def done(self, key: str) -> bool:
        return key in self._keys

    def add(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)
        self._keys.add(row["key"])


class Progress:
    """``fast3d eval: [i/N] key: metrics (rate, time left)`` on stderr, one line a sample."""

    def __init__(self, total: int | None, resumed: int = 0, stream=None):
        self.total, self.resumed, self.n = total, resumed, 0
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        if resumed:
            print(f"fast3d eval: resuming: {resumed} samples already done", file=self.stream, flush=True)

    def step(self, key: str, row: dict) -> None:
        self.n += 1
        dt = (time.perf_counter() - self.t0) / self.n
        done = self.resumed + self.n
        of = f"{done}/{self.total}" if self.total else f"{done}"
        left = f", {dt * (self.total - done):.0f} s left" if self.total else ""
        shown = ", ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k not in TABLE_HIDDEN
                          and isinstance(v, (int, float)) and not isinstance(v, bool))
        print(f"fast3d eval: [{of}] {key}: {shown} ({dt:.2f} s/sample{left})", file=self.stream, flush=True)


def compare_reports(a: dict, b: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """Two reports side by side: each metric's value in A and B, B - A, and which is better by the
    metric's direction; metrics measured with different backbones are flagged, not compared."""
    va = {**a.get("mean", {}), **a.get("set_metrics", {})}
    vb = {**b.get("mean", {}), **b.get("set_metrics", {})}
    keys = list(dict.fromkeys([*va, *vb]))
    rows = [("metric", names[0], names[1], "B - A", "")]
    for k in keys:
        lab, up = _label(k)
        x, y = va.get(k), vb.get(k)
        ba, bb = a.get("backbones", {}).get(k), b.get("backbones", {}).get(k)
        if x is None or y is None:
            rows.append((lab, _fmt(x) if x is not None else "-", _fmt(y) if y is not None else "-", "", ""))
            continue
        if ba != bb:
            rows.append((lab, _fmt(x), _fmt(y), "", f"backbones differ: {ba} vs {bb}"))
            continue
        d = y - x
        verdict = "" if d == 0 or up is None else ("B better" if (d > 0) == up else "A better")
        rows.append((lab, _fmt(x), _fmt(y), f"{d:+.4g}", verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    out = [f"A: {a.get('model')} on {a.get('data')} ({a.get('samples')} samples, commit {a.get('commit', 'unknown')})",
           f"B: {b.get('model')} on {b.get('data')} ({b.get('samples')} samples, commit {b.get('commit', 'unknown')})", ""]
    for r in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(out) + "\n"
