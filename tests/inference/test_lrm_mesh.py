"""The marching-cubes mesh of LRM inference: analytic densities (sphere, ellipsoid, half-space)
land at the right world coordinates with outward normals; a tiny LRM's mesh vertices sit on its
density's level set; `fast3d infer` writes mesh.ply (closed, coloured, or empty and said so)."""

import math

import pytest
import torch

from fast3d.cli import main
from fast3d.inference import lrm as lrm_infer
from fast3d.inference import mesh as lrm_mesh
from fast3d.inference.common import save_image
from fast3d.io import load_mesh_ply
from fast3d.models.lrm import LRM, LRMConfig
from fast3d.ops.triplane.api import triplane_sample

THR = lrm_mesh.DENSITY_THRESHOLD


def face_normals(v, f):  # [V, 3], [F, 3] -> [F, 3] (length: twice the area)
    p = v[f].double()
    return torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])


def signed_volume(v, f):  # [V, 3], [F, 3] -> enclosed volume, > 0 for outward normals
    p = v[f].double()
    return float(torch.linalg.det(p).sum() / 6)


def assert_closed(f):  # [F, 3]: every undirected edge in exactly two faces, once each way
    edges = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]).tolist()
    directed = set(map(tuple, edges))
    assert len(directed) == len(edges), "a directed edge twice: inconsistent orientation"
    assert all((b, a) in directed for a, b in directed), "an edge with one face: a hole"


def sphere(centre, r):
    c = torch.tensor(centre)
    return lambda p: THR + 10 * (r - (p - c).norm(dim=-1))  # [M, 3] -> [M], > THR inside


def test_off_centre_sphere_lands_at_its_world_position_with_outward_normals():
    centre, r, bound, grid = (0.13, -0.21, 0.07), 0.3, 0.6, 41
    h = 2 * bound / (grid - 1)
    v, f = lrm_mesh.density_mesh(sphere(centre, r), bound, grid)
    assert v.dtype == torch.float32 and f.dtype == torch.int64 and len(f) > 100
    dist = (v - torch.tensor(centre)).norm(dim=-1)
    assert (dist - r).abs().max() < h / 4, "every vertex on the sphere, well within one grid cell"
    assert torch.allclose(v.mean(0), torch.tensor(centre), atol=h / 4)
    n = face_normals(v, f)
    outward = (n * (v[f].double().mean(1) - torch.tensor(centre).double())).sum(-1)
    assert (outward > 0).all(), f"{int((outward <= 0).sum())} of {len(f)} faces point inward"
    assert_closed(f)
    assert math.isclose(signed_volume(v, f), 4 / 3 * math.pi * r ** 3, rel_tol=0.02)


def test_ellipsoid_axes_are_not_permuted():
    """Radii 0.1, 0.2, 0.3 along x, y, z: skimage's volume axes map to x, y, z in that order."""
    centre, radii = torch.tensor([0.2, 0.0, -0.1]), torch.tensor([0.1, 0.2, 0.3])
    v, f = lrm_mesh.density_mesh(lambda p: THR + 1 - (((p - centre) / radii) ** 2).sum(-1), 0.6, 49)
    h = 1.2 / 48
    assert torch.allclose(v.min(0).values, centre - radii, atol=h) and torch.allclose(v.max(0).values,
                                                                                      centre + radii, atol=h)
    assert math.isclose(signed_volume(v, f), 4 / 3 * math.pi * 0.1 * 0.2 * 0.3, rel_tol=0.05)


def test_region_reaching_the_box_is_closed_on_the_box_faces():
    """x < 0.2 inside: the mesh is the slab [-0.6, 0.2] x [-0.6, 0.6]^2, closed on the box."""
    v, f = lrm_mesh.density_mesh(lambda p: THR + 0.2 - p[:, 0], 0.6, 13)
    assert v.abs().max() <= 0.6 and math.isclose(float(v[:, 0].max()), 0.2, abs_tol=1e-5)
    assert math.isclose(float(v[:, 0].min()), -0.6, abs_tol=1e-6)
    assert_closed(f)
    assert math.isclose(signed_volume(v, f), 0.8 * 1.2 * 1.2, rel_tol=1e-4)


def test_chunking_does_not_change_the_mesh():
    fn = sphere((0.05, 0.1, -0.02), 0.25)
    v, f = lrm_mesh.density_mesh(fn, 0.6, 17)
    v2, f2 = lrm_mesh.density_mesh(fn, 0.6, 17, chunk=7)
    assert torch.equal(v, v2) and torch.equal(f, f2)


def test_empty_and_bad_densities():
    for fn in (lambda p: torch.zeros(len(p)), lambda p: torch.full((len(p),), THR)):
        v, f = lrm_mesh.density_mesh(fn, 0.6, 5)
        assert v.shape == (0, 3) and f.shape == (0, 3)
    with pytest.raises(ValueError, match="grid must be an integer >= 2"):
        lrm_mesh.density_mesh(sphere((0, 0, 0), 0.3), 0.6, 1)
    with pytest.raises(ValueError, match="threshold must be a finite real number"):
        lrm_mesh.density_mesh(sphere((0, 0, 0), 0.3), 0.6, 5, threshold=float("nan"))
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        lrm_mesh.density_mesh(sphere((0, 0, 0), 0.3), 0.6, 5, chunk=0)
    with pytest.raises(ValueError, match="bound must be a positive finite number"):
        lrm_mesh.density_mesh(sphere((0, 0, 0), 0.3), -1.0, 5)
    with pytest.raises(ValueError, match=r"density must map points \[M, 3\] to a tensor \[M\]; got \(125, 1\)"):
        lrm_mesh.density_mesh(lambda p: torch.zeros(len(p), 1), 0.6, 5)
    with pytest.raises(ValueError, match="density is NaN or infinite at 125 of 5"):
        lrm_mesh.density_mesh(lambda p: torch.full((len(p),), float("nan")), 0.6, 5)


