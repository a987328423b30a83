"""Tests of the native compositor's own contract (fast3d._C, csrc/composite), on the CPU backend
(and the CUDA one, for thin samples, on a GPU).

* Thin samples: alpha = 1 - exp(-tau) is computed as -expm1(-tau) (composite_math.h, shared with
  the CUDA kernel), so float32 weights, opacity and density gradients keep their relative accuracy
  for optical depths down to 1e-7, checked against the float64 reference on the same inputs.
* The bindings `composite_forward` / `composite_backward`, called directly (as the torch custom ops
  do, without the Python API's validation), reject a tensor of the wrong shape with an error naming
  the argument, the expected shape and the received one, and take non-contiguous tensors.

Every test draws fresh inputs from the `gen` fixture.
"""

from __future__ import annotations

import pytest
import torch

import fast3d
from fast3d import backends
from fast3d.ops.composite import reference

OP = "composite"

# Relative tolerances of the float32 cpu backend against float64 on thin samples (tau in
# [1e-7, 1e-3]). With expm1, alpha is within a few ulps (2^-24 ~ 6e-8) of itself, and T and the
# sums over S = 57 samples add <= S * 2^-24 ~ 3.4e-6 relative; measured worst (seeds 0-39) 7.1e-7
# (weights), 4.9e-7 (opacity), 2.1e-7 (color), 4.8e-7 (gradient, relative to its largest element).
# Computing 1 - exp(-tau) instead costs up to half an ulp of 1 (3e-8) absolute per alpha, relative
# 3e-8 / tau: measured worst 0.2 on these alphas, far past these bounds.
THIN_RTOL = {
    "weights": 2e-5,
    "opacity": 2e-5,
    "color": 2e-5,   # elementwise relative: colours are positive sums of positive terms
    "g_sigmas": 2e-5,  # relative to the largest |g_sigma| (terms of both signs)
}


def require(backend: str) -> None:
    reason = backends.availability(OP)[backend]
    if reason:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


def thin_inputs(gen: torch.Generator, R: int, S: int, D: int) -> dict:
    """Float32 rays of S samples with optical depth tau = sigma * dt log-uniform in [1e-7, 1e-3]."""
    dt = 0.01 + 0.09 * torch.rand(R, S, generator=gen, dtype=torch.float64)
    t_starts = 0.5 + torch.cumsum(dt, 1) - dt
    tau = 10 ** (-7 + 4 * torch.rand(R, S, generator=gen, dtype=torch.float64))
    return dict(sigmas=(tau / dt).float(), rgbs=torch.rand(R, S, D, generator=gen).float(),
                t_starts=t_starts.float(), t_ends=(t_starts + dt).float(),
                background=torch.rand(D, generator=gen).float())


@pytest.mark.parametrize("backend", [pytest.param("cpu", id="cpu"),
                                     pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)])
def test_thin_samples_keep_float32_accuracy(backend, gen):
    """The CUDA kernel shares composite_math.h; under --use_fast_math its exp is __expf, which made
    1 - exp(-tau) worse still (2% at tau = 1e-5), while expm1f is not replaced by an intrinsic."""
    require(backend)
    dev = "cuda" if backend == "cuda" else "cpu"
    x = thin_inputs(gen, 41, 57, 3)
    leaves32 = {k: v.to(dev).requires_grad_(k in ("sigmas", "rgbs")) for k, v in x.items()}
    leaves64 = {k: v.double().requires_grad_(k in ("sigmas", "rgbs")) for k, v in x.items()}
    got = [o.cpu() for o in fast3d.composite(*leaves32.values(), 0.0, backend=backend)]
    want = reference.composite(*leaves64.values(), 0.0)
    for name, a, b in zip(("color", "opacity", "depth", "weights"), got, want):
        if name == "depth":
            continue  # weighted depths: as accurate as the weights, and no cancellation of their own
        err = ((a.double() - b).abs() / b.abs()).max().item()
        assert err <= THIN_RTOL[name], f"{name}: worst relative error {err:.3g} > {THIN_RTOL[name]}"
    ups = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in want]
    g32 = torch.autograd.grad(got, leaves32["sigmas"], [u.float() for u in ups])[0].cpu()
    g64 = torch.autograd.grad(want, leaves64["sigmas"], ups)[0]
    err = ((g32.double() - g64).abs().max() / g64.abs().max()).item()
    assert err <= THIN_RTOL["g_sigmas"], f"g_sigmas: worst error {err:.3g} of the largest > {THIN_RTOL['g_sigmas']}"


# --- the bindings, called directly --------------------------------------------------------------

