"""Augmentations of the reconstruction recipes, all drawn from the caller's generator (so a resumed
run draws the same ones): LGM's grid distortion and camera jitter, random backgrounds, and
VFusion3D's camera noise."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def recomposite(images: Tensor,   # [..., 3, H, W] composited over `old` (white by default)
                alphas: Tensor,   # [..., 1, H, W]
                background: Tensor,  # [..., 3] the new background per image
                old: float = 1.0) -> Tensor:  # -> [..., 3, H, W]
    """Swap an image's background: I' = I + (1 - a) (b - old)."""
    return images + (1 - alphas) * (background[..., None, None] - old)


def grid_distortion(images: Tensor,  # [N, C, H, W]
                    gen: torch.Generator, strength: float = 0.5, cells: tuple[int, int] = (8, 17)) -> Tensor:
    """LGM's input augmentation: warp each image by a smooth random displacement field (a coarse
    grid of random offsets, bicubically upsampled; ``strength`` in units of one coarse cell),
    which imitates the inconsistencies of generated multi-view images."""
    N, _, H, W = images.shape
    out = []
    for i in range(N):
        n = int(torch.randint(cells[0], cells[1], (1,), generator=gen))
        offsets = (torch.rand(1, 2, n, n, generator=gen) * 2 - 1) * (strength / n)
        field = F.interpolate(offsets, size=(H, W), mode="bicubic", align_corners=True)[0].permute(1, 2, 0)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
        grid = torch.stack([xs, ys], -1) + field
        out.append(F.grid_sample(images[i:i + 1].float(), grid[None].to(images.device), mode="bilinear",
                                 padding_mode="border", align_corners=True))
    return torch.cat(out).to(images.dtype)


def random_rotation(n: int, max_deg: float, gen: torch.Generator, dtype=torch.float64) -> Tensor:  # -> [n, 3, 3]
    """Rotations about uniformly random axes by angles uniform in [-max_deg, max_deg] (Rodrigues)."""
    axis = F.normalize(torch.randn(n, 3, generator=gen, dtype=dtype), dim=-1)
    angle = (torch.rand(n, generator=gen, dtype=dtype) * 2 - 1) * math.radians(max_deg)
    Kx = torch.zeros(n, 3, 3, dtype=dtype)
    Kx[:, 0, 1], Kx[:, 0, 2], Kx[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    Kx = Kx - Kx.transpose(1, 2)
    s, c = torch.sin(angle)[:, None, None], torch.cos(angle)[:, None, None]
    return torch.eye(3, dtype=dtype) + s * Kx + (1 - c) * (Kx @ Kx)


def camera_jitter(viewmats: Tensor,  # [N, 4, 4] world-to-camera
                  gen: torch.Generator, max_deg: float = 3.0, max_shift: float = 0.02) -> Tensor:  # -> [N, 4, 4]
    """LGM's camera augmentation: each camera orbits the origin by a small random rotation and
    moves by a small random offset, so the model learns to tolerate imprecise input poses."""
    N = viewmats.shape[0]
    world = torch.eye(4, dtype=torch.float64).repeat(N, 1, 1)
    world[:, :3, :3] = random_rotation(N, max_deg, gen)
    world[:, :3, 3] = (torch.rand(N, 3, generator=gen, dtype=torch.float64) * 2 - 1) * max_shift
    return (viewmats.double() @ world.to(viewmats.device)).to(viewmats.dtype)


def camera_noise(viewmats: Tensor,  # [N, 4, 4]
                 Ks: Tensor,        # [N, 3, 3] pixels
                 gen: torch.Generator, amount: float, size: int) -> tuple[Tensor, Tensor]:
    """VFusion3D's camera noise injection: uniform noise of +-``amount`` on the extrinsics' entries
    (rotation and translation; the rotation is re-orthonormalised) and on the normalised
    intrinsics (fx/size, fy/size, cx/size, cy/size)."""
    N = viewmats.shape[0]
    vm = viewmats.double().clone()
    vm[:, :3, :] += (torch.rand(N, 3, 4, generator=gen, dtype=torch.float64) * 2 - 1).to(vm.device) * amount
    U, _, Vh = torch.linalg.svd(vm[:, :3, :3])
    vm[:, :3, :3] = U @ Vh
    K = Ks.double().clone()
    for (r, c) in ((0, 0), (1, 1), (0, 2), (1, 2)):
        K[:, r, c] += (torch.rand(N, generator=gen, dtype=torch.float64) * 2 - 1).to(K.device) * amount * size
    return vm.to(viewmats.dtype), K.to(Ks.dtype)
