"""Benchmark sets for ``fast3d eval``: GSO-style object folders, fast3d shards, prompt lists and
reference image folders. Every reader takes untrusted files: a bad one is a ValueError that names
the file and what is wrong (an object folder that fails is skipped and counted by the iterators).

A GSO-style folder (Google Scanned Objects rendered for evaluation, as MVBoost and VFusion3D use it)
holds one folder per object::

    <root>/<object>/views.json     the views and their cameras (below)
    <root>/<object>/<image files>  the rendered views (PNG / JPEG; alpha composited over white)
    <root>/<object>/mesh.ply       optional reference geometry: a triangle mesh (its surface is
                                   sampled) or points.ply, a point set (PLY vertices x y z)

``views.json``::

    {"frames": [{"file": "000.png",                         # relative to the object folder
                 "viewmat": [[4 x 4]],                      # OpenCV world-to-camera, or instead
                 "c2w": [[4 x 4]],                          #   OpenGL/Blender camera-to-world
                 "K": [[3 x 3]]},                           # pixels of this image, or instead
                                                            #   "fov_y_deg": 49.1 (centred principal point)
                ...],
     "world_up": "z",          # optional, with c2w: "z" (Blender, fast3d) or "y" (OpenGL scenes)
     "fov_y_deg": 49.1,        # optional default for frames without K / fov_y_deg
     "geometry": "mesh.ply",   # optional; default mesh.ply, else points.ply, else none
     "prompt": "a red mug"}    # optional caption

Every image of an object has one size; frames are used in the order listed. Samples from both kinds
of data are dicts as ``fast3d.data.MultiViewDataset`` yields them (images [V, 3, R, R], alphas,
viewmats, Ks scaled to R, key, caption, source) plus ``points``: the reference geometry [P, 3] or None.
"""

from __future__ import annotations

import glob
import json
import os
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fast3d import cameras
from fast3d.io.images import composite, read_image

VIEWS_FILE = "views.json"
SURFACE_POINTS = 10_000           # points sampled on a reference mesh's surface
MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_FRAMES = 1024
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _matrix(obj, name: str, n: int) -> Tensor:  # -> [n, n] float64, finite
    try:
        m = torch.tensor(obj, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise ValueError(f"{name} must be a {n}x{n} list of numbers; got {str(obj)[:60]}") from None
    if m.shape != (n, n) or not bool(torch.isfinite(m).all()):
        raise ValueError(f"{name} must be a finite {n}x{n} matrix; got shape {tuple(m.shape)}")
    return m


def _number(obj, name: str, lo: float, hi: float) -> float:
    if isinstance(obj, bool) or not isinstance(obj, (int, float)) or not (lo < obj < hi):
        raise ValueError(f"{name} must be a number in ({lo}, {hi}); got {obj!r}")
    return float(obj)


def read_json(path: str, what: str):
    """A JSON file of at most MAX_JSON_BYTES; ValueError naming ``what`` if it is not one."""
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} is not a file")
    if os.path.getsize(path) > MAX_JSON_BYTES:
        raise ValueError(f"{what} {path!r} is over {MAX_JSON_BYTES} bytes")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{what} {path!r} is not valid JSON ({type(e).__name__}: {str(e)[:80]})") from None


def _frame_file(folder: str, rel, where: str) -> str:
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
        raise ValueError(f"{where}.file must be a relative path inside the object folder; got {rel!r}")
    return os.path.join(folder, rel)


