"""Benchmark workloads, SDPA baselines and the byte/flop model of multiview_attention.

Baselines are what the models run today: rearrange q, k, v into ``B (V L)`` groups (contiguous
copies), PyTorch SDPA with one backend forced (flash / efficient / cudnn / math; the view mask, if
any, as a dense boolean mask), rearrange the output back. On the CPU the `triton` backend runs
under TRITON_INTERPRET=1: its times there measure the interpreter, not the kernel, which is why the
`--quick` shapes are tiny (a few dozen tile iterations per call).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fast3d.bench.spec import BenchSpec, Workload, register_bench
from fast3d.ops.attention import reference
from fast3d.ops.attention.api import multiview_attention

WORKLOADS = [
    Workload("mvdream", dict(batch=8, views=4, tokens=1024, heads=5, head_dim=64, layout="views", mask="none",
                             dtype="bfloat16"),
             quick=dict(batch=1, views=4, tokens=32, heads=2, head_dim=64, layout="views", mask="none",
                        dtype="bfloat16"),
             source="MVDream multi-view self-attention: 4 views x 32x32 latent tokens (4096 per sample), "
                    "5 heads x 64, batch 8, bf16 (DESIGN.md workload `mvdream`)"),
    Workload("mvdream-halfmask", dict(batch=8, views=4, tokens=1024, heads=5, head_dim=64, layout="views",
                                      mask="neighbours", dtype="bfloat16"),
             quick=dict(batch=1, views=4, tokens=32, heads=2, head_dim=64, layout="views", mask="neighbours",
                        dtype="bfloat16"),
             source="`mvdream` with a view mask keeping half of the view pairs (each view sees itself and the "
                    "next one): the block-sparse path should take about half the time"),
    Workload("era3d", dict(batch=8, views=6, image=(64, 64), heads=5, head_dim=64, layout="rows", mask="none",
                           dtype="bfloat16"),
             quick=dict(batch=1, views=6, image=(2, 16), heads=1, head_dim=64, layout="rows", mask="none",
                        dtype="bfloat16"),
             source="Era3D row-wise multi-view attention: 6 views, 64x64 latent, each row of 64 tokens attends "
                    "to the same row in all views (384 keys), 5 heads x 64, batch 8, bf16 (DESIGN.md `era3d`)"),
    Workload("pixart-mv", dict(batch=8, views=4, tokens=1024, heads=16, head_dim=72, layout="views", mask="none",
                               dtype="bfloat16"),
             quick=dict(batch=1, views=4, tokens=32, heads=2, head_dim=72, layout="views", mask="none",
                        dtype="bfloat16"),
             source="Bootstrap3D multi-view PixArt: 2x2 grid of 512 px views -> 4 x 1024 = 4096 tokens, "
                    "16 heads x 72, batch 8, bf16 (DESIGN.md workload `pixart-mv`)"),
]


def _geometry(p: dict) -> tuple[int, int, int | None]:
    """(tokens per view L, rows R per view, image_size) of a workload."""
    if p["layout"] == "rows":
        h, w = p["image"]
        return h * w, h, (h, w)
    return p["tokens"], 1, None


def _view_mask(p: dict, device) -> torch.Tensor | None:
    if p["mask"] == "none":
        return None
    V = p["views"]
    i = torch.arange(V)
    return (((i[None, :] - i[:, None]) % V) < 2).to(device)    # view i sees i and i + 1 (mod V)


def make_inputs(p: dict, device: torch.device, gen: torch.Generator) -> dict:
    L, _, image_size = _geometry(p)
    shape = (p["batch"] * p["views"], L, p["heads"], p["head_dim"])   # [B*V, L, H, D]
    dtype = getattr(torch, p["dtype"])

    def rand():
        return torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()

    return dict(q=rand(), k=rand(), v=rand(), num_views=p["views"], layout=p["layout"], image_size=image_size,
                view_mask=_view_mask(p, device))


SDPA_BASELINES = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                  "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}


def _sdpa(kind: SDPBackend, x: dict) -> torch.Tensor:
    """The models' path: rearrange copies, SDPA with one backend, rearrange back."""
    V, layout, image_size = x["num_views"], x["layout"], x["image_size"]
    L = x["q"].shape[1]
    seg = L if layout == "views" else image_size[1]
    q, k, v = (reference.to_groups(t, V, layout, image_size).contiguous() for t in (x["q"], x["k"], x["v"]))
    mask = reference.token_mask(x["view_mask"], seg, seg)
    try:
        with sdpa_kernel(kind), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    except RuntimeError as e:  # this SDPA backend cannot serve these inputs: the harness skips it
        raise ValueError(f"SDPA {kind.name} cannot serve this workload: {str(e).splitlines()[0]}") from e
    return reference.from_groups(out, V, layout, image_size).contiguous()


@functools.lru_cache(maxsize=None)
def _sdpa_reason(kind: SDPBackend, device_type: str) -> str | None:
    """Why this SDPA backend cannot run on this device (a tiny bf16 probe call), or None."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    q = torch.zeros(1, 1, 16, 64, dtype=torch.bfloat16, device=device_type)
    try:
        with sdpa_kernel(kind), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            F.scaled_dot_product_attention(q, q, q)
    except RuntimeError as e:
        return f"SDPA {kind.name} has no kernel for {device_type} bf16 here: {str(e).splitlines()[0]}"
    return None


def run(backend: str, x: dict) -> tuple:
    if backend in SDPA_BASELINES:
        return (_sdpa(SDPA_BASELINES[backend], x),)
    return (multiview_attention(x["q"], x["k"], x["v"], x["num_views"], x["layout"], x["image_size"],
                                x["view_mask"], backend=backend),)


def model(p: dict, pass_: str) -> tuple[int, int]:
    """Fewest bytes and flops. Forward: read q, k, v, write out (+ float32 lse); 4 D flops per
    (query, allowed key) pair (two matmuls). Backward: read q, k, v, out, dO, lse, write dq, dk,
    dv; 2.5x the forward flops (five matmuls, FlashAttention-2's count, recomputing QK^T)."""
    L, R, image_size = _geometry(p)
    B, V, H, D = p["batch"], p["views"], p["heads"], p["head_dim"]
    e = torch.tensor([], dtype=getattr(torch, p["dtype"])).element_size()
    seg = L // R
    allowed = V * V if p["mask"] == "none" else int(_view_mask(p, "cpu").sum())
    pairs = B * R * H * allowed * seg * seg            # (query, key) pairs over all groups and heads
    tensor = B * V * L * H * D * e                      # one [B*V, L, H, D] tensor
    lse = B * V * L * H * 4
    fwd_bytes, fwd_flops = 4 * tensor + lse, 4 * D * pairs
    bwd_bytes, bwd_flops = 8 * tensor + lse, int(2.5 * fwd_flops)
    if pass_ == "forward":
        return fwd_bytes, fwd_flops
    if pass_ == "backward":
        return bwd_bytes, bwd_flops
    return fwd_bytes + bwd_bytes, fwd_flops + bwd_flops


SPEC = register_bench(BenchSpec(
    op="multiview_attention", workloads=WORKLOADS, make_inputs=make_inputs, run=run, model=model,
    baselines={name: (lambda device, kind=kind: _sdpa_reason(kind, device.type))
               for name, kind in SDPA_BASELINES.items()}))
