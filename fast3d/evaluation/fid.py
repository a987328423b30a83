"""FID (Heusel et al. 2017) of generated images against a reference set: torchmetrics'
``FrechetInceptionDistance`` fed by a feature extractor that fast3d loads from a local file (nothing
is downloaded; torchmetrics' own extractor would fetch torch-fidelity's weights).

Backbones (``load_fid_backbone``):

* a path to torchvision's ImageNet Inception-v3 weights (``inception_v3_google-0cc3c7bd.pth``, or
  a safetensors copy): its 2048-d pool features; reported as ``inception-v3-torchvision``. These
  are not the TensorFlow-ported weights of the FID papers (pytorch-fid / clean-fid), so values are
  comparable between fast3d runs, not with published FIDs.
* ``"random-tiny"``: a two-layer convolutional net with random weights from a fixed seed (16-d
  features), for tests; reported as ``random-tiny-conv``, never as an Inception FID.

Resizing and quantisation, one rule for both sets (clean-fid's point: the same pipeline on each
side): images are quantised to 8 bits as fast3d writes files (``io.images.to_uint8``), then the
extractor resizes them to its input size (bilinear, antialiased) and scales them.

Set sizes: the reference set needs at least ``feature dimension + 1`` images (2049 for Inception),
so its covariance can have full rank; the generated set at least 2.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RANDOM_TINY = "random-tiny"


class InceptionFeatures(nn.Module):
    """torchvision's Inception-v3 up to its 2048-d average pool, from a local weights file.
    ``forward(uint8 [N, 3, H, W]) -> [N, 2048]``."""

    name = "inception-v3-torchvision"
    num_features = 2048

    def __init__(self, weights: str):
        super().__init__()
        from torchvision.models import inception_v3

        self.net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(weights)
        else:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
        if not isinstance(sd, dict):
            raise ValueError(f"fid backbone {weights!r}: not a state dict")
        sd = {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}
        try:
            self.net.load_state_dict(sd)
        except RuntimeError as e:
            raise ValueError(f"fid backbone {weights!r}: not torchvision Inception-v3 weights "
                             f"({str(e).splitlines()[0]})") from None
        self.net.fc = nn.Identity()
        self.eval()

    def forward(self, images: Tensor) -> Tensor:  # [N, 3, H, W] uint8 -> [N, 2048]
        x = F.interpolate(images.float() / 255, size=(299, 299), mode="bilinear", antialias=True, align_corners=False)
        return self.net(x * 2 - 1)  # the Google weights take [-1, 1] (torchvision's transform_input)


class RandomTinyFeatures(nn.Module):
    """A random two-layer conv net (fixed seed) with 16-d features: a test stand-in, not FID."""

    name = "random-tiny-conv"
    num_features = 16

    def __init__(self):
        super().__init__()
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2),
                                     nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        finally:
            torch.random.set_rng_state(state)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:  # [N, 3, H, W] uint8 -> [N, 16]
        x = F.interpolate(images.float() / 255, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return self.net(x * 2 - 1)


def load_fid_backbone(spec: str) -> nn.Module:
    """The feature extractor ``spec`` names (module docstring); a missing weights file is an error
    naming it, never a download."""
    if spec == RANDOM_TINY:
        return RandomTinyFeatures()
    if not isinstance(spec, str) or not os.path.isfile(spec):
        raise ValueError(f"fid backbone {spec!r} is not a file: pass torchvision's Inception-v3 weights "
                         f"(inception_v3_google-0cc3c7bd.pth; nothing is downloaded) or {RANDOM_TINY!r}")
    return InceptionFeatures(spec)


def min_reference_images(backbone: nn.Module) -> int:
    """The fewest reference images FID takes with ``backbone``: feature dimension + 1."""
    return int(backbone.num_features) + 1


def _uint8(images: Tensor) -> Tensor:  # [N, 3, H, W] in [0, 1] -> uint8
    return images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)


class FID:
    """Accumulates the two sets' features; ``compute()`` checks their sizes and returns the FID.

    ``add(images, real=...)`` takes float images in [0, 1] [N, 3, H, W] (any size; quantised to
    8 bits, then resized by the backbone).
    """

    def __init__(self, backbone: nn.Module, device: torch.device | str = "cpu"):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.backbone = backbone
        self.name = backbone.name
        self.metric = FrechetInceptionDistance(feature=backbone, normalize=False).to(device)
        self.counts = {True: 0, False: 0}

    def add(self, images: Tensor,  # [N, 3, H, W] in [0, 1]
            real: bool) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W]; got {tuple(images.shape)}")
        if len(images):
            self.metric.update(_uint8(images).to(self.metric.device), real=real)
            self.counts[real] += len(images)

    def compute(self) -> float:
        need = min_reference_images(self.backbone)
        if self.counts[True] < need:
            raise ValueError(f"FID with {self.name} needs at least {need} reference images (feature dimension "
                             f"{self.backbone.num_features} + 1); got {self.counts[True]}")
        if self.counts[False] < 2:
            raise ValueError(f"FID needs at least 2 generated images; got {self.counts[False]}")
        return float(self.metric.compute())
