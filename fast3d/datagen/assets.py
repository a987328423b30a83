"""Procedural 3D assets made of Gaussians, with captions generated from their parts.

An asset is 1-3 primitives (sphere, box, cylinder, cone, torus, blob, extruded star) with
random proportions and orientation, each with a colour pattern (solid, stripes, checkers, gradient,
noise) from a named palette, stacked ("on") or placed side by side ("next to"), then normalised to
the unit box [-0.5, 0.5]^3 (longest side 1) in fast3d's +Z-up world. The caption names the parts:
"a red striped cylinder on a blue box".

Gaussians lie on the primitives' surfaces, about area-uniformly, as flat discs in the tangent plane
(two tangent scales from the sampling density, a thin normal scale), so renders look like solid
surfaces. Everything is drawn from one torch.Generator: the same seed gives the same asset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fast3d.cameras import rotmat_to_quat
from fast3d.ops.rasterization.reference import SH_C0  # degree-0 spherical harmonic: colour = SH_C0 * dc + 0.5

PALETTE = {
    "red": (0.85, 0.12, 0.10), "orange": (0.95, 0.50, 0.08), "yellow": (0.95, 0.85, 0.15),
    "green": (0.15, 0.65, 0.20), "teal": (0.05, 0.55, 0.55), "blue": (0.12, 0.25, 0.85),
    "purple": (0.50, 0.18, 0.70), "pink": (0.95, 0.55, 0.70), "brown": (0.45, 0.28, 0.12),
    "white": (0.95, 0.95, 0.95), "gray": (0.50, 0.50, 0.50), "black": (0.06, 0.06, 0.06),
}
SHAPES = ("sphere", "box", "cylinder", "cone", "torus", "blob", "star")
PATTERNS = ("solid", "striped", "checkered", "gradient", "mottled")
_SHAPE_WORDS = {"star": "star-shaped prism", "blob": "blob"}


@dataclass
class Asset:
    means: Tensor       # [N, 3] world positions, inside [-0.5, 0.5]^3
    quats: Tensor       # [N, 4] wxyz, unit
    scales: Tensor      # [N, 3] post-activation
    opacities: Tensor   # [N] post-activation
    colors: Tensor      # [N, 3] RGB in [0, 1]
    caption: str
    parts: list = field(default_factory=list)  # one dict per part: shape, color, pattern

    @property
    def sh(self) -> Tensor:  # [N, 1, 3] degree-0 SH coefficients (the 3DGS PLY's f_dc)
        return ((self.colors - 0.5) / SH_C0)[:, None, :]


# --- surfaces: (n points) -> positions [n, 3], normals [n, 3], local coords [n, 3] for patterns ---


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _sphere(g, n, dims):
    p = _unit(torch.randn(n, 3, generator=g, dtype=torch.float64))
    return p * dims, _unit(p / dims), p                                 # ellipsoid, its normals


def _box(g, n, dims):
    areas = torch.stack([dims[1] * dims[2], dims[0] * dims[2], dims[0] * dims[1]]).repeat(2)
    face = torch.multinomial(areas, n, replacement=True, generator=g)   # 6 faces, area-weighted
    axis, sign = face % 3, torch.where(face < 3, 1.0, -1.0).double()
    p = torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1
    p[torch.arange(n), axis] = sign
    normal = torch.zeros(n, 3, dtype=torch.float64)
    normal[torch.arange(n), axis] = sign
    return p * dims, normal, p


def _revolve(g, n, dims, r0: float, r1: float):
    """A frustum about z (radius r0 at z = -1, r1 at z = 1) with flat caps, scaled by dims."""
    side = math.pi * (r0 + r1) * math.hypot(2.0, r0 - r1)
    which = torch.multinomial(torch.tensor([side, math.pi * r0 ** 2 + 1e-9, math.pi * r1 ** 2 + 1e-9]),
                              n, replacement=True, generator=g)                 # 0 side, 1 bottom, 2 top
    theta = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    z = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    r = r0 + (r1 - r0) * (z + 1) / 2
    normal = _unit(torch.stack([torch.cos(theta), torch.sin(theta), torch.full_like(theta, (r0 - r1) / 2)], -1))
    for cap, zc, rc in ((1, -1.0, r0), (2, 1.0, r1)):
        m = which == cap
        r[m] = rc * torch.sqrt(torch.rand(int(m.sum()), generator=g, dtype=torch.float64))
        z[m] = zc
        normal[m] = torch.tensor([0.0, 0.0, zc], dtype=torch.float64)
    local = torch.stack([r * torch.cos(theta), r * torch.sin(theta), z], -1)
    return local * dims, _unit(normal / dims), local


def _cylinder(g, n, dims):
    return _revolve(g, n, dims, 1.0, 1.0)


def _cone(g, n, dims):
    return _revolve(g, n, dims, 1.0, 0.0)


def _torus(g, n, dims):
    R, r = 1.0, 0.35
    # Area element of a torus is proportional to (R + r cos v): rejection-sample v.
    u = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    v = torch.empty(0, dtype=torch.float64)
    while len(v) < n:
        cand = torch.rand(2 * n, generator=g, dtype=torch.float64) * 2 * math.pi
        keep = torch.rand(2 * n, generator=g, dtype=torch.float64) * (R + r) < R + r * torch.cos(cand)
        v = torch.cat([v, cand[keep]])
    v = v[:n]
    p = torch.stack([(R + r * torch.cos(v)) * torch.cos(u), (R + r * torch.cos(v)) * torch.sin(u), r * torch.sin(v)], -1)
    normal = torch.stack([torch.cos(v) * torch.cos(u), torch.cos(v) * torch.sin(u), torch.sin(v)], -1)
    # The ring may be oval, but the tube stays round-ish so it still reads as a torus.
    xy = dims[:2] / (R + r)
    scale = torch.cat([xy, xy.mean()[None]])
    return p * scale, _unit(normal / scale), p / (R + r)


def _blob(g, n, dims):
    # A sphere displaced by a few random low-frequency lobes.
    k = torch.randn(4, 3, generator=g, dtype=torch.float64)
    amp = torch.rand(4, generator=g, dtype=torch.float64) * 0.25
    d = _unit(torch.randn(n, 3, generator=g, dtype=torch.float64))
    radius = 1.0 + (amp * torch.sin(d @ k.T * 2.0)).sum(-1)
    p = d * radius[:, None]
    return p * dims, _unit(d / dims), d


def _star(g, n, dims):
    # Extruded 5-pointed star: sides (area-weighted over the 10 edges) and two caps.
    pts = 5
    angles = torch.arange(2 * pts, dtype=torch.float64) * math.pi / pts
    radii = torch.where(torch.arange(2 * pts) % 2 == 0, 1.0, 0.45).double()
    poly = torch.stack([radii * torch.cos(angles), radii * torch.sin(angles)], -1)   # [10, 2]
    a, b = poly, poly.roll(-1, 0)
    edge_len = (b - a).norm(dim=-1)
    cap_area = 0.5 * (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]).sum().abs()
    w = torch.cat([edge_len * 2, cap_area[None], cap_area[None]])
    which = torch.multinomial(w, n, replacement=True, generator=g)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    z = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    p = torch.zeros(n, 3, dtype=torch.float64)
    normal = torch.zeros(n, 3, dtype=torch.float64)
    side = which < 2 * pts
    e = which[side]
    xy = a[e] + (b[e] - a[e]) * t[side, None]
    p[side] = torch.cat([xy, z[side, None]], -1)
    d = b[e] - a[e]
    normal[side] = _unit(torch.stack([d[:, 1], -d[:, 0], torch.zeros_like(d[:, 0])], -1))
    for cap, zc in ((2 * pts, -1.0), (2 * pts + 1, 1.0)):
        m = which == cap
        k = int(m.sum())
        if k == 0:
            continue
        tri = torch.multinomial((0.5 * (a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0])).abs(), k, replacement=True,
                                generator=g)
        s1, s2 = torch.rand(k, generator=g, dtype=torch.float64), torch.rand(k, generator=g, dtype=torch.float64)
        flip = s1 + s2 > 1
        s1[flip], s2[flip] = 1 - s1[flip], 1 - s2[flip]
        xy = a[tri] * s1[:, None] + b[tri] * s2[:, None]                # triangles (origin, a, b)
        p[m] = torch.cat([xy, torch.full((k, 1), zc, dtype=torch.float64)], -1)
        normal[m] = torch.tensor([0.0, 0.0, zc], dtype=torch.float64)
    return p * dims, _unit(normal / dims), p


_SURFACES = {"sphere": _sphere, "box": _box, "cylinder": _cylinder, "cone": _cone, "torus": _torus,
             "blob": _blob, "star": _star}


def _pattern(g, name: str, local: Tensor, c1: Tensor, c2: Tensor) -> Tensor:  # -> [n, 3]
    axis = int(torch.randint(0, 3, (), generator=g))
    freq = float(2 + torch.randint(0, 4, (), generator=g))
    if name == "solid":
        return c1.expand(len(local), 3).clone()
    if name == "striped":
        mix = (torch.floor((local[:, axis] + 1) * freq) % 2)[:, None]
    elif name == "checkered":
        mix = (torch.floor((local + 1) * freq).sum(-1) % 2)[:, None]
    elif name == "gradient":
        mix = ((local[:, axis] + 1) / 2).clamp(0, 1)[:, None]
    else:  # mottled: smooth value noise from a few random sinusoids
        k = torch.randn(6, 3, generator=g, dtype=torch.float64) * 3
        phase = torch.rand(6, generator=g, dtype=torch.float64) * 2 * math.pi
        mix = (0.5 + 0.5 * torch.sin(local @ k.T + phase).mean(-1)).clamp(0, 1)[:, None]
    return c1 * (1 - mix) + c2 * mix


def _quat_from_frames(R: Tensor) -> Tensor:  # [n, 3, 3] rotation matrices -> [n, 4] wxyz, w >= 0
    q = rotmat_to_quat(R)
    return torch.where(q[:, :1] < 0, -q, q)   # q and -q are one rotation; the assets keep w >= 0


def _random_rotation(g) -> Tensor:  # [3, 3], about z mostly, a little tilt
    yaw = float(torch.rand((), generator=g)) * 2 * math.pi
    tilt = (float(torch.rand((), generator=g)) - 0.5) * 0.6
    cz, sz, cx, sx = math.cos(yaw), math.sin(yaw), math.cos(tilt), math.sin(tilt)
    Rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    Rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    return Rz @ Rx


def make_asset(gen: torch.Generator, n_gaussians: int = 20_000, max_parts: int = 3) -> Asset:
    """One random asset of exactly `n_gaussians` Gaussians."""
    if n_gaussians < 16:
        raise ValueError(f"n_gaussians must be >= 16; got {n_gaussians}")
    if not 1 <= max_parts <= 3:
        raise ValueError(f"max_parts must be in 1..3; got {max_parts}")
    g = gen
    n_parts = 1 + int(torch.randint(0, max_parts, (), generator=g))
    colors = list(PALETTE)
    counts = [n_gaussians // n_parts + (i < n_gaussians % n_parts) for i in range(n_parts)]
    parts, pieces = [], []
    top, x_edge = 0.0, 0.0
    arrangement = "on" if torch.rand((), generator=g) < 0.6 else "next to"
    for i, n in enumerate(counts):
        shape = SHAPES[int(torch.randint(0, len(SHAPES), (), generator=g))]
        pattern = PATTERNS[int(torch.randint(0, len(PATTERNS), (), generator=g))]
        c1n, c2n = (colors[int(j)] for j in torch.randperm(len(colors), generator=g)[:2])
        dims = (0.3 + torch.rand(3, generator=g, dtype=torch.float64) * 0.7) * (1.0 - 0.25 * i)
        p, normal, local = _SURFACES[shape](g, n, dims)
        rgb = _pattern(g, pattern, local, torch.tensor(PALETTE[c1n], dtype=torch.float64),
                       torch.tensor(PALETTE[c2n], dtype=torch.float64))
        R = _random_rotation(g) if shape not in ("box", "cylinder", "cone", "star") or i == 0 else torch.eye(
            3, dtype=torch.float64)
        p, normal = p @ R.T, normal @ R.T
        # Place: stacked on the previous part's top, or beside it along +x.
        if arrangement == "on":
            p[:, 2] += top - p[:, 2].min()
            top = float(p[:, 2].max())
        else:
            p[:, 0] += x_edge - p[:, 0].min() + (0.1 if i else 0.0)
            p[:, 2] -= p[:, 2].min()
            x_edge = float(p[:, 0].max())
        # Disc-shaped Gaussians in the tangent plane: spacing from the part's extent and count.
        extent = (p.max(0).values - p.min(0).values).clamp_min(1e-3)
        spacing = math.sqrt(float(2 * (extent[0] * extent[1] + extent[1] * extent[2] + extent[0] * extent[2])) / n)
        t1 = _unit(torch.linalg.cross(normal, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64).expand_as(normal)
                                      + torch.tensor([[1e-3, 2e-3, 0.0]], dtype=torch.float64)))
        t2 = torch.linalg.cross(normal, t1)
        frames = torch.stack([t1, t2, normal], -1)                              # columns: local axes
        pieces.append((p, frames, torch.tensor([spacing, spacing, spacing * 0.15], dtype=torch.float64), rgb))
        parts.append({"shape": shape, "color": c1n, "pattern": pattern, "second_color": c2n})
    means = torch.cat([q[0] for q in pieces])
    lo, hi = means.min(0).values, means.max(0).values
    scale = 1.0 / float((hi - lo).max())
    means = (means - (lo + hi) / 2) * scale
    scales = torch.cat([q[2].expand(len(q[0]), 3) for q in pieces]) * scale * 0.7
    jitter = 1 + 0.2 * torch.rand(len(means), 1, generator=g, dtype=torch.float64)
    return Asset(means=means.float(), quats=_quat_from_frames(torch.cat([q[1] for q in pieces])).float(),
                 scales=(scales * jitter).float(), opacities=(0.85 + 0.14 * torch.rand(len(means), generator=g)),  # < 1: PLY stores logits
                 colors=torch.cat([q[3] for q in pieces]).clamp(0, 1).float(), caption=caption(parts, arrangement),
                 parts=parts)


def _describe(part: dict) -> str:
    shape = _SHAPE_WORDS.get(part["shape"], part["shape"])
    if part["pattern"] == "solid":
        return f"{part['color']} {shape}"
    if part["pattern"] == "gradient":
        return f"{shape} fading from {part['color']} to {part['second_color']}"
    if part["pattern"] == "mottled":
        return f"mottled {part['color']} and {part['second_color']} {shape}"
    return f"{part['color']} and {part['second_color']} {part['pattern']} {shape}"


def caption(parts: list, arrangement: str) -> str:
    """"a red striped cylinder on a blue box": the last-placed part first, as people describe stacks."""
    words = [_describe(p) for p in reversed(parts)]
    text = f" {arrangement} ".join(("an " if w[0] in "aeiou" else "a ") + w for w in words)
    return text
