"""Camera rigs and conventions: OpenCV world-to-camera matrices, +Z-up world, look-at upright."""

import math

import pytest
import torch
from helpers import assert_close

from fast3d import cameras


def project(viewmat, K, points):  # [4, 4], [3, 3], [N, 3] -> pixels [N, 2], depth [N]
    cam = points @ viewmat[:3, :3].T + viewmat[:3, 3]
    uv = cam @ K.T
    return uv[:, :2] / uv[:, 2:], cam[:, 2]


def test_look_at_is_a_rigid_opencv_camera(gen):
    eye = (torch.rand(7, 3, generator=gen, dtype=torch.float64) - 0.5) * 6 + torch.tensor([0, 0, 0.3])
    target = torch.rand(7, 3, generator=gen, dtype=torch.float64) * 0.2
    V = cameras.look_at(eye, target)
    R = V[:, :3, :3]
    assert_close(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(7, 3, 3), atol=1e-12, rtol=0,
                 name="R R^T")
    assert_close(torch.linalg.det(R), torch.ones(7, dtype=torch.float64), atol=1e-12, rtol=0, name="det R")
    assert_close(cameras.camera_centers(V), eye, atol=1e-12, rtol=0, name="centres")
    K = cameras.intrinsics(50.0, 64, 48, dtype=torch.float64)[0]
    for i in range(7):
        uv, z = project(V[i], K, target[i : i + 1])
        assert_close(uv, torch.tensor([[32.0, 24.0]], dtype=torch.float64), atol=1e-9, rtol=0, name="target pixel")
        assert z.item() > 0
        # A point above the target (world +Z) appears higher in the image: smaller v.
        uv_up, _ = project(V[i], K, target[i : i + 1] + torch.tensor([0, 0, 0.01], dtype=torch.float64))
        assert uv_up[0, 1] < uv[0, 1]


def test_known_pose_camera_on_plus_x():
    V = cameras.look_at(torch.tensor([[2.0, 0, 0]], dtype=torch.float64))[0]
    # Looking down -X with +Z up: right is +Y, down is -Z, forward is -X (rows of R).
    expected = torch.tensor([[0, 1.0, 0], [0, 0, -1], [-1, 0, 0]], dtype=torch.float64)
    assert_close(V[:3, :3], expected, atol=1e-12, rtol=0, name="R")


def test_opengl_and_blender_c2w_conversion_matches_look_at(gen):
    eye = torch.tensor([[1.5, -0.7, 0.9]], dtype=torch.float64)
    V = cameras.look_at(eye)
    # The same camera as an OpenGL/Blender c2w: columns right, up, backward, centre.
    c2w_cv = torch.linalg.inv(V[0])
    c2w_gl = c2w_cv.clone()
    c2w_gl[:3, 1] *= -1
    c2w_gl[:3, 2] *= -1
    assert_close(cameras.viewmat_from_opengl_c2w(c2w_gl[None]), V, atol=1e-12, rtol=0, name="z-up")
    # The same camera in a Y-up world: world coordinates (x, y, z)_zup = (x, -z, y)_yup ... inverse.
    zup_to_yup = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)
    assert_close(cameras.viewmat_from_opengl_c2w((zup_to_yup @ c2w_gl)[None], world_up="y"), V, atol=1e-12, rtol=0,
                 name="y-up")
    with pytest.raises(ValueError, match="world_up must be 'y' or 'z'; got 'x'"):
        cameras.viewmat_from_opengl_c2w(c2w_gl, world_up="x")
    with pytest.raises(ValueError, match=r"c2w must have shape \[..., 4, 4\]; got \(3, 4\)"):
        cameras.viewmat_from_opengl_c2w(c2w_gl[:3])


