"""The LRM mesh export: marching cubes on a density field (:func:`density_mesh`), and the
vertex-coloured surface of one triplane (:func:`extract_mesh`, ``fast3d infer``'s ``mesh.ply``)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from fast3d import checks
from fast3d.models.lrm import LRM

MESH_GRID = 128            # default extract_mesh grid: 128^3 density samples, box corners included
DENSITY_THRESHOLD = 3.0    # OpenLRM's surface threshold on the density
QUERY_CHUNK = 1 << 18      # decoder queries per call (bounds the memory of the mesh export)


def _check_mesh_args(grid, threshold, chunk) -> None:
    checks.integer("grid", grid, 2)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite real number; got {threshold!r}")
    checks.positive_int("chunk", chunk)


def density_mesh(density: Callable[[Tensor], Tensor],  # world points [M, 3] -> density [M]
                 bound: float, grid: int = MESH_GRID, threshold: float = DENSITY_THRESHOLD,
                 chunk: int = QUERY_CHUNK, device=None) -> tuple[Tensor, Tensor]:  # -> [V, 3], [F, 3]
    """Marching cubes (``skimage.measure.marching_cubes``, as OpenLRM) on the level ``threshold``
    of ``density`` sampled at the grid^3 nodes spanning [-bound, bound]^3 (spacing 2 bound /
    (grid - 1)), queried ``chunk`` points at a time. Returns vertices (world coordinates,
    float32) and triangles (int64) whose normals point out of the region density > threshold.
    The samples are padded with one empty layer, so the surface is closed where that region
    meets the box, on the box faces; an empty mesh (V = F = 0) where density never exceeds
    ``threshold``."""
    _check_mesh_args(grid, threshold, chunk)
    bound, grid, chunk = float(bound), int(grid), int(chunk)
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"bound must be a positive finite number; got {bound!r}")
    axis = torch.linspace(-bound, bound, grid, device=device)                  # [G]
    volume = np.empty(grid ** 3, dtype=np.float32)                            # index i G^2 + j G + k: (x_i, y_j, z_k)
    for s in range(0, grid ** 3, chunk):
        idx = torch.arange(s, min(s + chunk, grid ** 3), device=device)      # [M]
        points = axis[torch.stack([idx // grid ** 2, idx // grid % grid, idx % grid], -1)]  # [M, 3]
        sigma = density(points)
        if not isinstance(sigma, Tensor) or sigma.shape != idx.shape:
            raise ValueError(f"density must map points [M, 3] to a tensor [M]; got "
                             f"{tuple(sigma.shape) if isinstance(sigma, Tensor) else type(sigma).__name__}")
        volume[s:s + len(idx)] = sigma.detach().float().cpu().numpy()
    if not np.isfinite(volume).all():
        raise ValueError(f"density is NaN or infinite at {int((~np.isfinite(volume)).sum())} of {grid}^3 grid points")
    if not (volume > threshold).any():
        return torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64)
    try:
        from skimage.measure import marching_cubes
    except ImportError as e:
        raise ImportError("the mesh export needs scikit-image (pip install 'fast3d[train]'); or skip it "
                          "(mesh_grid=0, fast3d infer --mesh-grid 0)") from e

    padded = np.pad(volume.reshape(grid, grid, grid), 1, constant_values=threshold - 1 - abs(threshold))
    # axis 0 of the volume is x, 1 is y, 2 is z (not skimage's z, y, x): index space maps to world
    # axes in order, so the handedness (and with "ascent" the outward normals) carries over
    verts, faces, _, _ = marching_cubes(padded, level=threshold, gradient_direction="ascent")
    h = 2 * bound / (grid - 1)
    world = np.clip((verts.astype(np.float64) - 1) * h - bound, -bound, bound)  # pad-layer vertices onto the box
    return torch.from_numpy(world.astype(np.float32)), torch.from_numpy(faces.astype(np.int64))


@torch.no_grad()
def extract_mesh(model: LRM, planes: Tensor,  # [3, C, 2 token_res, 2 token_res] one sample's planes
                 grid: int = MESH_GRID, threshold: float = DENSITY_THRESHOLD, chunk: int = QUERY_CHUNK,
                 ) -> tuple[Tensor, Tensor, Tensor]:  # -> vertices [V, 3], faces [F, 3], colors [V, 3]
    """The surface density = threshold of one triplane as a vertex-coloured triangle mesh
    (``density_mesh`` over the triplane box [-bound, bound]^3, each vertex coloured by the
    decoder's rgb there, in [0, 1]). CPU tensors; empty (V = F = 0) where the density never
    exceeds ``threshold``."""
    planes = model.check_planes(planes, batch=False)
    _check_mesh_args(grid, threshold, chunk)
    vertices, faces = density_mesh(lambda p: model.decode_points(planes, p, chunk)[0], model.config.bound, grid,
                                   threshold, chunk, device=planes.device)
    _, colors = model.decode_points(planes, vertices.to(planes.device), chunk)
    return vertices, faces, colors.float().cpu().clamp(0, 1)
