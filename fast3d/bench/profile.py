"""`fast3d profile WORKLOAD`: a torch.profiler trace (Chrome/Perfetto JSON) of forward+backward
of each op that defines the workload, the top kernels by self time, and the ncu command line for
the top kernel. Ops run inside `fast3d.<op>[<backend>]` ranges (record_function, NVTX on CUDA)."""

from __future__ import annotations

import os

import torch
from torch.profiler import ProfilerActivity, profile

from fast3d import backends
from fast3d.bench import environment as env
from fast3d.bench.runner import DEFAULT_OUT
from fast3d.bench.timing import float_outputs, upstream_grads
from fast3d.bench.workloads import specs
from fast3d.inference.common import default_device

DEFAULT_TRACES = os.path.join(os.path.dirname(DEFAULT_OUT), "traces")


def targets(workload: str, op: str | None) -> list:
    """The (spec, workload) pairs a WORKLOAD name (or OP:WORKLOAD) names; ValueError if none."""
    if ":" in workload and op is None:
        op, workload = workload.split(":", 1)
    all_specs = specs()
    if op is not None and op not in all_specs:
        raise ValueError(f"unknown op {op!r}; valid: {', '.join(all_specs)}")
    found = [(s, w) for s in all_specs.values() if op in (None, s.op) for w in s.workloads if w.name == workload]
    if not found:
        valid = sorted({f"{s.op}:{w.name}" for s in all_specs.values() for w in s.workloads})
        raise ValueError(f"unknown workload {workload!r}; valid: {', '.join(valid)}")
    return found


def plan(workload: str, op: str | None = None, backend: str = "auto", log=None) -> list[tuple]:
    """(spec, workload, backend name) for each op that defines WORKLOAD, on this machine's device.
    ``auto`` is the backend the registry would pick (Triton's interpreter only when named); a named
    backend or baseline must be able to run here; ops of the workload that do not have it are
    skipped (and logged). ValueError (the CLI's exit code 2) otherwise."""
    from fast3d.bench.runner import candidates

    device = default_device()
    found = targets(workload, op)
    out, skipped = [], []

    def valid_anywhere(this_op: str) -> set:  # a backend another op of the workload has: skip, not fail
        return {n for s, _ in found if s.op != this_op for n, _ in candidates(s, device, [])}

    for spec, w in found:
        cands = dict(candidates(spec, device, [] if backend == "auto" else [backend]))
        if backend == "auto":
            order = sorted(backends.backends(spec.backend_op).values(), key=lambda b: -b.priority)
            runnable = [b.name for b in order if cands.get(b.name, "absent") is None]
            if not runnable:
                why = "; ".join(f"{n}: {r}" for n, r in cands.items())
                raise ValueError(f"no backend of {spec.op} can run on {device.type} ({why})")
            out.append((spec, w, runnable[0]))
        elif backend not in cands:
            valid = sorted(n for n, _ in candidates(spec, device, []))
            if backend in valid_anywhere(spec.op):
                skipped.append(f"{spec.op} has no {backend!r} backend (valid: {', '.join(valid)})")
                continue
            raise ValueError(f"unknown backend {backend!r} for {spec.op}; valid: {', '.join(valid)}")
        elif cands[backend] is not None:
            raise ValueError(f"backend {backend!r} cannot run {spec.op} on {device.type}: {cands[backend]}")
        else:
            out.append((spec, w, backend))
    if not out:
        raise ValueError("; ".join(skipped))
    for s in skipped if log else ():
        log(f"skipping {s}")
    return out


def profile_workload(workload: str, op: str | None = None, backend: str = "auto", quick: bool = False,
                     out: str = DEFAULT_TRACES, iters: int = 3, top: int = 10, log=print) -> list[str]:
    device = default_device()
    paths = []
    for spec, w, name in plan(workload, op, backend, log=log):
        params = w.quick if quick else w.params
        gen = torch.Generator().manual_seed(0)
        x = spec.make_inputs(params, device, gen)
        call = lambda inp, name=name: spec.run(name, inp)  # noqa: E731
        grads = upstream_grads(call, x, gen)  # also the warm-up

        def step():
            torch.autograd.backward(float_outputs(call(x)), grads)
            for t in x.values():
                if isinstance(t, torch.Tensor):
                    t.grad = None

        step()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts, record_shapes=True) as prof:
            for _ in range(iters):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        folder = os.path.join(out, env.device_slug(device))
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{spec.op}-{w.name}{'-quick' if quick else ''}-{name}.json")
        prof.export_chrome_trace(path)
        paths.append(path)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        log(f"== {spec.op} / {w.name}{' (quick)' if quick else ''} / {name}: {iters} x forward+backward ==")
        log(prof.key_averages().table(sort_by=key, row_limit=top))
        log(f"trace: {path}  (open in chrome://tracing or ui.perfetto.dev)")
        if device.type == "cuda":
            kernels = sorted((e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA),
                             key=lambda e: -e.self_device_time_total)
            if kernels:
                log(f'ncu: ncu --nvtx --nvtx-include "fast3d.{spec.op}[{name}]/" --set full -k "regex:{kernels[0].key[:40]}" '
                    f"-c 1 fast3d bench {spec.op} --workload {w.name} --backend {name} --pass forward+backward")
    return paths