def test_orbit16_follows_vfusion3d(gen):
    rig = cameras.orbit16(gen, resolution=64)
    assert rig.viewmats.shape == (16, 4, 4) and rig.Ks.shape == (16, 3, 3) and rig.num_views == 16
    steps = torch.diff(rig.azimuths.double())
    assert_close(steps, torch.full((15,), 2 * math.pi / 16, dtype=torch.float64), atol=1e-6, rtol=0, name="azimuth")
    assert rig.azimuths[0] == 0
    assert torch.all(rig.elevations == rig.elevations[0]) and 0 <= rig.elevations[0] <= math.pi / 4 + 1e-6
    ideal = cameras.spherical_to_position(rig.azimuths.double(), rig.elevations.double(), cameras.DEFAULT_DISTANCE)
    offset = cameras.camera_centers(rig.viewmats.double()) - ideal
    assert offset.abs().max() <= 0.05 + 1e-5 and offset.abs().max() > 0  # jittered, within the paper's bound


def test_orbit16_elevations_cover_the_range():
    els = torch.stack([cameras.orbit16(torch.Generator().manual_seed(s), resolution=8).elevations[0]
                       for s in range(200)])
    assert els.min() < 0.1 and els.max() > math.pi / 4 - 0.1 and els.max() <= math.pi / 4 + 1e-6


def test_zero123pp_and_mvdream_rigs():
    z = cameras.zero123pp(resolution=32)
    assert_close(torch.rad2deg(z.azimuths), torch.tensor([30.0, 90, 150, 210, 270, 330]), atol=1e-4, rtol=0,
                 name="zero123pp azimuths")
    assert_close(torch.rad2deg(z.elevations), torch.tensor([20.0, -10, 20, -10, 20, -10]), atol=1e-4, rtol=0,
                 name="zero123pp elevations")
    m = cameras.mvdream(resolution=32, elevation_deg=10.0, azimuth_offset_deg=45.0)
    assert_close(torch.rad2deg(m.azimuths), torch.tensor([45.0, 135, 225, 315]), atol=1e-4, rtol=0, name="mvdream")


def test_every_rig_sees_the_whole_unit_box(gen):
    corners = torch.tensor([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)],
                           dtype=torch.float64)
    for rig in [cameras.orbit16(gen, resolution=64), cameras.zero123pp(64), cameras.mvdream(64),
                cameras.random_sphere(gen, 32, resolution=64)]:
        for v in range(rig.num_views):
            uv, z = project(rig.viewmats[v].double(), rig.Ks[v].double(), corners)
            assert (z > 0).all() and (uv >= 0).all() and (uv <= 64).all()


def test_random_sphere_is_area_uniform(gen):
    rig = cameras.random_sphere(gen, 4000, resolution=8, distance_range=(1.5, 2.5))
    # Uniform on the sphere: sin(elevation) is uniform, so its mean is ~0 and |sin| has mean ~1/2.
    s = torch.sin(rig.elevations.double())
    assert abs(s.mean()) < 0.05 and abs(s.abs().mean() - 0.5) < 0.05
    d = cameras.camera_centers(rig.viewmats.double()).norm(dim=-1)
    assert d.min() >= 1.5 - 1e-4 and d.max() <= 2.5 + 1e-4


@pytest.mark.parametrize("call, match", [
    (lambda g: cameras.orbit16(g, elevation_range=(0.5, 0.1)), "elevation_range must satisfy"),
    (lambda g: cameras.random_sphere(g, 0), "n_views must be positive; got 0"),
    (lambda g: cameras.mvdream(elevation_deg=90.0), r"elevation_deg must be in \(-90, 90\); got 90.0"),
    (lambda g: cameras.intrinsics(0.0, 8, 8), r"fov_y_deg must be in \(0, 180\); got 0.0"),
    (lambda g: cameras.intrinsics(50.0, 0, 8), "width and height must be positive; got 0x8"),
    (lambda g: cameras.look_at(torch.zeros(1, 3)), "eye must differ from target"),
    (lambda g: cameras.look_at(torch.tensor([[0.0, 0, 2]])), "looks along the up axis"),
    (lambda g: cameras.look_at(torch.zeros(1, 2)), r"eye must have shape \[..., 3\]; got \(1, 2\)"),
])
def test_bad_input(call, match, gen):
    with pytest.raises(ValueError, match=match):
        call(gen)


