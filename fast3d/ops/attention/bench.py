"""Benchmark workloads, SDPA and xformers baselines and the byte/flop model of multiview_attention.

Baselines are what the models run today:

* ``sdpa-*``: rearrange q, k, v into ``B (V L)`` groups (contiguous copies), PyTorch SDPA with one
  backend forced (flash / efficient / cudnn / math; the view mask, if any, as a dense boolean
  mask), rearrange the output back.
* ``xformers``: ``xformers.ops.memory_efficient_attention`` on all attention groups packed into one
  sequence with a ``BlockDiagonalMask`` (:func:`xformers_pack`): layout ``views`` packs with no copy
  (a sample's V views are already contiguous), ``rows`` with one gather; a view mask becomes
  variable-length key blocks (each query view's block holds only the keys of the views it may
  see), so xformers, like fast3d, computes only the allowed (query, key) pairs. Where xformers is
  not installed, or has no kernel for the device (the CPU), the bench lists it with the reason.

On the CPU the `triton` backend runs under TRITON_INTERPRET=1: its times there measure the
interpreter, not the kernel, which is why the `--quick` shapes are tiny (a few dozen tile
iterations per call).
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
                    "5 heads x 64, batch 8, bf16 (docs/design.md#named-workloads `mvdream`)"),
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
                    "to the same row in all views (384 keys), 5 heads x 64, batch 8, bf16 "
                    "(docs/design.md#named-workloads `era3d`)"),
    Workload("pixart-mv", dict(batch=8, views=4, tokens=1024, heads=16, head_dim=72, layout="views", mask="none",
                               dtype="bfloat16"),
             quick=dict(batch=1, views=4, tokens=32, heads=2, head_dim=72, layout="views", mask="none",
                        dtype="bfloat16"),
             source="Bootstrap3D multi-view PixArt: 2x2 grid of 512 px views -> 4 x 1024 = 4096 tokens, "
                    "16 heads x 72, batch 8, bf16 (docs/design.md#named-workloads `pixart-mv`)"),
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


@functools.cache
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


XFORMERS = "xformers"


def xformers_pack(q: torch.Tensor,            # [B*V, L, H, D]
                  k: torch.Tensor,            # [B*V, L, H, D]
                  v: torch.Tensor,            # [B*V, L, H, D]
                  num_views: int, layout: str, image_size: tuple[int, int] | None,
                  view_mask: torch.Tensor | None,   # [V, V] bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int]]:
    """The multi-view layouts as block-diagonal attention over one packed sequence.

    The G attention groups (one per sample for ``views``, one per sample and image row for ``rows``)
    of V segments of S tokens (S = L, or a row of w tokens) are packed group after group, segment
    after segment: token s of view j of group g sits at ``(g V + j) S + s``. Without a view mask,
    query block g and key block g are group g's V S tokens. With one, query block (g, i) is view i's
    S tokens of group g and its key block is the segments of the views j with ``view_mask[i, j]``,
    gathered in order, so each query sees exactly the keys the mask allows.

    Args:
        q, k, v: the op's inputs (same shapes; self-attention layouts).
        num_views, layout, image_size, view_mask: as for :func:`fast3d.multiview_attention`.
    Returns:
        (q, k, v) packed as [1, G V S, H, D] (q) and [1, sum(kv_seqlens), H, D] (k, v), and the
        query and key block lengths (``BlockDiagonalMask.from_seqlens(q_seqlens, kv_seqlens)``).
    """
    BV, L, H, D = q.shape
    V = num_views
    if layout == "views":
        G, S = BV // V, L
        def pack(t):
            return t.reshape(1, BV * L, H, D)                                          # already (g, j, s) order
    else:
        h, w = image_size
        G, S = BV // V * h, w
        def pack(t):
            return (t.reshape(BV // V, V, h, w, H, D).permute(0, 2, 1, 3, 4, 5)           # [B, h, V, w, H, D]
                    .reshape(1, BV * L, H, D))
    qp, kp, vp = pack(q), pack(k), pack(v)
    if view_mask is None:
        return qp, kp, vp, [V * S] * G, [V * S] * G
    allowed = view_mask.cpu()
    idx = _kv_index(G, V, S, tuple(map(tuple, allowed.tolist())), str(q.device))
    lens = [S * int(n) for n in allowed.sum(1).tolist()]
    return qp, kp.index_select(1, idx), vp.index_select(1, idx), [S] * (G * V), lens * G


@functools.lru_cache(maxsize=16)
def _kv_index(G: int, V: int, S: int, allowed: tuple, device: str) -> torch.Tensor:
    """[sum over (g, i) of S x |{j: allowed[i][j]}|] int64: the packed positions of key block (g, i),
    segments (g V + j) S + [0, S) for the allowed j in increasing order (cached: built once per shape)."""
    i, j = torch.tensor(allowed).nonzero(as_tuple=True)       # allowed pairs, row-major: by i, then j
    start = (torch.arange(G)[:, None] * V + j[None, :]) * S    # [G, pairs]
    return (start[..., None] + torch.arange(S)).flatten().to(device)


def xformers_unpack(out: torch.Tensor,        # [1, B*V*L, H, D]
                    shape: torch.Size, num_views: int, layout: str,
                    image_size: tuple[int, int] | None) -> torch.Tensor:
    """Inverse of :func:`xformers_pack` for the queries.

    Args:
        out: attention output in the packed query order.
        shape: the queries' shape [B*V, L, H, D].
        num_views, layout, image_size: as given to :func:`xformers_pack`.
    Returns:
        [B*V, L, H, D], the op's layout (a copy for ``rows``, a view for ``views``).
    """
    if layout == "views":
        return out.reshape(shape)
    BV, L, H, D = shape
    h, w = image_size
    return (out.reshape(BV // num_views, h, num_views, w, H, D).permute(0, 2, 1, 3, 4, 5)   # [B, V, h, w, H, D]
            .reshape(BV, L, H, D))


def _xformers(x: dict) -> torch.Tensor:
    """The xformers baseline: pack, ``memory_efficient_attention`` with the block-diagonal mask, unpack."""
    from xformers.ops import fmha

    q = x["q"]
    qp, kp, vp, q_lens, kv_lens = xformers_pack(q, x["k"], x["v"], x["num_views"], x["layout"], x["image_size"],
                                                x["view_mask"])
    bias = _block_mask(tuple(q_lens), tuple(kv_lens), str(q.device))
    try:
        out = fmha.memory_efficient_attention(qp, kp, vp, attn_bias=bias)
    except (RuntimeError, NotImplementedError, ValueError) as e:   # no xformers kernel for these inputs
        raise ValueError(f"xformers cannot serve this workload: {str(e).splitlines()[0]}") from e
    return xformers_unpack(out, q.shape, x["num_views"], x["layout"], x["image_size"])


@functools.lru_cache(maxsize=16)
def _block_mask(q_lens: tuple, kv_lens: tuple, device: str):
    """xformers' BlockDiagonalMask for these block lengths (cached: its offsets are copied to the device once)."""
    from xformers.ops import fmha

    return fmha.attn_bias.BlockDiagonalMask.from_seqlens(list(q_lens), list(kv_lens), device=torch.device(device))