def tiny_lrm(density_bias=None, density_gain=1.0):
    torch.manual_seed(0)
    model = LRM(LRMConfig.preset("tiny")).eval()
    with torch.no_grad():
        last = model.renderer.decoder.layers[-1]
        last.weight[0] *= density_gain
        if density_bias is not None:
            last.bias[0] = density_bias
    return model


def decode(model, planes, points):  # [3, C, h, w], [M, 3] -> density [M], rgb [M, 3]
    sigma, rgb = model.renderer.decoder(triplane_sample(planes[None], points[None], "concat", model.config.bound))
    return sigma[0], rgb[0]


@torch.no_grad()
def test_lrm_mesh_vertices_sit_on_the_density_level_set():
    """Each vertex inside the box lies on a grid edge whose end densities straddle the threshold,
    where linear interpolation puts the crossing; its colour is the decoder's rgb there."""
    model = tiny_lrm(density_gain=100.0)
    viewmat, K, _ = lrm_infer.source_camera(None, 40)
    planes = model(torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(1)), viewmat, K)[0]
    b, grid = model.config.bound, 16
    h = 2 * b / (grid - 1)
    axis = torch.linspace(-b, b, grid)
    nodes = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).view(-1, 3)
    thr = float(decode(model, planes, nodes)[0].median())
    v, f, c = lrm_mesh.extract_mesh(model, planes, grid, thr)
    assert len(f) > 50 and c.shape == v.shape and 0 <= c.min() and c.max() <= 1
    assert torch.allclose(c, decode(model, planes, v)[1].clamp(0, 1), atol=1e-6)
    u = (v.double() + b) / h                                                  # [V, 3] index space
    off = (u - u.round()).abs() > 1e-3                                        # [V, 3] the coordinate between nodes
    inner = (off.sum(1) == 1) & (v.abs() < b).all(1)
    assert inner.sum() > 0.5 * len(v)
    u, off = u[inner], off[inner]
    lo, hi = torch.where(off, u.floor(), u.round()), torch.where(off, u.floor() + 1, u.round())
    s0, s1 = (decode(model, planes, (x * h - b).float())[0].double() for x in (lo, hi))
    assert ((s0 - thr) * (s1 - thr) <= 1e-6).all(), "the level set crosses every vertex's edge"
    t = (u - lo)[off]
    assert torch.allclose(t, (thr - s0) / (s1 - s0), atol=1e-3)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("img") / "input.png")
    save_image(torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(0)), path)
    return path


def run_infer(tmp_path, model, image, *extra):
    ckpt = str(tmp_path / "model")
    model.save_pretrained(ckpt)
    out = tmp_path / "out"
    assert main(["infer", "--checkpoint", ckpt, "--images", image, "--out", str(out), "--device", "cpu",
                 "--frames", "2", "--resolution", "16", "--point-grid", "4", *extra]) == 0
    return out


@torch.no_grad()
def test_cli_writes_a_closed_coloured_mesh(tmp_path, image, capsys):
    """Density above the threshold everywhere: the mesh is the triplane box, closed, outward."""
    model = tiny_lrm(density_bias=8.0)
    out = run_infer(tmp_path, model, image, "--mesh-grid", "10")
    printed = capsys.readouterr().out
    m = load_mesh_ply(out / "mesh.ply")
    v, f = m["vertices"], m["faces"]
    assert f"wrote {out / 'mesh.ply'} ({len(v)} vertices, {len(f)} triangles)" in printed
    assert "  mesh " in printed and "EMPTY" not in printed
    b = model.config.bound
    assert len(v) == 6 * 10 ** 2 and (v.abs().max(1).values == b).all(), "every vertex on a face of the box"
    assert_closed(f)
    assert math.isclose(signed_volume(v, f), (2 * b) ** 3, rel_tol=1e-5)
    viewmat, K, _ = lrm_infer.source_camera(None, 40)
    from fast3d.inference.common import load_image

    planes = model(load_image(image)[None], viewmat, K)[0]
    assert torch.allclose(m["colors"], decode(model, planes, v)[1].clamp(0, 1), atol=0.5 / 255 + 1e-4)


def test_cli_says_when_the_mesh_is_empty(tmp_path, image, capsys):
    out = run_infer(tmp_path, tiny_lrm(), image, "--mesh-grid", "6")          # untrained: density ~0.3 < 3
    printed = capsys.readouterr().out
    assert f"wrote {out / 'mesh.ply'}: EMPTY mesh, the density never exceeds {THR} on the 6^3 grid" in printed
    m = load_mesh_ply(out / "mesh.ply")
    assert m["vertices"].shape == (0, 3) and m["faces"].shape == (0, 3)


def test_mesh_grid_zero_skips_the_mesh(tmp_path, image, capsys):
    out = run_infer(tmp_path, tiny_lrm(), image, "--mesh-grid", "0")
    printed = capsys.readouterr().out
    assert not (out / "mesh.ply").exists() and "mesh.ply" not in printed and "  mesh " not in printed
    assert main(["infer", "--checkpoint", str(tmp_path / "model"), "--images", image, "--out", str(out),
                 "--mesh-grid", "1", "--device", "cpu"]) != 0
    assert "mesh_grid must be 0 (no mesh) or an integer >= 2; got 1" in capsys.readouterr().err
