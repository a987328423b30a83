"""LGM's camera normalisation: one rigid world transform per sample that puts its first input
camera at a fixed canonical pose, so the network always sees the first view from the same place
and predicts Gaussians in that normalised world.

The canonical camera sits on +X at ``distance`` from the origin, looking at the origin, upright
(azimuth 0, elevation 0 of fast3d's rigs, +Z up). The transform is
``T = canonical^-1 @ viewmats[:, 0]`` (old world -> normalised world); every camera of the sample
becomes ``viewmat @ T^-1``, so relative poses are kept and the result does not depend on where
the world's origin and axes were: moving all cameras by one rigid motion leaves it unchanged.
The point ``distance`` in front of the first camera lands on the origin; with fast3d's rigs
(cameras at 2.2 looking at the object's centre) that is the object's centre, so objects of the
unit box stay within sqrt(3)/2 of the origin after normalisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fast3d.cameras import DEFAULT_DISTANCE, look_at, rotmat_to_quat

# R R^T = I, det R = 1 and the last row (0, 0, 0, 1), to this tolerance; checked on CPU tensors only
RIGID_ATOL = 1e-3


def _check_rigid(name: str, m: Tensor, desc: str) -> None:
    if not isinstance(m, Tensor) or m.dim() < 2 or m.shape[-2:] != (4, 4) or not m.is_floating_point():
        got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
        raise ValueError(f"{name} must be a floating tensor of shape {desc}; got {got}")
    if m.numel() == 0 or m.device.type != "cpu" or torch.compiler.is_compiling():
        return  # the value check would synchronise with the device (or break a compiled graph)
    m = m.detach().double()
    R = m[..., :3, :3]
    eye = torch.eye(3, dtype=m.dtype, device=m.device)
    err = max((R @ R.transpose(-1, -2) - eye).abs().max().item(), (torch.linalg.det(R) - 1).abs().max().item(),
              (m[..., 3, :] - m.new_tensor([0.0, 0, 0, 1])).abs().max().item())
    if not err <= RIGID_ATOL:
        raise ValueError(f"{name} must hold rigid transforms (a rotation with det +1 and a translation, last row "
                         f"0 0 0 1); got an error of {err:.3g} (tolerance {RIGID_ATOL})")


def canonical_viewmat(distance: float = DEFAULT_DISTANCE) -> Tensor:  # -> [4, 4] float64
    """The pose every sample's first camera is moved to."""
    return look_at(torch.tensor([float(distance), 0.0, 0.0], dtype=torch.float64))


def normalize_cameras(viewmats: Tensor,  # [B, V, 4, 4] world-to-camera, OpenCV; view 0 is the reference
                      distance: float = DEFAULT_DISTANCE,
                      ) -> tuple[Tensor, Tensor]:  # -> viewmats [B, V, 4, 4], transform [B, 4, 4]
    """Normalise each sample's cameras so that its first camera is :func:`canonical_viewmat`.
    Returns the normalised viewmats and ``transform`` (old world -> normalised world), for
    :func:`apply_transform_to_viewmats` (supervision cameras) and, inverted,
    :func:`apply_transform_to_gaussians` (predicted Gaussians back to the asset's world)."""
    _check_rigid("viewmats", viewmats, "[B, V, 4, 4]")
    if viewmats.dim() != 4 or viewmats.shape[1] < 1:
        raise ValueError(f"viewmats must have shape [B, V, 4, 4] with V >= 1; got {tuple(viewmats.shape)}")
    if not distance > 0:
        raise ValueError(f"distance must be positive; got {distance!r}")
    canonical = canonical_viewmat(distance).to(viewmats.device)
    transform = torch.linalg.inv(canonical) @ viewmats[:, 0].double()             # [B, 4, 4]
    normalized = viewmats.double() @ torch.linalg.inv(transform)[:, None]
    return normalized.to(viewmats.dtype), transform.to(viewmats.dtype)


def apply_transform_to_viewmats(viewmats: Tensor,   # [B, C, 4, 4] world-to-camera in the old world
                                transform: Tensor,  # [B, 4, 4] rigid, old world -> new world
                                ) -> Tensor:        # -> [B, C, 4, 4] world-to-camera in the new world
    _check_rigid("viewmats", viewmats, "[B, C, 4, 4]")
    _check_rigid("transform", transform, "[B, 4, 4]")
    if viewmats.dim() != 4 or transform.shape != (viewmats.shape[0], 4, 4):
        raise ValueError(f"viewmats must have shape [B, C, 4, 4] and transform [B, 4, 4] with one B; "
                         f"got {tuple(viewmats.shape)} and {tuple(transform.shape)}")
    return (viewmats.double() @ torch.linalg.inv(transform.double())[:, None]).to(viewmats.dtype)


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:  # [..., 4] x [..., 4] wxyz -> [..., 4]: R(a b) = R(a) R(b)
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([aw * bw - ax * bx - ay * by - az * bz,
                        aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx,
                        aw * bz + ax * by - ay * bx + az * bw], -1)


def apply_transform_to_gaussians(gaussians: dict,   # means [B, N, 3], quats [B, N, 4] wxyz, ...
                                 transform: Tensor,  # [B, 4, 4] rigid
                                 ) -> dict:
    """The Gaussians moved by a rigid transform: means ``R m + t``, quats rotated by R; scales,
    opacities and colours unchanged. With ``torch.linalg.inv(transform)`` from
    :func:`normalize_cameras` this maps predicted Gaussians back to the asset's world."""
    _check_rigid("transform", transform, "[B, 4, 4]")
    for key in ("means", "quats"):
        if key not in gaussians:
            raise ValueError(f"gaussians must have the key {key!r}; got keys {sorted(gaussians)}")
    means, quats = gaussians["means"], gaussians["quats"]
    if means.dim() != 3 or means.shape[-1] != 3 or quats.shape != (*means.shape[:2], 4) \
            or transform.shape != (means.shape[0], 4, 4):
        raise ValueError(f"gaussians['means'] [B, N, 3], gaussians['quats'] [B, N, 4] and transform [B, 4, 4] "
                         f"must share B and N; got {tuple(means.shape)}, {tuple(quats.shape)} and "
                         f"{tuple(transform.shape)}")
    T = transform.to(torch.promote_types(means.dtype, torch.float32))
    R, t = T[:, None, :3, :3], T[:, None, :3, 3]
    new_means = (R @ means.to(T.dtype)[..., None])[..., 0] + t
    new_quats = quat_multiply(rotmat_to_quat(T[:, :3, :3])[:, None], quats.to(T.dtype))
    return {**gaussians, "means": new_means.to(means.dtype), "quats": new_quats.to(quats.dtype)}
