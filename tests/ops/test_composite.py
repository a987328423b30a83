"""Tests of fast3d.composite (NeRF emission-absorption compositing).

Every available native backend (`cpu`; `cuda` on a GPU) is compared with the PyTorch twin
`fast3d.ops.composite.reference.composite` run in float64 on the same (upcast) inputs: the four
outputs, and the gradients of sigmas, rgbs and background for random upstream gradients on all
four outputs (and on some of them only). Also: early termination, empty inputs, non-contiguous
inputs, input validation, backend selection, torch.compile, and half precision on the `torch`
backend. Every test draws fresh inputs from the `gen` fixture; a failure prints the seed
(FAST3D_TEST_SEED=N replays it).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, grads, random_like, triton_launches_inside_guard

import fast3d
from fast3d import backends
from fast3d.ops.composite import native, reference

try:
    import triton
    import triton.language as tl

    from fast3d.ops._triton_math import one_minus_exp_neg
except ImportError:   # the Triton-backed tests skip, through require("triton")
    triton = None

if triton is not None:
    @triton.jit
    def _apply_one_minus_exp_neg(x_ptr, y_ptr, N, BLOCK: tl.constexpr):   # x, y [N] float32
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        tl.store(y_ptr + offs, one_minus_exp_neg(tl.load(x_ptr + offs, mask=ok, other=0.0)), mask=ok)

OP = "composite"

# dtype -> (atol, rtol) of a backend's result against the float64 reference on the same inputs.
TOL = {
    # cpu backend in float64 vs the float64 reference: same formulas, but a sequential product
    # and sequential sums in the kernel against cumprod and torch's (blocked) sums in the
    # reference: a few ulp (2^-52) per sample over S <= 193 samples (measured worst |diff|
    # 7e-15, on the background gradient summed over 129 rays; 40 seeds).
    torch.float64: (1e-12, 1e-10),
    # cpu/cuda kernels in float32: sequential float32 sums and products over S <= 193 samples
    # accumulate <= S * 2^-24 ~ 1.2e-5 relative (rtol, with margin), and exp() plus the
    # `1 - alpha` cancellation cost <= 2^-25 absolute per sample times a transmittance <= 1
    # (atol). Measured: worst |diff| 3e-6 (background gradient, |value| ~ 10), worst excess over
    # rtol 1e-4 alone 4e-7 (60 seeds x 9 cases).
    torch.float32: (5e-6, 1e-4),
    # torch backend on half inputs: it computes in float32 and rounds the outputs (and
    # gradients) to the input dtype, so the error is the final rounding, 2^-11 (fp16) / 2^-8
    # (bf16) relative, plus the float32 terms above; the atol covers outputs near zero.
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
    # triton in float32 on thin samples (optical depth 1e-7..1e-5 each) vs float64 with expm1:
    # alpha comes from a series (no 1 - exp(-tau) cancellation, which alone costs up to 50%
    # relative at tau = 1e-7), so each weight and the opacity carry a few float32 roundings
    # (tau = sigma dt, the series, T = exp(-depth) ~ 1): <= 1e-6 relative; atol 0 (every value > 0).
    "thin float32": (0.0, 2e-6),
    # _triton_math.one_minus_exp_neg alone vs float64 -expm1: below its cut-off 1/2 a Horner series
    # whose truncation (< 1.1e-8) is under its 8 steps' float32 rounding, measured <= 1.05e-7
    # relative (~1.8 ulp) under the interpreter; 2e-7 leaves room for a GPU's other FMA contraction.
    "one_minus_exp_neg series": (0.0, 2e-7),
    # above the cut-off, 1 - exp(-tau) >= 0.39: exp's relative error (a few ulp with ex2.approx on
    # a GPU, measured 1.8e-7 in the interpreter) grows by at most 1/0.39 through the subtraction.
    "one_minus_exp_neg direct": (0.0, 1e-6),
}

# Kernel backends. `triton` runs on CUDA tensors on a GPU, else on CPU tensors in the interpreter
# (TRITON_INTERPRET=1, set by conftest); named explicitly, since `auto` skips the interpreter.
NATIVE = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
          pytest.param("triton", id="triton")]
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def device_of(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else ("cuda" if backend == "cuda" else "cpu")
BACKGROUNDS = [None, "shared", "per_ray"]
EPSILONS = [0.0, 1e-4, 1e-2]
# (R, S, D): odd sizes, R in {1, 37, 129}, S in {1, 7, 65, 193}, D in {1, 3, 4}.
SHAPES = [(1, 1, 3), (37, 7, 1), (37, 193, 3), (129, 65, 4), (129, 7, 3), (1, 193, 4)]
OUTPUTS = ("color", "opacity", "depth", "weights")

# Relative distance from transmittance_eps that the float64 transmittance of every sample keeps
# (see clear_of_cutoff).
CUTOFF_MARGIN = 1e-2


def require(backend: str) -> None:
    reason = backends.availability(OP)[backend]
    if reason:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


def make_inputs(gen: torch.Generator, R: int, S: int, D: int, *, background=None, density: str = "mixed",
                dtype: torch.dtype = torch.float32, device="cpu") -> dict:
    """Inputs built like fast3d/ops/composite/bench.py: sorted, jittered t_starts; t_ends the next
    start (far for the last sample). density "mixed": rays cycle through empty (sigma = 0 on the
    whole ray), normal (scale U(0, 40) as in the bench) and very dense (scale 200 + U(0, 2000):
    transmittance falls below any eps, often to 0, within a few samples); "dense": all very
    dense; "terminating": per-sample optical depth ~ U(0.5, 3), so the transmittance crosses eps
    early but stays far above float32's underflow (the cut-off, not underflow, zeroes weights)."""

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    near, far = 0.5, 2.5
    edges = torch.linspace(near, far, S + 1)
    jitter = (rand(R, S) - 0.5) * (far - near) / max(S, 1) * 0.5
    t_starts = (edges[:-1] + jitter).contiguous()
    t_ends = torch.cat([t_starts[:, 1:], torch.full((R, 1), far)], 1)[:, :S].contiguous()
    if density == "mixed":
        kind = torch.arange(R) % 3
        dense = 200.0 + rand(R) * 2000.0
        scale = torch.where(kind == 0, 0.0, torch.where(kind == 1, rand(R) * 40.0, dense))[:, None]
        sigmas = rand(R, S) * scale
    elif density == "dense":
        sigmas = rand(R, S) * (200.0 + rand(R, 1) * 2000.0)
    elif density == "terminating":
        sigmas = (0.5 + 2.5 * rand(R, S)) * S / (far - near)
    else:
        raise AssertionError(density)
    rgbs = rand(R, S, D)
    bg = {None: None, "shared": rand(D), "per_ray": rand(R, D)}[background]
    x = dict(sigmas=sigmas, rgbs=rgbs, t_starts=t_starts, t_ends=t_ends, background=bg)
    return {k: None if v is None else v.to(device, dtype) for k, v in x.items()}


