"""Triton helpers shared by the ops' kernels: rounding to a storage dtype, and a matmul that is
right under the interpreter too."""

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


def upcast(dtype: torch.dtype) -> bool:
    """mm's UPCAST for operands of `dtype` in this process."""
    return dtype == torch.bfloat16 and backends.triton_interpreter_configs()
