"""Tests of fast3d.ops.attention.multiview_attention (multi-view flash attention).

The `triton` backend (under TRITON_INTERPRET=1 on this CPU, natively on a GPU) is compared with the
reference (rearrange + SDPA with the view mask as -inf) run in float64 on the same upcast inputs:
the output and the gradients of q, k, v for a random upstream gradient. Layouts "views" and "rows"
(non-square grids), odd token counts (tails of blocks), every listed head dim (32..128 including
40, 72, 80: padded tiles), V in 1..8, Lq != Lk, view masks (random, diagonal, a key view nobody
sees: its blocks are skipped and its dk, dv are exactly 0; a query view that sees none: its output
and dq are exactly 0), strided inputs, custom scale, empty inputs, bad input, backend selection,
torch.compile and the benchmark hooks. Sizes are small: the interpreter runs ~5 ms per tile
iteration. Every test draws fresh inputs from `gen`; a failure prints the seed (FAST3D_TEST_SEED=N
replays it).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, grads, random_like, triton_launches_inside_guard

from fast3d import backends
from fast3d.ops.attention import AttentionShape, bench, multiview_attention, reference

OP = "multiview_attention"

# Tolerances of the triton backend against the float64 reference on the same (upcast) inputs.
TOL = {
    # float32 tiles (IEEE dots, float32 online softmax) vs float64: sums over <= V*Lk ~ 1000
    # products of O(1) terms cost ~sqrt(n) 2^-24 relative; exp2 and the rescaling a few ulp.
    # Measured (3 seeds x the cases below): worst |diff| 1.1e-5, on dk elements of magnitude
    # ~10 (relative ~2e-6, ~20 ulp); worst on O(1) elements 5.6e-6. Bounds 4-7x that.
    torch.float32: (1e-5, 2e-5),
}
# Half precision: "error at most 2x that of SDPA in the same precision against a float64
# reference", error being the RMS over the tensor. On a GPU, SDPA's flash / efficient kernels round
# P and dS to the input dtype for their tensor-core matmuls, as this kernel does: 2x. On the CPU,
# SDPA keeps P and dS in float32, so only its final rounding remains, and where few keys share
# the softmax (rows layout, V*w = 10) rounding P alone costs as much: measured bf16 RMS ratios
# 1.1-1.7 on most cases, dv on the rows case mean 1.94, max 2.02 over 25 seeds; fp16 ~1.0.
# Hence 2.5x against CPU SDPA.
HALF_RMS_FACTOR = {"cuda": 2.0, "cpu": 2.5}
# The max over single elements is noisier (bf16 dq up to 3.3x CPU SDPA's): this bound guards
# against wrong elements (a bad tail or view would be off by O(1), >100x), not a precision claim.
HALF_MAX_FACTOR = 5.0

# (B, V, Lq, Lk, H, D) for layout "views".
VIEWS_CASES = [
    (2, 3, 17, 17, 2, 32),
    (1, 3, 77, 77, 1, 40),
    (2, 1, 77, 77, 2, 64),
    (1, 2, 17, 33, 2, 72),     # Lq != Lk
    (1, 4, 9, 9, 1, 80),
    (1, 8, 5, 5, 2, 128),
    (1, 2, 33, 15, 1, 96),
    (3, 5, 1, 1, 1, 32),       # one token per view
]
# (B, V, (h, w), H, D) for layout "rows": non-square grids, rows shorter and longer than a tile.
ROWS_CASES = [
    (2, 2, (3, 5), 2, 32),
    (1, 6, (4, 7), 1, 72),
    (1, 3, (5, 1), 2, 40),
    (1, 4, (1, 33), 1, 64),
    (1, 2, (2, 40), 1, 128),
]


def require(backend: str) -> None:
    reason = backends.availability(OP)[backend]
    if reason:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


def make_qkv(gen, B, V, Lq, Lk, H, D, dtype=torch.float32, device="cpu"):
    """q, k, v [B*V, L, H, D]: N(0, 1) keys and values, queries N(0, 2^2) so the softmax is peaked
    in places (logits up to ~8 / sqrt(D) * D^0.5 ~ 8)."""
    q = 2.0 * torch.randn(B * V, Lq, H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B * V, Lk, H, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B * V, Lk, H, D, generator=gen, dtype=torch.float64)
    return [x.to(device, dtype) for x in (q, k, v)]


def random_mask(gen, V, *, unseen: int | None = None) -> torch.Tensor:
    """bool [V, V], each row with a True; `unseen`: a key view no query view attends to."""
    m = torch.rand(V, V, generator=gen) < 0.5
    m[torch.arange(V), torch.randint(V, (V,), generator=gen)] = True
    if unseen is not None:
        m[:, unseen] = False
        m[torch.arange(V), (unseen + 1 + torch.arange(V) % (V - 1)) % V] = True   # never column `unseen` (V >= 2)
    return m


def run_both(q, k, v, V, layout, image_size, view_mask, scale, gen, backend="triton"):
    """(out, dq, dk, dv) of `backend` and of the float64 reference, one random upstream gradient."""
    fn = lambda a, b, c: (multiview_attention(a, b, c, V, layout, image_size, view_mask, scale,  # noqa: E731
                                              backend=backend),)
    fn64 = lambda a, b, c: (reference.multiview_attention(a, b, c, V, layout, image_size,  # noqa: E731
                                                          view_mask, scale),)
    x64 = [x.detach().double() for x in (q, k, v)]   # on q's device
    with torch.no_grad():
        out = fn(q, k, v)[0]
        out64 = fn64(*x64)[0]
    up = random_like(out64, gen).to(q.dtype)
    g = grads(fn, [q, k, v], [up])
    g64 = grads(fn64, x64, [up.to(torch.float64)])
    return [out, *g], [out64, *g64]


def check_tight(actual, expected, dtype=torch.float32, what=""):
    atol, rtol = TOL[dtype]
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert a is not None, f"{name}: no gradient"
        assert_close(a, e, atol=atol, rtol=rtol, name=f"{what} {name}")


def rms(x):
    return x.double().pow(2).mean().sqrt().item()


# --- triton vs the float64 reference, float32 -----------------------------------------------------


@pytest.mark.parametrize("case", VIEWS_CASES, ids=lambda c: "B{}-V{}-Lq{}-Lk{}-H{}-D{}".format(*c))
def test_views_float32(case, gen):
    require("triton")
    B, V, Lq, Lk, H, D = case
    q, k, v = make_qkv(gen, B, V, Lq, Lk, H, D)
    check_tight(*run_both(q, k, v, V, "views", None, None, None, gen), what=str(case))


@pytest.mark.parametrize("case", ROWS_CASES, ids=lambda c: "B{}-V{}-{}x{}-H{}-D{}".format(c[0], c[1], *c[2], *c[3:]))
def test_rows_float32(case, gen):
    require("triton")
    B, V, (h, w), H, D = case
    q, k, v = make_qkv(gen, B, V, h * w, h * w, H, D)
    check_tight(*run_both(q, k, v, V, "rows", (h, w), None, None, gen), what=str(case))


@pytest.mark.parametrize("layout", ["views", "rows"])
@pytest.mark.parametrize("kind", ["random", "diagonal", "unseen"])
def test_view_mask_float32(kind, layout, gen):
    """Random masks; the diagonal (each view alone: per-view attention); and a key view no query
    view attends to (a whole row of key blocks masked): its dk and dv are exactly zero."""
    require("triton")
    V, H, D = 4, 2, 40
    image_size, L = ((3, 11), 33) if layout == "rows" else (None, 37)
    q, k, v = make_qkv(gen, 2, V, L, L, H, D)
    mask = {"random": lambda: random_mask(gen, V), "diagonal": lambda: torch.eye(V, dtype=torch.bool),
            "unseen": lambda: random_mask(gen, V, unseen=2)}[kind]()
    actual, expected = run_both(q, k, v, V, layout, image_size, mask, None, gen)
    check_tight(actual, expected, what=f"{kind} mask")
    if kind == "diagonal":  # each view attends to itself only: plain attention per image
        per_view = F.scaled_dot_product_attention(*(x.double().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
        if layout == "views":
            assert_close(actual[0], per_view, atol=1e-5, rtol=1e-5, name="diagonal mask vs per-view SDPA")
    if kind == "unseen":
        dk, dv = actual[2].reshape(2, V, L, H, D), actual[3].reshape(2, V, L, H, D)
        assert torch.equal(dk[:, 2], torch.zeros_like(dk[:, 2])) and torch.equal(dv[:, 2], torch.zeros_like(dv[:, 2]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["views", "rows"])
@pytest.mark.parametrize("kind", ["one-row", "all-rows"])
def test_empty_mask_row_gives_zero(kind, layout, backend, gen):
    """A view-mask row with no True is valid: that query view's output is exactly 0 and it passes no
    gradient (dq = 0 there, nothing added to dk, dv). Elsewhere the result is the float64 reference
    with that row made all-True (a valid mask, no special case) and the view's output zeroed; the
    gradients are that reference's for the upstream gradient zeroed on the view. `one-row`: a random
    mask with row `empty` cleared; `all-rows`: an all-False mask (output and every gradient 0)."""
    require(backend)
    B, V, H, D = 2, 4, 2, 40
    image_size, L = ((3, 7), 21) if layout == "rows" else (None, 19)
    q, k, v = make_qkv(gen, B, V, L, L, H, D)
    if kind == "one-row":
        empty = int(torch.randint(V, (1,), generator=gen))
        mask = random_mask(gen, V)
        mask[empty] = False
        rows = [empty]
    else:
        mask = torch.zeros(V, V, dtype=torch.bool)
        rows = list(range(V))
    full = mask.clone()
    full[rows] = True
    dead = torch.zeros(B, V, 1, 1, 1, dtype=torch.bool)
    dead[:, rows] = True

    def zero_dead(x):   # [B*V, L, H, D] with the empty rows' query views set to 0
        return torch.where(dead, 0.0, x.reshape(B, V, *x.shape[1:])).reshape(x.shape)

    fn = lambda a, b, c: (multiview_attention(a, b, c, V, layout, image_size, mask, backend=backend),)  # noqa: E731
    fn64 = lambda a, b, c: (reference.multiview_attention(a, b, c, V, layout, image_size, full, None),)  # noqa: E731
    x64 = [x.double() for x in (q, k, v)]
    up = random_like(q, gen)
    with torch.no_grad():
        out = fn(q, k, v)[0]
        expected = [zero_dead(fn64(*x64)[0])]
    actual = [out, *grads(fn, [q, k, v], [up])]
    expected += grads(fn64, x64, [zero_dead(up).double()])
    for name, a in zip(("out", "dq"), actual[:2]):
        a = a.reshape(B, V, L, H, D)[:, rows]
        assert torch.equal(a, torch.zeros_like(a)), f"{name} of the query views with an empty mask row is not 0"
    if kind == "all-rows":
        for name, a in zip(("dk", "dv"), actual[2:]):
            assert torch.equal(a, torch.zeros_like(a)), f"{name} with an all-False mask is not 0"
    check_tight(actual, expected, what=f"{kind} empty mask row, {backend}")


def test_masked_blocks_are_skipped(gen):
    """Keys and values of a view nobody attends to are never read: NaN there leaves the output and
    the other gradients finite and equal to the reference on zeros (SDPA with a -inf mask would
    still multiply the NaNs and return NaN)."""
    require("triton")
    V, L, H, D = 3, 20, 1, 32
    mask = random_mask(gen, V, unseen=1)
    assert not mask[:, 1].any() and mask.any(1).all()
    q, k, v = make_qkv(gen, 1, V, L, L, H, D)
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[1], v_nan[1] = float("nan"), float("nan")
    q_, k_, v_ = (x.clone().requires_grad_() for x in (q, k_nan, v_nan))
    out = multiview_attention(q_, k_, v_, V, view_mask=mask, backend="triton")
    up = torch.randn(out.shape, generator=gen)
    dq, dk, dv = torch.autograd.grad(out, (q_, k_, v_), up)
    expected = multiview_attention(q, k, v, V, view_mask=mask, backend="triton")
    assert torch.equal(out, expected)
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert torch.equal(dk[1], torch.zeros_like(dk[1])) and torch.equal(dv[1], torch.zeros_like(dv[1]))


@pytest.mark.parametrize("source", ["fused_qkv", "bhld", "expanded_kv"])
def test_strided_inputs_and_gradients(source, gen):
    """The kernels read q, k, v and the upstream gradient through strides: q, k, v unbound from a
    fused [B*V, L, 3, H, D] projection, transposed from [B*V, H, L, D], or k/v broadcast across
    heads (stride 0); same result as on contiguous copies."""
    require("triton")
    B, V, L, H, D = 1, 3, 19, 2, 40
    if source == "fused_qkv":
        qkv = torch.randn(B * V, L, 3, H, D, generator=gen)
        q, k, v = qkv.unbind(2)
    elif source == "bhld":
        q, k, v = (torch.randn(B * V, H, L, D, generator=gen).transpose(1, 2) for _ in range(3))
    else:
        q = torch.randn(B * V, L, H, D, generator=gen)
        k, v = (torch.randn(B * V, L, 1, D, generator=gen).expand(B * V, L, H, D) for _ in range(2))
    assert not any(x.is_contiguous() for x in (q, k, v) if source != "expanded_kv")
    up = torch.randn(B * V, H, L, D, generator=gen).transpose(1, 2)   # a strided upstream gradient too
    fn = lambda a, b, c: (multiview_attention(a, b, c, V, backend="triton"),)  # noqa: E731
    strided = [fn(q, k, v)[0], *grads(fn, [q, k, v], [up])]
    contig = [fn(*(x.contiguous() for x in (q, k, v)))[0],
              *grads(fn, [x.contiguous() for x in (q, k, v)], [up.contiguous()])]
    for name, a, e in zip(("out", "dq", "dk", "dv"), strided, contig):
        assert_close(a, e, atol=1e-6, rtol=1e-6, name=name)


def test_custom_scale(gen):
    """scale 0.3 (vs the default 1/8 for D = 64) on unit queries: logits of std 2.4, like the
    other tests' (float32 logit rounding grows with the logits, and so does the error)."""
    require("triton")
    q, k, v = make_qkv(gen, 1, 2, 21, 21, 2, 64)
    q = q / 2
    check_tight(*run_both(q, k, v, 2, "views", None, None, 0.3, gen), what="scale 0.3")


