"""The backend contract of rasterization: three differentiable stages.

:func:`fast3d.rasterization` validates its inputs, then chains a backend's stages with autograd:
projection (3D Gaussians -> 2D means, conics, depths, opacities, radii), spherical harmonics
(coefficients -> per-camera colours) and rasterization (2D Gaussians -> images). The 2D means the
projection returns are the tensors the rasterization stage reads, so ``meta["means2d"]`` lies on
the autograd path and its ``.grad`` (after ``retain_grad()``) is d loss / d mean2d per camera, as
gsplat's densification strategies read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RasterStages:
    """One backend's stages (what ``backends.Backend.fn`` holds for the rasterization op).

    Attributes:
        project: ``(means [B,N,3], quats [B,N,4], scales [B,N,3], opacities [B,N], viewmats
            [B,C,4,4], Ks [B,C,3,3], width, height, near, far, eps2d, antialiased,
            camera_model="pinhole"|"ortho") -> (means2d [B,C,N,2], conics [B,C,N,3], depths
            [B,C,N], opacities [B,C,N], radii [B,C,N,2] int32)``: the projection of
            quaternion/scale Gaussians (covariances use ``reference.project_stage`` on every
            backend).
        sh: ``(sh [B,N,K,3], means [B,N,3], viewmats [B,C,4,4], degree) -> colors [B,C,N,3]``.
        rasterize: ``(means2d [I,N,2], conics [I,N,3], opacities [I,N], feats [I,N,D], depths
            [I,N], radii [I,N,2] int32, width, height, deterministic, capacity, absgrad) ->
            (image [I,H,W,D], alpha [I,H,W,1], n_intersections (0-dim int64), absgrad buffer
            [I,N,2] filled by the backward, or None)``; Gaussians with a zero radius are not drawn.
    """

    project: Callable
    sh: Callable
    rasterize: Callable