def _valid(gen) -> dict:
    """Valid positional arguments of composite_forward / composite_backward: R = 5 rays of S = 7
    samples, D = 3 channels, a per-ray background, float32 on the CPU."""
    from fast3d import _native

    R, S, D = 5, 7, 3
    x = thin_inputs(gen, R, S, D)
    x["background"] = torch.rand(R, D, generator=gen)
    fwd = dict(**x, eps=1e-4)
    _, opacity, _, _ = _native.module().composite_forward(*fwd.values())
    bwd = dict(**fwd, opacity=opacity, g_color=torch.rand(R, D, generator=gen), g_opacity=torch.rand(R, generator=gen),
               g_depth=torch.rand(R, generator=gen), g_weights=torch.rand(R, S, generator=gen))
    return {"composite_forward": fwd, "composite_backward": bwd}


F, B = "composite_forward", "composite_backward"

BAD = {  # case: (function, argument, change of the valid value, expected message fragment)
    "sigmas-rank": (F, "sigmas", lambda t: t[0], f"{F}: sigmas must have shape [R, S] (2 dims); got [7]"),
    "rgbs-rank": (F, "rgbs", lambda t: t[..., 0], f"{F}: rgbs must have shape [R, S, D] (3 dims); got [5, 7]"),
    "rgbs-R": (F, "rgbs", lambda t: t[:4], f"{F}: rgbs must have shape [R, S, D] = [5, 7, 3]; got [4, 7, 3]"),
    "rgbs-S": (F, "rgbs", lambda t: t[:, :6], "rgbs must have shape [R, S, D] = [5, 7, 3]; got [5, 6, 3]"),
    "t-starts-S": (F, "t_starts", lambda t: t[:, :6], "t_starts must have shape [R, S] = [5, 7]; got [5, 6]"),
    "t-ends-transposed": (F, "t_ends", lambda t: t.t(), "t_ends must have shape [R, S] = [5, 7]; got [7, 5]"),
    "background-R": (F, "background", lambda t: t[:4], "background must have shape [R, D] = [5, 3]; got [4, 3]"),
    "background-D": (F, "background", lambda t: t[0, :2], "background must have shape [D] = [3]; got [2]"),
    "background-rank": (F, "background", lambda t: t[None],
                        "background must have shape [R, D] = [5, 3] or [D] = [3]; got [1, 5, 3]"),
    "t-ends-dtype": (F, "t_ends", lambda t: t.double(), "t_ends has dtype Double, expected Float"),
    "rgbs-device": (F, "rgbs", lambda t: t.to("meta"), "rgbs is on meta, expected cpu (the device of sigmas)"),
    "sigmas-int": (F, "sigmas", lambda t: t.int(), "sigmas has dtype Int, expected Float or Double"),
    "bwd-rgbs-D": (B, "rgbs", lambda t: t[..., :2], f"{B}: background must have shape [R, D] = [5, 2]; got [5, 3]"),
    "bwd-opacity": (B, "opacity", lambda t: t[:, None], f"{B}: opacity must have shape [R] = [5]; got [5, 1]"),
    "bwd-g-color": (B, "g_color", lambda t: t[:, :2], "g_color must have shape [R, D] = [5, 3]; got [5, 2]"),
    "bwd-g-opacity": (B, "g_opacity", lambda t: t[:4], "g_opacity must have shape [R] = [5]; got [4]"),
    "bwd-g-depth": (B, "g_depth", lambda t: t.expand(2, 5), "g_depth must have shape [R] = [5]; got [2, 5]"),
    "bwd-g-weights": (B, "g_weights", lambda t: t[:, :6], "g_weights must have shape [R, S] = [5, 7]; got [5, 6]"),
    "bwd-sigmas-S": (B, "sigmas", lambda t: t[:, :6], "rgbs must have shape [R, S, D] = [5, 6, 3]; got [5, 7, 3]"),
    "bwd-background": (B, "background", lambda t: t[:, :2], "background must have shape [R, D] = [5, 3]; got [5, 2]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bindings_reject_wrong_shapes(case, gen):
    require("cpu")
    from fast3d import _native

    fn, arg, change, message = BAD[case]
    args = _valid(gen)[fn]
    args[arg] = change(args[arg])
    with pytest.raises(RuntimeError) as info:
        getattr(_native.module(), fn)(*args.values())
    assert message in str(info.value)


@pytest.mark.parametrize("fn", [F, B])
@pytest.mark.parametrize("background", ["per_ray", "shared", None])
def test_bindings_take_non_contiguous_tensors(fn, background, gen):
    """Non-contiguous inputs are made contiguous, not read with the wrong strides; a background
    [D] and none are accepted."""
    require("cpu")
    from fast3d import _native

    args = _valid(gen)[fn]
    args["background"] = {"per_ray": args["background"], "shared": args["background"][0], None: None}[background]
    strided = {k: v.t().contiguous().t() if isinstance(v, torch.Tensor) and v.dim() == 2 else v
               for k, v in args.items()}
    assert any(isinstance(v, torch.Tensor) and not v.is_contiguous() for v in strided.values())
    f = getattr(_native.module(), fn)
    for a, b in zip(f(*strided.values()), f(*args.values())):
        assert torch.equal(a, b)
