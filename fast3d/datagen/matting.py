"""Background matting of generated views: the foreground alpha of each frame from a segmentation /
salient-object model, so that generated samples carry real masks instead of alpha 1.

VFusion3D runs a saliency detector (U2-Net) on its synthetic views to get the masks of the central
object, and trains the LRM with an opacity loss against them; with alpha 1 everywhere that loss
would teach full opacity over the whole frame. :class:`Matting` loads any transformers model of
the semantic-segmentation family (``AutoModelForSemanticSegmentation``: SegFormer, DPT, UperNet,
MobileViT, ... fine-tuned for foreground / background or salient-object segmentation) from a
local directory, never downloaded, or ``"random-tiny"`` (a small random SegFormer, the same every
time: tests and smoke runs). Models that need ``trust_remote_code`` are not loaded.

The alpha of a pixel is the model's foreground probability, upsampled to the frame: with one
output channel, ``sigmoid(logit)`` (a saliency map); with several, ``1 - softmax(logits)[background]``
(every class but the background label is foreground).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from fast3d.inference.preprocess import foreground_alpha, load_segmentation_model

RANDOM_TINY = "random-tiny"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _tiny_segmenter():
    """A random tiny SegFormer with 2 labels (background, foreground), the same weights every time."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                             hidden_sizes=[8, 16], patch_sizes=[3, 3], strides=[2, 2], num_attention_heads=[1, 2],
                             mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = SegformerForSemanticSegmentation(config)
    with torch.no_grad():  # initialised logits are ~0 (alpha 0.5 everywhere): spread them so masks vary
        model.decode_head.classifier.weight.mul_(200.0)
    return model


def _normalisation(directory: str) -> tuple[tuple, tuple]:
    """(mean, std) of the model's image processor config when the directory has one, else ImageNet's."""
    path = os.path.join(directory, "preprocessor_config.json")
    if not os.path.isfile(path):
        return IMAGENET_MEAN, IMAGENET_STD
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
        mean, std = tuple(float(x) for x in cfg["image_mean"]), tuple(float(x) for x in cfg["image_std"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"matting.model {directory!r}: unreadable preprocessor_config.json "
                         f"({type(e).__name__}: {e})") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"matting.model {directory!r}: preprocessor_config.json image_mean / image_std must be 3 "
                         f"numbers (std > 0); got {mean}, {std}")
    return mean, std


def load_segmenter(model: str):
    """(model, mean, std): a transformers semantic-segmentation model from a local directory or
    ``random-tiny``; ValueError naming ``matting.model`` when it is missing or of another kind."""
    if not isinstance(model, str) or not model:
        raise ValueError(f"matting.model must be {RANDOM_TINY!r} or a local model directory; got {model!r}")
    if model == RANDOM_TINY:
        return _tiny_segmenter(), IMAGENET_MEAN, IMAGENET_STD
    if not os.path.isdir(model):
        raise ValueError(f"matting.model must be {RANDOM_TINY!r} or a local model directory; got {model!r}, which is "
                         f"not a directory (weights are never downloaded)")
    net = load_segmentation_model(model, "matting.model")
    mean, std = _normalisation(model)
    return net, mean, std


class Matting:
    """``__call__(views [N, V, 3, H, W]) -> alphas [N, V, 1, H, W]`` in [0, 1], the foreground
    probability of each pixel (see the module docstring).

    Args:
        model: a local semantic-segmentation model directory, or ``"random-tiny"``.
        resolution: the square size frames are resized to for the model.
        background_label: the background class of a multi-class model (ignored with one channel).
        device: where the model runs.
        batch_size: frames per model call.
    """

    def __init__(self, model: str, resolution: int, background_label: int, device: torch.device,
                 batch_size: int = 16):
        net, mean, std = load_segmenter(model)
        labels = int(net.config.num_labels)
        if labels > 1 and not 0 <= background_label < labels:
            raise ValueError(f"matting.background_label must be in [0, {labels}) for {model!r}, a model of {labels} "
                             f"labels; got {background_label!r}")
        self.net, self.device = net.to(device).eval(), device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.resolution, self.background_label, self.batch_size = resolution, background_label, batch_size

    @staticmethod
    def check_config(cfg) -> None:
        """Checks of :meth:`PipelineConfig.validate`: no options, the model directory exists."""
        m = cfg.matting
        if m.options:
            raise ValueError(f"matting.options: the {m.kind!r} matting stage takes no options; got {sorted(m.options)}")
        if m.model is not None and m.model != RANDOM_TINY and not (isinstance(m.model, str) and os.path.isdir(m.model)):
            raise ValueError(f"matting.model must be null, {RANDOM_TINY!r} or a local model directory; got {m.model!r}, "
                             f"which is not a directory (weights are never downloaded)")

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> Matting | None:
        m = cfg.matting
        return None if m.model is None else cls(m.model, m.resolution, m.background_label, device)

    @torch.no_grad()
    def __call__(self, views: Tensor,  # [N, V, 3, H, W] in [0, 1]
                 ) -> Tensor:  # -> [N, V, 1, H, W] in [0, 1]
        if not isinstance(views, Tensor) or views.dim() != 5 or views.shape[2] != 3:
            raise ValueError(f"views must be a tensor [N, V, 3, H, W]; got "
                             f"{tuple(views.shape) if isinstance(views, Tensor) else type(views).__name__}")
        N, V, _, H, W = views.shape
        out = []
        for chunk in views.flatten(0, 1).split(self.batch_size):
            x = chunk.to(self.device, torch.float32)
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True,
                              align_corners=False)
            logits = self.net(pixel_values=(x - self.mean) / self.std).logits         # [B, C, h, w]
            out.append(foreground_alpha(logits, (H, W), self.background_label).clamp(0, 1).cpu())
        return torch.cat(out).view(N, V, 1, H, W)
