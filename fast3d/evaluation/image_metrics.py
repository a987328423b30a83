"""Image metrics on [0, 1] images ``[..., 3, H, W]``: PSNR, SSIM (11x11 Gaussian window, sigma 1.5,
as Wang et al. 2004 and scikit-image's defaults for this use) and LPIPS (the lpips package, VGG).

LPIPS needs ImageNet VGG-16 weights, which lpips takes from torchvision's cache
(``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``); this machine cannot download them, so
``backbone`` says where they come from: ``"imagenet"`` (that cache; a clear error if it is empty),
a path to a VGG-16 state dict (safetensors, or a ``.pth`` read with ``weights_only=True``), or
``"random"`` (a randomly initialised VGG under lpips' learned heads: a perceptual-style loss for
offline tests and demos, not the LPIPS metric; evaluation reports name it ``lpips_random``).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

VGG16_FILE = "vgg16-397923af.pth"


def psnr(pred: Tensor,   # [..., 3, H, W] in [0, 1]
         target: Tensor  # [..., 3, H, W]
         ) -> Tensor:    # [...]
    mse = (pred.float() - target.float()).pow(2).flatten(-3).mean(-1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def _gaussian_window(size: int, sigma: float, device, dtype) -> Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    g = g / g.sum()
    return g


def ssim(pred: Tensor,    # [..., 3, H, W] in [0, 1]
         target: Tensor,  # [..., 3, H, W]
         window: int = 11, sigma: float = 1.5) -> Tensor:  # [...]
    """Mean SSIM over pixels and channels (valid convolution, no padding)."""
    lead = pred.shape[:-3]
    C, H, W = pred.shape[-3:]
    if min(H, W) < window:
        raise ValueError(f"ssim needs images of at least {window}x{window}; got {H}x{W}")
    x = pred.float().reshape(-1, C, H, W)
    y = target.float().reshape(-1, C, H, W)
    g = _gaussian_window(window, sigma, x.device, x.dtype)

    def blur(t):  # separable Gaussian, per channel
        t = F.conv2d(t, g.view(1, 1, 1, -1).expand(C, 1, 1, window), groups=C)
        return F.conv2d(t, g.view(1, 1, -1, 1).expand(C, 1, window, 1), groups=C)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).reshape(lead)


def load_lpips(backbone: str = "imagenet", device: torch.device | str = "cpu") -> torch.nn.Module:
    """A frozen LPIPS-VGG module: ``m(pred, target)`` with images in [0, 1] ``[N, 3, H, W]`` -> [N]."""
    import lpips

    if backbone not in ("imagenet", "random") and not os.path.isfile(backbone):
        raise ValueError(f"lpips backbone must be 'imagenet', 'random' or a VGG-16 weights file; got {backbone!r}")
    if backbone == "imagenet":
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)
        if not os.path.isfile(cached):
            raise ValueError(f"LPIPS needs ImageNet VGG-16 weights at {cached} (torchvision's cache; this machine "
                             f"cannot download them): copy them there, pass a weights file, or use 'random' "
                             f"for an offline stand-in")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation notice
        m = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=backbone != "imagenet", verbose=False)
    if backbone not in ("imagenet", "random"):
        _load_vgg(m, backbone)
    m = _Scaled(m).to(device).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _load_vgg(m, path: str) -> None:
    """torchvision VGG-16 weights (``features.N.weight`` keys) into lpips' sliced copy of it."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    net = m.net
    mapped = {}
    for name, mod in net.named_modules():
        if isinstance(mod, torch.nn.Conv2d):  # lpips names them sliceK.<features index>
            idx = name.split(".")[-1]
            for k in ("weight", "bias"):
                src = f"features.{idx}.{k}"
                if src not in sd:
                    raise ValueError(f"{path}: not VGG-16 weights (no {src})")
                mapped[f"{name}.{k}"] = sd[src]
    net.load_state_dict(mapped)


class _Scaled(torch.nn.Module):
    """lpips expects [-1, 1] inputs; fast3d's images are [0, 1]."""

    def __init__(self, m):
        super().__init__()
        self.lpips = m

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:  # [N, 3, H, W] x2 -> [N]
        return self.lpips(pred * 2 - 1, target * 2 - 1, normalize=False).flatten()