@functools.cache
def _xformers_reason(device_type: str) -> str | None:
    """Why the xformers baseline cannot run on this device (import, then a tiny bf16 probe), or None."""
    try:
        from xformers.ops import fmha
    except ImportError as e:
        return f"xformers is not installed ({e}); pip install xformers (a GPU peer)"
    if device_type != "cuda":
        return f"xformers' memory_efficient_attention has no {device_type} kernels"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    q = torch.zeros(1, 16, 1, 64, dtype=torch.bfloat16, device=device_type)
    try:
        fmha.memory_efficient_attention(q, q, q, attn_bias=fmha.attn_bias.BlockDiagonalMask.from_seqlens(
            [8, 8], device=q.device))
    except (RuntimeError, NotImplementedError, ValueError) as e:
        return f"xformers has no kernel for {device_type} bf16 here: {str(e).splitlines()[0]}"
    return None

def run(backend: str, x: dict) -> tuple:
    if backend in SDPA_BASELINES:
        return (_sdpa(SDPA_BASELINES[backend], x),)
    if backend == XFORMERS:
        return (_xformers(x),)
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
    baselines={**{name: (lambda device, kind=kind: _sdpa_reason(kind, device.type))
                  for name, kind in SDPA_BASELINES.items()},
               XFORMERS: lambda device: _xformers_reason(device.type)}))