def test_camera_rays_hit_the_pixels_they_start_from(gen):
    rig = cameras.orbit16(gen, resolution=32)
    o, d = cameras.camera_rays(rig.viewmats, rig.Ks, 32, 24)
    assert o.shape == d.shape == (16, 24, 32, 3)
    assert_close(d.norm(dim=-1), torch.ones(16, 24, 32), atol=1e-5, rtol=0, name="|d|")
    # Project a point along each ray back into its camera: it lands on the pixel centre.
    p = o + 1.7 * d
    cam = torch.einsum("cij,chwj->chwi", rig.viewmats[:, :3, :3], p) + rig.viewmats[:, None, None, :3, 3]
    uv = torch.einsum("cij,chwj->chwi", rig.Ks, cam)
    uv = uv[..., :2] / uv[..., 2:]
    v, u = torch.meshgrid(torch.arange(24) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    assert_close(uv, torch.stack([u, v], -1).expand_as(uv), atol=1e-3, rtol=0, name="reprojected pixel")


def test_plucker_rays_are_moment_and_direction(gen):
    rig = cameras.mvdream(resolution=8)
    pl = cameras.plucker_rays(rig.viewmats, rig.Ks, 8, 8)
    assert pl.shape == (4, 6, 8, 8)
    m, d = pl[:, :3], pl[:, 3:]
    assert_close((m * d).sum(1), torch.zeros(4, 8, 8), atol=1e-5, rtol=0, name="moment . direction")


def test_camera_rays_reject_mismatched_cameras():
    with pytest.raises(ValueError, match="viewmats"):
        cameras.camera_rays(torch.eye(4).expand(2, 4, 4), torch.eye(3).expand(3, 3, 3), 4, 4)


def test_orbit_cameras_sit_on_the_sphere_and_turntable_steps_evenly(gen):
    az = torch.rand(2, 3, generator=gen, dtype=torch.float64) * 2 * math.pi
    el = (torch.rand(2, 3, generator=gen, dtype=torch.float64) - 0.5) * 2
    viewmats, Ks = cameras.orbit_cameras(az, el, 2.5, 40.0, 64)
    assert viewmats.shape == (2, 3, 4, 4) and Ks.shape == (2, 3, 3, 3) and viewmats.dtype == Ks.dtype == torch.float32
    assert_close(cameras.camera_centers(viewmats.double()), cameras.spherical_to_position(az, el, 2.5), atol=1e-5,
                 rtol=0, name="centres")
    assert_close(Ks, cameras.intrinsics(40.0, 64, 64, 6).view(2, 3, 3, 3), atol=0, rtol=0, name="Ks")
    tv, tK = cameras.turntable(8, 32, elevation_deg=20.0, distance=2.0)
    centres = cameras.camera_centers(tv.double())
    assert_close(torch.atan2(centres[:, 1], centres[:, 0]).remainder(2 * math.pi),
                 torch.arange(8, dtype=torch.float64) * (math.pi / 4), atol=1e-6, rtol=0, name="azimuths")
    assert_close(centres[:, 2], torch.full((8,), 2.0 * math.sin(math.radians(20.0)), dtype=torch.float64), atol=1e-6,
                 rtol=0, name="heights")


@pytest.mark.parametrize("angle", [0.3, math.pi - 1e-7], ids=["small", "near-180-degrees"])
def test_rotmat_to_quat_round_trips_even_near_a_half_turn(gen, angle):
    from fast3d.ops.rasterization.reference import quat_to_rotmat

    axis = torch.nn.functional.normalize(torch.randn(5, 3, generator=gen, dtype=torch.float64), dim=-1)
    q = torch.cat([torch.full((5, 1), math.cos(angle / 2), dtype=torch.float64), axis * math.sin(angle / 2)], -1)
    R = quat_to_rotmat(q)
    got = cameras.rotmat_to_quat(R)
    assert_close(got.norm(dim=-1), torch.ones(5, dtype=torch.float64), atol=1e-12, rtol=0, name="unit")
    assert_close(quat_to_rotmat(got), R, atol=1e-12, rtol=0, name="R(q(R))")
