"""nn.Module wrappers of the triplane renderer: the decoder MLP and the renderer module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# EG3D's output activations, shared with the fused Triton marcher (fast3d/ops/triplane/march.py).
RGB_PAD = 0.001            # rgb = sigmoid(x) (1 + 2 RGB_PAD) - RGB_PAD
SOFTPLUS_THRESHOLD = 20.0  # F.softplus's default: linear above it


class TriplaneMLP(nn.Module):
    """OpenLRM / EG3D's OSGDecoder: concatenated triplane features [..., 3C] -> ``n_layers``
    linear layers (ReLU between) -> density sigma [...] and colour rgb [..., 3].

    sigma = softplus(x_0 + density_bias) (EG3D's shifted softplus: empty space at init);
    rgb = sigmoid(x_1:4) (1 + 2 RGB_PAD) - RGB_PAD (EG3D's widened sigmoid, so 0 and 1 are reachable).
    """

    def __init__(self, n_features: int, hidden: int = 64, n_layers: int = 4, density_bias: float = -1.0):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1; got {n_layers}")
        self.n_features = int(n_features)
        self.in_features = 3 * self.n_features
        self.hidden = int(hidden)
        self.density_bias = float(density_bias)
        widths = [self.in_features] + [self.hidden] * (n_layers - 1) + [4]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, feats: Tensor) -> tuple[Tensor, Tensor]:   # feats [..., 3C] -> [...], [..., 3]
        x = feats
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = F.relu(x)
        sigma = F.softplus(x[..., 0] + self.density_bias, threshold=SOFTPLUS_THRESHOLD)
        rgb = torch.sigmoid(x[..., 1:]) * (1 + 2 * RGB_PAD) - RGB_PAD
        return sigma, rgb


class TriplaneRenderer(nn.Module):
    """Renders rays through a triplane with its own :class:`TriplaneMLP` decoder
    (``fast3d.render_triplane``). forward(planes [B, 3, C, H, W], rays_o, rays_d [B, R, 3],
    near, far: float or [B, R], background) -> dict(color [B, R, 3], opacity, depth [B, R, 1])."""

    def __init__(self, n_features: int, hidden: int = 64, n_layers: int = 4, n_samples: int = 64,
                 n_importance: int = 64, bound: float = 1.0, density_bias: float = -1.0,
                 transmittance_eps: float = 1e-4, backend: str = "auto"):
        super().__init__()
        self.decoder = TriplaneMLP(n_features, hidden, n_layers, density_bias)
        self.n_samples, self.n_importance = int(n_samples), int(n_importance)
        self.bound, self.transmittance_eps, self.backend = float(bound), float(transmittance_eps), backend

    def forward(self, planes: Tensor, rays_o: Tensor, rays_d: Tensor, near, far,
                background: Tensor | None = None, deterministic: bool | None = None,
                generator: torch.Generator | None = None) -> dict:
        from fast3d.ops.triplane.api import render_triplane

        # Evaluation renders are reproducible (midpoints, evenly spaced importance samples);
        # training jitters the samples, as NeRF does.
        det = (not self.training) if deterministic is None else deterministic
        return render_triplane(planes, self.decoder, rays_o, rays_d, near, far, n_samples=self.n_samples,
                               n_importance=self.n_importance, background=background, bound=self.bound,
                               deterministic=det, generator=generator,
                               transmittance_eps=self.transmittance_eps, backend=self.backend)