def clear_of_cutoff(x: dict, eps: float) -> dict:
    """Scale the densities of rays on which some sample's transmittance lies within
    CUTOFF_MARGIN (relative) of eps, until none does.

    The cut-off `T_i >= eps` is a discontinuity: a sample whose transmittance is within rounding
    of eps can be live in one computation and cut in another, changing its weight by up to
    alpha * eps and every earlier sigma gradient by g * w (1e-2 for eps = 1e-2). Such ties are
    not meaningful to compare, so the inputs avoid them. The margin: T_i is a product of factors
    1 - alpha_j, each >= T_i >= eps (else the ray was already cut); float32 rounds alpha to
    2^-25 absolute, i.e. <= 2^-25 / eps relative in 1 - alpha_j, and tau and exp cost ~1e-7
    relative per factor, so the float32 T_i is within ~6e-8 * (1/eps + S) ~ 6e-4 (eps = 1e-4)
    of the exact one; CUTOFF_MARGIN = 1e-2 leaves a wide berth.

    (Running the reference in float32 instead does not make the decision match: torch's
    cumprod accumulates float32 in double on the CPU, so it is not the kernel's sequential
    float32 product, and the exp implementations differ by an ulp.)"""
    if eps == 0.0:
        return x
    s = x["sigmas"].clone()
    t0, t1 = x["t_starts"].double(), x["t_ends"].double()
    for _ in range(100):
        tau = torch.cumsum(s.double() * (t1 - t0), -1)
        trans = torch.exp(-torch.cat([torch.zeros_like(tau[:, :1]), tau[:, :-1]], -1))  # T_i
        tie = ((trans / eps - 1.0).abs() < CUTOFF_MARGIN).any(-1)
        if not tie.any():
            return dict(x, sigmas=s)
        s[tie] = s[tie] * 1.07
    raise AssertionError("could not move the transmittances away from the cut-off")


def differentiable(x: dict) -> list:
    return [x["sigmas"], x["rgbs"]] + ([x["background"]] if x["background"] is not None else [])


def fn_of(x: dict, eps: float, backend: str | None):
    """f(sigmas, rgbs[, background]) -> 4 outputs; backend None is the reference."""
    t0, t1 = x["t_starts"], x["t_ends"]
    has_bg = x["background"] is not None

    def f(sigmas, rgbs, *bg):
        background = bg[0] if has_bg else None
        if backend is None:
            return reference.composite(sigmas, rgbs, t0.to(sigmas.dtype), t1.to(sigmas.dtype), background, eps)
        return fast3d.composite(sigmas, rgbs, t0, t1, background, eps, backend=backend)

    return f