def test_long_sequence_float32(gen):
    """L = 1025: one token past 32 tiles of the interpreter (and 8 of the GPU's 128-row tiles)."""
    require("triton")
    q, k, v = make_qkv(gen, 1, 1, 1025, 1025, 1, 32)
    check_tight(*run_both(q, k, v, 1, "views", None, None, None, gen), what="L1025")


# --- half precision: error relative to SDPA's in the same precision -------------------------------


def check_half(q, k, v, V, layout, image_size, view_mask, gen):
    """triton and SDPA (the `torch` backend) in q's precision against the float64 reference (on
    q's device), for one random upstream gradient: output and gradients."""
    dtype = q.dtype

    def fn(backend):
        return lambda a, b, c: (multiview_attention(a, b, c, V, layout, image_size, view_mask, backend=backend),)

    def fn64(a, b, c):
        return (reference.multiview_attention(a, b, c, V, layout, image_size, view_mask, None),)

    x64 = [x.detach().double() for x in (q, k, v)]
    with torch.no_grad():
        out, out_sdpa, out64 = fn("triton")(q, k, v)[0], fn("torch")(q, k, v)[0], fn64(*x64)[0]
    up = random_like(out64, gen)
    tri = [out, *grads(fn("triton"), [q, k, v], [up.to(dtype)])]
    sdpa = [out_sdpa, *grads(fn("torch"), [q, k, v], [up.to(dtype)])]
    ref = [out64, *grads(fn64, x64, [up])]
    for name, a, s, e in zip(("out", "dq", "dk", "dv"), tri, sdpa, ref):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        err, err_sdpa = (a.double() - e), (s.double() - e)
        factor = HALF_RMS_FACTOR[q.device.type]
        assert rms(err) <= factor * rms(err_sdpa), f"{name}: RMS error {rms(err):.3g} > {factor} x SDPA's {rms(err_sdpa):.3g}"
        assert err.abs().max() <= HALF_MAX_FACTOR * err_sdpa.abs().max(), \
            f"{name}: max error {err.abs().max():.3g} > {HALF_MAX_FACTOR} x SDPA's {err_sdpa.abs().max():.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["views-D64", "views-mask-D80", "rows-D72", "views-V1-D128"])
