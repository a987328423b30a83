"""Camera rigs of the multi-view papers, and conversions into fast3d's one camera convention.

fast3d's convention (docs/design.md#names-and-shapes): world-to-camera ``viewmats [..., C, 4, 4]`` and pinhole
``Ks [..., C, 3, 3]`` with OpenCV axes (x right, y down, z forward), pixel centres at +0.5.

The rigs place cameras around an object normalised to the unit box ``[-0.5, 0.5]^3`` at the origin,
in a right-handed world with **+Z up** (Blender's): azimuth is measured in the XY plane from +X
towards +Y, elevation upwards from the XY plane. Every camera looks at the origin, upright.
Datasets in other conventions come in through :func:`viewmat_from_opengl_c2w` (OpenGL and Blender
camera-to-world matrices; a Y-up world is rotated to Z-up).

Rigs:
* :func:`orbit16` — VFusion3D's: 16 views at uniform azimuth steps of 2*pi/16 starting at 0, one
  elevation per orbit drawn from [0, pi/4], constant distance, each camera position jittered by
  an offset in [-0.05, 0.05] per axis (the paper's camera noise during rendering).
* :func:`zero123pp` — Zero123++'s 6 target views: azimuths 30, 90, ..., 330 degrees relative to the
  input view, elevations alternating +20 and -10 degrees.
* :func:`mvdream` — MVDream's 4 orthogonal views (azimuth 0, 90, 180, 270 plus an offset) at one
  elevation.
* :func:`random_sphere` — OpenLRM-style random views: directions uniform on the sphere (optionally
  restricted in elevation), distance drawn from a range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Defaults: LGM's / Zero123++'s field of view; a distance at which the unit box's bounding sphere
# (radius sqrt(3)/2) stays inside the view from any direction: asin(0.866 / 2.2) = 23.2 deg < 24.55.
DEFAULT_FOV_Y_DEG = 49.1
DEFAULT_DISTANCE = 2.2
WORLD_UP = (0.0, 0.0, 1.0)

# OpenGL / Blender camera axes (x right, y up, looking down -z) -> OpenCV's (x right, y down, z forward).
_GL_TO_CV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
# Y-up world -> Z-up world: a rotation of +90 degrees about X, (x, y, z) -> (x, -z, y).
_YUP_TO_ZUP = torch.tensor([[1.0, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)


@dataclass
class Rig:
    viewmats: Tensor   # [V, 4, 4] world-to-camera, OpenCV axes
    Ks: Tensor         # [V, 3, 3] pinhole intrinsics, pixels
    azimuths: Tensor   # [V] radians
    elevations: Tensor  # [V] radians
    width: int
    height: int

    @property
    def num_views(self) -> int:
        return self.viewmats.shape[0]


def spherical_to_position(azimuth: Tensor,    # [...] radians
                          elevation: Tensor,  # [...] radians
                          distance: Tensor | float) -> Tensor:  # -> [..., 3]
    cos_e = torch.cos(elevation)
    return torch.stack([cos_e * torch.cos(azimuth), cos_e * torch.sin(azimuth), torch.sin(elevation)], -1) * (
        torch.as_tensor(distance, dtype=azimuth.dtype, device=azimuth.device)[..., None])


def look_at(eye: Tensor,                  # [..., 3] camera centres, world
            target: Tensor | None = None,  # [..., 3] (default: the origin)
            up: tuple = WORLD_UP) -> Tensor:  # -> viewmats [..., 4, 4]
    """World-to-camera matrices (OpenCV axes) of cameras at `eye` looking at `target`, upright
    with respect to `up` (image y points along -up). `eye - target` must not be parallel to `up`."""
    if eye.shape[-1:] != (3,):
        raise ValueError(f"eye must have shape [..., 3]; got {tuple(eye.shape)}")
    target = torch.zeros_like(eye) if target is None else target.to(eye).expand_as(eye)
    up_t = torch.tensor(up, dtype=eye.dtype, device=eye.device).expand_as(eye)
    forward = target - eye                                                    # camera +z
    norm = forward.norm(dim=-1, keepdim=True)
    if bool((norm <= 1e-12).any()):
        raise ValueError("eye must differ from target for every camera")
    forward = forward / norm
    right = torch.linalg.cross(forward, up_t)                                 # camera +x
    rnorm = right.norm(dim=-1, keepdim=True)
    if bool((rnorm <= 1e-9).any()):
        raise ValueError(f"a camera looks along the up axis {up}: its image orientation is undefined")
    right = right / rnorm
    down = torch.linalg.cross(forward, right)                                 # camera +y
    R = torch.stack([right, down, forward], -2)                               # rows: camera axes in world
    viewmat = torch.zeros(*eye.shape[:-1], 4, 4, dtype=eye.dtype, device=eye.device)
    viewmat[..., :3, :3] = R
    viewmat[..., :3, 3] = -(R @ eye[..., None])[..., 0]
    viewmat[..., 3, 3] = 1.0
    return viewmat


def intrinsics(fov_y_deg: float, width: int, height: int, n: int = 1, dtype=torch.float32) -> Tensor:
    """Pinhole intrinsics [n, 3, 3]: square pixels, principal point at the image centre."""
    if not 0.0 < fov_y_deg < 180.0:
        raise ValueError(f"fov_y_deg must be in (0, 180); got {fov_y_deg}")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive; got {width}x{height}")
    f = 0.5 * height / math.tan(math.radians(fov_y_deg) / 2)
    K = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]], dtype=dtype)
    return K.expand(n, 3, 3).clone()


def orbit_cameras(azimuths: Tensor,    # [...] radians, float64
                  elevations: Tensor,  # [...] radians
                  distance: Tensor | float, fov_y_deg: float, resolution: int) -> tuple[Tensor, Tensor]:
    """Cameras on a sphere of radius ``distance`` around the origin, looking at it, upright.

    Args:
        azimuths, elevations: each camera's direction (see :func:`spherical_to_position`).
        distance: the radius (a number, or a tensor broadcasting against ``azimuths``).
        fov_y_deg: the vertical field of view.
        resolution: the side of the square image the intrinsics are in pixels of.

    Returns:
        viewmats [..., 4, 4] (float32, OpenCV world-to-camera) and Ks [..., 3, 3] (float32).
    """
    viewmats = look_at(spherical_to_position(azimuths, elevations, distance)).float()
    Ks = intrinsics(fov_y_deg, resolution, resolution, azimuths.numel()).view(*azimuths.shape, 3, 3)
    return viewmats, Ks


def turntable(n: int, resolution: int, elevation_deg: float = 20.0, distance: float = DEFAULT_DISTANCE,
              fov_y_deg: float = DEFAULT_FOV_Y_DEG) -> tuple[Tensor, Tensor]:  # -> [n, 4, 4], [n, 3, 3]
    """``n`` cameras evenly around the +Z axis from azimuth 0, at one elevation (a turntable video)."""
    az = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    return orbit_cameras(az, torch.full_like(az, math.radians(elevation_deg)), distance, fov_y_deg, resolution)


def rotmat_to_quat(R: Tensor) -> Tensor:  # [..., 3, 3] rotation -> [..., 4] unit quaternion, wxyz
    """The quaternion of a rotation matrix, from whichever of w, x, y, z is largest (stable)."""
    m = R.unbind(-1)
    m00, m10, m20 = m[0].unbind(-1)
    m01, m11, m21 = m[1].unbind(-1)
    m02, m12, m22 = m[2].unbind(-1)
    sq = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22,           # 4w^2, 4x^2, 4y^2, 4z^2
                      1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    # Each row is 4 * (that component) * q; dividing by its norm leaves q, and the row of the
    # largest component divides by the largest number (the others lose digits near 180 degrees).
    candidates = torch.stack([                                              # 4w (w,x,y,z), 4x (...), ...
        torch.stack([sq[..., 0], m21 - m12, m02 - m20, m10 - m01], -1),
        torch.stack([m21 - m12, sq[..., 1], m10 + m01, m02 + m20], -1),
        torch.stack([m02 - m20, m10 + m01, sq[..., 2], m12 + m21], -1),
        torch.stack([m10 - m01, m20 + m02, m21 + m12, sq[..., 3]], -1),
    ], -2)                                                                  # [..., 4, 4]
    best = sq.argmax(-1)
    q = candidates.gather(-2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    return q / q.norm(dim=-1, keepdim=True)


def viewmat_from_opengl_c2w(c2w: Tensor,  # [..., 4, 4] camera-to-world, OpenGL/Blender camera axes
                            world_up: str = "z") -> Tensor:  # -> viewmats [..., 4, 4], OpenCV
    """OpenGL / Blender camera-to-world (camera looks down -z, y up) to fast3d's OpenCV
    world-to-camera. `world_up="y"` also rotates a Y-up world (OpenGL scenes) into fast3d's Z-up
    world; Blender scenes are Z-up already."""
    if c2w.shape[-2:] != (4, 4):
        raise ValueError(f"c2w must have shape [..., 4, 4]; got {tuple(c2w.shape)}")
    if world_up not in ("y", "z"):
        raise ValueError(f"world_up must be 'y' or 'z'; got {world_up!r}")
    c2w_cv = c2w.double() @ _GL_TO_CV.to(c2w.device)
    if world_up == "y":
        c2w_cv = _YUP_TO_ZUP.to(c2w.device) @ c2w_cv
    return torch.linalg.inv(c2w_cv).to(c2w.dtype)


def camera_centers(viewmats: Tensor) -> Tensor:  # [..., 4, 4] -> [..., 3]
    R, t = viewmats[..., :3, :3], viewmats[..., :3, 3:]
    return -(R.transpose(-1, -2) @ t)[..., 0]


def camera_rays(viewmats: Tensor,   # [..., C, 4, 4] world-to-camera, OpenCV
                Ks: Tensor,         # [..., C, 3, 3]
                width: int, height: int) -> tuple[Tensor, Tensor]:  # -> 2 x [..., C, H, W, 3]
    """World-space rays through the pixel centres (+0.5): origins (the camera centres) and unit
    directions."""
    if viewmats.shape[-2:] != (4, 4) or Ks.shape[-2:] != (3, 3) or viewmats.shape[:-2] != Ks.shape[:-2]:
        raise ValueError(f"viewmats [..., C, 4, 4] and Ks [..., C, 3, 3] must share their leading dims; "
                         f"got {tuple(viewmats.shape)} and {tuple(Ks.shape)}")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive; got {width}x{height}")
    dev, dt = viewmats.device, viewmats.dtype
    v, u = torch.meshgrid(torch.arange(height, device=dev, dtype=dt) + 0.5,
                          torch.arange(width, device=dev, dtype=dt) + 0.5, indexing="ij")
    fx, fy = Ks[..., 0, 0, None, None], Ks[..., 1, 1, None, None]
    cx, cy = Ks[..., 0, 2, None, None], Ks[..., 1, 2, None, None]
    d_cam = torch.stack([(u - cx) / fx, (v - cy) / fy, torch.ones_like(u).expand_as(fx * u)], -1)
    R = viewmats[..., :3, :3]
    d = torch.einsum("...ji,...hwj->...hwi", R, d_cam)  # R^T d: camera to world
    d = d / d.norm(dim=-1, keepdim=True)
    o = camera_centers(viewmats)[..., None, None, :].expand_as(d)
    return o, d


def plucker_rays(viewmats: Tensor,  # [..., C, 4, 4]
                 Ks: Tensor,        # [..., C, 3, 3]
                 width: int, height: int) -> Tensor:  # -> [..., C, 6, H, W]
    """The 6-channel Pluecker embedding of each pixel's ray, (o x d, d), channels first (LGM)."""
    o, d = camera_rays(viewmats, Ks, width, height)
    return torch.cat([torch.cross(o, d, dim=-1), d], -1).movedim(-1, -3)


