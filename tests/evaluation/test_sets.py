"""Benchmark-set readers: a GSO-style object folder (views.json + images + mesh or points), fast3d
shards with their assets, prompt lists and reference image folders; fuzzed like the PLY readers
(every truncation and random byte flips of the JSON, an image and the geometry: a correct load or
a ValueError, never another exception)."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import byte_flips

from fast3d import cameras
from fast3d.evaluation import sets
from fast3d.inference.common import save_image
from fast3d.io import save_mesh_ply, save_points_ply

POSE_ATOL = 1e-5   # float32 matrices written as JSON decimals and read back
PIXEL_ATOL = 1e-6  # 8-bit PNG values v / 255 read back exactly, up to float32 division


def make_object(folder, gen, views=3, size=12, c2w=False, geometry="mesh", prompt="a red mug"):
    """An object folder: ``views`` random RGBA PNGs on an orbit, their cameras, a mesh or points."""
    folder.mkdir(parents=True)
    az = torch.arange(views, dtype=torch.float64) * (2 * math.pi / views)
    eye = cameras.spherical_to_position(az, torch.full_like(az, 0.3), 2.0)
    vms = cameras.look_at(eye).float()                                      # [V, 4, 4]
    K = cameras.intrinsics(40.0, size, size, views)                         # [V, 3, 3]
    frames, images = [], []
    for v in range(views):
        rgba = torch.rand(4, size, size, generator=gen)
        from PIL import Image

        from fast3d.io.images import to_uint8
        Image.fromarray(to_uint8(rgba)).save(folder / f"{v:03d}.png")
        images.append(rgba)
        fr = {"file": f"{v:03d}.png"}
        if c2w:  # OpenGL camera-to-world: the inverse of OpenCV's world-to-camera with y and z flipped
            flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
            fr["c2w"] = (torch.linalg.inv(vms[v].double()) @ flip).tolist()
            fr["fov_y_deg"] = 40.0
        else:
            fr["viewmat"], fr["K"] = vms[v].tolist(), K[v].tolist()
        frames.append(fr)
    d = {"frames": frames, "prompt": prompt}
    if c2w:
        d["world_up"] = "z"
    (folder / sets.VIEWS_FILE).write_text(json.dumps(d))
    if geometry == "mesh":  # a unit square of two triangles in the z = 0 plane
        v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
        save_mesh_ply(folder / "mesh.ply", v, torch.tensor([[0, 1, 2], [0, 2, 3]]), torch.rand(4, 3, generator=gen))
    elif geometry == "points":
        save_points_ply(folder / "points.ply", torch.rand(50, 3, generator=gen), torch.rand(50, 3, generator=gen))
    return vms, K, torch.stack(images)


@pytest.mark.parametrize("c2w", [False, True])
def test_object_folder_reads_views_cameras_prompt_and_mesh(tmp_path, gen, c2w):
    vms, K, rgba = make_object(tmp_path / "obj", gen, c2w=c2w)
    s = sets.read_views(str(tmp_path / "obj"))
    assert torch.allclose(s["viewmats"], vms, atol=POSE_ATOL) and torch.allclose(s["Ks"], K, atol=POSE_ATOL)
    q = torch.round(rgba * 255) / 255
    assert torch.allclose(s["alphas"], q[:, 3:], atol=PIXEL_ATOL)
    assert torch.allclose(s["images"], q[:, :3] * q[:, 3:] + (1 - q[:, 3:]), atol=PIXEL_ATOL), "over white"
    assert s["prompt"] == "a red mug" and s["geometry"].endswith("mesh.ply")
    pts = sets.read_geometry(s["geometry"], n=2000, seed=1)
    assert pts.shape == (2000, 3) and (pts[:, 2] == 0).all() and (pts[:, :2] >= 0).all() and (pts[:, :2] <= 1).all()
    # uniform on the square's area: each of the two triangles gets about half, each quadrant a quarter
    assert abs(float((pts[:, 0] > pts[:, 1]).float().mean()) - 0.5) < 0.05
    assert torch.equal(pts, sets.read_geometry(s["geometry"], n=2000, seed=1)), "seeded"


def test_iter_samples_resizes_skips_and_counts_bad_objects(tmp_path, gen):
    root = tmp_path / "gso"
    make_object(root / "a", gen, geometry="points")
    vms, K, _ = make_object(root / "b", gen, geometry=None, prompt="a blue car")
    make_object(root / "c", gen)
    (root / "c" / "001.png").write_bytes(b"not a png")
    make_object(root / "d", gen, views=2)
    skipped = []
    out = list(sets.iter_samples(str(root), views=3, resolution=24, skipped=skipped))
    assert [s["key"] for s in out] == ["a", "b"]
    assert [k for k, _ in skipped] == ["c", "d"]
    assert "not a readable image" in skipped[0][1] and "has 2 views; need 3" in skipped[1][1]
    a, b = out
    assert a["images"].shape == (3, 3, 24, 24) and a["points"].shape == (50, 3) and b["points"] is None
    assert torch.allclose(b["Ks"][:, :2], K[:, :2] * 2, atol=POSE_ATOL), "intrinsics scale with the image"
    assert b["caption"] == "a blue car" and b["source"] == "gso"


def test_iter_samples_reads_shards_with_their_assets(tmp_path):
    from fast3d.datagen import procedural
    from fast3d.io import load_ply

    data = tmp_path / "shards"
    procedural.run(str(data), procedural.ProceduralConfig(num_objects=2, views=3, rig="orbit16", resolution=16,
                                                          gaussians_per_object=100, samples_per_shard=2))
    out = list(sets.iter_samples(str(data), views=2, resolution=16))
    assert len(out) == 2 and out[0]["images"].shape == (2, 3, 16, 16)
    assert torch.equal(out[0]["points"], load_ply(data / "assets" / f"{out[0]['key']}.ply")["means"])


def _check_fuzzed(path_to_write, raw, gen, load, check, *, every_cut=True):
    """Every truncation (or a sample of them) and 300 byte flips of ``raw`` written to the file:
    ``load()`` returns something ``check`` accepts or raises ValueError."""
    cuts = range(len(raw)) if every_cut else sorted(set(np.linspace(0, len(raw) - 1, 120).astype(int).tolist()))
    for cut in cuts:
        path_to_write.write_bytes(raw[:cut])
        try:
            check(load())
        except ValueError:
            pass
    ok = 0
    for flipped in byte_flips(raw, gen, 300):
        path_to_write.write_bytes(flipped)
        try:
            check(load())
            ok += 1
        except ValueError:
            continue
    return ok


def _check_views(s):
    V = s["images"].shape[0]
    assert s["images"].shape[1] == 3 and s["alphas"].shape == (V, 1, *s["images"].shape[-2:])
    assert s["viewmats"].shape == (V, 4, 4) and s["Ks"].shape == (V, 3, 3)
    assert torch.isfinite(s["viewmats"]).all() and torch.isfinite(s["Ks"]).all()
    assert 0 <= s["images"].min() and s["images"].max() <= 1


def test_fuzz_the_views_json(tmp_path, gen):
    make_object(tmp_path / "o", gen, views=2, size=8)
    f = tmp_path / "o" / sets.VIEWS_FILE
    raw = f.read_bytes()
    ok = _check_fuzzed(f, raw, gen, lambda: sets.read_views(str(tmp_path / "o")), _check_views)
    assert ok > 0  # flips inside the numbers still load


def test_fuzz_a_view_image(tmp_path, gen):
    make_object(tmp_path / "o", gen, views=2, size=8)
    f = tmp_path / "o" / "001.png"
    raw = f.read_bytes()
    _check_fuzzed(f, raw, gen, lambda: sets.read_views(str(tmp_path / "o")), _check_views)


@pytest.mark.parametrize("geometry", ["mesh", "points"])
def test_fuzz_the_geometry(tmp_path, gen, geometry):
    make_object(tmp_path / "o", gen, views=1, size=8, geometry=geometry)
    f = tmp_path / "o" / f"{geometry}.ply"
    raw = f.read_bytes()

    def check(p):
        assert p.dim() == 2 and p.shape[1] == 3 and len(p) > 0 and torch.isfinite(p).all()

    ok = _check_fuzzed(f, raw, gen, lambda: sets.read_geometry(str(f), n=50), check)
    assert ok > 0


def test_bad_views_files_are_named(tmp_path, gen):
    make_object(tmp_path / "o", gen, views=1, size=8)
    f = tmp_path / "o" / sets.VIEWS_FILE
    good = json.loads(f.read_text())
    fr = good["frames"][0]
    cases = [
        ({"frames": []}, "non-empty 'frames' list"),
        ({"frames": [dict(fr, file="../x.png")]}, "relative path inside the object folder"),
        ({"frames": [{k: v for k, v in fr.items() if k != "viewmat"}]}, "exactly one of 'viewmat' and 'c2w'"),
        ({"frames": [dict(fr, viewmat=[[1, 0], [0, 1]])]}, r"viewmat must be a finite 4x4 matrix"),
        ({"frames": [dict(fr, viewmat=(2 * torch.eye(4)).tolist())]}, "not a rigid transform: rotation determinant 8"),
        ({"frames": [{"file": fr["file"], "c2w": torch.zeros(4, 4).tolist(), "fov_y_deg": 40}]},
         "c2w is not a rigid transform"),
        ({"frames": [dict(fr, K=[[0, 0, 4], [0, 0, 4], [0, 0, 1]])]}, "positive focal lengths"),
        ({"frames": [{k: v for k, v in fr.items() if k != "K"}]}, r"fov_y_deg must be a number in \(0, 180\)"),
        ({"frames": [fr], "world_up": "x"}, "world_up must be 'y' or 'z'"),
        ({"frames": [fr], "geometry": "none.ply"}, "geometry .* is not a file"),
    ]
    for d, match in cases:
        f.write_text(json.dumps(d))
        with pytest.raises(ValueError, match=match):
            sets.read_views(str(tmp_path / "o"))


def test_prompt_lists(tmp_path):
    (tmp_path / "p.txt").write_text("# prompts\na red mug\n\n  a blue car  \n")
    assert sets.read_prompts(str(tmp_path / "p.txt")) == ["a red mug", "a blue car"]
    (tmp_path / "p.json").write_text(json.dumps(["a", {"prompt": "b", "id": 3}]))
    assert sets.read_prompts(str(tmp_path / "p.json")) == ["a", "b"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n"b"\n')
    assert sets.read_prompts(str(tmp_path / "p.jsonl")) == ["a", "b"]
    for name, text, match in [("dup.txt", "a\nb\na\n", "prompt 2 repeats prompt 0"),
                              ("empty.txt", "# nothing\n", "holds no prompts"),
                              ("bad.json", '{"prompt": "a"}', "expected a JSON list"),
                              ("num.json", '["a", 3]', "item 1 is not a non-empty prompt string"),
                              ("cut.json", '["a", "b', "not valid JSON"),
                              ("cut.jsonl", '"a"\n{"prompt": \n', "line 2: not JSON")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=match):
            sets.read_prompts(str(tmp_path / name))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        sets.read_prompts(str(tmp_path / "latin1.txt"))


def test_image_folder_skips_and_counts_unreadable_images(tmp_path, gen):
    for i in range(5):
        save_image(torch.rand(3, 8, 8, generator=gen), str(tmp_path / f"{i}.png"))
    save_image(torch.rand(3, 6, 6, generator=gen), str(tmp_path / "small.png"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n")
    (tmp_path / "notes.txt").write_text("not an image")
    skipped = []
    batches = list(sets.iter_image_folder(str(tmp_path), skipped, batch=3))
    assert sorted(b.shape[0] for b in batches) == [1, 2, 3] and sum(len(b) for b in batches) == 6
    assert [p.split("/")[-1] for p, _ in skipped] == ["broken.png"]
    with pytest.raises(ValueError, match="is not a directory"):
        sets.list_images(str(tmp_path / "nothing"))
