"""Tests of fast3d.io.save_points_ply: the coloured point-cloud layout read back byte by byte, the
atomic write, and rejection of non-finite or mis-shaped input."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fast3d.io import save_points_ply

_RECORD = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])


def _read(path):
    raw = path.read_bytes()
    head, body = raw.split(b"end_header\n", 1)
    return head.decode("ascii"), body


@pytest.mark.parametrize("N", [0, 1, 29])
def test_round_trip(tmp_path, gen, N):
    points = torch.randn(N, 3, generator=gen)
    colors = torch.rand(N, 3, generator=gen) * 1.2 - 0.1            # outside [0, 1] is clamped
    path = tmp_path / "p.ply"
    save_points_ply(path, points, colors)
    head, body = _read(path)
    assert head.splitlines() == ["ply", "format binary_little_endian 1.0", f"element vertex {N}",
                                 "property float x", "property float y", "property float z",
                                 "property uchar red", "property uchar green", "property uchar blue"]
    assert len(body) == 15 * N
    data = np.frombuffer(body, dtype=_RECORD)
    xyz = np.stack([data["x"], data["y"], data["z"]], 1)
    rgb = np.stack([data["red"], data["green"], data["blue"]], 1)
    np.testing.assert_array_equal(xyz, points.numpy())
    np.testing.assert_array_equal(rgb, torch.round(colors.clamp(0, 1) * 255).to(torch.uint8).numpy())
    assert os.listdir(tmp_path) == ["p.ply"]                         # no temporary file left


def test_replaces_an_existing_file(tmp_path, gen):
    path = tmp_path / "p.ply"
    path.write_bytes(b"old contents")
    save_points_ply(path, torch.zeros(2, 3), torch.ones(2, 3))
    head, body = _read(path)
    assert "element vertex 2" in head and body == (np.zeros(3, "<f4").tobytes() + bytes([255] * 3)) * 2


@pytest.mark.parametrize("bad, match", [
    (dict(points=torch.tensor([[0.0, float("nan"), 0.0]])), "points must be finite"),
    (dict(points=torch.tensor([[0.0, 0.0, float("inf")]])), "points must be finite"),
    (dict(colors=torch.tensor([[float("nan"), 0.0, 0.0]])), "colors must be finite"),
    (dict(points=torch.zeros(1, 2)), r"points must have shape \[N, 3\]"),
    (dict(colors=torch.zeros(2, 3)), r"colors must have shape \[N, 3\] with N = 1; got \[2, 3\] float32 on cpu"),
])
def test_rejects_bad_input(tmp_path, bad, match):
    args = dict(points=torch.zeros(1, 3), colors=torch.zeros(1, 3))
    args.update(bad)
    path = tmp_path / "p.ply"
    with pytest.raises(ValueError, match=match):
        save_points_ply(path, **args)
    assert not os.listdir(tmp_path)


def test_rejects_integer_tensors(tmp_path):
    with pytest.raises(TypeError, match="points must be a floating tensor"):
        save_points_ply(tmp_path / "p.ply", torch.zeros(1, 3, dtype=torch.int64), torch.zeros(1, 3))
