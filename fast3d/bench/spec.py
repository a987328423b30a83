"""How an op registers itself with the benchmark harness.

This module is the vocabulary the ops (layer 1) register into, so it imports nothing of fast3d;
fast3d.bench.workloads loads every workload when the bench runs.

An op gives its named workloads (shapes from real models), a way to build one input set, a way to
run one backend on it, and its byte/flop model: the fewest bytes each pass must move through memory
and the flops it must do (the physical floor that achieved GB/s and TFLOP/s are measured against).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

PASSES = ("forward", "backward", "forward+backward")


@dataclass(frozen=True)
class Workload:
    name: str
    params: dict      # the real shape
    quick: dict       # the shape `--quick` uses: the whole CPU run stays under a minute
    source: str       # the model or paper the shape comes from


@dataclass
class BenchSpec:
    op: str
    workloads: list
    # (params, device, generator) -> dict of inputs; float tensors that take gradients have
    # requires_grad set.
    make_inputs: Callable[[dict, torch.device, torch.Generator], dict]
    # (backend, inputs) -> tuple of output tensors; backend is a registry name or a baseline name.
    run: Callable[[str, dict], tuple]
    # (params, pass) -> (bytes, flops) for one call of that pass.
    model: Callable[[dict, str], tuple]
    # Extra implementations to time beside the registry's backends (a peer library, torch.compile
    # of the reference): name -> (available() -> reason or None).
    baselines: dict = field(default_factory=dict)
    # The passes the op has: ("forward",) for work with no backward (data generation).
    passes: tuple = PASSES
    # A model-level workload (a training step, data generation) is no op of the registry: it runs
    # on the backends of its hot kernel's op, named here; backend X runs the step with that op on X.
    kernel_op: str = ""

    @property
    def backend_op(self) -> str:
        """The registry op whose backends this workload is timed on."""
        return self.kernel_op or self.op

    def workload(self, name: str) -> Workload:
        for w in self.workloads:
            if w.name == name:
                return w
        raise ValueError(f"{self.op}: unknown workload {name!r}; valid: {', '.join(w.name for w in self.workloads)}")


_SPECS: dict[str, BenchSpec] = {}


def register_bench(spec: BenchSpec) -> BenchSpec:
    _SPECS[spec.op] = spec
    return spec


def registered() -> dict[str, BenchSpec]:
    """The specs registered so far, by op name, sorted. fast3d.bench.workloads.specs() registers
    them all first."""
    return dict(sorted(_SPECS.items()))
