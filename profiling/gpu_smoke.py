"""A small case of every GPU kernel of fast3d, forward and backward: what gpu_session.sh's memcheck
stage runs under ``compute-sanitizer --tool memcheck``.

For every op of the registry and every backend of it that runs on CUDA (the CUDA kernels and the
Triton ones; not the PyTorch reference), each of the op's benchmark workloads at its ``--quick``
shape: make the inputs on the GPU, run the forward, backpropagate random upstream gradients
through every differentiable output, synchronize. Model-level workloads are left out (their
kernels are these). Prints one line a case and exits 1 if any case raised, 2 without a GPU.

    python3 profiling/gpu_smoke.py [--ops rasterization composite ...] [--seed 0] [--list]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from fast3d import backends
from fast3d.bench.workloads import specs


def cases(ops: list[str]) -> list[tuple[str, str, str]]:
    """(op, backend, workload) of every GPU backend of the op-level specs (all of them if ``ops`` is empty).

    Args:
        ops: op names to keep; empty for all.
    Returns:
        The cases, in registry order.
    """
    out = []
    for op, spec in specs().items():
        if spec.kernel_op or (ops and op not in ops):
            continue
        for name, b in backends.backends(op).items():
            if "cuda" in b.devices and name != "torch":   # fast3d's kernels, not the PyTorch reference
                out += [(op, name, w.name) for w in spec.workloads]
    return out


def run_case(op: str, backend: str, workload: str, gen: torch.Generator) -> str:
    """Forward and backward of one case on the current CUDA device; returns what it ran."""
    spec = specs()[op]
    x = spec.make_inputs(spec.workload(workload).quick, torch.device("cuda"), gen)
    outs = [o for o in spec.run(backend, x) if isinstance(o, torch.Tensor) and o.requires_grad]
    if outs and "backward" in spec.passes:
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
    torch.cuda.synchronize()
    return f"forward{' + backward of ' + str(len(outs)) + ' output(s)' if outs else ''}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="*", default=[], help="ops to run (default: all with a GPU backend)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true", help="list the cases and exit (no GPU needed)")
    a = ap.parse_args()
    if a.list:
        for c in cases(a.ops):
            print("/".join(c))
        return 0
    if not torch.cuda.is_available():
        print("gpu_smoke.py: no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    torch.manual_seed(a.seed)   # the upstream gradients
    gen = torch.Generator().manual_seed(a.seed)
    failed = 0
    todo = cases(a.ops)
    for op, backend, workload in todo:
        reason = backends.backends(op)[backend].available()
        if reason:
            print(f"SKIP {op}/{backend}/{workload}: {reason}", flush=True)
            continue
        t0 = time.monotonic()
        try:
            what = run_case(op, backend, workload, gen)
            print(f"ok   {op}/{backend}/{workload}: {what} ({time.monotonic() - t0:.1f} s)", flush=True)
        except Exception as e:  # report every failing case, not just the first
            failed += 1
            print(f"FAIL {op}/{backend}/{workload}: {type(e).__name__}: {e}", flush=True)
    print(f"gpu_smoke: {len(todo) - failed} of {len(todo)} cases ran, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
