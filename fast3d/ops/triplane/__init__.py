"""Triplane sampling and volume rendering: api (public functions), decoder (the decoder MLP's
weights, constants and functional ``decode``), reference (PyTorch twins, OpenLRM-style), triton
(the triplane_sample kernels), march (the fused render_triplane kernels), bench (the `lrm`
workload and byte/flop models)."""

import torch

from fast3d import backends
from fast3d.ops.triplane import bench, reference
from fast3d.ops.triplane.api import OP_RENDER, OP_SAMPLE, DecoderShape, render_triplane, triplane_sample
from fast3d.ops.triplane.decoder import DecoderWeights, decode

try:
    from fast3d.ops.triplane import march
    from fast3d.ops.triplane import triton as triton_kernels
except ImportError:  # no triton: triton_reason() says so and the backends are never called
    march = triton_kernels = None

_ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _triton_sample(*args):
    return triton_kernels.triplane_sample(*args)


def _triton_render(*args):
    return march.render_triplane(*args)


def _triton_render_check(q: backends.Query) -> list:
    if march is None:
        return []
    return march.unsupported_decoder(q.shape.layers, q.shape.hidden, q.shape.dtype, q.device)


backends.register(OP_SAMPLE, "torch", reference.triplane_sample, devices=("cpu", "cuda"), dtypes=_ALL_FLOATS,
                  priority=0, doc="PyTorch reference: F.grid_sample per plane, autograd backward")
backends.register(OP_SAMPLE, "triton", _triton_sample, devices=backends.triton_devices(), dtypes=_TRITON_FLOATS,
                  priority=30, available=backends.triton_reason,
                  doc="Triton, 64 points x channel tile per program, channels-last gathers, atomic-add backward")
backends.register(OP_RENDER, "torch", reference.render_triplane, devices=("cpu", "cuda"), dtypes=_ALL_FLOATS,
                  priority=0, doc="PyTorch reference (OpenLRM): grid_sample + MLP + cumprod, sample_pdf")
backends.register(OP_RENDER, "triton", _triton_render, devices=backends.triton_devices(), dtypes=_TRITON_FLOATS,
                  priority=30, available=backends.triton_reason, check=_triton_render_check, shape_type=DecoderShape,
                  doc="fused Triton ray marcher: sampling + decoder MLP + compositing per tile, recomputed in "
                      "the backward (no per-sample tensors)")

__all__ = ["triplane_sample", "render_triplane", "DecoderWeights", "DecoderShape", "decode", "reference", "bench"]
