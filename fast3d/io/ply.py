"""3D Gaussian splats as PLY files, in the standard 3DGS layout (binary little-endian, one
``vertex`` element of float properties):

    x y z  nx ny nz  f_dc_0..2  f_rest_0..(3(K-1)-1)  opacity  scale_0..2  rot_0..3

``opacity`` is stored as a logit, ``scale_*`` as logs, ``rot_*`` as a wxyz quaternion, and the
higher SH bands ``f_rest_*`` channel-major (all of red's K-1 coefficients, then green's, then
blue's), as the INRIA code writes them, so the files open in the usual splat viewers.

``load_ply`` reads files written by any tool in that layout (properties in any order, extra scalar
properties ignored) and rejects anything malformed, truncated or hostile with a ValueError that
says what is wrong, before allocating memory for it.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

from fast3d.checks import check_shape
from fast3d.io.atomic import write_atomic

_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "<i2", "int16": "<i2",
          "ushort": "<u2", "uint16": "<u2", "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4",
          "float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8"}
_MAX_HEADER = 1 << 16


def float_tensor(name: str, x, shape: str, dims: dict | None = None, *, finite: bool = True) -> dict:
    """Check that a writer's argument is a floating tensor of ``shape`` (see
    :func:`fast3d.checks.check_shape`, which binds and returns the named dims) and, if asked, finite.
    TypeError for a non-tensor or a non-floating dtype, ValueError otherwise."""
    dims = check_shape(x, shape, name, dims)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor; got {x.dtype}")
    if finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite; got {int((~torch.isfinite(x)).sum())} non-finite values")
    return dims


def _names(K: int) -> list[str]:
    return (["x", "y", "z", "nx", "ny", "nz"] + [f"f_dc_{i}" for i in range(3)]
            + [f"f_rest_{i}" for i in range(3 * (K - 1))] + ["opacity"] + [f"scale_{i}" for i in range(3)]
            + [f"rot_{i}" for i in range(4)])


def save_ply(path: str | os.PathLike,
             means: Tensor,      # [N, 3]
             quats: Tensor,      # [N, 4] wxyz
             scales: Tensor,     # [N, 3] post-activation (> 0)
             opacities: Tensor,  # [N] post-activation, in (0, 1)
             sh: Tensor,         # [N, K, 3] SH coefficients, K in {1, 4, 9, 16}
             ) -> None:
    """Write one scene. The file appears atomically (written to a temporary name, then renamed)."""
    write_atomic(path, ply_bytes(means, quats, scales, opacities, sh))


def ply_bytes(means: Tensor,      # [N, 3]
              quats: Tensor,      # [N, 4] wxyz
              scales: Tensor,     # [N, 3] post-activation (> 0)
              opacities: Tensor,  # [N] post-activation, in (0, 1)
              sh: Tensor,         # [N, K, 3] SH coefficients, K in {1, 4, 9, 16}
              ) -> bytes:
    """The bytes :func:`save_ply` writes (an HTTP response body)."""
    d = float_tensor("means", means, "[N, 3]", finite=False)
    d = float_tensor("quats", quats, "[N, 4]", d, finite=False)
    d = float_tensor("scales", scales, "[N, 3]", d, finite=False)
    d = float_tensor("opacities", opacities, "[N]", d, finite=False)
    d = float_tensor("sh", sh, "[N, K, 3]", d, finite=False)
    N, K = d["N"], d["K"]
    if K not in (1, 4, 9, 16):
        raise ValueError(f"sh must hold 1, 4, 9 or 16 coefficients per channel (degree 0-3); got K={K}")
    if N and (bool((scales <= 0).any()) or bool(((opacities <= 0) | (opacities >= 1)).any())):
        raise ValueError("scales must be > 0 and opacities in (0, 1) (they are stored as log / logit)")
    for name, x in (("means", means), ("quats", quats), ("scales", scales), ("opacities", opacities), ("sh", sh)):
        if N and not bool(torch.isfinite(x).all()):
            bad = (~torch.isfinite(x)).reshape(N, -1).any(1).nonzero()[:5, 0].tolist()
            raise ValueError(f"{name} holds NaN or infinite values (first rows: {bad}); a PLY must hold finite numbers")
    if N and bool((quats.norm(dim=-1) == 0).any()):
        raise ValueError("quats has zero-length rows: a rotation quaternion needs a non-zero norm")
    f = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    op = f(opacities)
    cols = [f(means), torch.zeros(N, 3, dtype=torch.float64), f(sh)[:, 0],
            f(sh)[:, 1:].transpose(1, 2).reshape(N, 3 * (K - 1)), torch.log(op / (1 - op))[:, None],
            torch.log(f(scales)), f(quats)]
    data = torch.cat(cols, 1).to(torch.float32).numpy()
    names = _names(K)
    header = "ply\nformat binary_little_endian 1.0\n" + f"element vertex {N}\n" + "".join(
        f"property float {n}\n" for n in names) + "end_header\n"
    return header.encode("ascii") + np.ascontiguousarray(data, dtype="<f4").tobytes()


def header_records(raw: bytes) -> tuple[list[tuple[list[str], str]], int]:
    """The element and property lines of a PLY header as (tokens, line), and the header's length
    in bytes; raw is the file's first _MAX_HEADER bytes. Checks what every reader here needs: an
    ASCII header from a 'ply' line to an 'end_header' line, one binary_little_endian 1.0 format
    line, well-formed element lines; comments skipped; ValueError for anything else."""
    end = raw.find(b"\nend_header\n") + 1  # a line of its own, not text inside a comment
    if end <= 0:
        raise ValueError(f"not a PLY file: no 'end_header' line in the first {_MAX_HEADER} bytes")
    try:
        lines = raw[:end].decode("ascii").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"PLY header is not ASCII ({e})") from None
    if not lines or lines[0].strip() != "ply":
        raise ValueError("not a PLY file: the first line must be 'ply'")
    fmt, records = None, []
    for ln in lines[1:]:
        tok = ln.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        if tok[0] == "format":
            if tok[1:] != ["binary_little_endian", "1.0"]:
                raise ValueError(f"unsupported PLY format {' '.join(tok[1:])!r}; need binary_little_endian 1.0")
            fmt = tok[1]
        elif tok[0] == "element" and len(tok) != 3:
            raise ValueError(f"malformed element line {ln!r}")
        elif tok[0] in ("element", "property"):
            records.append((tok, ln))
        else:
            raise ValueError(f"unexpected PLY header line {ln!r}")
    if fmt is None:
        raise ValueError("PLY header has no format line")
    return records, end + len(b"end_header\n")


def scalar_property(tok: list[str], ln: str, props: list[tuple[str, str]], what: str = "") -> tuple[str, str]:
    """(name, numpy dtype) of a 'property TYPE NAME' line; ``what`` ("vertex ") names it in errors."""
    if len(tok) != 3 or tok[1] == "list":
        raise ValueError(f"unsupported {what}property line {ln!r} (only scalar properties)")
    if tok[1] not in _TYPES:
        raise ValueError(f"unknown property type {tok[1]!r} in {ln!r}")
    if any(n == tok[2] for n, _ in props):
        raise ValueError(f"duplicate {what}property {tok[2]!r}")
    return tok[2], _TYPES[tok[1]]


def _parse_header(raw: bytes) -> tuple[int, list[tuple[str, str]], int]:
    """-> (vertex count, [(name, numpy dtype)], header length in bytes)."""
    records, hlen = header_records(raw)
    count, props, element = None, [], None
    for tok, ln in records:
        if tok[0] == "element":
            if element is not None:
                raise ValueError(f"unexpected second element {tok[1]!r}; a splat file has only 'vertex'")
            if tok[1] != "vertex":
                raise ValueError(f"unexpected element {tok[1]!r}; a splat file has only 'vertex'")
            if not tok[2].isdigit():
                raise ValueError(f"vertex count must be a non-negative integer; got {tok[2]!r}")
            element, count = tok[1], int(tok[2])
        else:
            if element is None:
                raise ValueError("property before any element")
            props.append(scalar_property(tok, ln, props))
    if count is None:
        raise ValueError("PLY header has no 'element vertex' line")
    return count, props, hlen


def load_ply(path: str | os.PathLike) -> dict:
    """Read a 3DGS PLY file. Returns activated tensors (float32, CPU): means [N, 3], quats [N, 4]
    (normalised wxyz), scales [N, 3] (exp of the stored logs), opacities [N] (sigmoid of the
    stored logits), sh [N, K, 3], and sh_degree."""
    with open(path, "rb") as fh:
        raw = fh.read(_MAX_HEADER)
        count, props, hlen = _parse_header(raw)
        names = [n for n, _ in props]
        n_rest = sum(1 for n in names if n.startswith("f_rest_"))
        K = 1 + n_rest // 3
        degree = round(math.sqrt(K)) - 1
        if n_rest % 3 or (degree + 1) ** 2 != K or degree > 3:
            raise ValueError(f"{n_rest} f_rest_* properties: need 3 (K - 1) with K in 1, 4, 9, 16")
        need = [n for n in _names(K) if n not in ("nx", "ny", "nz")]
        missing = [n for n in need if n not in names]
        if missing:
            raise ValueError(f"missing properties {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        bad = [n for n, t in props if n in need and t != "<f4"]
        if bad:
            raise ValueError(f"properties {bad[:4]} must be float (32-bit)")
        dtype = np.dtype(props)
        size = os.fstat(fh.fileno()).st_size
        expected = hlen + count * dtype.itemsize
        if size < expected:
            raise ValueError(f"truncated PLY: {count} vertices of {dtype.itemsize} bytes need {expected} bytes; "
                             f"the file has {size}")
        if size > expected:
            raise ValueError(f"PLY has {size - expected} trailing bytes after {count} vertices")
        fh.seek(hlen)
        data = np.frombuffer(fh.read(count * dtype.itemsize), dtype=dtype, count=count)

    def cols(ns):  # -> [count, len(ns)] float32
        out = torch.empty(count, len(ns))
        for i, n in enumerate(ns):
            out[:, i] = torch.from_numpy(data[n].astype(np.float32))
        return out

    means = cols(["x", "y", "z"])
    dc = cols([f"f_dc_{i}" for i in range(3)])
    rest = cols([f"f_rest_{i}" for i in range(n_rest)]).reshape(count, 3, K - 1).transpose(1, 2)  # [N, K-1, 3]
    logit = cols(["opacity"])[:, 0]
    log_scales = cols([f"scale_{i}" for i in range(3)])
    quats = cols([f"rot_{i}" for i in range(4)])
    for name, t in (("x/y/z", means), ("f_dc/f_rest", torch.cat([dc, rest.reshape(count, 3 * (K - 1))], 1)),
                    ("opacity", logit), ("scale", log_scales), ("rot", quats)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"non-finite values in the {name} properties")
    norm = quats.norm(dim=-1, keepdim=True)
    if count and bool((norm == 0).any()):
        raise ValueError("a rot_* quaternion is zero")
    scales = torch.exp(log_scales)
    if not bool(torch.isfinite(scales).all()):
        raise ValueError("scale_* properties overflow: exp(log scale) is not finite")
    return dict(means=means, quats=quats / norm, scales=scales, opacities=torch.sigmoid(logit),
                sh=torch.cat([dc[:, None], rest], 1), sh_degree=degree)


def save_points_ply(path: str | os.PathLike,
                    points: Tensor,  # [N, 3] positions
                    colors: Tensor,  # [N, 3] RGB in [0, 1] (clamped), stored as uchar round(255 c)
                    ) -> None:
    """Write a coloured point cloud: binary little-endian PLY, one ``vertex`` element with
    ``float x y z`` and ``uchar red green blue`` (15 bytes a point), the layout point-cloud viewers
    read. The file appears atomically (written to a temporary name, then renamed)."""
    write_atomic(path, points_ply_bytes(points, colors))


def points_ply_bytes(points: Tensor,  # [N, 3] positions
                     colors: Tensor,  # [N, 3] RGB in [0, 1]
                     ) -> bytes:
    """The bytes :func:`save_points_ply` writes (an HTTP response body)."""
    float_tensor("colors", colors, "[N, 3]", float_tensor("points", points, "[N, 3]"))
    N = points.shape[0]
    record = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    data = np.empty(N, dtype=record)
    xyz = points.detach().to("cpu", torch.float32).numpy()
    rgb = torch.round(colors.detach().to("cpu", torch.float64).clamp(0, 1) * 255).to(torch.uint8).numpy()
    for i, n in enumerate(("x", "y", "z")):
        data[n] = xyz[:, i]
    for i, n in enumerate(("red", "green", "blue")):
        data[n] = rgb[:, i]
    header = ("ply\nformat binary_little_endian 1.0\n" + f"element vertex {N}\n"
              + "".join(f"property float {n}\n" for n in "xyz")
              + "".join(f"property uchar {n}\n" for n in ("red", "green", "blue")) + "end_header\n")
    return header.encode("ascii") + data.tobytes()
