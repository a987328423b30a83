"""Run metrics: ``OUT/metrics.jsonl`` (one JSON object per logging step) and TensorBoard
(``OUT/tensorboard``). Written by rank 0. A resumed run first drops the lines after its
checkpoint's step, so the file holds one curve, as if the run had never stopped."""

from __future__ import annotations

import json
import math
import os

from fast3d.io.atomic import atomic_open


class MetricsWriter:
    def __init__(self, out: str, resume_step: int | None, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(out, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        os.makedirs(out, exist_ok=True)
        if resume_step is None:
            open(self.path, "w").close()
        elif os.path.exists(self.path):
            kept = [ln for ln in open(self.path) if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            with atomic_open(self.path) as f:
                f.writelines(kept)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out, "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)
        except ImportError:  # tensorboard is in the [train] extra; the JSONL log does not need it
            self.tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(out: str) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(ln) for ln in open(path) if ln.strip()] if os.path.exists(path) else []
