"""DINOv2 features of multi-view samples, the input of VFusion3D's quality filter and elevation
estimator.

:func:`sample_features` is the ONE function that turns a sample's frames into the feature vector
both models see, at training (:func:`fast3d.datagen.quality.train_filter`) and at use (the
pipeline's filter and elevation stages, :func:`~fast3d.datagen.quality.apply_filter`): the mean
DINOv2 feature of ``frames`` frames spread uniformly over the video (VFusion3D: 8 frames for the
filter, 4 views for the elevation estimator). Each saved model records its ``frames``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_TINY = "random-tiny"
FILTER_FRAMES = 8      # VFusion3D: "DINO ... features from 8 frames, uniformly distributed throughout the video"
ELEVATION_FRAMES = 4   # VFusion3D: "DINO to extract features from 4 uniform views and averaged their features"


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


def uniform_frames(num_frames: int, frames: int) -> Tensor:  # -> [frames] int64
    """Indices of ``frames`` frames spread uniformly over a video of ``num_frames``: floor(i * V / n),
    i = 0..n-1 (on an orbit of uniform azimuth steps, views 360/n degrees apart, the first included).

    Raises ValueError when the video has fewer frames than requested."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be a positive int; got {frames!r}")
    if num_frames < frames:
        raise ValueError(f"a video of {num_frames} frames has fewer frames than the {frames} requested")
    return torch.arange(frames) * num_frames // frames


def sample_features(extractor: FeatureExtractor, videos: Tensor,  # [N, V, 3, H, W] in [0, 1]
                    frames: int) -> Tensor:  # -> [N, D] float32
    """The feature of each video that the quality filter and the elevation estimator are trained on
    and applied to: the mean DINOv2 feature of :func:`uniform_frames` (V, ``frames``).

    Args:
        extractor: the DINOv2 feature extractor the model was trained with.
        videos: [N, V, 3, H, W] frames in [0, 1], V >= frames.
        frames: frames averaged per video (the saved model's ``frames``).

    Returns:
        [N, D] float32 features.
    """
    if not isinstance(videos, Tensor) or videos.dim() != 5:
        raise ValueError(f"videos must be a tensor [N, V, 3, H, W]; got "
                         f"{tuple(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__}")
    return extractor.features(videos[:, uniform_frames(videos.shape[1], frames)])