def read_views(folder: str) -> dict:
    """The views of one object folder (module docstring): images [V, 3, H, W] and alphas
    [V, 1, H, W] in [0, 1] (colour composited over white), viewmats [V, 4, 4] (OpenCV
    world-to-camera), Ks [V, 3, 3] in pixels, prompt (str or None), geometry (path or None)."""
    path = os.path.join(folder, VIEWS_FILE)
    d = read_json(path, "views file")
    if not isinstance(d, dict) or not isinstance(d.get("frames"), list) or not d["frames"]:
        raise ValueError(f"{path}: expected an object with a non-empty 'frames' list")
    frames = d["frames"]
    if len(frames) > MAX_FRAMES:
        raise ValueError(f"{path}: {len(frames)} frames; at most {MAX_FRAMES}")
    up = d.get("world_up", "z")
    if up not in ("y", "z"):
        raise ValueError(f"{path}: world_up must be 'y' or 'z'; got {up!r}")
    prompt = d.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"{path}: prompt must be a string; got {type(prompt).__name__}")
    images, alphas, viewmats, Ks = [], [], [], []
    for i, fr in enumerate(frames):
        where = f"{path}: frames[{i}]"
        if not isinstance(fr, dict):
            raise ValueError(f"{where} must be an object; got {type(fr).__name__}")
        rgba = read_image(_frame_file(folder, fr.get("file"), where), name=f"{where}.file")  # [4, H, W]
        H, W = rgba.shape[-2:]
        if images and (H, W) != tuple(images[0].shape[-2:]):
            raise ValueError(f"{where}: image is {W}x{H}; frames[0] is {images[0].shape[-1]}x{images[0].shape[-2]}")
        if ("viewmat" in fr) == ("c2w" in fr):
            raise ValueError(f"{where} needs exactly one of 'viewmat' and 'c2w'")
        name = "viewmat" if "viewmat" in fr else "c2w"
        m = _matrix(fr[name], f"{where}.{name}", 4)
        det = float(torch.linalg.det(m[:3, :3]))
        if abs(det - 1) > 1e-3 or m[3].tolist() != [0, 0, 0, 1]:
            raise ValueError(f"{where}.{name} is not a rigid transform: rotation determinant {det:.4g}, "
                             f"last row {m[3].tolist()} (expected 1 and [0, 0, 0, 1])")
        vm = m if name == "viewmat" else cameras.viewmat_from_opengl_c2w(m, up)
        if "K" in fr:
            K = _matrix(fr["K"], f"{where}.K", 3)
            if not (K[0, 0] > 0 and K[1, 1] > 0):
                raise ValueError(f"{where}.K needs positive focal lengths; got fx {float(K[0, 0])}, fy {float(K[1, 1])}")
        else:
            fov = _number(fr.get("fov_y_deg", d.get("fov_y_deg")), f"{where}.fov_y_deg", 0, 180)
            K = cameras.intrinsics(fov, W, H, 1, torch.float64)[0]
        images.append(composite(rgba, 1.0))
        alphas.append(rgba[3:])
        viewmats.append(vm)
        Ks.append(K)
    geometry = d.get("geometry")
    if geometry is None:
        geometry = next((g for g in ("mesh.ply", "points.ply") if os.path.isfile(os.path.join(folder, g))), None)
    if geometry is not None:
        geometry = _frame_file(folder, geometry, f"{path}: geometry")
        if not os.path.isfile(geometry):
            raise ValueError(f"{path}: geometry {geometry!r} is not a file")
    return dict(images=torch.stack(images), alphas=torch.stack(alphas), viewmats=torch.stack(viewmats).float(),
                Ks=torch.stack(Ks).float(), prompt=prompt, geometry=geometry)


def _vertices_ply(path: str) -> Tensor:  # -> [N, 3] x y z of a vertex-only PLY
    from fast3d.io.ply import _MAX_HEADER, header_records, scalar_property

    with open(path, "rb") as fh:
        records, hlen = header_records(fh.read(_MAX_HEADER))
        props, count = [], None
        for tok, ln in records:
            if tok[0] == "element":
                if count is not None or tok[1] != "vertex":
                    raise ValueError(f"unexpected element {tok[1]!r}; a point set has one 'element vertex'")
                if not tok[2].isdigit():
                    raise ValueError(f"vertex count must be a non-negative integer; got {tok[2]!r}")
                count = int(tok[2])
            elif count is None:
                raise ValueError("property before any element")
            else:
                props.append(scalar_property(tok, ln, props, "vertex "))
        names = dict(props)
        if count is None or any(n not in names or names[n] not in ("<f4", "<f8") for n in "xyz"):
            raise ValueError("a point set needs 'element vertex' with float or double x, y, z")
        dtype = np.dtype(props)
        size = os.fstat(fh.fileno()).st_size
        if size != hlen + count * dtype.itemsize:
            raise ValueError(f"PLY size {size} bytes; {count} vertices of {dtype.itemsize} bytes need "
                             f"{hlen + count * dtype.itemsize}")
        fh.seek(hlen)
        data = np.frombuffer(fh.read(count * dtype.itemsize), dtype=dtype, count=count)
    xyz = torch.from_numpy(np.stack([data[n].astype(np.float32) for n in "xyz"], -1).reshape(count, 3))
    if not bool(torch.isfinite(xyz).all()):
        raise ValueError("non-finite x/y/z values")
    return xyz


