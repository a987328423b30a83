"""Vertex-coloured triangle-mesh PLY files: round trip, the exact MeshLab/Blender layout, other
tools' variants, and malformed files rejected with a ValueError naming the problem (fuzzed:
truncations, byte flips)."""

import numpy as np
import pytest
import torch
from helpers import byte_flips

from fast3d.io import load_mesh_ply, save_mesh_ply


def _mesh(gen, V=7, F=9):
    vertices = torch.randn(V, 3, generator=gen)                               # [V, 3]
    faces = torch.randint(0, V, (F, 3), generator=gen)                        # [F, 3]
    colors = torch.rand(V, 3, generator=gen) * 1.2 - 0.1                      # [V, 3], some out of [0, 1]
    return vertices, faces, colors


def _valid_bytes(tmp_path, gen, **kw):
    save_mesh_ply(tmp_path / "valid.ply", *_mesh(gen, **kw))
    return (tmp_path / "valid.ply").read_bytes()


@pytest.mark.parametrize("V, F", [(7, 9), (1, 0), (0, 0), (300, 1000)])
def test_round_trip(tmp_path, gen, V, F):
    vertices, faces, colors = _mesh(gen, V, F) if V else (torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long),
                                                          torch.zeros(0, 3))
    save_mesh_ply(tmp_path / "m.ply", vertices, faces, colors)
    out = load_mesh_ply(tmp_path / "m.ply")
    assert torch.equal(out["vertices"], vertices.float())
    assert out["faces"].dtype == torch.int64 and torch.equal(out["faces"], faces)
    assert torch.equal(out["colors"], torch.round(colors.clamp(0, 1) * 255) / 255)
    save_mesh_ply(tmp_path / "again.ply", out["vertices"], out["faces"], out["colors"])
    assert (tmp_path / "again.ply").read_bytes() == (tmp_path / "m.ply").read_bytes()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name], "no temporary file left behind"


def test_layout_is_the_meshlab_one(tmp_path, gen):
    raw = _valid_bytes(tmp_path, gen, V=4, F=2)
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    assert raw[:end].decode("ascii").splitlines() == [
        "ply", "format binary_little_endian 1.0", "element vertex 4", "property float x", "property float y",
        "property float z", "property uchar red", "property uchar green", "property uchar blue", "element face 2",
        "property list uchar int vertex_indices", "end_header"]
    assert len(raw) - end == 4 * 15 + 2 * 13
    faces = np.frombuffer(raw[end + 60:], dtype=[("n", "u1"), ("i", "<i4", (3,))])
    assert (faces["n"] == 3).all()


def test_reads_other_tools_variants(tmp_path, gen):
    """Property order, double coordinates, extra properties, no colour, vertex_index, uint indices."""
    xyz = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    rec = np.empty(3, dtype=[("nx", "<f4"), ("z", "<f8"), ("y", "<f8"), ("x", "<f8")])
    rec["nx"], rec["x"], rec["y"], rec["z"] = 1, xyz[:, 0].numpy(), xyz[:, 1].numpy(), xyz[:, 2].numpy()
    face = np.array([(3, (2, 1, 0))], dtype=[("n", "u1"), ("i", "<u4", (3,))])
    header = (b"ply\nformat binary_little_endian 1.0\ncomment from elsewhere\nelement vertex 3\nproperty float nx\n"
              b"property double z\nproperty double y\nproperty double x\nelement face 1\n"
              b"property list uint8 uint vertex_index\nend_header\n")
    (tmp_path / "o.ply").write_bytes(header + rec.tobytes() + face.tobytes())
    out = load_mesh_ply(tmp_path / "o.ply")
    assert torch.equal(out["vertices"], xyz.float()) and out["faces"].tolist() == [[2, 1, 0]]
    assert out["colors"] is None


def _swap(raw, old, new):
    assert old in raw, old
    return raw.replace(old, new, 1)


def _end(raw):
    return raw.index(b"end_header\n") + len(b"end_header\n")


