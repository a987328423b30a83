"""NeRF compositing: api (public function), reference (PyTorch twin), native (C++ CPU and CUDA
kernels in csrc/composite), bench (workloads and byte/flop model)."""

import torch

from fast3d import backends
from fast3d.ops.composite import bench, native, reference
from fast3d.ops.composite.api import OP, composite

_ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

backends.register(OP, "torch", reference.composite, devices=("cpu", "cuda"), dtypes=_ALL_FLOATS, priority=0,
                  doc="PyTorch reference (cumprod), autograd backward")
backends.register(OP, "cpu", native.composite, devices=("cpu",), dtypes=(torch.float32, torch.float64),
                  priority=10, available=backends.native_cpu_reason,
                  doc="C++/OpenMP, one ray per iteration, two-pass backward")
backends.register(OP, "cuda", native.composite, devices=("cuda",), dtypes=(torch.float32,), priority=20,
                  available=backends.native_cuda_reason,
                  doc="CUDA, one thread per ray (same per-ray math as cpu)")

__all__ = ["composite", "reference", "bench"]
