"""DINOv2 features of multi-view samples, the input of VFusion3D's quality filter and elevation
estimator."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_TINY = "random-tiny"


class FeatureExtractor:
    """DINOv2 CLS (pooler) features, averaged over the frames of each sample."""

    def __init__(self, model, spec: str, image_size: int | None = None, batch_size: int = 32):
        self.model = model.eval()
        self.spec = spec  # how to rebuild this extractor: a local path or RANDOM_TINY
        self.image_size = int(image_size or model.config.image_size)
        self.batch_size = batch_size
        self.dim = int(model.config.hidden_size)

    @classmethod
    def load(cls, spec: str, **kwargs) -> FeatureExtractor:
        """`spec`: a local DINOv2 directory (never downloaded) or "random-tiny" (a small randomly
        initialised DINOv2, the same weights every time: for tests and smoke runs)."""
        from transformers import Dinov2Config, Dinov2Model

        if spec == RANDOM_TINY:
            config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  patch_size=8, image_size=32)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return cls(Dinov2Model(config), spec, **kwargs)
        if not os.path.isdir(spec):
            raise ValueError(f"dinov2 must be {RANDOM_TINY!r} or a local DINOv2 directory; got {spec!r} "
                             f"(no such directory)")
        return cls(Dinov2Model.from_pretrained(spec, local_files_only=True), spec, **kwargs)

    @torch.no_grad()
    def features(self, images: Tensor,  # [N, V, 3, H, W] in [0, 1]
                 ) -> Tensor:  # [N, D] float32
        if images.dim() != 5 or images.shape[2] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor [N, V, 3, H, W]; got {images.dtype} "
                             f"{tuple(images.shape)}")
        N, V = images.shape[:2]
        device = next(self.model.parameters()).device
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        frames = images.flatten(0, 1)
        out = []
        for chunk in frames.split(self.batch_size):
            x = chunk.to(device, torch.float32)
            if x.shape[-2:] != (self.image_size, self.image_size):
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                                  align_corners=False)
            out.append(self.model(pixel_values=(x - mean) / std).pooler_output.float().cpu())
        return torch.cat(out).view(N, V, -1).mean(1)
