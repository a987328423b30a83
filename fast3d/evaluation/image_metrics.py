"""Image metrics on [0, 1] images ``[..., 3, H, W]``: PSNR, SSIM and MS-SSIM (torchmetrics: 11x11
Gaussian window, sigma 1.5, as Wang et al. 2004) and LPIPS (the lpips package, VGG).

LPIPS needs ImageNet VGG-16 weights, which lpips takes from torchvision's cache
(``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth``); this machine cannot download them, so
``backbone`` says where they come from: ``"imagenet"`` (that cache; a clear error if it is empty),
a path to a VGG-16 state dict (safetensors, or a ``.pth`` read with ``weights_only=True``), or
``"random"`` (a randomly initialised VGG, the same one every time (a fixed seed), under lpips'
learned heads: a perceptual-style loss for offline tests and demos, not the LPIPS metric;
evaluation reports name it ``lpips_random``).
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

VGG16_FILE = "vgg16-397923af.pth"


def psnr(pred: Tensor,   # [..., 3, H, W] in [0, 1]
         target: Tensor  # [..., 3, H, W]
         ) -> Tensor:    # [...]
    mse = (pred.float() - target.float()).pow(2).flatten(-3).mean(-1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


SSIM_BACKBONE = "torchmetrics-gaussian11-sigma1.5"   # what the report names SSIM and MS-SSIM's window
MS_SSIM_SCALES = 5                                    # Wang et al. 2003's five scales and weights


def _images(name: str, x: Tensor) -> Tensor:  # [..., 3, H, W] -> [N, 3, H, W] float32
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"{name} must be images [..., 3, H, W]; got {tuple(x.shape)}")
    return x.float().reshape(-1, *x.shape[-3:])


def ssim(pred: Tensor,    # [..., 3, H, W] in [0, 1]
         target: Tensor,  # [..., 3, H, W]
         ) -> Tensor:     # [...]
    """SSIM (Wang et al. 2004) from torchmetrics: an 11x11 Gaussian window of sigma 1.5, K1 0.01,
    K2 0.03, data range 1, averaged over every pixel and channel (border windows reflect-padded)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have one shape; got {tuple(pred.shape)} and {tuple(target.shape)}")
    x, y = _images("pred", pred), _images("target", target)
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"ssim needs images of at least 11x11; got {x.shape[-2]}x{x.shape[-1]}")
    s = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none")
    return s.reshape(pred.shape[:-3])


def ms_ssim_min_size(scales: int = MS_SSIM_SCALES) -> int:
    """The smallest image side MS-SSIM takes: the 11 px window must fit the coarsest of ``scales``
    downsampled scales; torchmetrics' rule is side // (scales - 1)^2 > 10, 176 px for five."""
    return 11 * max(1, scales - 1) ** 2


def ms_ssim(pred: Tensor,    # [..., 3, H, W] in [0, 1]
            target: Tensor,  # [..., 3, H, W]
            ) -> Tensor:     # [...]
    """Multi-scale SSIM (Wang et al. 2003) from torchmetrics: five scales with the paper's weights,
    the SSIM window above; images need sides of at least :func:`ms_ssim_min_size` (176 px)."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have one shape; got {tuple(pred.shape)} and {tuple(target.shape)}")
    x, y = _images("pred", pred), _images("target", target)
    need = ms_ssim_min_size()
    if min(x.shape[-2:]) < need:
        raise ValueError(f"ms_ssim needs images of at least {need}x{need} ({MS_SSIM_SCALES} scales of an 11 px "
                         f"window); got {x.shape[-2]}x{x.shape[-1]}")
    s = multiscale_structural_similarity_index_measure(x, y, data_range=1.0, reduction="none",
                                                       normalize="relu")
    return s.reshape(pred.shape[:-3])


def view_scores(pred: Tensor,      # [V, 3, H, W] in [0, 1] a sample's rendered views
                target: Tensor,    # [V, 3, H, W] the true views
                lpips_fn, lpips_name: str) -> dict:
    """A sample's image scores, each the mean over its views: ``psnr``, ``ssim``, ``lpips_name``
    (``lpips_fn`` from :func:`load_lpips`, named by :func:`lpips_metric`) and, where the views are
    large enough (:func:`ms_ssim_min_size`), ``ms_ssim``."""
    row = {"psnr": float(psnr(pred, target).mean()), "ssim": float(ssim(pred, target).mean()),
           lpips_name: float(lpips_fn(pred, target).mean())}
    if min(pred.shape[-2:]) >= ms_ssim_min_size():
        row["ms_ssim"] = float(ms_ssim(pred, target).mean())
    return row


def view_backbones(rows: list, lpips_name: str, lpips_net: str, size: int) -> dict:
    """The report's ``backbones`` for rows of :func:`view_scores` (and ``clip_*`` scores) of
    ``size`` px views: the network or window behind each score."""
    backbones = {"ssim": SSIM_BACKBONE, lpips_name: lpips_net}
    backbones.update({k: k.split(":", 1)[1] for r in rows for k in r if k.startswith("clip_")})
    if size >= ms_ssim_min_size():
        backbones["ms_ssim"] = SSIM_BACKBONE
    return backbones


def lpips_metric(backbone: str) -> tuple[str, str]:
    """(metric name, backbone name) for the report: ``("lpips", "lpips-vgg")`` for ImageNet VGG
    weights; the random stand-in is ``("lpips_random", "lpips-vgg-random")``, never the metric."""
    if backbone == "random":
        return "lpips_random", "lpips-vgg-random"
    return "lpips", "lpips-vgg"


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
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation notice
        torch.manual_seed(0)  # the random stand-in is one fixed net: a resumed evaluation scores alike
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
