"""Benchmark workloads and the byte/flop model of composite."""

from __future__ import annotations

import torch

from fast3d.bench.spec import BenchSpec, Workload, register_bench
from fast3d.ops.composite import reference
from fast3d.ops.composite.api import composite

WORKLOADS = [
    Workload("lrm", dict(rays=16 * 4 * 128 * 128, samples=128, channels=3),
             quick=dict(rays=8192, samples=128, channels=3),
             source="LRM/OpenLRM renderer: batch 16 x 4 views x 128x128 rays, 64 stratified + 64 importance "
                    "samples, RGB (docs/design.md#named-workloads `lrm`)"),
    Workload("nerf", dict(rays=4096, samples=192, channels=3),
             quick=dict(rays=1024, samples=192, channels=3),
             source="NeRF training step: 4096 rays, 64 coarse + 128 fine samples, RGB"),
]


def make_inputs(p: dict, device: torch.device, gen: torch.Generator) -> dict:
    R, S, D = p["rays"], p["samples"], p["channels"]

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device="cpu").to(device)

    near, far = 0.5, 2.5
    edges = torch.linspace(near, far, S + 1, device=device)
    jitter = (rand(R, S) - 0.5) * (far - near) / S * 0.5          # stratified-like, still sorted
    t_starts = (edges[:-1] + jitter).contiguous()                  # [R, S]
    t_ends = torch.cat([t_starts[:, 1:], torch.full((R, 1), far, device=device)], 1).contiguous()
    # Per-ray density scale: some rays empty, some opaque early (exercises early termination).
    scale = rand(R, 1) * 40.0
    sigmas = (rand(R, S) * scale).requires_grad_()               # [R, S]
    rgbs = rand(R, S, D).requires_grad_()                          # [R, S, D]
    background = rand(D).requires_grad_()                          # [D]
    return dict(sigmas=sigmas, rgbs=rgbs, t_starts=t_starts, t_ends=t_ends, background=background)


_compiled = None


def run(backend: str, x: dict) -> tuple:
    args = (x["sigmas"], x["rgbs"], x["t_starts"], x["t_ends"], x["background"])
    if backend == "torch.compile":
        global _compiled
        if _compiled is None:
            _compiled = torch.compile(reference.composite, dynamic=False)
        return _compiled(*args, 1e-4)
    return composite(*args, backend=backend)


def compile_available(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "torch.compile baseline runs on CUDA only (inductor's CPU compile dominates a CPU run)"
    return None


def model(p: dict, pass_: str) -> tuple[int, int]:
    """Fewest bytes and flops of each pass (float32): every input read once, every output written
    once; per sample ~(12 + 2D) flops forward (alpha, weight, accumulations), ~(30 + 4D) backward
    (two passes over the ray)."""
    R, S, D = p["rays"], p["samples"], p["channels"]
    e = 4
    fwd_bytes = e * (R * S * (3 + D) + R * (D + 2) + R * S)         # sigmas, t0, t1, rgbs -> color, opacity, depth, weights
    bwd_bytes = e * (R * S * (4 + D) + R * (D + 3) + R * S * (1 + D))  # inputs, opacity, grads -> g_sigmas, g_rgbs
    fwd_flops = R * S * (12 + 2 * D)
    bwd_flops = R * S * (30 + 4 * D)
    if pass_ == "forward":
        return fwd_bytes, fwd_flops
    if pass_ == "backward":
        return bwd_bytes, bwd_flops
    return fwd_bytes + bwd_bytes, fwd_flops + bwd_flops


SPEC = register_bench(BenchSpec(op="composite", workloads=WORKLOADS, make_inputs=make_inputs, run=run,
                                model=model, baselines={"torch.compile": compile_available}))
