"""Multi-view dataset shards: tar files a WebDataset reader can read, written atomically.

One sample is a group of tar members sharing a key (the member name up to its first dot, as
WebDataset groups them):

    <key>.rgb_00.png ... <key>.rgb_{V-1}.png      8-bit RGB views
    <key>.alpha_00.png ...                         8-bit alpha of each view
    <key>.cameras.json                             {"viewmats": [V][4][4] OpenCV world-to-camera,
                                                    "Ks": [V][3][3] pixels, "width": W, "height": H}
    <key>.caption.txt                              UTF-8 caption
    <key>.meta.json                                {"source": "synthetic"|"rendered3d"|"image2d"|"boost",
                                                    "quality": float, "elevation": float|null}

The RGB views are composited over one background colour per sample (the procedural generator's:
white, or one random colour per object); :func:`background_color` reads it back from the empty
pixels.

A shard is written to a hidden temporary file and renamed into place when complete, so a crash
never leaves a half-written shard under a shard's name. The reader treats every file as untrusted:
a malformed sample or shard is skipped with a warning that names it, and counted.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fast3d.io.atomic import atomic_open, temp_path
from fast3d.io.images import to_uint8

SOURCES = ("synthetic", "rendered3d", "image2d", "boost")
MAX_MEMBER_BYTES = 64 * 2**20     # one PNG or JSON member; larger is treated as hostile
MAX_IMAGE_SIDE = 8192
MAX_VIEWS = 256
EMPTY_ALPHA = 0.01                # pixels with less alpha than this show the background alone
_KEY = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")


@dataclass
class MultiViewSample:
    key: str                 # unique within a dataset: letters, digits, '_' and '-'
    images: Tensor           # [V, 3, H, W] in [0, 1]
    alphas: Tensor           # [V, 1, H, W] in [0, 1]
    viewmats: Tensor         # [V, 4, 4] world-to-camera, OpenCV axes
    Ks: Tensor               # [V, 3, 3] pinhole intrinsics, pixels
    caption: str
    source: str              # one of SOURCES
    quality: float = 1.0
    elevation: float | None = None  # radians

    def validate(self) -> None:
        if not isinstance(self.key, str) or not _KEY.match(self.key):
            raise ValueError(f"key must be 1-128 letters, digits, '_' or '-'; got {self.key!r}")
        if self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must have shape [V, 3, H, W]; got {tuple(self.images.shape)}")
        V, _, H, W = self.images.shape
        if not 1 <= V <= MAX_VIEWS or not (1 <= H <= MAX_IMAGE_SIDE and 1 <= W <= MAX_IMAGE_SIDE):
            raise ValueError(f"images must have 1..{MAX_VIEWS} views of 1..{MAX_IMAGE_SIDE} px; got {(V, H, W)}")
        for name, t, shape in (("alphas", self.alphas, (V, 1, H, W)), ("viewmats", self.viewmats, (V, 4, 4)),
                               ("Ks", self.Ks, (V, 3, 3))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}; got {tuple(t.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} must be finite")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}; got {self.source!r}")
        if not math.isfinite(float(self.quality)):
            raise ValueError(f"quality must be finite; got {self.quality!r}")


def png_bytes(img: Tensor) -> bytes:  # [C, H, W] in [0, 1] -> PNG bytes
    """A shard member's PNG: ``img`` (1 channel: grey, 3: RGB) rounded to 8 bits.

    Args:
        img: the image.

    Returns:
        The encoded file.
    """
    from PIL import Image

    arr = to_uint8(img)
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_sample(s: MultiViewSample) -> dict[str, bytes]:
    """Tar member suffix -> bytes for one sample (PNG encoding happens here)."""
    s.validate()
    V, _, H, W = s.images.shape
    out = {}
    for v in range(V):
        out[f"rgb_{v:02d}.png"] = png_bytes(s.images[v])
        out[f"alpha_{v:02d}.png"] = png_bytes(s.alphas[v])
    out["cameras.json"] = json.dumps({"viewmats": s.viewmats.double().tolist(), "Ks": s.Ks.double().tolist(),
                                      "width": W, "height": H}).encode()
    out["caption.txt"] = s.caption.encode("utf-8")
    out["meta.json"] = json.dumps({"source": s.source, "quality": float(s.quality),
                                   "elevation": None if s.elevation is None else float(s.elevation)}).encode()
    return out


class ShardWriter:
    """Writes samples into `<out_dir>/<prefix>-NNNNNN.tar`, `samples_per_shard` each; a shard
    appears under its name only once complete (temporary file, then an atomic rename)."""

    def __init__(self, out_dir: str, prefix: str = "shard", samples_per_shard: int = 256, start_index: int = 0):
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be positive; got {samples_per_shard}")
        if not _KEY.match(prefix):
            raise ValueError(f"prefix must be letters, digits, '_' or '-'; got {prefix!r}")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.prefix, self.per_shard = out_dir, prefix, samples_per_shard
        self.index = start_index
        self.written: list[str] = []   # completed shard paths
        self._tar = self._tmp = None
        self._count = 0
        self._keys: set[str] = set()

    def shard_path(self, index: int) -> str:
        return os.path.join(self.out_dir, f"{self.prefix}-{index:06d}.tar")

    def write(self, sample: MultiViewSample | dict[str, bytes], key: str | None = None) -> None:
        """Add one sample: a MultiViewSample, or members already encoded by `encode_sample`."""
        members = encode_sample(sample) if isinstance(sample, MultiViewSample) else sample
        key = sample.key if isinstance(sample, MultiViewSample) else key
        if key is None or not _KEY.match(key):
            raise ValueError(f"key must be 1-128 letters, digits, '_' or '-'; got {key!r}")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in this writer")
        if self._tar is None:
            self._tmp = temp_path(self.shard_path(self.index))
            self._tar = tarfile.open(self._tmp, "w")
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.add(key)
        self._count += 1
        if self._count == self.per_shard:
            self._finish()

    def _finish(self) -> None:
        self._tar.close()
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        path = self.shard_path(self.index)
        os.replace(self._tmp, path)
        self.written.append(path)
        self._tar, self._tmp, self._count = None, None, 0
        self.index += 1

    def close(self) -> None:
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the shard in progress (its temporary file), keeping the completed ones."""
        if self._tar is not None:
            self._tar.close()
            os.unlink(self._tmp)
            self._tar, self._tmp, self._count = None, None, 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --- reading ---------------------------------------------------------------------------------------


