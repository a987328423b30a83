"""Coloured triangle meshes as PLY files, in the layout MeshLab and Blender open (binary
little-endian):

    element vertex V   property float x, y, z; property uchar red, green, blue
    element face F     property list uchar int vertex_indices      (3 indices a face)

``load_mesh_ply`` reads that layout as other tools write it too (vertex properties in any order,
x y z float or double, extra scalar vertex properties ignored, colour optional, ``vertex_index``
for ``vertex_indices``, uint indices) and rejects anything malformed, truncated or hostile with a
ValueError that says what is wrong, before allocating memory for it.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from fast3d.checks import check_shape
from fast3d.io.atomic import write_atomic
from fast3d.io.ply import _MAX_HEADER, _TYPES, float_tensor, header_records, scalar_property

_RGB = ("red", "green", "blue")
_INDEX_NAMES = ("vertex_indices", "vertex_index")
_MAX_INDEX = 2 ** 31 - 1  # faces are stored as int32


def save_mesh_ply(path: str | os.PathLike,
                  vertices: Tensor,  # [V, 3] positions
                  faces: Tensor,     # [F, 3] integer vertex indices in [0, V), counter-clockwise seen from outside
                  colors: Tensor,    # [V, 3] RGB in [0, 1] (clamped), stored as uchar round(255 c)
                  ) -> None:
    """Write a vertex-coloured triangle mesh (layout in the module docstring: 15 bytes a vertex,
    13 a face). The file appears atomically (written to a temporary name, then renamed)."""
    d = float_tensor("vertices", vertices, "[V, 3]")
    d = float_tensor("colors", colors, "[V, 3]", d)
    check_shape(faces, "[F, 3]", "faces")
    if faces.is_floating_point() or faces.is_complex() or faces.dtype == torch.bool:
        raise TypeError(f"faces must be an integer tensor; got {faces.dtype}")
    V = d["V"]
    if V > _MAX_INDEX + 1:
        raise ValueError(f"vertices: {V} vertices do not fit the file's int32 face indices")
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= V):
        raise ValueError(f"faces must index vertices in [0, {V}); got indices in [{int(faces.min())}, "
                         f"{int(faces.max())}]")
    F = faces.shape[0]
    vdata = np.empty(V, dtype=[("xyz", "<f4", (3,)), ("rgb", "u1", (3,))])
    vdata["xyz"] = vertices.detach().to("cpu", torch.float32).numpy()
    vdata["rgb"] = torch.round(colors.detach().to("cpu", torch.float64).clamp(0, 1) * 255).to(torch.uint8).numpy()
    fdata = np.empty(F, dtype=[("n", "u1"), ("idx", "<i4", (3,))])
    fdata["n"] = 3
    fdata["idx"] = faces.detach().to("cpu", torch.int64).numpy()
    header = ("ply\nformat binary_little_endian 1.0\n" + f"element vertex {V}\n"
              + "".join(f"property float {n}\n" for n in "xyz") + "".join(f"property uchar {n}\n" for n in _RGB)
              + f"element face {F}\nproperty list uchar int vertex_indices\nend_header\n")
    write_atomic(path, header.encode("ascii"), vdata.tobytes(), fdata.tobytes())


def _parse_header(raw: bytes) -> tuple[int, list[tuple[str, str]], int, tuple[str, str], int]:
    """-> (vertex count, [(name, numpy dtype)] of a vertex, face count, (count dtype, index
    dtype) of a face's list, header length in bytes)."""
    records, hlen = header_records(raw)
    counts, vprops, flist = {}, [], None
    element = None
    for tok, ln in records:
        if tok[0] == "element":
            expected = "vertex" if element is None else "face" if element == "vertex" else None
            if tok[1] != expected:
                raise ValueError(f"unexpected element {tok[1]!r}; a mesh file has 'vertex' then 'face', nothing else")
            if not tok[2].isdigit():
                raise ValueError(f"{tok[1]} count must be a non-negative integer; got {tok[2]!r}")
            element, counts[tok[1]] = tok[1], int(tok[2])
        elif element is None:
            raise ValueError("property before any element")
        elif element == "vertex":
            vprops.append(scalar_property(tok, ln, vprops, "vertex "))
        else:
            if flist is not None:
                raise ValueError(f"unexpected face property line {ln!r}; a face has only its index list")
            if len(tok) != 5 or tok[1] != "list" or tok[4] not in _INDEX_NAMES:
                raise ValueError(f"unsupported face property line {ln!r}; need 'property list uchar int "
                                 f"vertex_indices'")
            ctype, itype = _TYPES.get(tok[2]), _TYPES.get(tok[3])
            if ctype != "u1" or itype not in ("<i4", "<u4"):
                raise ValueError(f"face list {tok[2]} {tok[3]!r}: need a uchar count and int or uint indices")
            flist = (ctype, itype)
    if "vertex" not in counts:
        raise ValueError("PLY header has no 'element vertex' line")
    if "face" not in counts:
        raise ValueError("PLY header has no 'element face' line: a point cloud, not a mesh")
    if flist is None:
        raise ValueError("PLY header declares faces but no 'property list uchar int vertex_indices'")
    return counts["vertex"], vprops, counts["face"], flist, hlen


def load_mesh_ply(path: str | os.PathLike) -> dict:
    """Read a triangle-mesh PLY file. Returns CPU tensors: vertices [V, 3] float32, faces [F, 3]
    int64 (in [0, V)), and colors [V, 3] float32 in [0, 1] (stored uchar / 255), or None where
    the file has no red green blue."""
    with open(path, "rb") as fh:
        raw = fh.read(_MAX_HEADER)
        nv, vprops, nf, (ctype, itype), hlen = _parse_header(raw)
        names = dict(vprops)
        missing = [n for n in "xyz" if n not in names]
        if missing:
            raise ValueError(f"missing vertex properties {missing}")
        bad = [n for n in "xyz" if names[n] not in ("<f4", "<f8")]
        if bad:
            raise ValueError(f"vertex properties {bad} must be float or double")
        has_rgb = [n in names for n in _RGB]
        if any(has_rgb) and not all(has_rgb):
            raise ValueError("vertex colour needs all of red, green, blue; got only "
                             f"{[n for n in _RGB if n in names]}")
        if all(has_rgb) and any(names[n] != "u1" for n in _RGB):
            raise ValueError("vertex properties red, green, blue must be uchar")
        vtype = np.dtype(vprops)
        ftype = np.dtype([("n", ctype), ("idx", itype, (3,))])
        size = os.fstat(fh.fileno()).st_size
        expected = hlen + nv * vtype.itemsize + nf * ftype.itemsize
        if size < expected:
            raise ValueError(f"truncated PLY: {nv} vertices of {vtype.itemsize} bytes and {nf} triangles of "
                             f"{ftype.itemsize} bytes need {expected} bytes; the file has {size}")
        fh.seek(hlen)
        vdata = np.frombuffer(fh.read(nv * vtype.itemsize), dtype=vtype, count=nv)
        fdata = np.frombuffer(fh.read(nf * ftype.itemsize), dtype=ftype, count=nf)
    not_tri = np.flatnonzero(fdata["n"] != 3)
    if len(not_tri):
        i = int(not_tri[0])
        raise ValueError(f"face {i} has {int(fdata['n'][i])} vertices; only triangle meshes are read")
    if size > expected:
        raise ValueError(f"PLY has {size - expected} trailing bytes after {nv} vertices and {nf} faces")
    vertices = torch.from_numpy(np.stack([vdata[n].astype(np.float32) for n in "xyz"], -1).reshape(nv, 3))
    if not bool(torch.isfinite(vertices).all()):
        raise ValueError(f"non-finite x/y/z in {int((~torch.isfinite(vertices)).any(1).sum())} vertices")
    faces = torch.from_numpy(fdata["idx"].astype(np.int64).reshape(nf, 3))
    if nf and (int(faces.min()) < 0 or int(faces.max()) >= nv):
        bad_face = int(((faces < 0) | (faces >= nv)).any(1).nonzero()[0, 0])
        raise ValueError(f"face {bad_face} indexes vertices {faces[bad_face].tolist()}; the file has {nv} "
                         f"vertices (indices in [0, {nv}))")
    colors = None
    if all(has_rgb):
        colors = torch.from_numpy(np.stack([vdata[n] for n in _RGB], -1).reshape(nv, 3).astype(np.float32) / 255)
    return dict(vertices=vertices, faces=faces, colors=colors)