def sample_surface(vertices: Tensor,  # [V, 3]
                   faces: Tensor,     # [F, 3] int64 in [0, V)
                   n: int, seed: int) -> Tensor:  # -> [n, 3]
    """``n`` points uniformly on a triangle mesh's surface (triangles by area, then uniform
    barycentric coordinates: sqrt(u) folds the unit square onto the triangle evenly)."""
    tri = vertices[faces].double()                                                  # [F, 3, 3]
    area = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]).norm(dim=-1)
    if not float(area.sum()) > 0:
        raise ValueError("the mesh has no surface area")
    g = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(area, n, replacement=True, generator=g)
    u, v = torch.rand(n, 1, generator=g, dtype=torch.float64), torch.rand(n, 1, generator=g, dtype=torch.float64)
    su = u.sqrt()
    t = tri[idx]
    return ((1 - su) * t[:, 0] + su * (1 - v) * t[:, 1] + su * v * t[:, 2]).float()


def read_geometry(path: str, n: int = SURFACE_POINTS, seed: int = 0) -> Tensor:  # -> [P, 3]
    """Reference points of a PLY file: a triangle mesh (header with ``element face``) gives ``n``
    surface samples (seeded), a point set its vertices. ValueError naming the file otherwise."""
    from fast3d.io import load_mesh_ply
    from fast3d.io.ply import _MAX_HEADER

    try:
        with open(path, "rb") as f:
            head = f.read(_MAX_HEADER)
        end = head.find(b"\nend_header\n")
        if end >= 0 and b"\nelement face " in head[:end + 1]:
            mesh = load_mesh_ply(path)
            if len(mesh["faces"]) == 0:
                pts = mesh["vertices"]
            else:
                pts = sample_surface(mesh["vertices"], mesh["faces"], n, seed)
        else:
            pts = _vertices_ply(path)
    except (OSError, MemoryError) as e:
        raise ValueError(f"geometry {path!r}: unreadable ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise ValueError(f"geometry {path!r}: {e}") from None
    if len(pts) == 0:
        raise ValueError(f"geometry {path!r} has no points")
    return pts


def _resize(s: dict, views: int, resolution: int, key: str) -> dict:
    V = s["images"].shape[0]
    if V < views:
        raise ValueError(f"object {key!r} has {V} views; need {views}")
    images, alphas, Ks = s["images"][:views], s["alphas"][:views], s["Ks"][:views].clone()
    H, W = images.shape[-2:]
    if H != W:
        raise ValueError(f"object {key!r}: views are {W}x{H}; evaluation takes square views")
    if H != resolution:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True,
                               align_corners=False).clamp(0, 1)
        alphas = F.interpolate(alphas, size=(resolution, resolution), mode="bilinear", antialias=True,
                               align_corners=False).clamp(0, 1)
        Ks[:, :2] *= resolution / H  # pixel centres at +0.5: continuous coordinates scale with the image
    return dict(images=images, alphas=alphas, viewmats=s["viewmats"][:views], Ks=Ks)


def is_object_folder(root: str) -> bool:
    """Whether ``root`` is a GSO-style folder: a directory with at least one <object>/views.json."""
    return os.path.isdir(root) and bool(glob.glob(os.path.join(glob.escape(root), "*", VIEWS_FILE)))


