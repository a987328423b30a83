"""The xformers peer of the multiview_attention benchmark (fast3d.ops.attention.bench).

xformers has no CPU kernels, so on the CPU the layout mapping the baseline relies on is tested on
its own: ``xformers_pack`` + block-diagonal attention + ``xformers_unpack`` must equal the reference
multi-view attention, with the block-diagonal attention written here in pure torch (one SDPA per
block, the semantics of ``BlockDiagonalMask.from_seqlens``). Where xformers is importable its
``BlockDiagonalMask`` is checked against the same dense mask, and on a GPU (``gpu`` tests) the
baseline itself is checked against the reference on the quick workloads.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from fast3d.bench import runner
from fast3d.ops.attention import bench, reference

# Tolerances of this file, by dtype, with their reason.
TOL = {
    # float64 on both sides: the same sums in a different order (per block vs masked dense).
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    # bf16 on the GPU: xformers and the reference SDPA each round q.k and p.v to bf16 (8 bits of
    # mantissa, 2^-8 = 3.9e-3) in a different order; outputs are averages of unit-variance values.
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}

# (layout, num_views, tokens L, image_size or None, heads, head_dim, view mask rows or None)
CASES = [
    ("views", 4, 12, None, 2, 8, None),
    ("views", 4, 12, None, 2, 8, [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]]),
    ("views", 3, 5, None, 1, 4, [[1, 0, 0], [1, 1, 1], [0, 1, 1]]),
    ("rows", 6, 12, (3, 4), 2, 8, None),
    ("rows", 3, 10, (2, 5), 1, 4, [[1, 1, 0], [0, 1, 0], [1, 1, 1]]),
]


def _block_diagonal(q, k, v, q_lens, kv_lens):
    """Block-diagonal attention written out: query block b attends to key block b only.
    q [1, sum(q_lens), H, D], k and v [1, sum(kv_lens), H, D] -> [1, sum(q_lens), H, D]."""
    assert len(q_lens) == len(kv_lens) and q.shape[1] == sum(q_lens) and k.shape[1] == sum(kv_lens)
    outs = []
    for qb, kb, vb in zip(q.split(q_lens, 1), k.split(kv_lens, 1), v.split(kv_lens, 1)):
        outs.append(F.scaled_dot_product_attention(qb.transpose(1, 2), kb.transpose(1, 2),
                                                   vb.transpose(1, 2)).transpose(1, 2))
    return torch.cat(outs, 1)


def _dense_block_mask(q_lens, kv_lens):
    """[sum(q_lens), sum(kv_lens)] bool: True inside the diagonal blocks."""
    qb = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens))
    kb = torch.repeat_interleave(torch.arange(len(kv_lens)), torch.tensor(kv_lens))
    return qb[:, None] == kb[None, :]


def _inputs(case, batch, gen, dtype=torch.float64, device="cpu"):
    layout, V, L, image_size, H, D, mask = case
    q, k, v = (torch.randn(batch * V, L, H, D, generator=gen, dtype=torch.float64).to(device, dtype)
               for _ in range(3))
    view_mask = None if mask is None else torch.tensor(mask, dtype=torch.bool, device=device)
    return q, k, v, V, layout, image_size, view_mask


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-V{c[1]}-{'mask' if c[6] else 'nomask'}")
def test_pack_block_diagonal_unpack_is_multiview_attention(case, batch, gen):
    q, k, v, V, layout, image_size, view_mask = _inputs(case, batch, gen)
    qp, kp, vp, q_lens, kv_lens = bench.xformers_pack(q, k, v, V, layout, image_size, view_mask)
    out = bench.xformers_unpack(_block_diagonal(qp, kp, vp, q_lens, kv_lens), q.shape, V, layout, image_size)
    ref = reference.multiview_attention(q, k, v, V, layout, image_size, view_mask, None)
    assert out.shape == q.shape
    assert_close(out, ref, **TOL[torch.float64], name=f"{layout} packed block-diagonal")
    S = q.shape[1] if layout == "views" else image_size[1]
    G = q.shape[0] // V * (1 if layout == "views" else image_size[0])
    if view_mask is None:      # one block per attention group, all of its tokens
        assert q_lens == kv_lens == [V * S] * G
    else:                      # one block per (group, query view), keys of the allowed views only
        assert q_lens == [S] * (G * V)
        assert kv_lens == [S * int(n) for n in view_mask.sum(1).tolist()] * G
    if layout == "views":      # the views layout packs without a copy
        assert qp.data_ptr() == q.data_ptr()
        if view_mask is None:
            assert kp.data_ptr() == k.data_ptr() and vp.data_ptr() == v.data_ptr()


def test_block_diagonal_emulation_is_the_dense_mask(gen):
    """The test's block-diagonal attention equals SDPA with the dense block mask, so what the pack
    test checks is the semantics BlockDiagonalMask.from_seqlens has."""
    q_lens, kv_lens = [3, 5, 2], [4, 1, 6]
    q = torch.randn(1, sum(q_lens), 2, 4, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, sum(kv_lens), 2, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=_dense_block_mask(q_lens, kv_lens)).transpose(1, 2)
    assert_close(_block_diagonal(q, k, v, q_lens, kv_lens), dense, **TOL[torch.float64], name="block-diagonal")


def test_xformers_block_mask_matches_the_emulation():
    """Where xformers is importable (its masks build without a GPU): the BlockDiagonalMask the
    baseline passes is the dense block mask the emulation uses."""
    pytest.importorskip("xformers.ops", reason="xformers is not installed")
    q_lens, kv_lens = (4, 4, 2), (8, 4, 4)
    bias = bench._block_mask(q_lens, kv_lens, "cpu").materialize((sum(q_lens), sum(kv_lens)))
    assert torch.equal(bias == 0, _dense_block_mask(list(q_lens), list(kv_lens)))


def test_xformers_listed_with_a_reason_where_it_cannot_run():
    """On the CPU the bench lists xformers as unavailable, with why (not installed, or no CPU kernels)."""
    cands = dict(runner.candidates(bench.SPEC, torch.device("cpu"), []))
    assert bench.XFORMERS in cands and set(bench.SDPA_BASELINES) <= set(cands)
    reason = cands[bench.XFORMERS]
    assert reason is not None and "xformers" in reason
    try:
        import xformers.ops  # noqa: F401
        assert "no cpu kernels" in reason
    except ImportError:
        assert "not installed" in reason


@pytest.mark.gpu
@pytest.mark.parametrize("workload", [w.name for w in bench.WORKLOADS])
def test_xformers_baseline_matches_reference_on_gpu(workload, gen):
    """The baseline as the bench runs it (bf16, quick shape, on the GPU) against the reference."""
    pytest.importorskip("xformers.ops", reason="xformers is not installed")
    device = torch.device("cuda")
    reason = bench.SPEC.baselines[bench.XFORMERS](device)
    assert reason is None, reason
    w = bench.SPEC.workload(workload)
    x = bench.make_inputs(w.quick, device, gen)
    (out,) = bench.run(bench.XFORMERS, x)
    (ref,) = bench.run("torch", x)
    assert_close(out.float(), ref.float(), **TOL[torch.bfloat16], name=workload)
    out.float().sum().backward()   # the backward the forward+backward rows time runs too
    assert all(torch.isfinite(x[n].grad).all() for n in ("q", "k", "v"))