def _rig(azimuths: Tensor, elevations: Tensor, positions: Tensor, fov_y_deg: float, resolution: int) -> Rig:
    viewmats = look_at(positions.double()).float()
    return Rig(viewmats=viewmats, Ks=intrinsics(fov_y_deg, resolution, resolution, len(azimuths)),
               azimuths=azimuths.float(), elevations=elevations.float(), width=resolution, height=resolution)


def orbit16(gen: torch.Generator, resolution: int = 256, n_views: int = 16, distance: float = DEFAULT_DISTANCE,
            fov_y_deg: float = DEFAULT_FOV_Y_DEG, elevation_range: tuple = (0.0, math.pi / 4),
            position_noise: float = 0.05) -> Rig:
    """VFusion3D's rendering orbit: uniform azimuths from 0, one random elevation, jittered centres."""
    lo, hi = elevation_range
    if not -math.pi / 2 < lo <= hi < math.pi / 2:
        raise ValueError(f"elevation_range must satisfy -pi/2 < lo <= hi < pi/2; got {elevation_range}")
    az = torch.arange(n_views, dtype=torch.float64) * (2 * math.pi / n_views)
    el = torch.full((n_views,), lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item())
    pos = spherical_to_position(az, el, distance)
    pos = pos + (torch.rand(n_views, 3, generator=gen, dtype=torch.float64) * 2 - 1) * position_noise
    return _rig(az, el, pos, fov_y_deg, resolution)


