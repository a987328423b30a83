"""The report ``fast3d eval`` writes, and what makes a long evaluation resumable.

* ``write_report``: one JSON (per-sample rows, their means, set-level metrics such as FID, the model,
  data, every metric's backbone and the git commit) and beside it a Markdown table laid out as the
  papers' tables are (one row per model, one column per metric with its direction).
* ``SampleLog``: per-sample rows appended to ``<report>.rows.jsonl`` as they are computed, so a
  killed run resumes where it stopped (a rerun with the same settings skips the samples it has;
  other settings or another model start afresh).
* ``Progress``: one line per sample on stderr (count, rate, time left).
* ``compare_reports``: two reports side by side with the differences (``fast3d eval --compare``).
* ``side_by_side`` / ``evaluate_side_by_side``: several models scored on one held-out set in ONE
  report (``fast3d eval --baseline``, ``fast3d boost demo``): each model's means, each one's
  difference to the first (the baseline) and on how many samples it is better, and optionally a
  paper's published numbers quoted beside them as a labelled reference row (``PAPER_NUMBERS``).
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

# Published results quoted beside a side-by-side report (``--paper NAME``): measured by the paper's
# authors on their benchmark with their models, never here. "mean" uses this module's metric names.
PAPER_NUMBERS = {
    "mvboost": {
        "label": "MVBoost (paper, GSO)",
        "note": "MVBoost's published single-image reconstruction results on Google Scanned Objects (its full-size "
                "Era3D + LGM, its renders, views and Chamfer/F-score convention): quoted for reference, not "
                "measured by this run and not comparable to tiny models on other data",
        "data": "Google Scanned Objects",
        "mean": {"psnr": 18.561, "ssim": 0.859, "lpips": 0.131, "chamfer": 0.1011, "fscore": 0.7977},
    },
}


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


def _values(report: dict) -> dict:
    return {k: v for k, v in {**report.get("mean", {}), **report.get("set_metrics", {})}.items()
            if k not in TABLE_HIDDEN}


def side_by_side(reports: list[tuple[str, dict]], paper: str | None = None) -> dict:
    """One report of several models on one held-out set: the first is the baseline.

    Args:
        reports: (name, report) pairs, each report as :func:`write_report` returns it; the names are
            the table's row labels and must differ.
        paper: a key of ``PAPER_NUMBERS`` whose published numbers are quoted as a labelled reference
            row, or None.

    Returns:
        ``{"kind": "side_by_side", "baseline", "data", "samples", "commit", "models": [{"name",
        "model", "kind", "samples", "mean", "backbones"}], "difference": {name: {metric: value -
        baseline's}}, "better_on": {name: {metric: [samples better, samples compared]}},
        "paper": {...} or None}``. A metric whose backbones differ between a model and the baseline
        has no difference (``None``).

    Raises:
        ValueError: fewer than two reports, repeated names, other data or other samples than the
            baseline's, or an unknown ``paper``.
    """
    if len(reports) < 2:
        raise ValueError(f"side by side needs at least two reports; got {len(reports)}")
    names = [n for n, _ in reports]
    if len(set(names)) != len(names):
        raise ValueError(f"the models' names must differ; got {names}")
    if paper is not None and paper not in PAPER_NUMBERS:
        raise ValueError(f"--paper must be one of {sorted(PAPER_NUMBERS)}; got {paper!r}")
    base_name, base = reports[0]
    keys = [r["key"] for r in base.get("per_sample", [])]
    for name, r in reports[1:]:
        if os.path.abspath(r["data"]) != os.path.abspath(base["data"]):
            raise ValueError(f"{name!r} was evaluated on {r['data']!r}, {base_name!r} on {base['data']!r}: side by "
                             f"side needs one held-out set")
        other = [s["key"] for s in r.get("per_sample", [])]
        if sorted(other) != sorted(keys):
            raise ValueError(f"{name!r} has {len(other)} samples, {base_name!r} {len(keys)}, not the same ones: side "
                             f"by side needs the same samples")
    bv, bb = _values(base), base.get("backbones", {})
    base_rows = {s["key"]: s for s in base.get("per_sample", [])}
    difference, better_on = {}, {}
    for name, r in reports[1:]:
        v, backs = _values(r), r.get("backbones", {})
        difference[name], better_on[name] = {}, {}
        for k in dict.fromkeys([*bv, *v]):
            if k not in bv or k not in v:
                continue
            same = bb.get(k) == backs.get(k)
            difference[name][k] = v[k] - bv[k] if same else None
            up = _label(k)[1]
            pairs = [(s[k], base_rows[s["key"]][k]) for s in r.get("per_sample", [])
                     if k in s and k in base_rows.get(s["key"], {})]
            if same and up is not None and pairs:  # paired per sample: on how many objects it is better
                better_on[name][k] = [sum(1 for x, y in pairs if (x > y if up else x < y)), len(pairs)]
    return {"kind": "side_by_side", "baseline": base_name, "data": os.path.abspath(base["data"]),
            "samples": base["samples"], "commit": git_commit(),
            "models": [{"name": n, "model": r["model"], "kind": r.get("kind"), "samples": r["samples"],
                        "mean": _values(r), "backbones": r.get("backbones", {})} for n, r in reports],
            "difference": difference, "better_on": better_on,
            "paper": dict(PAPER_NUMBERS[paper], key=paper) if paper else None}


def side_by_side_markdown(report: dict) -> str:
    """A :func:`side_by_side` report as one paper-style table: a row per model, a row per model's
    difference to the baseline (with on how many samples it is better), and the paper's row, labelled
    as the paper's, under the metrics it has (its other numbers listed below the table)."""
    models = report["models"]
    cols = list(dict.fromkeys(k for m in models for k in m["mean"]))
    head = ["Model", "Data"] + [f"{lab} {'↑' if up else '↓' if up is not None else ''}".strip()
                                for lab, up in map(_label, cols)]
    data = f"{os.path.basename(os.path.normpath(report['data']))} ({report['samples']})"
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        lines.append("| " + " | ".join([m["name"], data] + [_fmt(m["mean"][k]) if k in m["mean"] else "-"
                                                            for k in cols]) + " |")
    for m in models[1:]:
        d, won = report["difference"][m["name"]], report["better_on"][m["name"]]
        cells = []
        for k in cols:
            if d.get(k) is None:
                cells.append("-")
            else:
                cells.append(f"{d[k]:+.4g}" + (f" ({won[k][0]}/{won[k][1]} better)" if k in won else ""))
        lines.append("| " + " | ".join([f"{m['name']} − {report['baseline']}", ""] + cells) + " |")
    paper = report.get("paper")
    if paper:
        cells = [str(paper["mean"][k]) if k in paper["mean"] else "-" for k in cols]
        lines.append("| " + " | ".join([f"{paper['label']} †", paper["data"]] + cells) + " |")
    lines.append("")
    if paper:
        quoted = ", ".join(f"{_label(k)[0]} {v}" for k, v in paper["mean"].items())
        lines.append(f"- † {paper['label']}: {quoted}. {paper['note']}.")
        missing = [k for k in paper["mean"] if k not in cols]
        if missing:
            lines.append(f"- the paper's {', '.join(_label(k)[0] for k in missing)} has no column here: this run "
                         f"did not measure that metric (a stand-in backbone is reported under its own name)")
    for m in models:
        lines.append(f"- {m['name']}: `{m['model']}`" + (f" ({m['kind']})" if m.get("kind") else ""))
    lines.append(f"- data: `{report['data']}`, {report['samples']} samples; differences are each model's mean "
                 f"minus {report['baseline']}'s, \"better\" counted per sample by the metric's direction")
    for metric, backbone in models[0]["backbones"].items():
        lines.append(f"- {metric}: {backbone}")
    lines.append(f"- commit: {report.get('commit', 'unknown')}")
    return "\n".join(lines) + "\n"


def write_side_by_side(out_json: str, reports: list[tuple[str, dict]], paper: str | None = None) -> dict:
    """:func:`side_by_side` written to ``out_json`` (atomically) and its Markdown table beside it."""
    report = side_by_side(reports, paper)
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    with atomic_open(out_json) as f:
        json.dump(report, f, indent=1)
    with atomic_open(markdown_path(out_json)) as f:
        f.write(side_by_side_markdown(report))
    return report


def model_report_path(out_json: str, name: str) -> str:
    """Where :func:`evaluate_side_by_side` keeps model ``name``'s own report (and its resumable rows):
    ``<out>.<name>.json`` with the name reduced to letters, digits, '.', '-' and '_'."""
    slug = "".join(c if c.isalnum() or c in ".-_" else "_" for c in name).strip("._") or "model"
    return (out_json[:-5] if out_json.endswith(".json") else out_json) + f".{slug}.json"


def evaluate_side_by_side(evaluate, models: list[tuple[str, str]], out_json: str, paper: str | None = None) -> dict:
    """Score every model on one held-out set with the same settings and write one side-by-side report.

    Args:
        evaluate: ``evaluate(model_dir, out_json) -> report`` (e.g. ``fast3d.inference.lgm.evaluate``
            with the data and settings bound); each model's own report goes to
            :func:`model_report_path`, so a killed run resumes model by model, sample by sample.
        models: (name, model directory) pairs; the first is the baseline.
        out_json: the side-by-side report (JSON, and its Markdown table beside it).
        paper: a key of ``PAPER_NUMBERS`` quoted as a labelled reference row, or None.

    Returns:
        The :func:`side_by_side` report.
    """
    if paper is not None and paper not in PAPER_NUMBERS:  # before any model is scored
        raise ValueError(f"--paper must be one of {sorted(PAPER_NUMBERS)}; got {paper!r}")
    paths = [model_report_path(out_json, n) for n, _ in models]
    if len(set(paths)) != len(paths) or os.path.abspath(out_json) in map(os.path.abspath, paths):
        raise ValueError(f"the models' names {[n for n, _ in models]} must differ after reduction to file names")
    reports = [(name, evaluate(model_dir, path)) for (name, model_dir), path in zip(models, paths)]
    return write_side_by_side(out_json, reports, paper)
