"""NeRF compositing: api (public function), reference (PyTorch twin), native (C++ CPU and CUDA
kernels in csrc/composite), triton (Triton kernels), bench (workloads and byte/flop model)."""

import torch

from fast3d import backends
from fast3d.ops.composite import bench, native, reference
from fast3d.ops.composite.api import OP, PACKED_NATIVE, composite

try:
    from fast3d.ops.composite import triton as triton_kernels
except ImportError:  # no triton: triton_reason() says so and the backend is never called
    triton_kernels = None

_ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _triton_composite(sigmas,             # [R, S] dense, or [M] packed
                      rgbs,               # [R, S, D] dense, or [M, D] packed
                      t_starts,           # [R, S] dense, or [M] packed
                      t_ends,             # [R, S] dense, or [M] packed
                      background,         # [D] or [R, D], or None
                      transmittance_eps: float,
                      packed_info=None):  # [R, 2] int64 (first sample, count) with packed samples
    """The triton backend: dense samples, or packed ones with ``packed_info`` (its PACKED_NATIVE
    feature). Returns color [R, D], opacity [R, 1], depth [R, 1], weights [R, S] or [M]."""
    if packed_info is not None:
        return triton_kernels.composite_packed(sigmas, rgbs, t_starts, t_ends, packed_info, background,
                                               transmittance_eps)
    return triton_kernels.composite(sigmas, rgbs, t_starts, t_ends, background, transmittance_eps)


backends.register(OP, "torch", reference.composite, devices=("cpu", "cuda"), dtypes=_ALL_FLOATS, priority=0,
                  doc="PyTorch reference (cumprod), autograd backward")
backends.register(OP, "cpu", native.composite, devices=("cpu",), dtypes=(torch.float32, torch.float64),
                  priority=10, available=backends.native_cpu_reason,
                  doc="C++/OpenMP, one ray per iteration, two-pass backward")
backends.register(OP, "cuda", native.composite, devices=("cuda",), dtypes=(torch.float32,), priority=20,
                  available=backends.native_cuda_reason,
                  doc="CUDA, one thread per ray (same per-ray math as cpu)")
backends.register(OP, "triton", _triton_composite, devices=backends.triton_devices(),
                  dtypes=(torch.float16, torch.bfloat16, torch.float32), priority=30,
                  features=(PACKED_NATIVE,), available=backends.triton_reason,
                  doc="Triton, 16 rays x 32-sample tiles per program, scan transmittance, one-pass backward")

__all__ = ["composite", "reference", "bench"]
