"""GaussianRenderer: fast3d.rasterization as an nn.Module for models that predict Gaussians."""

from __future__ import annotations

from torch import Tensor, nn

from fast3d.ops.rasterization import rasterization


class GaussianRenderer(nn.Module):
    """Renders B scenes of N Gaussians from C cameras each (all images in one call).

    The image size and rendering options are fixed at construction; ``forward`` takes the
    Gaussians and cameras and returns ``(colors [..., C, H, W, D(+1)], alphas [..., C, H, W, 1],
    meta)`` exactly as :func:`fast3d.rasterization` does. No parameters or buffers. ``capacity``
    (an intersection bound) makes a CUDA render free of host synchronisation, for CUDA graph
    capture; check ``meta["overflow"]`` (or ``fast3d.ops.rasterization.check_overflow(meta)``).
    """

    def __init__(self, width: int, height: int, *, sh_degree: int | None = None, near_plane: float = 0.01,
                 far_plane: float = 1e10, eps2d: float = 0.3, render_mode: str = "RGB",
                 rasterize_mode: str = "classic", deterministic: bool = False, absgrad: bool = False,
                 capacity: int | None = None, backend: str = "auto"):
        super().__init__()
        self.width, self.height = width, height
        self.options = dict(sh_degree=sh_degree, near_plane=near_plane, far_plane=far_plane, eps2d=eps2d,
                            render_mode=render_mode, rasterize_mode=rasterize_mode, deterministic=deterministic,
                            absgrad=absgrad, capacity=capacity, backend=backend)

    def forward(self, means: Tensor,      # [..., N, 3]
                quats: Tensor,            # [..., N, 4]
                scales: Tensor,           # [..., N, 3]
                opacities: Tensor,        # [..., N]
                colors: Tensor,           # [..., N, D] / [..., C, N, D] / SH [..., N, K, 3]
                viewmats: Tensor,         # [..., C, 4, 4]
                Ks: Tensor,               # [..., C, 3, 3]
                backgrounds: Tensor | None = None,  # [..., C, D]
                ) -> tuple[Tensor, Tensor, dict]:
        return rasterization(means, quats, scales, opacities, colors, viewmats, Ks, self.width, self.height,
                             backgrounds=backgrounds, **self.options)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"width={self.width}, height={self.height}, {opts}"


__all__ = ["GaussianRenderer"]