def upcast(x: dict) -> dict:
    return {k: None if v is None else v.detach().to("cpu", torch.float64) for k, v in x.items()}


def check(name: str, actual, expected, tol, like=None) -> None:
    """Every element finite and equal to the reference within tol. A None gradient (an input the
    requested outputs do not reach) counts as zeros of `like`'s shape."""
    if actual is None:
        actual = torch.zeros_like(like)
    if expected is None:
        expected = torch.zeros(actual.shape, dtype=torch.float64)
    assert torch.isfinite(actual).all(), f"{name}: non-finite elements {(~torch.isfinite(actual)).nonzero()[:5].tolist()}"
    atol, rtol = tol
    assert_close(actual, expected, atol=atol, rtol=rtol, name=name)


def compare_with_reference(backend: str, x: dict, eps: float, gen: torch.Generator, *, tol,
                           upstream=OUTPUTS) -> tuple:
    """Forward and gradients of `backend` on x against the float64 reference on upcast(x).
    Only the outputs named in `upstream` get a (random) upstream gradient."""
    x64 = upcast(x)
    dtype, device = x["sigmas"].dtype, x["sigmas"].device
    with torch.no_grad():
        out = fn_of(x, eps, backend)(*differentiable(x))
        out64 = fn_of(x64, eps, None)(*differentiable(x64))
    for name, a, e in zip(OUTPUTS, out, out64):
        assert a.dtype == dtype and a.device == device, f"{name}: {a.dtype} on {a.device}"
        check(f"{backend} {name}", a, e, tol)
    # The same upstream values for both: drawn in float64, rounded to the backend's dtype.
    ups = [random_like(e, gen).to(dtype) if n in upstream else None for n, e in zip(OUTPUTS, out64)]
    ups = [None if u is None else u.to(device) for u in ups]
    ups64 = [None if u is None else u.to("cpu", torch.float64) for u in ups]
    g = grads(fn_of(x, eps, backend), differentiable(x), ups)
    g64 = grads(fn_of(x64, eps, None), differentiable(x64), ups64)
    for name, a, e, inp in zip(("grad sigmas", "grad rgbs", "grad background"), g, g64, differentiable(x)):
        check(f"{backend} {name}", a, e, tol, like=inp)
    return out, out64, g, g64


# --- native backends vs the float64 reference ---------------------------------------------------


@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("bg", BACKGROUNDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "R{}-S{}-D{}".format(*s))
@pytest.mark.parametrize("backend", NATIVE)
def test_native_float32_matches_reference(backend, shape, bg, eps, gen):
    """float32 kernels vs the float64 reference on the same (upcast) float32 inputs; empty,
    normal and very dense rays; gradients for random upstream gradients on all four outputs."""
    require(backend)
    x = clear_of_cutoff(make_inputs(gen, *shape, background=bg), eps)
    x = {k: None if v is None else v.to(device_of(backend)) for k, v in x.items()}
    compare_with_reference(backend, x, eps, gen, tol=TOL[torch.float32])


@pytest.mark.parametrize("bg", BACKGROUNDS)
@pytest.mark.parametrize("D", [17, 40])
def test_triton_wide_features_in_channel_chunks(D, bg, gen):
    """Feature rendering (D > 16): the Triton kernels walk the channels in 16-wide chunks (the
    forward recomputes the weights per chunk, the backward sums <dcolor, rgb> over them)."""
    require("triton")
    x = clear_of_cutoff(make_inputs(gen, 21, 45, D, background=bg), 1e-4)
    x = {k: None if v is None else v.to(device_of("triton")) for k, v in x.items()}
    compare_with_reference("triton", x, 1e-4, gen, tol=TOL[torch.float32])


@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("bg", BACKGROUNDS)
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=lambda s: "R{}-S{}-D{}".format(*s))
def test_cpu_float64_matches_reference_tightly(shape, bg, eps, gen):
    require("cpu")
    x = clear_of_cutoff(make_inputs(gen, *shape, background=bg), eps)
    x = {k: None if v is None else v.double() for k, v in x.items()}
    compare_with_reference("cpu", x, eps, gen, tol=TOL[torch.float64])


@pytest.mark.parametrize("upstream", [("color",), ("opacity",), ("depth",), ("weights",), ("opacity", "depth"),
                                      ("color", "weights")], ids="+".join)
@pytest.mark.parametrize("backend", NATIVE)
def test_gradients_with_some_outputs_unused(backend, upstream, gen):
    """Only some outputs reach the loss (None upstream for the others): the backward must treat
    the missing gradients as zeros. Inputs the used outputs do not depend on get None from the
    reference (counted as zeros) and zeros from the kernel."""
    require(backend)
    x = make_inputs(gen, 37, 65, 3, background="per_ray" if "color" in upstream else "shared",
                    device=device_of(backend))
    x = clear_of_cutoff(x, 1e-4)
    compare_with_reference(backend, x, 1e-4, gen, tol=TOL[torch.float32], upstream=upstream)


