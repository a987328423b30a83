"""The report ``fast3d eval`` writes: per-sample metrics, their means, and what was evaluated."""

from __future__ import annotations

import json
import os

from fast3d.io.atomic import atomic_open


def mean_metrics(rows: list[dict]) -> dict:
    """Each metric's mean over the rows that have it (a metric may be absent from some rows, e.g.
    geometry where a sample has no asset); ``key`` is the sample's name, not a metric."""
    keys = dict.fromkeys(k for r in rows for k in r if k != "key")
    return {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}


def write_report(out_json: str, rows: list[dict], model: str, data: str, **fields) -> dict:
    """Write and return the evaluation report.

    Args:
        out_json: the JSON file, written atomically (its directory is made).
        rows: one dict of metrics per sample, with its ``key``.
        model, data: the model and dataset evaluated (written as absolute paths).
        fields: what else the report records (held-out views, resolution, ...), in order.

    Returns:
        ``{"model", "data", "samples", **fields, "mean", "per_sample"}``.
    """
    report = {"model": os.path.abspath(model), "data": os.path.abspath(data), "samples": len(rows), **fields,
              "mean": mean_metrics(rows), "per_sample": rows}
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    with atomic_open(out_json) as f:
        json.dump(report, f, indent=1)
    return report