def zero123pp(resolution: int = 320, distance: float = DEFAULT_DISTANCE, fov_y_deg: float = DEFAULT_FOV_Y_DEG,
              input_azimuth_deg: float = 0.0) -> Rig:
    """Zero123++'s 6 target views around an input view at `input_azimuth_deg`."""
    az = torch.deg2rad(torch.tensor([30.0, 90, 150, 210, 270, 330], dtype=torch.float64) + input_azimuth_deg)
    el = torch.deg2rad(torch.tensor([20.0, -10, 20, -10, 20, -10], dtype=torch.float64))
    return _rig(az, el, spherical_to_position(az, el, distance), fov_y_deg, resolution)


def mvdream(resolution: int = 256, elevation_deg: float = 15.0, azimuth_offset_deg: float = 0.0,
            distance: float = DEFAULT_DISTANCE, fov_y_deg: float = DEFAULT_FOV_Y_DEG) -> Rig:
    """MVDream's 4 orthogonal views at one elevation."""
    if not -90.0 < elevation_deg < 90.0:
        raise ValueError(f"elevation_deg must be in (-90, 90); got {elevation_deg}")
    az = torch.deg2rad(torch.tensor([0.0, 90, 180, 270], dtype=torch.float64) + azimuth_offset_deg)
    el = torch.full((4,), math.radians(elevation_deg), dtype=torch.float64)
    return _rig(az, el, spherical_to_position(az, el, distance), fov_y_deg, resolution)


