"""Multi-view attention: api (public function), reference (rearrange + PyTorch SDPA), triton
(FlashAttention-2 style forward and backward reading the multi-view layouts through strides),
bench (workloads mvdream / era3d / pixart-mv, byte/flop model, SDPA baselines)."""

import torch

from fast3d import backends
from fast3d.ops.attention import bench, reference
from fast3d.ops.attention.api import OP, AttentionShape, multiview_attention

MAX_TRITON_HEAD_DIM = 256


def _triton(*args):
    # Imported on first use: importing triton costs ~1 s, and a machine without it still gets the
    # reference (the registry says why not through triton_reason).
    from fast3d.ops.attention import triton as kernels

    return kernels.multiview_attention(*args)


def _triton_check(q: backends.Query) -> list:
    shape = q.shape
    if shape.head_dim > MAX_TRITON_HEAD_DIM:
        return [f"head dim {shape.head_dim} > {MAX_TRITON_HEAD_DIM} (one head's tile must fit in shared memory)"]
    from fast3d.ops.attention import triton as kernels

    return kernels.shared_memory_reasons(q.dtype, shape.head_dim, shape.seg_q, shape.seg_k, shape.backward,
                                         q.device)


backends.register(OP, "torch", reference.multiview_attention, devices=("cpu", "cuda"),
                  dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64), priority=0,
                  doc="rearrange copies + torch SDPA with the view mask as a dense -inf mask")
backends.register(OP, "triton", _triton, devices=backends.triton_devices(),
                  dtypes=(torch.float16, torch.bfloat16, torch.float32), priority=30,
                  available=backends.triton_reason, check=_triton_check, shape_type=AttentionShape,
                  doc="Triton flash attention (online softmax, FA2 backward), strided layouts, block-sparse view mask")

__all__ = ["multiview_attention", "AttentionShape", "reference", "bench"]
