"""Named ranges around every fast3d op: torch.profiler sees them in traces, and on CUDA they are
NVTX ranges too, so Nsight Systems and `ncu --nvtx-include "fast3d.<op>/"` can find the kernels."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def op_range(name: str, device: torch.device):
    label = f"fast3d.{name}"
    with torch.profiler.record_function(label):
        if device.type == "cuda":
            torch.cuda.nvtx.range_push(label)
            try:
                yield
            finally:
                torch.cuda.nvtx.range_pop()
        else:
            yield
