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


# Decoding limits for images from users and clients: a 64-megapixel image is larger than any input
# a multi-view model takes (they resize to <= 1024^2), and far smaller than a decompression bomb.
MAX_PIXELS = 64 * 1024 * 1024
MAX_BYTES = 64 * 1024 * 1024
# The raster formats a user or client may send. PIL would otherwise also try every plugin it has,
# among them EPS (which runs Ghostscript where it is installed) and formats no camera writes.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


def read_image(source: str | bytes, name: str = "image", max_pixels: int = MAX_PIXELS,
               max_bytes: int = MAX_BYTES) -> Tensor:  # -> [4, H, W] RGBA in [0, 1], float32
    """Decode an untrusted image file (a path or its bytes) to straight-alpha RGBA floats.

    Every mode PIL reads is converted, not rejected: grey (L, LA), palette (P, with its
    transparency), 16-bit grey (I;16, scaled by 1/65535), 32-bit integer and float grey, CMYK,
    RGB (alpha 1) and RGBA. Only the raster formats of ``FORMATS`` are opened (the first frame of
    an animated GIF or WebP).

    Args:
        source: a file path, or the file's bytes (an HTTP body).
        name: what the caller calls this input (``--image``, ``images[2]``): every error names it.
        max_pixels: largest width x height accepted, checked from the header before any pixel is
            decoded (a decompression bomb never allocates).
        max_bytes: largest encoded size accepted.

    Returns:
        float32 [4, H, W]: R, G, B and alpha in [0, 1].

    Raises:
        ValueError: naming ``name``: not an image, truncated, empty, over a limit, or unreadable.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        where = f"{name} ({len(data)} bytes)"
    else:
        import os

        if not os.path.isfile(source):
            raise ValueError(f"{name}: {source!r} is not a file")
        where = f"{name} {source!r}"
        size = os.path.getsize(source)
        if size > max_bytes:
            raise ValueError(f"{where}: {size} bytes is over the limit of {max_bytes}")
        with open(source, "rb") as f:
            data = f.read()
    if len(data) == 0:
        raise ValueError(f"{where}: empty; expected a PNG, JPEG or other image file")
    if len(data) > max_bytes:
        raise ValueError(f"{where}: {len(data)} bytes is over the limit of {max_bytes}")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ValueError(f"{where}: has zero size ({w}x{h})")
        if w * h > max_pixels:
            raise ValueError(f"{where}: {w}x{h} = {w * h} pixels is over the limit of {max_pixels}")
        img.load()
    except (OSError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{where}: not a readable image ({type(e).__name__}: {e})") from None
    return _rgba(img)


def _rgba(img) -> Tensor:  # PIL image -> [4, H, W] float32 in [0, 1]
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        grey = np.asarray(img, dtype=np.float32) / 65535.0
    elif img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        # 32-bit grey: PNG's 16-bit grey decodes to mode I with values in [0, 65535].
        grey = (a / (65535.0 if a.max(initial=0) > 255 else 255.0)).clip(0, 1).astype(np.float32)
    else:
        a = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        return torch.from_numpy(a).permute(2, 0, 1).contiguous()
    rgb = np.repeat(grey[None], 3, axis=0)
    return torch.from_numpy(np.concatenate([rgb, np.ones_like(grey)[None]])).contiguous()


def composite(rgba: Tensor,  # [..., 4, H, W] straight alpha in [0, 1]
              background: float | Tensor = 1.0,  # scalar or [..., 3, 1, 1]
              ) -> Tensor:  # -> [..., 3, H, W]
    """RGB over a background by the alpha channel (white by default, as the multi-view models
    were trained)."""
    rgb, alpha = rgba[..., :3, :, :], rgba[..., 3:, :, :]
    return rgb * alpha + background * (1 - alpha)
