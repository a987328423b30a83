"""Tests of fast3d.io.ply: round trips in the standard 3DGS layout, reading files laid out by
other tools (property order, extra properties), and rejection of malformed, truncated and hostile
files with a ValueError (fuzzed: truncations, byte flips, huge counts)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from helpers import byte_flips

from fast3d.io import load_ply, save_ply
from fast3d.io.ply import _names


def _scene(gen, N=37, K=16):
    return dict(means=torch.randn(N, 3, generator=gen), quats=torch.randn(N, 4, generator=gen),
                scales=torch.rand(N, 3, generator=gen) * 0.1 + 1e-3,
                opacities=torch.rand(N, generator=gen) * 0.98 + 0.01, sh=torch.randn(N, K, 3, generator=gen))


@pytest.mark.parametrize("K", [1, 4, 9, 16])
@pytest.mark.parametrize("N", [0, 1, 37])
def test_round_trip(tmp_path, gen, N, K):
    x = _scene(gen, N, K)
    path = tmp_path / "s.ply"
    save_ply(path, **x)
    y = load_ply(path)
    assert y["sh_degree"] == int(math.sqrt(K)) - 1
    assert y["means"].shape == (N, 3) and y["sh"].shape == (N, K, 3)
    torch.testing.assert_close(y["means"], x["means"])
    torch.testing.assert_close(y["sh"], x["sh"])
    torch.testing.assert_close(y["scales"], x["scales"], rtol=1e-5, atol=0)
    torch.testing.assert_close(y["opacities"], x["opacities"], rtol=1e-5, atol=1e-6)
    if N:
        torch.testing.assert_close(y["quats"], x["quats"] / x["quats"].norm(dim=-1, keepdim=True))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_layout_is_the_3dgs_one(tmp_path, gen):
    """Header property order, logit opacity, log scales, channel-major f_rest."""
    x = _scene(gen, 5, 4)
    path = tmp_path / "s.ply"
    save_ply(path, **x)
    raw = path.read_bytes()
    head, body = raw.split(b"end_header\n")
    props = [ln.split()[2] for ln in head.decode().splitlines() if ln.startswith("property")]
    assert props == _names(4) and b"format binary_little_endian 1.0" in head and b"element vertex 5" in head
    data = np.frombuffer(body, dtype="<f4").reshape(5, len(props))
    col = {n: data[:, i] for i, n in enumerate(props)}
    np.testing.assert_allclose(col["opacity"], torch.logit(x["opacities"].double()).numpy(), rtol=1e-5)
    np.testing.assert_allclose(col["scale_1"], torch.log(x["scales"][:, 1]).numpy(), rtol=1e-5)
    np.testing.assert_allclose(col["f_rest_3"], x["sh"][:, 1, 1].numpy())  # green's first rest coefficient
    np.testing.assert_allclose(col["f_dc_2"], x["sh"][:, 0, 2].numpy())


def _write(path, props, rows, count=None, extra_header=""):
    header = "ply\nformat binary_little_endian 1.0\n" + extra_header + \
        f"element vertex {len(rows) if count is None else count}\n" + \
        "".join(f"property {t} {n}\n" for t, n in props) + "end_header\n"
    dtype = np.dtype([(n, {"float": "<f4", "uchar": "u1", "double": "<f8"}[t]) for t, n in props])
    arr = np.zeros(len(rows), dtype=dtype)
    for i, r in enumerate(rows):
        arr[i] = tuple(r)
    path.write_bytes(header.encode() + arr.tobytes())


def test_reads_other_property_orders_and_extras(tmp_path, gen):
    names = [n for n in _names(1)][::-1] + ["red"]
    props = [("uchar" if n == "red" else "float", n) for n in names]
    rng = np.random.default_rng(0)
    rows = [[float(v) for v in rng.normal(size=len(names) - 1)] + [7] for _ in range(4)]
    _write(tmp_path / "o.ply", props, rows, extra_header="comment written by some tool\n")
    y = load_ply(tmp_path / "o.ply")
    assert y["means"].shape == (4, 3) and y["sh_degree"] == 0
    assert y["means"][2, 0].item() == pytest.approx(rows[2][names.index("x")], rel=1e-6)


def _valid_bytes(tmp_path, gen, N=6, K=4):
    save_ply(tmp_path / "v.ply", **_scene(gen, N, K))
    return (tmp_path / "v.ply").read_bytes()


def _header_swap(raw, old, new):
    assert old in raw
    return raw.replace(old, new, 1)


MALFORMED = {
    "empty": (lambda raw: b"", r"no 'end_header'"),
    "not-ply": (lambda raw: b"PK\x03\x04" + raw[4:], r"first line must be 'ply'"),
    "ascii-format": (lambda raw: _header_swap(raw, b"binary_little_endian", b"ascii"), r"unsupported PLY format"),
    "big-endian": (lambda raw: _header_swap(raw, b"binary_little_endian", b"binary_big_endian"),
                   r"unsupported PLY format"),
    "no-end-header": (lambda raw: raw.replace(b"end_header\n", b"end_headr\n"), r"no 'end_header'"),
    "negative-count": (lambda raw: _header_swap(raw, b"element vertex 6", b"element vertex -6"),
                       r"vertex count must be a non-negative integer"),
    "huge-count": (lambda raw: _header_swap(raw, b"element vertex 6", b"element vertex 99999999999999"),
                   r"truncated PLY"),
    "count-too-small": (lambda raw: _header_swap(raw, b"element vertex 6", b"element vertex 5"),
                        r"trailing bytes"),
    "second-element": (lambda raw: _header_swap(raw, b"end_header\n", b"element face 0\nend_header\n"),
                       r"unexpected second element"),
    "list-property": (lambda raw: _header_swap(raw, b"property float nx\n", b"property list uchar int nx\n"),
                      r"unsupported property line"),
    "unknown-type": (lambda raw: _header_swap(raw, b"property float nx\n", b"property half nx\n"),
                     r"unknown property type"),
    "duplicate": (lambda raw: _header_swap(raw, b"property float nx\n", b"property float x\n"),
                  r"duplicate property 'x'"),
    "missing-rot": (lambda raw: _header_swap(raw, b"property float rot_3\n", b"property float rot_x\n"),
                    r"missing properties \['rot_3'\]"),
    "double-required": (lambda raw: _header_swap(raw, b"property float scale_0\n", b"property double scale_0\n"),
                        r"must be float|truncated"),
    "bad-rest-count": (lambda raw: _header_swap(raw, b"property float f_rest_8\n", b"property float g_rest_8\n"),
                       r"f_rest_\* properties"),
    "garbage-line": (lambda raw: _header_swap(raw, b"element vertex", b"hello\nelement vertex"),
                     r"unexpected PLY header line"),
    "binary-header": (lambda raw: _header_swap(raw, b"comment", b"comment") if b"comment" in raw else
                      raw.replace(b"ply\n", b"ply\n\xff\xfe\n", 1), r"not ASCII"),
    "nan-mean": (lambda raw: raw[:raw.index(b"end_header\n") + 11 + 4] + np.float32(np.nan).tobytes()
                 + raw[raw.index(b"end_header\n") + 11 + 8:], r"non-finite values in the x/y/z"),
    "zero-quat": (lambda raw: raw[:-(4 * 4)] + bytes(16), r"quaternion is zero"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_are_rejected(tmp_path, gen, case):
    mutate, pattern = MALFORMED[case]
    (tmp_path / "bad.ply").write_bytes(mutate(_valid_bytes(tmp_path, gen)))
    with pytest.raises(ValueError, match=pattern):
        load_ply(tmp_path / "bad.ply")


def test_fuzz_truncations_and_byte_flips(tmp_path, gen):
    """Every truncation point and random byte flips: a clean result or a ValueError, never
    another exception (or a crash, or a huge allocation)."""
    raw = _valid_bytes(tmp_path, gen, N=3, K=1)
    path = tmp_path / "f.ply"
    cuts = sorted(set(range(0, len(raw), 7)) | {len(raw) - 1, len(raw) - 4})
    for cut in cuts:
        path.write_bytes(raw[:cut])
        with pytest.raises(ValueError):
            load_ply(path)
    ok = 0
    for flipped in byte_flips(raw, gen, 300):
        path.write_bytes(flipped)
        try:
            out = load_ply(path)
            assert out["means"].shape[1] == 3
            ok += 1
        except ValueError:
            pass
    assert ok > 0  # flips inside the float payload still load


@pytest.mark.parametrize("bad, exc, pattern", [
    (dict(K=5), ValueError, r"1, 4, 9 or 16"),
    (dict(opacities=torch.ones(37)), ValueError, r"opacities in \(0, 1\)"),
    (dict(scales=torch.zeros(37, 3)), ValueError, r"scales must be > 0"),
    (dict(means=torch.zeros(36, 3)), ValueError, r"must have shape"),
    (dict(quats=torch.zeros(37, 4, dtype=torch.int32)), TypeError, r"quats must be a floating tensor"),
    (dict(means=torch.full((37, 3), float("nan"))), ValueError, r"means holds NaN or infinite values"),
    (dict(sh=torch.full((37, 4, 3), float("inf"))), ValueError, r"sh holds NaN or infinite"),
    (dict(quats=torch.zeros(37, 4)), ValueError, r"zero-length rows"),
])
def test_save_rejects_bad_input(tmp_path, gen, bad, exc, pattern):
    x = _scene(gen, 37, bad.pop("K", 4))
    x.update(bad)
    with pytest.raises(exc, match=pattern):
        save_ply(tmp_path / "x.ply", **x)


def test_scales_that_overflow_are_rejected(tmp_path, gen):
    """A finite stored log-scale whose exp() is inf is hostile input, not a scene."""
    path = tmp_path / "big.ply"
    save_ply(path, **_scene(gen, N=3, K=1))
    raw = bytearray(path.read_bytes())
    start = raw.index(b"\nend_header\n") + len(b"\nend_header\n")
    scale0 = _names(1).index("scale_0")               # float32 properties, vertex 0
    raw[start + 4 * scale0:start + 4 * scale0 + 4] = np.float32(200.0).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="scale_\\* properties overflow"):
        load_ply(path)


def test_a_comment_mentioning_end_header_is_just_a_comment(tmp_path, gen):
    path = tmp_path / "c.ply"
    scene = _scene(gen, N=4, K=1)
    save_ply(path, **scene)
    raw = path.read_bytes()
    first = raw.index(b"\n") + 1
    path.write_bytes(raw[:first] + b"comment a line that ends in end_header\n" + raw[first:])
    g = load_ply(path)
    assert torch.allclose(g["means"], scene["means"], atol=1e-6)
