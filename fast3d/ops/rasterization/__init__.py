"""3D Gaussian rasterization: api (public function, gsplat's signature), stages (the backend
contract: projection, SH, rasterization), reference (dense PyTorch twin), native (C++ CPU and CUDA
kernels in csrc/gaussians), bench (workloads and byte/flop model)."""

import torch

from fast3d import _native, backends
from fast3d.backends import device_memory as _device_memory  # module-level: tests shrink it
from fast3d.ops.rasterization import bench, native, reference
from fast3d.ops.rasterization.api import OP, RasterShape, check_overflow, rasterization
from fast3d.ops.rasterization.stages import RasterStages

_ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# The dense reference keeps about ten float32 tensors of [images, Gaussians, pixels] for autograd.
_DENSE_BYTES_PER_ELEMENT = 40


def _reference_check(q: backends.Query) -> list:
    need = q.shape.dense_elements * _DENSE_BYTES_PER_ELEMENT
    have = _device_memory(q.device)
    if need > have // 2:
        return [f"the dense reference needs ~{need / 2**30:.0f} GiB for these inputs "
                f"(images x Gaussians x pixels); the {q.device.type} has {have / 2**30:.0f} GiB"]
    return []


REFERENCE_STAGES = RasterStages(project=reference.project_stage, sh=reference.sh_stage,
                                rasterize=reference.rasterize_stage)
NATIVE_STAGES = RasterStages(project=native.project_stage, sh=native.sh_stage, rasterize=native.rasterize_stage)

backends.register(OP, "torch", REFERENCE_STAGES, devices=("cpu", "cuda"), dtypes=_ALL_FLOATS, priority=0,
                  check=_reference_check, shape_type=RasterShape,
                  doc="PyTorch reference: dense, every Gaussian at every pixel, autograd")


def _cuda_check(q: backends.Query) -> list:  # runs only where the extension loaded
    D, images = q.shape.channels, q.shape.images
    max_d, max_images = _native.module().gs_max_cuda_channels, _native.module().gs_max_cuda_images
    reasons = [f"{D} channels; the CUDA kernels take at most {max_d}"] if D > max_d else []
    if images > max_images:  # images are grid axis y of the CUDA launches
        reasons.append(f"{images} images (scenes x cameras); the CUDA kernels take at most {max_images} per call")
    return reasons


# cpu/cuda above torch: the dense reference is O(pixels x Gaussians).
backends.register(OP, "cpu", NATIVE_STAGES, devices=("cpu",), dtypes=(torch.float32, torch.float64),
                  priority=10, available=backends.native_cpu_reason,
                  doc="C++/OpenMP: exact-extent 16x16 tile binning, hand-written backward")
backends.register(OP, "cuda", NATIVE_STAGES, devices=("cuda",), dtypes=(torch.float32,), priority=20,
                  available=backends.native_cuda_reason, check=_cuda_check, shape_type=RasterShape,
                  doc="CUDA: radix-sorted image|tile|depth keys, per-tile blending, warp-reduced backward")

__all__ = ["rasterization", "check_overflow", "RasterShape", "RasterStages", "reference", "native", "bench"]