def test_half_precision(case, dtype, gen):
    require("triton")
    if case == "views-D64":
        q, k, v = make_qkv(gen, 1, 3, 45, 45, 2, 64, dtype)
        check_half(q, k, v, 3, "views", None, None, gen)
    elif case == "views-mask-D80":
        q, k, v = make_qkv(gen, 1, 4, 19, 19, 1, 80, dtype)
        check_half(q, k, v, 4, "views", None, random_mask(gen, 4), gen)
    elif case == "rows-D72":
        q, k, v = make_qkv(gen, 2, 2, 15, 15, 2, 72, dtype)
        check_half(q, k, v, 2, "rows", (3, 5), None, gen)
    else:
        q, k, v = make_qkv(gen, 2, 1, 33, 33, 1, 128, dtype)
        check_half(q, k, v, 1, "views", None, None, gen)


# --- empty inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shape", [(0, 5, 5), (2, 0, 5)], ids=["B0", "Lq0"])
def test_empty_inputs(backend, shape, gen):
    """No samples, or no queries: empty output; dk and dv are zeros (no query reaches any key)."""
    require(backend)
    BV, Lq, Lk = shape
    q = torch.randn(BV, Lq, 2, 32, generator=gen).requires_grad_()
    k, v = (torch.randn(BV, Lk, 2, 32, generator=gen).requires_grad_() for _ in range(2))
    out = multiview_attention(q, k, v, 2 if BV else 1, backend=backend)
    assert out.shape == q.shape
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out), allow_unused=True)
    for g, x in ((dq, q), (dk, k), (dv, v)):
        g = torch.zeros_like(x) if g is None else g
        assert g.shape == x.shape and torch.equal(g, torch.zeros_like(x))


