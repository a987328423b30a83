"""Timing and peak memory of one pass of one backend on a rotating list of input sets.

Passes, as a training step sees them:
* ``forward``: the op under ``torch.no_grad()`` (inference: what a serving path pays);
* ``backward``: the backward alone, after an untimed forward that built the graph;
* ``forward+backward``: both, as one training step's share of the op.

On CUDA the region is timed with CUDA events (no host synchronisation inside the loop); on the CPU
with ``time.perf_counter``. Inputs rotate among several sets so that caches do not flatter.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fast3d.bench.spec import PASSES


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    iters: int
    peak_mem_bytes: int | None


def float_outputs(outs) -> list[Tensor]:
    """The outputs of a workload call a backward pass flows from.

    Args:
        outs: what the call returned (a tuple of tensors and other values).

    Returns:
        Its floating-point tensors that require grad.
    """
    return [o for o in outs if isinstance(o, Tensor) and o.is_floating_point() and o.requires_grad]


def _leaves(inputs: dict) -> list[Tensor]:
    return [x for x in inputs.values() if isinstance(x, Tensor) and x.requires_grad]


def upstream_grads(run: Callable[[dict], tuple], inputs: dict, gen: torch.Generator) -> list[Tensor]:
    """Random upstream gradients for every differentiable output (fixed per input set), drawn on
    the output's device (a GPU workload's gradients may not fit in host memory)."""
    outs = float_outputs(run(inputs))
    grads = []
    for o in outs:
        g = torch.Generator(o.device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        grads.append(torch.randn(o.shape, generator=g, device=o.device, dtype=o.dtype))
    return grads


def _percentile(sorted_ms: list[float], q: float) -> float:
    k = (len(sorted_ms) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (k - lo)


def _step(pass_: str, run, inputs: dict, grads: list[Tensor], device):
    """One iteration; returns (start, end) markers around the timed region."""
    start = end = None
    if pass_ == "forward":
        with torch.no_grad():
            start = _mark(device)
            run(inputs)
            end = _mark(device)
    else:
        if pass_ == "forward+backward":
            start = _mark(device)
        outs = float_outputs(run(inputs))
        if pass_ == "backward":
            start = _mark(device)
        torch.autograd.backward(outs, grads)
        end = _mark(device)
        for x in _leaves(inputs):
            x.grad = None
    return start, end


def _mark(device: torch.device):
    if device.type == "cuda":
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e
    return time.perf_counter()


def _elapsed_ms(start, end, device) -> float:
    if device.type == "cuda":
        return start.elapsed_time(end)
    return (end - start) * 1e3


def time_pass(pass_: str, run: Callable[[dict], tuple], sets: list[dict], grads: list[list[Tensor]],
              device: torch.device, *, warmup: int = 2, min_iters: int = 5, max_iters: int = 200,
              budget_s: float = 2.0) -> Timing:
    """Median / p20 / p80 over at least `min_iters` iterations, more while under `budget_s`.

    An iteration that alone outlasts the budget (a full-size workload on the CPU) is warmed up
    once and measured 3 times: its run-to-run spread is small next to its length."""
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}; got {pass_!r}")
    for i in range(warmup):
        t0 = time.perf_counter()
        _step(pass_, run, sets[i % len(sets)], grads[i % len(sets)], device)
        _sync(device)
        if time.perf_counter() - t0 > budget_s:
            min_iters = min(min_iters, 3)
            break
    marks = []
    t_begin = time.perf_counter()
    i = 0
    while i < min_iters or (i < max_iters and time.perf_counter() - t_begin < budget_s):
        marks.append(_step(pass_, run, sets[i % len(sets)], grads[i % len(sets)], device))
        i += 1
        if device.type == "cuda" and i % 16 == 0:
            _sync(device)  # bound the queue so the time budget means something
    _sync(device)
    ms = sorted(_elapsed_ms(s, e, device) for s, e in marks)
    return Timing(median_ms=statistics.median(ms), p20_ms=_percentile(ms, 0.2), p80_ms=_percentile(ms, 0.8),
                  iters=len(ms), peak_mem_bytes=peak_memory(pass_, run, sets[0], grads[0], device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(pass_: str, run, inputs: dict, grads: list[Tensor], device: torch.device) -> int | None:
    """Peak bytes allocated by one iteration beyond what was allocated before it (inputs excluded).

    CUDA: the caching allocator's peak counter. CPU: the running sum of the allocations and frees
    that torch.profiler records (profile_memory=True), maximised over the iteration."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _step(pass_, run, inputs, grads, device)
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(pass_, run, inputs, grads, device)
    # Memory events in order: +bytes for an allocation, -bytes for a free.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    if not events:
        return None
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return int(peak)
