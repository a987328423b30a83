"""Input checks shared by the ops' public APIs. Messages name the argument, what was expected and
what came, so a user can fix the call without reading the kernel."""

from __future__ import annotations

import torch
from torch import Tensor

from fast3d import checks

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor(name: str, x, *, dims: int | None = None, last: int | None = None, floating: bool = True) -> Tensor:
    """Check that `x` is a tensor of rank `dims` (and trailing size `last`), floating if asked."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64); got {_dt(x.dtype)}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims; got shape {tuple(x.shape)}")
    if last is not None and (x.dim() == 0 or x.shape[-1] != last):
        raise ValueError(f"{name} must end in a dimension of size {last}; got shape {tuple(x.shape)}")
    return x


def same_shape(name: str, x: Tensor, shape, expected_desc: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {expected_desc} = {tuple(shape)}; got {tuple(x.shape)}")


def same_device_dtype(ref_name: str, ref: Tensor, **others: Tensor | None) -> None:
    for name, x in others.items():
        if x is None:
            continue
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; all inputs must share a device")
        if x.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {_dt(x.dtype)} but {ref_name} has {_dt(ref.dtype)}; all inputs must share a dtype")


def finite(name: str, x: Tensor) -> None:
    """Finiteness check; only on the CPU, where it needs no device synchronisation, and not while
    torch.compile traces (a data-dependent branch would break the graph)."""
    if torch.compiler.is_compiling():
        return
    if x.device.type == "cpu" and x.numel() and not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{name} must be finite; got {x[tuple(bad)].item()} at index {tuple(bad)}")


def real_in(name: str, x, lo: float, hi: float) -> float:
    """A real number in [lo, hi) (bools are not numbers here); :func:`fast3d.checks.real`."""
    return checks.real(name, x, lo, hi, hi_open=True)