@pytest.mark.parametrize("eps", [1e-4, 1e-2])
@pytest.mark.parametrize("S", [65, 193])
@pytest.mark.parametrize("backend", NATIVE)
def test_early_termination(backend, S, eps, gen):
    """Samples after the transmittance falls below eps get weight (and gradient) exactly zero in
    both implementations, at the same samples; the cut-off, not underflow, is what zeroes them."""
    require(backend)
    x = clear_of_cutoff(make_inputs(gen, 37, S, 3, background="per_ray", density="terminating",
                                      device=device_of(backend)), eps)
    out, out64, g, g64 = compare_with_reference(backend, x, eps, gen, tol=TOL[torch.float32])
    w, w64 = out[3].cpu(), out64[3]
    cut = w == 0
    assert cut.any(-1).all(), f"every ray should terminate early; rays without a zero weight: {(~cut.any(-1)).nonzero().flatten().tolist()}"
    assert torch.equal(cut, w64 == 0), "kernel and reference cut different samples"
    # Once cut, the rest of the ray is cut.
    assert torch.equal(cut, cut.int().cummax(-1).values.bool())
    # Without the cut-off these samples would have positive weight: the cut-off is exercised.
    with torch.no_grad():
        w_uncut = fn_of(upcast(x), 0.0, None)(*differentiable(upcast(x)))[3]
    assert (w_uncut[cut] > 0).all()
    # No gradient flows into cut samples.
    g_sigmas, g_rgbs = g[0].cpu(), g[1].cpu()
    assert (g_sigmas[cut] == 0).all() and (g_rgbs[cut] == 0).all()
    assert (g64[0][cut] == 0).all() and (g64[1][cut] == 0).all()


@pytest.mark.parametrize("backend", NATIVE)
def test_non_contiguous_inputs(backend, gen):
    require(backend)
    R, S, D = 37, 65, 3
    x = clear_of_cutoff(make_inputs(gen, R, S, D, background="per_ray", device=device_of(backend)), 1e-4)
    # Same values, strided layouts: transposed [R, S], a slice of a wider [R, S, D + 2].
    y = dict(x)
    for k in ("sigmas", "t_starts", "t_ends"):
        y[k] = x[k].t().contiguous().t()
    wide = torch.empty(R, S, D + 2, device=device_of(backend))
    wide[..., 1:D + 1] = x["rgbs"]
    y["rgbs"] = wide[..., 1:D + 1]
    y["background"] = x["background"].t().contiguous().t()
    assert not any(y[k].is_contiguous() for k in ("sigmas", "rgbs", "t_starts", "t_ends", "background"))
    compare_with_reference(backend, y, 1e-4, gen, tol=TOL[torch.float32])


def test_t_intervals_get_no_gradient(gen):
    """t_starts / t_ends are constants: no gradient reaches them even if they require one."""
    require("cpu")
    x = make_inputs(gen, 7, 7, 3, background="shared")
    t0, t1 = x["t_starts"].requires_grad_(), x["t_ends"].requires_grad_()
    for backend in ("cpu", "torch"):
        out = fast3d.composite(x["sigmas"].requires_grad_(), x["rgbs"], t0, t1, x["background"], backend=backend)
        loss = sum((o * random_like(o, gen)).sum() for o in out)
        g = torch.autograd.grad(loss, [x["sigmas"], t0, t1], allow_unused=True)
        assert g[0] is not None and g[1] is None and g[2] is None, backend


# --- empty inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("bg", BACKGROUNDS)
@pytest.mark.parametrize("R, S", [(0, 7), (0, 0), (5, 0)])
@pytest.mark.parametrize("backend", NATIVE + ["torch"])
def test_empty_inputs(backend, R, S, bg, gen):
    """R = 0 gives empty outputs; S = 0 (rays without samples) gives opacity and depth 0 and the
    background as colour (0 without one); gradients have the inputs' shapes."""
    require(backend)
    device = device_of(backend)
    D = 3
    x = make_inputs(gen, R, S, D, background=bg, device=device)
    out = fast3d.composite(x["sigmas"], x["rgbs"], x["t_starts"], x["t_ends"], x["background"], backend=backend)
    assert [tuple(o.shape) for o in out] == [(R, D), (R, 1), (R, 1), (R, S)]
    color, opacity, depth, _ = (o.cpu() for o in out)
    if S == 0:
        expected = torch.zeros(R, D) if bg is None else x["background"].cpu().expand(R, D)
        assert torch.equal(color, expected)
        assert torch.equal(opacity, torch.zeros(R, 1)) and torch.equal(depth, torch.zeros(R, 1))
    compare_with_reference(backend, x, 1e-4, gen, tol=TOL[torch.float32])


# --- input validation and backend selection ----------------------------------------------------