def random_sphere(gen: torch.Generator, n_views: int, resolution: int = 256,
                  distance_range: tuple = (DEFAULT_DISTANCE, DEFAULT_DISTANCE), fov_y_deg: float = DEFAULT_FOV_Y_DEG,
                  elevation_range: tuple = (-math.pi / 2 + 0.05, math.pi / 2 - 0.05)) -> Rig:
    """Random views: directions uniform on the sphere (area-uniform within the elevation range),
    distances uniform in `distance_range`. The poles are excluded (the up vector is undefined)."""
    lo, hi = elevation_range
    if not -math.pi / 2 < lo <= hi < math.pi / 2:
        raise ValueError(f"elevation_range must satisfy -pi/2 < lo <= hi < pi/2; got {elevation_range}")
    if n_views <= 0:
        raise ValueError(f"n_views must be positive; got {n_views}")
    u = torch.rand(n_views, generator=gen, dtype=torch.float64)
    el = torch.asin(math.sin(lo) + u * (math.sin(hi) - math.sin(lo)))     # uniform in sin(elevation)
    az = torch.rand(n_views, generator=gen, dtype=torch.float64) * 2 * math.pi
    d0, d1 = distance_range
    dist = d0 + (d1 - d0) * torch.rand(n_views, generator=gen, dtype=torch.float64)
    return _rig(az, el, spherical_to_position(az, el, dist), fov_y_deg, resolution)


RIGS = {"orbit16": orbit16, "zero123pp": zero123pp, "mvdream": mvdream, "random": random_sphere}
