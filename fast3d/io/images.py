"""Images in fast3d are float tensors in [0, 1], channels first; files hold 8 bits a channel."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def to_uint8(images: Tensor,  # [..., C, H, W] in [0, 1]
             ) -> np.ndarray:  # -> [..., H, W, C] uint8
    """The 8-bit pixels of float images, channels last (as PIL and image files want them).

    The one rule for every image fast3d writes: clamp to [0, 1], scale by 255 and round to the
    nearest integer (ties to even), in float32, so an 8-bit value v reads back as v / 255 and
    writes again as v.
    """
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()