class SampleError(ValueError):
    """A sample's members are missing or malformed."""


def iter_tar_groups(path: str):
    """(key, {suffix: bytes}) for each group of consecutive members sharing a key. Only regular
    files are read, never extracted; names with a directory part are ignored."""
    with tarfile.open(path, "r:") as tar:
        key, group = None, {}
        for m in tar:
            if not m.isfile() or "/" in m.name or "\\" in m.name:
                continue
            if m.size > MAX_MEMBER_BYTES:
                raise SampleError(f"member {m.name!r} is {m.size} bytes (limit {MAX_MEMBER_BYTES})")
            k, _, suffix = m.name.partition(".")
            if k != key:
                if key is not None:
                    yield key, group
                key, group = k, {}
            group[suffix] = tar.extractfile(m).read()
        if key is not None:
            yield key, group


def _decode_png(data: bytes, channels: int, name: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG":
                raise SampleError(f"{name} is {im.format}, not PNG")
            if max(im.size) > MAX_IMAGE_SIDE:
                raise SampleError(f"{name} is {im.size[0]}x{im.size[1]} (limit {MAX_IMAGE_SIDE})")
            arr = np.asarray(im.convert("RGB" if channels == 3 else "L"))
    except SampleError:
        raise
    except Exception as e:  # PIL raises many types on corrupt data
        raise SampleError(f"{name}: not a readable PNG ({type(e).__name__}: {e})") from None
    return arr if arr.ndim == 3 else arr[..., None]


def _matrix_list(obj, name: str, V: int, n: int) -> Tensor:
    try:
        t = torch.tensor(obj, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise SampleError(f"cameras.json {name}: not a numeric array ({e})") from None
    if tuple(t.shape) != (V, n, n):
        raise SampleError(f"cameras.json {name} must be [{V}][{n}][{n}]; got {list(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise SampleError(f"cameras.json {name} has non-finite values")
    return t.float()


def decode_sample(key: str, group: dict[str, bytes]) -> MultiViewSample:
    """Members of one sample -> MultiViewSample; SampleError naming what is wrong."""
    for need in ("cameras.json", "meta.json", "caption.txt", "rgb_00.png"):
        if need not in group:
            raise SampleError(f"missing {key}.{need}")
    try:
        cams = json.loads(group["cameras.json"])
        meta = json.loads(group["meta.json"])
        caption = group["caption.txt"].decode("utf-8")
    except (ValueError, UnicodeDecodeError) as e:
        raise SampleError(f"unreadable metadata: {type(e).__name__}: {e}") from None
    if not isinstance(cams, dict) or not isinstance(meta, dict):
        raise SampleError("cameras.json and meta.json must hold JSON objects")
    V = sum(1 for k in group if re.fullmatch(r"rgb_\d{2,3}\.png", k))
    if not 1 <= V <= MAX_VIEWS:
        raise SampleError(f"{V} views (limit {MAX_VIEWS})")
    rgb, alpha = [], []
    for v in range(V):
        r, a = group.get(f"rgb_{v:02d}.png"), group.get(f"alpha_{v:02d}.png")
        if r is None or a is None:
            raise SampleError(f"view {v}: missing rgb_{v:02d}.png or alpha_{v:02d}.png")
        rgb.append(_decode_png(r, 3, f"rgb_{v:02d}.png"))
        alpha.append(_decode_png(a, 1, f"alpha_{v:02d}.png"))
    shapes = {x.shape[:2] for x in rgb + alpha}
    if len(shapes) != 1:
        raise SampleError(f"views differ in size: {sorted(shapes)}")
    (H, W), = shapes
    if (cams.get("width"), cams.get("height")) != (W, H):
        raise SampleError(f"cameras.json says {cams.get('width')}x{cams.get('height')}, images are {W}x{H}")
    source = meta.get("source")
    if source not in SOURCES:
        raise SampleError(f"meta.json source must be one of {SOURCES}; got {source!r}")
    quality, elevation = meta.get("quality", 1.0), meta.get("elevation")
    if isinstance(quality, bool) or not isinstance(quality, (int, float)) or not math.isfinite(quality):
        raise SampleError(f"meta.json quality must be a finite number; got {quality!r}")
    if elevation is not None and (isinstance(elevation, bool) or not isinstance(elevation, (int, float))
                                  or not math.isfinite(elevation)):
        raise SampleError(f"meta.json elevation must be a finite number or null; got {elevation!r}")
    images = torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float() / 255
    alphas = torch.from_numpy(np.stack(alpha)).permute(0, 3, 1, 2).float() / 255
    return MultiViewSample(key=key, images=images, alphas=alphas,
                           viewmats=_matrix_list(cams.get("viewmats"), "viewmats", V, 4),
                           Ks=_matrix_list(cams.get("Ks"), "Ks", V, 3), caption=caption, source=source,
                           quality=float(quality), elevation=None if elevation is None else float(elevation))


def background_color(images: Tensor,   # [B, V, 3, H, W] composited over one colour per sample
                     alphas: Tensor,   # [B, V, 1, H, W]
                     ) -> Tensor:      # -> [B, 3]
    """The colour each sample's views were composited over: the mean of its empty pixels (alpha
    below EMPTY_ALPHA), white where no pixel is empty."""
    empty = (alphas < EMPTY_ALPHA).to(images.dtype)
    n = empty.sum((1, 3, 4))                                                   # [B, 1]
    total = (images * empty).sum((1, 3, 4))                                    # [B, 3]
    return torch.where(n > 0, total / n.clamp_min(1), torch.ones_like(total))


def warn_skipped(what: str, why: str) -> None:
    warnings.warn(f"fast3d.data: skipping {what}: {why}", RuntimeWarning, stacklevel=3)


DATASET_MANIFEST = "dataset.json"


def claim_output(out: str, manifest: dict, prefix: str, also_ours: tuple = ()) -> None:
    """Make directory ``out`` hold the dataset that ``manifest`` (JSON-able) describes, or check that it
    already does: a generator's rerun continues its own dataset and never mixes in another. The
    manifest is written to ``out/dataset.json`` atomically; a directory without one must hold only
    the generator's shards (``prefix-*``, their temporary files) and ``also_ours``."""
    path = os.path.join(out, DATASET_MANIFEST)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out must be a directory; got {out!r}, which is a file")
    if os.path.exists(path):
        try:
            with open(path) as f:
                theirs = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is unreadable ({e}); refusing to write into {out}") from None
        if theirs != manifest:
            raise ValueError(f"out {out!r} holds another dataset ({path} records {theirs}, this configuration is "
                             f"{manifest}); use another output directory or the same configuration")
        return
    os.makedirs(out, exist_ok=True)
    foreign = [n for n in os.listdir(out)
               if n not in also_ours and not n.startswith((f"{prefix}-", f".{prefix}-"))]
    if foreign:
        raise ValueError(f"out {out!r} is not empty and holds no {DATASET_MANIFEST} (found {sorted(foreign)[:5]}); "
                         f"refusing to mix datasets")
    with atomic_open(path) as f:
        json.dump(manifest, f, indent=1)
