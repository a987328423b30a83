"""FID (Heusel et al. 2017) of generated images against a reference set: torchmetrics'
``FrechetInceptionDistance`` fed by a feature extractor that fast3d loads from a local file (nothing
is downloaded; torchmetrics' own extractor would fetch torch-fidelity's weights).

Backbones (``load_fid_backbone``), told apart by the weights file's classifier (1008 or 1000 classes):

* a path to the FID Inception (``pt_inception-2015-12-05-6726825d.pth``: the TensorFlow FID
  network ported by torch-fidelity, the one pytorch-fid, clean-fid and the papers' FIDs use): its
  2048-d pool features, through torchmetrics' own extractor (``NoTrainInceptionV3``), with its
  TensorFlow-1 bilinear resize; reported as ``inception-v3-fid``. Values are comparable with
  published FIDs (same images, same resize rules).
* a path to torchvision's ImageNet Inception-v3 weights (``inception_v3_google-0cc3c7bd.pth``, or
  a safetensors copy): its 2048-d pool features; reported as ``inception-v3-torchvision``: other
  weights, so comparable between fast3d runs only.
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


def _load_state_dict(weights: str) -> dict:
    """A plain tensor state dict from ``weights`` (safetensors, or ``torch.load(weights_only=True)``:
    nothing is unpickled)."""
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(weights)
    try:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable or unsafe file: one named error
        raise ValueError(f"fid backbone {weights!r}: not a readable state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"fid backbone {weights!r}: not a state dict of tensors")
    return sd


class FIDInceptionFeatures(nn.Module):
    """The FID Inception (torch-fidelity's port of the TensorFlow FID graph) up to its 2048-d pool,
    as torchmetrics runs it. ``forward(uint8 [N, 3, H, W]) -> [N, 2048]``."""

    name = "inception-v3-fid"
    num_features = 2048

    def __init__(self, state_dict: dict):
        super().__init__()
        import tempfile

        from torchmetrics.image.fid import NoTrainInceptionV3

        # torch-fidelity loads its weights file with torch.load(weights_only=False): hand it a copy
        # of the tensors already read safely, never the user's file. antialias=False keeps
        # torch-fidelity's TensorFlow-1 bilinear resize, as the published FIDs (torchmetrics'
        # default, an antialiased resize, gives other values).
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "fid_inception.pth")
            torch.save(state_dict, path)
            try:
                self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(self.num_features)],
                                              feature_extractor_weights_path=path, antialias=False)
            except RuntimeError as e:
                raise ValueError(f"fid backbone: not the FID Inception's weights ({str(e).splitlines()[0]})") from None
        self.eval()

    def forward(self, images: Tensor) -> Tensor:  # [N, 3, H, W] uint8 -> [N, 2048]
        return self.net(images)


class InceptionFeatures(nn.Module):
    """torchvision's Inception-v3 up to its 2048-d average pool, from a local weights file.
    ``forward(uint8 [N, 3, H, W]) -> [N, 2048]``."""

    name = "inception-v3-torchvision"
    num_features = 2048

    def __init__(self, state_dict: dict, weights: str = "state dict"):
        super().__init__()
        from torchvision.models import inception_v3

        self.net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
        sd = {k: v for k, v in state_dict.items() if not k.startswith("AuxLogits.")}
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
        raise ValueError(f"fid backbone {spec!r} is not a file: pass the FID Inception's weights "
                         f"(pt_inception-2015-12-05-6726825d.pth) or torchvision's (inception_v3_google-0cc3c7bd.pth); "
                         f"nothing is downloaded; or {RANDOM_TINY!r} for tests")
    sd = _load_state_dict(spec)
    classes = sd["fc.weight"].shape[0] if "fc.weight" in sd else None
    if classes == 1008:
        try:
            return FIDInceptionFeatures(sd)
        except ValueError as e:
            raise ValueError(f"fid backbone {spec!r}: {str(e).removeprefix('fid backbone: ')}") from None
    if classes == 1000:
        return InceptionFeatures(sd, spec)
    raise ValueError(f"fid backbone {spec!r}: expected Inception-v3 weights with a 1008-class (FID) or 1000-class "
                     f"(torchvision) fc.weight; got {classes if classes is not None else 'no fc.weight'}")


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
