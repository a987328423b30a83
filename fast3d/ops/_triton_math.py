"""Triton helpers shared by the ops' kernels: rounding to a storage dtype, a matmul that is right
under the interpreter too, and 1 - exp(-tau) without cancellation (a thin sample's opacity)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fast3d import backends


@triton.jit
def rne(x, dtype: tl.constexpr):
    """float32 x as `dtype`, rounded to nearest even. For bfloat16 the rounding is done on the bits
    (add half an ulp of the 16 dropped bits, ties to even, truncate) so that the conversion left
    is exact: Triton's interpreter truncates float32 -> bfloat16, a GPU rounds; both agree now."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = tl.where(x != x, x, ((bits >> 16) << 16).to(tl.float32, bitcast=True))  # NaN stays NaN
    return x.to(dtype)


@triton.jit
def mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation. UPCAST: the Triton interpreter (3.9) computes bf16 x bf16
    dots wrongly, so there the operands go to float32 first; bf16 products are exact in float32, so
    this is the tensor-core result up to the order of the accumulation."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def one_minus_exp_neg(tau):
    """1 - exp(-tau) for tau >= 0 (float32 [...]), without the cancellation of the direct form.

    Directly, 1 - exp(-tau) keeps the absolute rounding error of exp(-tau) near 1 (~2^-24, more with
    the GPU's ex2.approx) on a result of size ~tau: 6% relative at tau = 1e-6, a thin sample's
    opacity, and Triton has no expm1 on every version. Below the cut-off 1/2 the Taylor series to
    tau^8 is used, in Horner form tau (1 - tau/2 (1 - tau/3 (... (1 - tau/8)))): its truncation is
    < tau^8 / 9! <= 1.1e-8 relative at 1/2, under float32's rounding. Measured under the Triton
    interpreter (float32 numpy arithmetic) against float64 expm1 on 2e6 points of (1e-30, 1/2]:
    worst relative error 1.05e-7 (~1.8 ulp, the Horner steps' rounding). Above 1/2,
    1 - exp(-tau) >= 0.39, so the direct form's cancellation costs at most ~2.5x exp's own relative
    error (measured 1.8e-7 over [1/2, 2] there; a GPU's ex2.approx adds its own)."""
    r = 1.0 - tau * 0.125
    r = 1.0 - tau * (1.0 / 7.0) * r
    r = 1.0 - tau * (1.0 / 6.0) * r
    r = 1.0 - tau * 0.2 * r
    r = 1.0 - tau * 0.25 * r
    r = 1.0 - tau * (1.0 / 3.0) * r
    r = 1.0 - tau * 0.5 * r
    return tl.where(tau < 0.5, tau * r, 1.0 - tl.exp(-tau))


def upcast(dtype: torch.dtype) -> bool:
    """mm's UPCAST for operands of `dtype` in this process."""
    return dtype == torch.bfloat16 and backends.triton_interpreter_configs()