def iter_samples(data: str, views: int, resolution: int, skipped: list | None = None):
    """Evaluation samples (module docstring) of a GSO-style folder or of fast3d shards (a shard, or
    a directory of them, with reference geometry from ``assets/<key>.ply`` where present).

    Objects that fail to read are skipped: ``(key, reason)`` is appended to ``skipped``.
    """
    if is_object_folder(data):
        for folder in sorted(os.path.dirname(p) for p in glob.glob(os.path.join(glob.escape(data), "*", VIEWS_FILE))):
            key = os.path.basename(folder)
            try:
                s = read_views(folder)
                out = _resize(s, views, resolution, key)
                points = None
                if s["geometry"] is not None:
                    points = read_geometry(s["geometry"], seed=zlib.crc32(key.encode()))
            except ValueError as e:
                if skipped is not None:
                    skipped.append((key, str(e)))
                continue
            yield dict(out, key=key, caption=s["prompt"] or "", source="gso", points=points)
        return
    from fast3d.data.dataset import MultiViewDataset
    from fast3d.io import load_ply

    root = data if os.path.isdir(data) else os.path.dirname(data)
    for s in MultiViewDataset(data, views=views, resolution=resolution, rank=0, world_size=1):
        asset = os.path.join(root, "assets", f"{s['key']}.ply")
        points = None
        if os.path.isfile(asset):
            try:
                points = load_ply(asset)["means"]
            except ValueError as e:
                if skipped is not None:
                    skipped.append((s["key"], f"asset {asset!r}: {e}"))
                continue
        yield dict(s, points=points)


def read_prompts(path: str) -> list[str]:
    """A prompt list: ``.json`` (a list of strings, or of objects with a "prompt" string), ``.jsonl``
    (one such object or string a line), or text (one prompt a line; blank lines and lines starting
    with '#' skipped). ValueError for an empty list, a non-string or a duplicate prompt (CLIP-R
    retrieves a prompt among the set, so each must be distinct)."""
    if path.endswith((".json", ".jsonl")):
        if path.endswith(".json"):
            items = read_json(path, "prompt list")
            if not isinstance(items, list):
                raise ValueError(f"prompt list {path!r}: expected a JSON list; got {type(items).__name__}")
        else:
            items = []
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            items.append(json.loads(line.decode("utf-8")))
                        except (UnicodeDecodeError, ValueError) as e:
                            raise ValueError(f"prompt list {path!r} line {n}: not JSON ({str(e)[:60]})") from None
        prompts = []
        for i, it in enumerate(items):
            p = it.get("prompt") if isinstance(it, dict) else it
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt list {path!r}: item {i} is not a non-empty prompt string: {str(it)[:60]}")
            prompts.append(p.strip())
    else:
        if not os.path.isfile(path):
            raise ValueError(f"prompt list {path!r} is not a file")
        try:
            with open(path, "rb") as f:
                text = f.read(MAX_JSON_BYTES + 1).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"prompt list {path!r} is not UTF-8 text ({e})") from None
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not prompts:
        raise ValueError(f"prompt list {path!r} holds no prompts")
    seen = {}
    for i, p in enumerate(prompts):
        if p in seen:
            raise ValueError(f"prompt list {path!r}: prompt {i} repeats prompt {seen[p]} ({p[:60]!r})")
        seen[p] = i
    return prompts


def list_images(folder: str) -> list[str]:
    """The image files of a folder (by extension, sorted; not recursive)."""
    if not os.path.isdir(folder):
        raise ValueError(f"image folder {folder!r} is not a directory")
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n)))


def iter_image_folder(folder: str, skipped: list | None = None, batch: int = 32):
    """Batches [B, 3, H, W] (RGB in [0, 1], alpha over white) of a folder's images; images of another
    size than the batch's first start a new batch; unreadable files are skipped and appended to
    ``skipped`` as (path, reason)."""
    pending: list[Tensor] = []
    for p in list_images(folder):
        try:
            img = composite(read_image(p, name="reference image"), 1.0)
        except ValueError as e:
            if skipped is not None:
                skipped.append((p, str(e)))
            continue
        if pending and (img.shape != pending[0].shape or len(pending) == batch):
            yield torch.stack(pending)
            pending = []
        pending.append(img)
    if pending:
        yield torch.stack(pending)

