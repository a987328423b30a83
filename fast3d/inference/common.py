"""What the inference pipelines share: the default device, reading input images, writing images
and turntable files, and per-stage latency."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from torch import Tensor

from fast3d.io.atomic import atomic_path
from fast3d.io.images import composite, read_image, to_uint8


def default_device(device=None) -> torch.device:
    """Where a model runs: ``device`` (a ``torch.device`` or its name, e.g. ``"cuda:1"``) when one is
    given, else CUDA when there is one and the CPU otherwise.

    Args:
        device: the device asked for; None (or "") for the default.

    Returns:
        The ``torch.device``.
    """
    if device is None or (isinstance(device, str) and not device):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_image(path: str, size: int | None = None, background: float = 1.0) -> Tensor:  # -> [3, H, W] in [0, 1]
    """An image file as RGB floats (io.images.read_image's limits and modes); alpha is composited
    over ``background`` (white); resized to ``size`` x ``size`` when given (square images only)."""
    rgba = read_image(path, name="image")                          # [4, H, W]
    if size is not None and tuple(rgba.shape[1:]) != (size, size):
        if rgba.shape[1] != rgba.shape[2]:
            raise ValueError(f"image {path!r} is {rgba.shape[2]}x{rgba.shape[1]}; expected a square image")
        rgba = torch.nn.functional.interpolate(rgba[None], size=(size, size), mode="bicubic", antialias=True,
                                               align_corners=False)[0].clamp(0, 1)
    return composite(rgba, background)


def load_images(paths: list[str], size: int | None = None) -> Tensor:  # -> [V, 3, H, W]
    imgs = [load_image(p, size) for p in paths]
    shapes = {tuple(i.shape) for i in imgs}
    if len(shapes) > 1:
        raise ValueError(f"--images have different sizes: {', '.join(f'{p}: {tuple(i.shape[1:])}' for p, i in zip(paths, imgs))}")
    return torch.stack(imgs)


def save_image(img: Tensor,  # [3, H, W] in [0, 1]
               path: str) -> None:
    from PIL import Image

    Image.fromarray(to_uint8(img)).save(path)


def write_turntable(frames: Tensor,  # [N, 3, H, W] in [0, 1]
                    path: str, fps: int = 12) -> str:
    """An animated GIF (``.gif``) of the frames, written atomically. Returns the path."""
    from PIL import Image

    if not path.endswith(".gif"):
        raise ValueError(f"turntable path must end in .gif; got {path!r}")
    arr = to_uint8(frames)
    imgs = [Image.fromarray(a) for a in arr]
    with atomic_path(path) as tmp:
        imgs[0].save(tmp, format="GIF", save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    return path


class StageTimer:
    """Wall-clock latency of named stages (synchronising the GPU around each)."""

    def __init__(self):
        self.stages: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stages[name] = self.stages.get(name, 0.0) + (time.perf_counter() - t) * 1e3

    def report(self) -> str:
        total = sum(self.stages.values())
        return "\n".join([f"  {k:<14} {v:9.1f} ms" for k, v in self.stages.items()] + [f"  {'total':<14} {total:9.1f} ms"])
