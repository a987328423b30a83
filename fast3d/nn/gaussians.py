"""GaussianRenderer: fast3d.rasterization as an nn.Module for models that predict Gaussians."""

from __future__ import annotations

from torch import Tensor, nn

from fast3d.ops.rasterization import rasterization


class GaussianRenderer(nn.Module):
    """:func:`fast3d.rasterization` as an ``nn.Module``, for models that predict Gaussians.

    The image size and the rendering options are fixed at construction; ``forward`` takes the
    Gaussians and cameras. It has no parameters or buffers (adds nothing to a ``state_dict``).

    .. note::
        **CUDA graphs.** ``capacity`` (a bound on the Gaussian-tile intersections) makes a CUDA
        render free of host synchronisation, so a training step can be captured; check
        ``meta["overflow"]`` outside capture (:func:`fast3d.ops.rasterization.check_overflow`).

    Args:
        width, height: image size in pixels.
        sh_degree, near_plane, far_plane, eps2d, render_mode, rasterize_mode, deterministic,
            absgrad, capacity, backend: as :func:`fast3d.rasterization`, with its defaults;
            checked on every call.

    Example::

        renderer = GaussianRenderer(256, 256, render_mode="RGB+D")
        colors, alphas, meta = renderer(means, quats, scales, opacities, rgb, viewmats, Ks)
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
        """Render every camera of every scene.

        Args:
            means, quats, scales, opacities, colors, viewmats, Ks, backgrounds: as
                :func:`fast3d.rasterization` (shapes in the signature's comments).

        Returns:
            ``(colors [..., C, H, W, X], alphas [..., C, H, W, 1], meta)`` exactly as
            :func:`fast3d.rasterization` returns them.
        """
        return rasterization(means, quats, scales, opacities, colors, viewmats, Ks, self.width, self.height,
                             backgrounds=backgrounds, **self.options)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"width={self.width}, height={self.height}, {opts}"


__all__ = ["GaussianRenderer"]
