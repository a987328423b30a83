"""The input image of image-to-3D (``fast3d generate --image``) made into what a multi-view
diffusion model was trained on: one object, centred, its longer side a fixed fraction of a square
image, on the model's background colour.

The object's mask comes from, in order:

1. the image's own alpha, where it has one (any pixel with alpha below 1: a cut-out PNG);
2. a background-removal model from a local directory (:class:`Segmenter`, ``--remove-background``):
   a transformers semantic-segmentation model (``AutoModelForSemanticSegmentation`` with its image
   processor) whose labels name a ``background`` class (alpha = 1 - its probability), or a
   matting model with one output channel (alpha = its sigmoid);
3. none: an opaque image is kept as it is (its own background), padded to a square.

``keep_background`` skips 1 and 2: the whole image, its alpha composited over the background,
padded to a square, not re-centred.

Centring: the object is the pixels of alpha above ``ALPHA_THRESHOLD``; their bounding box is
cropped from the image composited over the background, resized (antialiased) so its longer side is
``fraction * size`` pixels, and pasted at the centre of a ``size`` x ``size`` canvas of the
background colour.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from fast3d import checks
from fast3d.io.images import composite

ALPHA_THRESHOLD = 0.5  # a pixel belongs to the object where its alpha is above this


def load_segmentation_model(model_dir: str, name: str):
    """A transformers semantic-segmentation model (``AutoModelForSemanticSegmentation``: SegFormer,
    DPT, UperNet, ...) from a local directory, in float32; never downloaded, no remote code. The one
    loader of :class:`Segmenter` and of ``fast3d datagen pipeline``'s matting stage.

    Args:
        model_dir: the directory (``config.json`` + weights).
        name: the argument's name in errors (``--remove-background``, ``matting.model``).

    Returns:
        The model (train mode, on the CPU), its ``config`` giving ``num_labels`` / ``id2label``.
    """
    from transformers import AutoModelForSemanticSegmentation

    try:
        return AutoModelForSemanticSegmentation.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{name} {model_dir!r} is not a transformers semantic-segmentation model "
                         f"(AutoModelForSemanticSegmentation): {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None


def foreground_alpha(logits: Tensor,  # [B, C, h, w] a segmentation model's output
                     size: tuple[int, int], background_label: int | None) -> Tensor:  # -> [B, 1, H, W] in [0, 1]
    """Each pixel's foreground probability, the logits upsampled (bilinear) to ``size`` = (H, W)
    first: with one channel (a matting / saliency model) ``sigmoid(logit)``; with several,
    ``1 - softmax(logits)[background_label]`` (every class but the background is foreground).

    Args:
        logits: the model's logits.
        size: the image's (H, W).
        background_label: the background class of a multi-class model (ignored with one channel).

    Returns:
        float32 alpha.
    """
    logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return 1 - logits.softmax(1)[:, background_label:background_label + 1]


def _background(background, device=None) -> Tensor:  # -> [3, 1, 1]
    if isinstance(background, numbers.Real) and not isinstance(background, bool):
        background = (float(background),) * 3
    try:
        bg = torch.as_tensor(background, dtype=torch.float32, device=device).reshape(3, 1, 1)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"background must be a number or 3 numbers in [0, 1]; got {background!r}") from None
    if not bool(((bg >= 0) & (bg <= 1)).all()):
        raise ValueError(f"background must be in [0, 1]; got {background!r}")
    return bg


class Segmenter:
    """A background-removal model from a local directory (module docstring), loaded once.

    Args:
        model_dir: a directory with a transformers model (``config.json`` + weights) and its
            image processor (``preprocessor_config.json``).
        device: where it runs (default: the CPU).
        name: the argument's name in errors (``--remove-background``).
    """

    def __init__(self, model_dir: str, device=None, name: str = "--remove-background"):
        import os

        from transformers import AutoImageProcessor

        self.name = name
        if not isinstance(model_dir, str) or not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise ValueError(f"{name} {model_dir!r}: expected a local transformers model directory "
                             f"(config.json, weights and preprocessor_config.json)")
        self.model = load_segmentation_model(model_dir, name)
        config = self.model.config
        try:
            self.processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{name} {model_dir!r}: its image processor (preprocessor_config.json) cannot be loaded "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        labels = {int(k): str(v).lower() for k, v in (config.id2label or {}).items()}
        n = config.num_labels
        if n == 1:
            self.background_label = None  # matting: one channel, the foreground's logit
        else:
            bg = [k for k, v in labels.items() if v == "background"]
            if len(bg) != 1:
                raise ValueError(f"{name} {model_dir!r}: its labels {sorted(labels.values())} name no single "
                                 f"'background' class (and it has {n} output channels, not 1 as a matting model)")
            self.background_label = bg[0]
        self.device = torch.device(device or "cpu")
        self.model = self.model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, rgb: Tensor,  # [3, H, W] in [0, 1]
                 ) -> Tensor:        # -> alpha [1, H, W] in [0, 1]
        """The foreground alpha of an image."""
        H, W = rgb.shape[-2:]
        x = self.processor(images=rgb.float().cpu(), return_tensors="pt", do_rescale=False)["pixel_values"]
        logits = self.model(pixel_values=x.to(self.device)).logits               # [1, C, h, w]
        return foreground_alpha(logits, (H, W), self.background_label)[0].cpu()


def _pad_square(rgb: Tensor,  # [3, H, W]
                bg: Tensor,   # [3, 1, 1]
                ) -> Tensor:  # -> [3, S, S], S = max(H, W)
    H, W = rgb.shape[-2:]
    S = max(H, W)
    out = bg.expand(3, S, S).clone()
    y, x = (S - H) // 2, (S - W) // 2
    out[:, y:y + H, x:x + W] = rgb
    return out


def _resize(img: Tensor,  # [C, h, w]
            h: int, w: int) -> Tensor:  # -> [C, h', w']
    if img.shape[-2:] == (h, w):
        return img
    return F.interpolate(img[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def centre_object(rgba: Tensor,  # [4, H, W] straight alpha in [0, 1]
                  size: int, fraction: float, background=1.0,
                  name: str = "image") -> Tensor:  # -> [3, size, size]
    """The object of an RGBA image centred and scaled (module docstring).

    Args:
        rgba: the image with the object's alpha.
        size: the output's side in pixels.
        fraction: the object's longer side over ``size``, in (0, 1].
        background: the canvas colour, a number or 3 numbers in [0, 1].
        name: what the caller calls the image, in errors.

    Returns:
        float [3, size, size] in [0, 1].

    Raises:
        ValueError: naming ``name`` when no pixel's alpha is above ``ALPHA_THRESHOLD``.
    """
    size = checks.positive_int("size", size)
    fraction = checks.real("fraction", fraction, 0.0, 1.0, lo_open=True)
    bg = _background(background)
    mask = rgba[3] > ALPHA_THRESHOLD                                          # [H, W]
    if not bool(mask.any()):
        raise ValueError(f"{name}: no object: no pixel has alpha above {ALPHA_THRESHOLD} (a fully transparent "
                         f"image, or the background-removal model found nothing)")
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    crop = composite(rgba[:, y0:y1, x0:x1], bg)                               # [3, h, w]
    h, w = y1 - y0, x1 - x0
    scale = fraction * size / max(h, w)
    nh, nw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
    out = bg.expand(3, size, size).clone()
    y, x = (size - nh) // 2, (size - nw) // 2
    out[:, y:y + nh, x:x + nw] = _resize(crop, nh, nw)
    return out


def preprocess(rgba: Tensor,  # [4, H, W] straight alpha in [0, 1] (io.images.read_image)
               size: int, fraction: float, background=1.0, segmenter: Segmenter | None = None,
               keep_background: bool = False, name: str = "--image") -> tuple[Tensor, str]:  # -> [3, size, size], how
    """The model input of one image (module docstring).

    Args:
        rgba: the decoded image.
        size: the model's input side in pixels.
        fraction: the object's longer side over ``size`` (the model's framing).
        background: the model's background colour.
        segmenter: the background-removal model, used on opaque images; None: opaque images are
            kept as they are.
        keep_background: the whole image as it is (no mask, no centring).
        name: what the caller calls the image, in errors.

    Returns:
        The image, float [3, size, size] in [0, 1], and where its mask came from: ``"alpha"``,
        ``"segmenter"`` or ``"none"``.
    """
    if not isinstance(rgba, Tensor) or rgba.dim() != 3 or rgba.shape[0] != 4 or 0 in rgba.shape:
        got = tuple(rgba.shape) if isinstance(rgba, Tensor) else type(rgba).__name__
        raise ValueError(f"{name}: expected an RGBA image [4, H, W] with H, W > 0; got {got}")
    checks.boolean("keep_background", keep_background)
    bg = _background(background)
    has_alpha = bool((rgba[3] < 1).any())
    if not keep_background and has_alpha:
        return centre_object(rgba, size, fraction, bg, name), "alpha"
    if not keep_background and segmenter is not None:
        alpha = segmenter(rgba[:3])                                             # [1, H, W]
        return centre_object(torch.cat([rgba[:3], alpha]), size, fraction, bg, name), "segmenter"
    square = _pad_square(composite(rgba, bg), bg)
    return _resize(square, size, size), "none"