# --- bad input ------------------------------------------------------------------------------------


def _valid(gen):
    q, k, v = make_qkv(gen, 2, 3, 12, 12, 2, 32)
    return dict(q=q, k=k, v=v, num_views=3, layout="views", image_size=None, view_mask=None, scale=None)


def _mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


BAD_INPUTS = {
    "batch-not-divisible": (lambda x: dict(x, num_views=4), r"num_views=4 must divide the batch of q"),
    "num_views-zero": (lambda x: dict(x, num_views=0), r"num_views must be a positive integer"),
    "num_views-float": (lambda x: dict(x, num_views=3.0), r"num_views must be a positive integer"),
    "q-rank3": (lambda x: dict(x, q=x["q"][..., 0]), r"q must have 4 dims"),
    "k-batch": (lambda x: dict(x, k=x["k"][:3]), r"k must have the batch B\*V = 6 of q"),
    "v-heads": (lambda x: dict(x, v=x["v"][:, :, :1]), r"v must have the H = 2 heads of q"),
    "k-head-dim": (lambda x: dict(x, k=x["k"][..., :16]), r"k must have the head dim D = 32 of q"),
    "v-head-dim": (lambda x: dict(x, v=torch.cat([x["v"], x["v"]], -1)), r"v must have the head dim D = 32 of q"),
    "v-tokens": (lambda x: dict(x, v=x["v"][:, :11]), r"v must have the Lk = 12 tokens of k"),
    "k-dtype": (lambda x: dict(x, k=x["k"].double()), r"k has dtype float64 but q has float32"),
    "v-dtype": (lambda x: dict(x, v=x["v"].half()), r"v has dtype float16 but q has float32"),
    "k-device": (lambda x: dict(x, k=x["k"].to("meta")), r"k is on meta but q is on cpu"),
    "layout": (lambda x: dict(x, layout="grid"), r"layout must be one of \('views', 'rows'\)"),
    "image_size-with-views": (lambda x: dict(x, image_size=(3, 4)), r"image_size is only used with layout='rows'"),
    "image_size-missing": (lambda x: dict(x, layout="rows"), r"image_size must be \(h, w\)"),
    "image_size-three": (lambda x: dict(x, layout="rows", image_size=(2, 3, 2)), r"image_size must be \(h, w\)"),
    "image_size-zero": (lambda x: dict(x, layout="rows", image_size=(0, 12)), r"image_size must be \(h, w\)"),
    "image_size-mismatch": (lambda x: dict(x, layout="rows", image_size=(3, 5)),
                            r"image_size \(h, w\) = \(3, 5\) must have h\*w = Lq = 12"),
    "rows-Lk": (lambda x: dict(x, layout="rows", image_size=(3, 4), k=x["k"][:, :8], v=x["v"][:, :8]),
                r"k must have Lk = Lq = 12 tokens"),
    "view_mask-shape": (lambda x: dict(x, view_mask=torch.ones(2, 2, dtype=torch.bool)),
                        r"view_mask must have shape \[V, V\] with V = num_views = \(3, 3\)"),
    "view_mask-dtype": (lambda x: dict(x, view_mask=torch.ones(3, 3)), r"view_mask must be a bool tensor; got float32"),
    "scale-negative": (lambda x: dict(x, scale=-0.1), r"scale must be a positive finite real number"),
    "scale-nan": (lambda x: dict(x, scale=math.nan), r"scale must be a positive finite real number"),
    "k-no-tokens": (lambda x: dict(x, k=x["k"][:, :0], v=x["v"][:, :0]), r"k must have at least one token"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_bad_inputs_are_rejected(case, backend, gen):
    mutate, pattern = BAD_INPUTS[case]
    x = mutate(_valid(gen))
    with pytest.raises(ValueError, match=pattern):
        multiview_attention(**x, backend=backend)


@pytest.mark.parametrize("name, value, exc, pattern", [
    ("q", "not a tensor", TypeError, r"q must be a torch.Tensor"),
    ("k", torch.ones(6, 12, 2, 32, dtype=torch.int32), TypeError, r"k must be a floating tensor"),
    ("view_mask", [[True]], TypeError, r"view_mask must be a bool torch.Tensor"),
])
def test_bad_types_are_rejected(name, value, exc, pattern, gen):
    x = dict(_valid(gen), **{name: value})
    with pytest.raises(exc, match=pattern):
        multiview_attention(**x)


# --- backends, dispatch, torch.compile --------------------------------------------------------------


def test_registered_backends():
    table = backends.backends(OP)
    assert set(table) == {"torch", "triton"}
    assert table["triton"].priority > table["torch"].priority
    assert torch.float64 not in table["triton"].dtypes
    assert backends.availability(OP)["torch"] is None


def test_explicit_triton_that_cannot_serve_lists_reasons(gen):
    require("triton")
    x = _valid(gen)
    x.update(q=x["q"].double(), k=x["k"].double(), v=x["v"].double())
    with pytest.raises(ValueError, match=r"multiview_attention: no backend can serve these inputs "
                                         r"\(backend='triton'\) -- triton: dtype float64 not in"):
        multiview_attention(**x, backend="triton")
    big = torch.randn(2, 3, 1, 264, generator=gen)
    with pytest.raises(ValueError, match=r"triton: head dim 264 > 256"):
        multiview_attention(big, big, big, 2, backend="triton")
    # auto falls back to the reference for what triton cannot serve.
    out = multiview_attention(**x)
    assert out.dtype == torch.float64


def test_auto_selects_triton_on_gpu_and_never_the_interpreter(gen):
    require("triton")
    shape = AttentionShape(head_dim=64, seg_q=4096, seg_k=4096)
    cpu = backends.Query(device=torch.device("cpu"), dtype=torch.bfloat16, shape=shape)
    assert backends.select(OP, "auto", cpu).name == "torch"
    assert backends.select(OP, "triton", cpu).name == "triton"
    if torch.cuda.is_available():
        gpu = backends.Query(device=torch.device("cuda"), dtype=torch.bfloat16, shape=shape)
        assert backends.select(OP, "auto", gpu).name == "triton"


def test_compile_fullgraph_forward_backward(gen):
    """The custom ops' fake implementations trace under fullgraph=True; compiled forward and
    gradients equal eager's."""
    require("triton")
    torch._dynamo.reset()
    mask = random_mask(gen, 2)
    f_eager = lambda a, b, c: multiview_attention(a, b, c, 2, view_mask=mask, backend="triton")  # noqa: E731
    f = torch.compile(f_eager, fullgraph=True, backend="aot_eager")
    q, k, v = make_qkv(gen, 1, 2, 13, 13, 1, 32)
    up = torch.randn(q.shape, generator=gen)
    for a, b in zip(grads(lambda *x: (f(*x),), [q, k, v], [up]), grads(lambda *x: (f_eager(*x),), [q, k, v], [up])):
        assert torch.equal(a, b)
    assert torch.equal(f(q, k, v), f_eager(q, k, v))


# --- benchmark hooks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("workload", [w.name for w in bench.WORKLOADS])
def test_bench_quick_inputs_and_baselines_agree(workload, gen):
    """The quick shape of every workload: the reference and the SDPA math baseline (rearrange
    copies + SDPA) give the same output; the flop model halves with the half mask."""
    w = next(w for w in bench.WORKLOADS if w.name == workload)
    p = dict(w.quick, dtype="float32")
    x = bench.make_inputs(p, torch.device("cpu"), gen)
    (ref,) = bench.run("torch", x)
    (base,) = bench.run("sdpa-math", x)
    assert_close(base, ref, atol=1e-5, rtol=1e-5, name=workload)
    for pass_ in ("forward", "backward", "forward+backward"):
        nbytes, flops = bench.model(w.params, pass_)
        assert nbytes > 0 and flops > 0
    if w.params["mask"] != "none":
        full = dict(w.params, mask="none")
        assert bench.model(w.params, "forward")[1] * 2 == bench.model(full, "forward")[1]


def test_bench_sdpa_baselines_say_why_not():
    for name in bench.SDPA_BASELINES:
        reason = bench.SPEC.baselines[name](torch.device("cpu"))
        assert reason is None or "SDPA" in reason
    assert bench.SPEC.baselines["sdpa-math"](torch.device("cpu")) is None
    if not torch.cuda.is_available():
        assert bench.SPEC.baselines["sdpa-cudnn"](torch.device("cuda")) == "no CUDA GPU visible to torch"


# --- GPU: the compiled kernels at model sizes ------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["mvdream", "era3d", "pixart-mv", "mvdream-halfmask"])
def test_gpu_workloads_half_precision(case, dtype, gen):
    """Model-sized shapes (batch 1) on the GPU against CUDA SDPA in the same precision."""
    require("triton")
    w = next(w for w in bench.WORKLOADS if w.name == case)
    p = dict(w.params, batch=1)
    x = bench.make_inputs(dict(p, dtype="float32"), torch.device("cpu"), gen)
    q, k, v = (x[n].detach().to("cuda", dtype).requires_grad_() for n in ("q", "k", "v"))
    check_half(q, k, v, x["num_views"], x["layout"], x["image_size"], x["view_mask"], gen)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [32, 40, 64, 72, 80, 128])
@pytest.mark.parametrize("layout", ["views", "rows"])
def test_gpu_float32_head_dims(layout, D, gen):
    require("triton")
    V = 4
    image_size, L = ((12, 40), 480) if layout == "rows" else (None, 1025)
    q, k, v = make_qkv(gen, 1, V, L, L, 2, D, device="cuda")
    mask = random_mask(gen, V, unseen=1)
    check_tight(*run_both(q, k, v, V, layout, image_size, mask, None, gen), what=f"{layout} D{D}")


# --- launch limits, device guard ---------------------------------------------------------------


@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_head_dim_fits_every_target_gpu(dtype, tf32, monkeypatch):
    """At the configurations a GPU launches, forward and backward of every accepted head dim fit
    the shared memory of every target architecture (sm_86/89's 101,376 B the smallest), by the
    model dispatch refuses by (tests/test_triton_compile.py checks the model against compiled
    figures)."""
    require("triton")
    from fast3d.ops.attention import MAX_TRITON_HEAD_DIM
    from fast3d.ops.attention import triton as kernels

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    for D in range(1, MAX_TRITON_HEAD_DIM + 1):
        assert kernels.shared_memory_reasons(dtype, D, 4096, 4096, True, torch.device("cpu")) == [], D


def test_dispatch_refuses_a_launch_past_the_shared_memory_limit(monkeypatch, gen):
    """A GPU whose per-block limit is below what a kernel needs: an explicit triton call names the
    kernel, its bytes and the limit, and the triton backend refuses the query (so auto passes it
    over), forward and backward kernels alike."""
    require("triton")
    limit = 30_000 + int(torch.randint(0, 10_000, (), generator=gen))
    monkeypatch.setitem(backends.SHARED_MEMORY_OPTIN, 86, limit)
    q, k, v = make_qkv(gen, 1, 2, 80, 80, 1, 128)
    with pytest.raises(ValueError, match=rf"triton: fwd kernel at .* needs ~[0-9,]+ B of shared memory > "
                                         rf"sm_86's {limit:,} B per block"):
        multiview_attention(q, k, v, 2, backend="triton")
    triton = backends.backends("multiview_attention")["triton"]
    for backward, kernels in ((False, ["fwd"]), (True, ["fwd", "dkdv", "dq"])):
        query = backends.Query(q.device, q.dtype, shape=AttentionShape(128, 80, 80, backward=backward))
        reasons = [r for r in triton.not_supported_reasons(query) if f"sm_86's {limit:,} B" in r]
        assert [r.split()[0] for r in reasons] == kernels, reasons
    # short segments get short tiles: D = 16 at 16 tokens fits
    small = make_qkv(gen, 1, 2, 16, 16, 1, 16)
    assert multiview_attention(*small, 2, backend="triton").shape == small[0].shape


@pytest.mark.skipif(torch.cuda.is_available(), reason="inspects the interpreter's launches (CPU tensors)")
def test_triton_launches_run_under_the_inputs_device_guard(monkeypatch, gen):
    """Triton launches on the current CUDA device: every attention launch (forward, delta, dK/dV,
    dQ) runs inside backends.cuda_device_guard(the inputs' device)."""
    require("triton")
    q, k, v = (x.requires_grad_() for x in make_qkv(gen, 1, 2, 9, 9, 1, 16))
    guarded = triton_launches_inside_guard(
        monkeypatch, lambda: multiview_attention(q, k, v, 2, backend="triton").sum().backward())
    assert sorted({name for name, _ in guarded}) == ["_delta_kernel", "_dkdv_kernel", "_dq_kernel", "_fwd_kernel"]
    assert {device for _, device in guarded} == {torch.device("cpu")}


def test_cuda_device_guard_targets_the_tensors_device():
    guard = backends.cuda_device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(backends.cuda_device_guard(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.gpu
def test_triton_on_a_second_gpu(gen):
    """Inputs on cuda:1 while cuda:0 is current: the launches follow the inputs (no illegal
    address), and forward and gradients equal the same call on cuda:0."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    require("triton")
    x = make_qkv(gen, 1, 2, 77, 77, 2, 64)
    up = random_like(x[0], gen)
    results = []
    with torch.cuda.device(0):
        for dev in ("cuda:1", "cuda:0"):
            q, k, v = (t.to(dev).requires_grad_() for t in x)
            out = multiview_attention(q, k, v, 2, backend="triton")
            out.backward(up.to(dev))
            assert out.device == torch.device(dev)
            results.append([t.cpu() for t in (out, q.grad, k.grad, v.grad)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_cuda_view_mask_costs_no_host_sync(gen):
    """A CUDA view_mask, here with an empty row, is never read back to the host nor asserted on the
    device (torch.cuda.set_sync_debug_mode('error') raises on any synchronising call in the op's
    Python); the empty row's query view comes out 0."""
    require("triton")
    q, k, v = make_qkv(gen, 1, 3, 33, 33, 1, 32, device="cuda")
    mask = random_mask(gen, 3)
    mask[1] = False
    mask = mask.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = multiview_attention(q, k, v, 3, view_mask=mask, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
