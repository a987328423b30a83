"""Benchmark workloads and byte/flop models of triplane_sample and render_triplane."""

from __future__ import annotations

import torch

from fast3d.bench.spec import BenchSpec, Workload, register_bench
from fast3d.ops.triplane import reference
from fast3d.ops.triplane.api import render_triplane, triplane_sample
from fast3d.ops.triplane.decoder import DecoderWeights

_LRM_SRC = ("LRM/OpenLRM renderer: planes 3x80x64x64, 64 stratified + 64 importance samples, 4-layer 64-wide "
            "MLP, batch 16 x 4 views x 128x128 rays (docs/design.md#named-workloads `lrm`)")
# --quick shapes run the reference on the CPU in seconds; Triton on the CPU runs in the interpreter,
# whose times are not timings.
RENDER_WORKLOADS = [
    Workload("lrm", dict(batch=16, rays=4 * 128 * 128, channels=80, res=64, samples=64, importance=64,
                         hidden=64, layers=4),
             quick=dict(batch=1, rays=256, channels=80, res=64, samples=16, importance=16, hidden=64, layers=4),
             source=_LRM_SRC),
]
SAMPLE_WORKLOADS = [
    # One coarse pass of one view a sample: the render workload's 4 views x 128 samples would be
    # 134M points and 129 GB of sampled features, more than any GPU holds.
    Workload("lrm", dict(batch=16, points=128 * 128 * 64, channels=80, res=64),
             quick=dict(batch=1, points=8192, channels=80, res=64),
             source="the sampling step of one coarse pass (1 view x 128x128 rays x 64 samples a sample) of "
                    + _LRM_SRC),
]


def _rays(B: int, R: int, device, gen):
    """Rays from cameras on a sphere of radius 2 looking at the box [-1, 1]^3 (jittered targets)."""
    def rand(*shape):
        return torch.rand(*shape, generator=gen).to(device)

    cam = torch.nn.functional.normalize(torch.randn(B, 1, 3, generator=gen), dim=-1).to(device) * 2.0
    target = (rand(B, R, 3) - 0.5) * 1.6
    rays_d = torch.nn.functional.normalize(target - cam, dim=-1)
    return cam.expand(B, R, 3).contiguous(), rays_d.contiguous()


def _decoder(C: int, hidden: int, layers: int, device: torch.device) -> DecoderWeights:
    """Leaf weights with nn.Linear's default initialisation from the global RNG, layer by layer as
    fast3d.nn.TriplaneMLP builds them (so the same seed gives the same decoder)."""
    widths = [3 * C] + [hidden] * (layers - 1) + [4]
    lin = [torch.nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]
    return DecoderWeights(tuple(m.weight.detach().to(device).requires_grad_() for m in lin),
                          tuple(m.bias.detach().to(device).requires_grad_() for m in lin), -1.0)


def make_render_inputs(p: dict, device: torch.device, gen: torch.Generator) -> dict:
    B, R, C, N = p["batch"], p["rays"], p["channels"], p["res"]
    planes = (torch.randn(B, 3, C, N, N, generator=gen) * 0.5).to(device).requires_grad_()
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    decoder = _decoder(C, p["hidden"], p["layers"], device)
    rays_o, rays_d = _rays(B, R, device, gen)
    return dict(planes=planes, decoder=decoder, rays_o=rays_o.requires_grad_(), rays_d=rays_d.requires_grad_(),
                near=1.0, far=3.0, n_samples=p["samples"], n_importance=p["importance"])


def make_sample_inputs(p: dict, device: torch.device, gen: torch.Generator) -> dict:
    B, M, C, N = p["batch"], p["points"], p["channels"], p["res"]
    planes = torch.randn(B, 3, C, N, N, generator=gen).to(device).requires_grad_()
    points = (torch.rand(B, M, 3, generator=gen) * 2.2 - 1.1).to(device).requires_grad_()
    return dict(planes=planes, points=points)


def run_render(backend: str, x: dict) -> tuple:
    out = render_triplane(x["planes"], x["decoder"], x["rays_o"], x["rays_d"], x["near"], x["far"],
                          n_samples=x["n_samples"], n_importance=x["n_importance"], deterministic=True,
                          backend=backend)
    return out["color"], out["opacity"], out["depth"]


def run_sample(backend: str, x: dict) -> tuple:
    return (triplane_sample(x["planes"], x["points"], backend=backend),)


def render_model(p: dict, pass_: str) -> tuple[int, int]:
    """The fused marcher's floor (float32): planes read once (forward) and their gradient written
    once (backward), rays, outputs and the sorted sample positions ([B, R, S] floats, written by the
    sort and read by the kernel) once; no other per-sample tensor touches memory. Flops per decoded
    sample: 3 planes x 4 corners x C bilinear MACs (24C), the MLP (2 x weights), compositing (~20).
    The forward decodes the coarse samples twice (the no-grad pass that places the importance
    samples, then the final pass over all S), 2 S_c + S_f decodes; the backward recomputes the
    final pass and runs ~2x its flops backwards, 3 S decodes' worth."""
    B, R, C, N = p["batch"], p["rays"], p["channels"], p["res"]
    S = p["samples"] + p["importance"]
    h, L = p["hidden"], p["layers"]
    e = 4
    mlp = 3 * C * h + (L - 2) * h * h + h * 4
    per_decode = 24 * C + 2 * mlp + 20
    planes = B * 3 * C * N * N * e
    rays = B * R * (6 + 5) * e
    samples = B * R * S * e
    fwd = (planes + rays + 2 * samples, B * R * (S + p["samples"]) * per_decode)
    bwd = (2 * planes + rays + samples + B * R * 6 * e, 3 * B * R * S * per_decode)
    if pass_ == "forward":
        return fwd
    if pass_ == "backward":
        return bwd
    return fwd[0] + bwd[0], fwd[1] + bwd[1]


def sample_model(p: dict, pass_: str) -> tuple[int, int]:
    """Points read and features written once; planes read once (they stay in cache); backward reads
    the feature gradient and points, writes point and plane gradients. 8 flops per corner-channel."""
    B, M, C, N = p["batch"], p["points"], p["channels"], p["res"]
    e = 4
    planes = B * 3 * C * N * N * e
    fwd = (B * M * (3 + 3 * C) * e + planes, B * M * 3 * 4 * C * 2)
    bwd = (B * M * (3 * C + 6) * e + 2 * planes, B * M * 3 * 4 * C * 6)
    if pass_ == "forward":
        return fwd
    if pass_ == "backward":
        return bwd
    return fwd[0] + bwd[0], fwd[1] + bwd[1]


_compiled = None


def _compile_available(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "torch.compile baseline runs on CUDA only (inductor's CPU compile dominates a CPU run)"
    return None


def run_sample_with_baselines(backend: str, x: dict) -> tuple:
    if backend == "torch.compile":
        global _compiled
        if _compiled is None:
            _compiled = torch.compile(reference.triplane_sample, dynamic=False)
        return (_compiled(x["planes"], x["points"], "concat", 1.0),)
    return run_sample(backend, x)


RENDER_SPEC = register_bench(BenchSpec(op="render_triplane", workloads=RENDER_WORKLOADS,
                                       make_inputs=make_render_inputs, run=run_render, model=render_model))
SAMPLE_SPEC = register_bench(BenchSpec(op="triplane_sample", workloads=SAMPLE_WORKLOADS,
                                       make_inputs=make_sample_inputs, run=run_sample_with_baselines,
                                       model=sample_model, baselines={"torch.compile": _compile_available}))