def _valid(gen, R=5, S=7, D=3):
    return make_inputs(gen, R, S, D, background="shared")


BAD_INPUTS = {
    # name: (mutation of the valid inputs, exception, message pattern)
    "sigmas-not-tensor": (lambda x: dict(x, sigmas=x["sigmas"].tolist()), TypeError, r"sigmas must be a torch.Tensor"),
    "sigmas-rank3": (lambda x: dict(x, sigmas=x["sigmas"][None]), ValueError, r"sigmas must have 2 dims"),
    "sigmas-rank1": (lambda x: dict(x, sigmas=x["sigmas"][0]), ValueError, r"sigmas must have 2 dims"),
    "rgbs-rank2": (lambda x: dict(x, rgbs=x["rgbs"][..., 0]), ValueError, r"rgbs must have 3 dims"),
    "rgbs-R": (lambda x: dict(x, rgbs=x["rgbs"][:4]), ValueError, r"rgbs must have shape \[R, S, D\]"),
    "rgbs-S": (lambda x: dict(x, rgbs=x["rgbs"][:, :6]), ValueError, r"rgbs must have shape \[R, S, D\]"),
    "t_starts-shape": (lambda x: dict(x, t_starts=x["t_starts"][:, :6]), ValueError, r"t_starts must have shape"),
    "t_starts-transposed": (lambda x: dict(x, t_starts=torch.rand(7, 5)), ValueError, r"t_starts must have shape"),
    "t_ends-shape": (lambda x: dict(x, t_ends=x["t_ends"][:4]), ValueError, r"t_ends must have shape"),
    "t_ends-rank": (lambda x: dict(x, t_ends=x["t_ends"][..., None]), ValueError, r"t_ends must have 2 dims"),
    "background-D": (lambda x: dict(x, background=torch.rand(4)), ValueError, r"background must have shape"),
    "background-RD": (lambda x: dict(x, background=torch.rand(5, 4)), ValueError, r"background must have shape"),
    "background-R": (lambda x: dict(x, background=torch.rand(6, 3)), ValueError, r"background must have shape"),
    "background-1D": (lambda x: dict(x, background=torch.rand(1, 3)), ValueError, r"background must have shape"),
    "background-rank3": (lambda x: dict(x, background=torch.rand(5, 3, 1)), ValueError, r"background must have shape"),
    "sigmas-int": (lambda x: dict(x, sigmas=(x["sigmas"] * 10).int()), TypeError, r"sigmas must be a floating tensor"),
    "rgbs-int": (lambda x: dict(x, rgbs=(x["rgbs"] * 255).to(torch.uint8)), TypeError, r"rgbs must be a floating tensor"),
    "t_starts-long": (lambda x: dict(x, t_starts=x["t_starts"].long()), TypeError, r"t_starts must be a floating tensor"),
    "background-int": (lambda x: dict(x, background=torch.ones(3, dtype=torch.int32)), TypeError,
                       r"background must be a floating tensor"),
    "rgbs-float64": (lambda x: dict(x, rgbs=x["rgbs"].double()), TypeError, r"rgbs has dtype float64 but sigmas has float32"),
    "t_ends-float16": (lambda x: dict(x, t_ends=x["t_ends"].half()), TypeError, r"t_ends has dtype float16"),
    "background-bfloat16": (lambda x: dict(x, background=x["background"].bfloat16()), TypeError,
                            r"background has dtype bfloat16"),
    "background-device": (lambda x: dict(x, background=x["background"].to("meta")), ValueError,
                          r"background is on meta but sigmas is on cpu"),
    "t_starts-inf": (lambda x: dict(x, t_starts=x["t_starts"].index_put((torch.tensor([2]), torch.tensor([3])),
                                                                         torch.tensor(math.inf))),
                     ValueError, r"t_starts must be finite; got inf at index \(2, 3\)"),
    "t_starts-nan": (lambda x: dict(x, t_starts=x["t_starts"].index_put((torch.tensor([4]), torch.tensor([0])),
                                                                         torch.tensor(math.nan))),
                     ValueError, r"t_starts must be finite; got nan at index \(4, 0\)"),
    "t_ends-neginf": (lambda x: dict(x, t_ends=x["t_ends"].index_put((torch.tensor([0]), torch.tensor([6])),
                                                                     torch.tensor(-math.inf))),
                      ValueError, r"t_ends must be finite; got -inf"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_bad_inputs_are_rejected(case, backend, gen):
    mutate, exc, pattern = BAD_INPUTS[case]
    x = mutate(_valid(gen))
    with pytest.raises(exc, match=pattern):
        fast3d.composite(x["sigmas"], x["rgbs"], x["t_starts"], x["t_ends"], x["background"], backend=backend)


@pytest.mark.parametrize("eps", [-1e-6, -1.0, 1.0, 1.5, math.nan, math.inf, "0.1", None])
def test_transmittance_eps_out_of_range(eps, gen):
    x = _valid(gen)
    with pytest.raises(ValueError, match=r"transmittance_eps must be a real number in \[0, 1\)"):
        fast3d.composite(x["sigmas"], x["rgbs"], x["t_starts"], x["t_ends"], x["background"], transmittance_eps=eps)


def test_explicit_backend_that_cannot_serve_lists_its_reasons(gen):
    x = _valid(gen)
    args = (x["sigmas"], x["rgbs"], x["t_starts"], x["t_ends"], x["background"])
    # cuda on CPU tensors: the reason is the machine's (no GPU / no CUDA build), or the device.
    reason = backends.availability(OP)["cuda"] or "device 'cpu' not in ['cuda']"
    with pytest.raises(ValueError, match=r"composite: no backend can serve these inputs \(backend='cuda'\)") as e:
        fast3d.composite(*args, backend="cuda")
    assert f"cuda: {reason}" in str(e.value)
    # The native cpu backend declares float32/float64 only.
    if backends.availability(OP)["cpu"] is None:
        with pytest.raises(ValueError, match=r"cpu: dtype bfloat16 not in \['float32', 'float64'\]"):
            fast3d.composite(*(a.bfloat16() for a in args), backend="cpu")


@pytest.mark.parametrize("name", ["nope", "Triton", "CPU", ""])
def test_unknown_backend_name(name, gen):
    x = _valid(gen)
    with pytest.raises(ValueError, match=r"composite: backend must be 'auto' or one of \['cpu', 'cuda', 'torch', 'triton'\]; "
                                         rf"got '{name}'"):
        fast3d.composite(x["sigmas"], x["rgbs"], x["t_starts"], x["t_ends"], x["background"], backend=name)


def test_registered_backends():
    table = backends.backends(OP)
    assert set(table) == {"torch", "cpu", "cuda", "triton"}
    assert table["triton"].priority > table["cuda"].priority
    assert set(table["triton"].dtypes) == {torch.float16, torch.bfloat16, torch.float32}
    assert table["cpu"].dtypes == (torch.float32, torch.float64) and table["cpu"].devices == ("cpu",)
    assert table["cuda"].dtypes == (torch.float32,) and table["cuda"].devices == ("cuda",)
    assert set(table["torch"].dtypes) == {torch.float16, torch.bfloat16, torch.float32, torch.float64}
    assert table["cuda"].priority > table["cpu"].priority > table["torch"].priority
    avail = backends.availability(OP)
    assert avail["torch"] is None
    if not torch.cuda.is_available():
        assert avail["cuda"]  # a reason, never None without a GPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_auto_runs_the_selected_backend(dtype, gen):
    """auto on CPU tensors: the native cpu backend for float32/float64 (where built), torch for
    half precision; and the call gives exactly the named backend's result."""
    cpu_ok = backends.availability(OP)["cpu"] is None
    expected = "cpu" if cpu_ok and dtype in (torch.float32, torch.float64) else "torch"
    q = backends.Query(device=torch.device("cpu"), dtype=dtype)
    assert backends.select(OP, "auto", q).name == expected
    x = make_inputs(gen, 37, 7, 3, background="per_ray", dtype=dtype)
    args = (x["sigmas"], x["rgbs"], x["t_starts"], x["t_ends"], x["background"])
    for a, b in zip(fast3d.composite(*args), fast3d.composite(*args, backend=expected)):
        assert torch.equal(a, b)


# --- half precision: the torch backend ------------------------------------------------------------


@pytest.mark.parametrize("bg", BACKGROUNDS)
@pytest.mark.parametrize("dtype, S", [(torch.bfloat16, 7), (torch.bfloat16, 193), (torch.float16, 65),
                                      (torch.float16, 193)])
def test_half_precision_uses_torch_backend(dtype, S, bg, gen):
    """bf16/fp16: auto selects `torch`, which computes in float32, and matches the float64
    reference on the upcast half inputs to the output dtype's rounding, on long rays too."""
    q = backends.Query(device=torch.device("cpu"), dtype=dtype)
    assert backends.select(OP, "auto", q).name == "torch"
    x = make_inputs(gen, 37, S, 3, background=bg, dtype=dtype)
    compare_with_reference("auto", x, 1e-4, gen, tol=TOL[dtype])


# --- torch.compile -------------------------------------------------------------------------------


def _small(gen):
    x = clear_of_cutoff(make_inputs(gen, 9, 13, 3, background="shared"), 1e-4)
    return x["sigmas"], x["rgbs"], x["t_starts"], x["t_ends"], x["background"]


def test_compile_public_api_fullgraph(gen):
    require("cpu")
    torch._dynamo.reset()
    args = _small(gen)
    f = torch.compile(lambda *a: fast3d.composite(*a, 1e-4, backend="cpu"), fullgraph=True, backend="aot_eager")
    for a, b in zip(f(*args), fast3d.composite(*args, 1e-4, backend="cpu")):
        assert torch.equal(a, b)


def test_compile_public_api_with_graph_break(gen):
    require("cpu")
    torch._dynamo.reset()
    args = _small(gen)
    f = torch.compile(lambda *a: fast3d.composite(*a, 1e-4, backend="cpu"), backend="aot_eager")
    for a, b in zip(f(*args), fast3d.composite(*args, 1e-4, backend="cpu")):
        assert torch.equal(a, b)


def test_compile_custom_op_fullgraph_forward_backward(gen):
    """The custom ops' fake implementations (forward and backward) trace under fullgraph=True,
    with dynamic shapes, and the compiled forward and gradients equal eager's."""
    require("cpu")
    torch._dynamo.reset()
    f = torch.compile(lambda *a: native.composite(*a, 1e-4), fullgraph=True, dynamic=True, backend="aot_eager")
    for R, S in [(9, 13), (5, 21)]:
        x = clear_of_cutoff(make_inputs(gen, R, S, 3, background="per_ray"), 1e-4)
        args = (x["sigmas"], x["rgbs"], x["t_starts"], x["t_ends"], x["background"])
        for a, b in zip(f(*args), native.composite(*args, 1e-4)):
            assert a.shape == b.shape and torch.equal(a, b)
        ups = [random_like(o, gen) for o in native.composite(*args, 1e-4)]
        fc = lambda s, r, bg: f(s, r, x["t_starts"], x["t_ends"], bg)  # noqa: E731
        fe = lambda s, r, bg: native.composite(s, r, x["t_starts"], x["t_ends"], bg, 1e-4)  # noqa: E731
        for a, b in zip(grads(fc, differentiable(x), ups), grads(fe, differentiable(x), ups)):
            assert torch.equal(a, b)


def test_compile_custom_op_inductor(gen):
    """The default inductor backend (about 1 s here with an empty inductor cache: the graph is
    two custom-op calls, nothing for inductor to generate but glue)."""
    require("cpu")
    torch._dynamo.reset()
    args = _small(gen)
    f = torch.compile(lambda *a: native.composite(*a, 1e-4), fullgraph=True)
    for a, b in zip(f(*args), fast3d.composite(*args, 1e-4, backend="cpu")):
        assert torch.equal(a, b)


# --- triton backend: half precision, selection, torch.compile -----------------------------------


@pytest.mark.parametrize("bg", BACKGROUNDS)
@pytest.mark.parametrize("dtype, S", [(torch.bfloat16, 7), (torch.bfloat16, 193), (torch.float16, 65)])
def test_triton_half_precision(dtype, S, bg, gen):
    """bf16/fp16 inputs: the Triton kernels load them, compute in float32 and round the outputs
    and gradients, as the torch backend does; same tolerance."""
    require("triton")
    x = make_inputs(gen, 37, S, 3, background=bg, dtype=dtype, device=TRITON_DEVICE)
    compare_with_reference("triton", x, 1e-4, gen, tol=TOL[dtype])


def test_auto_never_picks_the_triton_interpreter():
    """On CPU tensors `auto` skips triton (the interpreter is slow) and names why; an explicit
    backend="triton" is served."""
    require("triton")
    q = backends.Query(device=torch.device("cpu"), dtype=torch.float32)
    assert backends.select(OP, "auto", q).name != "triton"
    assert backends.select(OP, "triton", q).name == "triton"
    with pytest.raises(ValueError, match="interpreter: used only when named"):
        backends.select(OP, "auto", backends.Query(device=torch.device("cpu"), dtype=torch.bfloat16,
                                                   features=frozenset({"no-such-feature"})))


def test_compile_triton_custom_op_fullgraph_forward_backward(gen):
    """The Triton backend's custom ops trace under fullgraph=True (fake implementations) and
    the compiled forward and gradients equal eager's."""
    require("triton")
    from fast3d.ops.composite import triton as triton_composite

    torch._dynamo.reset()
    f = torch.compile(lambda *a: triton_composite.composite(*a, 1e-4), fullgraph=True, backend="aot_eager")
    x = clear_of_cutoff(make_inputs(gen, 9, 13, 3, background="per_ray", device=TRITON_DEVICE), 1e-4)
    args = (x["sigmas"], x["rgbs"], x["t_starts"], x["t_ends"], x["background"])
    eager = triton_composite.composite(*args, 1e-4)
    for a, b in zip(f(*args), eager):
        assert a.shape == b.shape and torch.equal(a, b)
    ups = [random_like(o, gen) for o in eager]
    fc = lambda s, r, bg: f(s, r, x["t_starts"], x["t_ends"], bg)  # noqa: E731
    fe = lambda s, r, bg: triton_composite.composite(s, r, x["t_starts"], x["t_ends"], bg, 1e-4)  # noqa: E731
    for a, b in zip(grads(fc, differentiable(x), ups), grads(fe, differentiable(x), ups)):
        assert torch.equal(a, b)


def test_triton_thin_samples_keep_relative_precision(gen):
    """Nearly transparent samples (tau = sigma dt in 1e-7..1e-5): weights and opacity are relative-
    accurate against float64's -expm1(-tau) (a plain 1 - exp(-tau) in float32 is off by up to 50%)."""
    require("triton")
    R, S = 17, 40
    tau = 10 ** (-7 + 2 * torch.rand(R, S, generator=gen, dtype=torch.float64))           # [R, S]
    t = torch.cumsum(0.5 + torch.rand(R, S + 1, generator=gen, dtype=torch.float64), -1)  # [R, S + 1]
    t0, t1 = t[:, :-1].float(), t[:, 1:].float()
    sig = (tau / (t1 - t0).double()).float()                                             # [R, S]
    rgb = torch.rand(R, S, 3, generator=gen)
    dev = TRITON_DEVICE
    color, opacity, depth, weights = fast3d.composite(sig.to(dev), rgb.to(dev), t0.to(dev), t1.to(dev), None,
                                                      1e-4, backend="triton")
    tau64 = sig.double() * (t1.double() - t0.double())
    depth_through = torch.cumsum(tau64, -1)
    w64 = -torch.expm1(-tau64) * torch.exp(-(depth_through - tau64))
    o64 = -torch.expm1(-depth_through[:, -1:])
    atol, rtol = TOL["thin float32"]
    assert_close(weights.cpu().double(), w64, atol=atol, rtol=rtol)
    assert_close(opacity.cpu().double(), o64, atol=atol, rtol=rtol)


def test_one_minus_exp_neg_is_relative_accurate(gen):
    """The shared Triton helper for 1 - exp(-tau) (composite's and the marcher's alpha): relative
    error against float64 -expm1 on log-uniform tau in (1e-30, 1/2] (the series) and uniform tau
    around and above the cut-off 1/2 (both branches meet there)."""
    require("triton")
    series = (10 ** (-30 + 29.7 * torch.rand(20000, generator=gen, dtype=torch.float64))).float()   # <= 0.5
    series = series.clamp(max=0.5)
    around = 0.45 + 3.55 * torch.rand(4000, generator=gen)                                        # [0.45, 4)
    for name, tau in (("one_minus_exp_neg series", series), ("one_minus_exp_neg direct", around[around >= 0.5]),
                      ("one_minus_exp_neg series", around[around < 0.5])):
        x = tau.to(TRITON_DEVICE)
        y = torch.empty_like(x)
        _apply_one_minus_exp_neg[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
        atol, rtol = TOL[name]
        assert_close(y.cpu().double(), -torch.expm1(-tau.double()), atol=atol, rtol=rtol, name=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="inspects the interpreter's launches (CPU tensors)")
def test_triton_launches_run_under_the_inputs_device_guard(monkeypatch, gen):
    """Triton launches on the current CUDA device: every composite launch (forward, backward,
    dense and packed) runs inside backends.cuda_device_guard(the inputs' device)."""
    require("triton")
    x = make_inputs(gen, 5, 9, 3, background="shared")
    ri = torch.arange(5).repeat_interleave(9)
    flat = {k: v.reshape(-1, *v.shape[2:]).clone() for k, v in x.items() if k != "background"}
    for inputs in (x, flat):
        inputs["sigmas"].requires_grad_()
        inputs["rgbs"].requires_grad_()

    def run():
        out = fast3d.composite(**x, backend="triton")
        torch.autograd.backward(out[:3], [torch.ones_like(o) for o in out[:3]])
        out = fast3d.composite(**flat, ray_indices=ri, backend="triton")
        torch.autograd.backward(out[:3], [torch.ones_like(o) for o in out[:3]])

    guarded = triton_launches_inside_guard(monkeypatch, run)
    assert sorted({name for name, _ in guarded}) == ["_composite_bwd", "_composite_fwd"]
    assert {device for _, device in guarded} == {torch.device("cpu")}


@pytest.mark.gpu
def test_triton_on_a_second_gpu(gen):
    """Inputs on cuda:1 while cuda:0 is current: the launch follows the inputs (no illegal address),
    and the result equals the same call on cuda:0."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    require("triton")
    x = make_inputs(gen, 37, 65, 3, background="per_ray")
    with torch.cuda.device(0):
        on1 = fast3d.composite(**{k: v.detach().to("cuda:1") for k, v in x.items()}, backend="triton")
        on0 = fast3d.composite(**{k: v.detach().to("cuda:0") for k, v in x.items()}, backend="triton")
    for a, b in zip(on1, on0):
        assert a.device == torch.device("cuda:1")
        assert torch.equal(a.cpu(), b.cpu())