MALFORMED = {  # on a file of 6 vertices (15 bytes each) and 4 faces (13 bytes each)
    "not-ply": (lambda raw: b"plx" + raw[3:], r"first line must be 'ply'"),
    "ascii": (lambda raw: _swap(raw, b"binary_little_endian", b"ascii"), r"unsupported PLY format"),
    "no-end-header": (lambda raw: _swap(raw, b"end_header\n", b"end_headr\n"), r"no 'end_header'"),
    "no-faces": (lambda raw: raw[:raw.index(b"element face")] + b"end_header\n" + raw[_end(raw):_end(raw) + 90],
                 r"no 'element face' line"),
    "face-first": (lambda raw: _swap(raw, b"element vertex", b"element face"), r"unexpected element 'face'"),
    "third-element": (lambda raw: _swap(raw, b"end_header\n", b"element edge 0\nend_header\n"),
                      r"unexpected element 'edge'"),
    "negative-count": (lambda raw: _swap(raw, b"element face 4", b"element face -4"),
                       r"face count must be a non-negative integer"),
    "huge-vertex-count": (lambda raw: _swap(raw, b"element vertex 6", b"element vertex 99999999999999999999"),
                          r"truncated PLY: 99999999999999999999 vertices"),
    "huge-face-count": (lambda raw: _swap(raw, b"element face 4", b"element face 4000000000000"),
                        r"truncated PLY"),
    "truncated-data": (lambda raw: raw[:-5], r"truncated PLY: .* need \d+ bytes; the file has"),
    "trailing": (lambda raw: raw + b"\0", r"1 trailing bytes"),
    "quad": (lambda raw: raw[:_end(raw) + 90] + b"\x04" + raw[_end(raw) + 91:] + bytes(4), r"face 0 has 4 vertices"),
    "index-out-of-range": (lambda raw: raw[:-4] + np.int32(6).tobytes(), r"face 3 indexes vertices .* 6 vertices"),
    "negative-index": (lambda raw: raw[:-4] + np.int32(-1).tobytes(), r"face 3 indexes vertices"),
    "float-indices": (lambda raw: _swap(raw, b"list uchar int", b"list uchar float"), r"need a uchar count"),
    "face-scalar": (lambda raw: _swap(raw, b"property list uchar int vertex_indices", b"property int flags"),
                    r"unsupported face property line"),
    "vertex-list": (lambda raw: _swap(raw, b"property uchar red", b"property list uchar int red"),
                    r"unsupported vertex property line"),
    "unknown-type": (lambda raw: _swap(raw, b"property float y", b"property half y"), r"unknown property type"),
    "duplicate": (lambda raw: _swap(raw, b"property float y", b"property float x"), r"duplicate vertex property 'x'"),
    "int-xyz": (lambda raw: _swap(raw, b"property float z", b"property int z"), r"must be float or double"),
    "float-color": (lambda raw: _swap(raw, b"property uchar green", b"property float green"),
                    r"red, green, blue must be uchar"),
    "half-color": (lambda raw: _swap(raw, b"property uchar blue\n", b"property uchar alpha\n"),
                   r"needs all of red, green, blue"),
    "garbage-line": (lambda raw: _swap(raw, b"element vertex", b"hello\nelement vertex"), r"unexpected PLY header"),
    "binary-header": (lambda raw: _swap(raw, b"ply\n", b"ply\n\xff\n"), r"not ASCII"),
    "nan-vertex": (lambda raw: raw[:_end(raw)] + np.float32(np.nan).tobytes() + raw[_end(raw) + 4:],
                   r"non-finite x/y/z in 1 vertices"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_are_rejected(tmp_path, gen, case):
    mutate, pattern = MALFORMED[case]
    (tmp_path / "bad.ply").write_bytes(mutate(_valid_bytes(tmp_path, gen, V=6, F=4)))
    with pytest.raises(ValueError, match=pattern):
        load_mesh_ply(tmp_path / "bad.ply")


def test_fuzz_truncations_and_byte_flips(tmp_path, gen):
    """Every truncation point and random byte flips: a well-formed mesh or a ValueError, never
    another exception (or a crash, or a huge allocation)."""
    raw = _valid_bytes(tmp_path, gen, V=5, F=6)
    path = tmp_path / "f.ply"
    for cut in range(len(raw)):
        path.write_bytes(raw[:cut])
        with pytest.raises(ValueError):
            load_mesh_ply(path)
    ok = 0
    for flipped in byte_flips(raw, gen, 1000):
        path.write_bytes(flipped)
        try:
            out = load_mesh_ply(path)
        except ValueError:
            continue
        V = out["vertices"].shape[0]
        assert out["vertices"].shape == (V, 3) and torch.isfinite(out["vertices"]).all()
        assert out["faces"].dim() == 2 and out["faces"].shape[1] == 3
        assert out["faces"].numel() == 0 or (0 <= int(out["faces"].min()) and int(out["faces"].max()) < V)
        assert out["colors"] is None or (out["colors"].shape == (V, 3) and 0 <= out["colors"].min()
                                         and out["colors"].max() <= 1)
        ok += 1
    assert ok > 0  # flips inside the vertex payload still load


@pytest.mark.parametrize("bad, exc, match", [
    (dict(vertices=torch.zeros(7, 2)), ValueError, r"vertices must have shape \[V, 3\]"),
    (dict(colors=torch.zeros(6, 3)), ValueError, r"colors must have shape \[V, 3\] with V = 7; got \[6, 3\] float32 on cpu"),
    (dict(faces=torch.zeros(9, 4, dtype=torch.long)), ValueError, r"faces must have shape \[F, 3\]"),
    (dict(faces=torch.zeros(9, 3)), TypeError, r"faces must be an integer tensor"),
    (dict(faces=torch.full((9, 3), 7)), ValueError, r"faces must index vertices in \[0, 7\)"),
    (dict(faces=torch.full((9, 3), -1)), ValueError, r"faces must index vertices"),
    (dict(vertices=torch.full((7, 3), float("nan"))), ValueError, r"vertices must be finite"),
    (dict(colors=torch.zeros(7, 3, dtype=torch.uint8)), TypeError, r"colors must be a floating tensor"),
    (dict(vertices=np.zeros((7, 3))), TypeError, r"vertices must be a torch.Tensor"),
])
def test_save_rejects_bad_input(tmp_path, gen, bad, exc, match):
    vertices, faces, colors = _mesh(gen)
    args = dict(dict(vertices=vertices, faces=faces, colors=colors), **bad)
    with pytest.raises(exc, match=match):
        save_mesh_ply(tmp_path / "m.ply", **args)
    assert not list(tmp_path.iterdir()), "nothing written for refused input"
