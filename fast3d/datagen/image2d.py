"""`fast3d datagen images`: a folder of 2D images (SA-1B-like) -> ``image2d`` multi-view shards, the
third data source of TTR training (Bootstrap3D trains on high-quality SA-1B photos as "4 identical
views tiled" in the 2x2 grid, at small timesteps only, for texture detail).

Each readable image becomes one sample ``img2dNNNNNNNN`` (its index in the sorted file list): the
image composited over white (:func:`fast3d.io.images.composite`), centre-cropped to a square and
resized to ``resolution``, tiled into 4 identical views with identical front cameras, its alpha
likewise, the caption of the caption stage (:class:`fast3d.datagen.pipeline.stages.Recaptioner`,
BLIP from a local directory or ``random-tiny``), ``source=image2d``. Files are decoded with
:func:`fast3d.io.images.read_image` (untrusted input: pixel and byte limits before decoding); a file
that does not decode is skipped and counted, and the run goes on.

Resumable as the other generators: shard j holds files j*S .. j*S+S-1 of the sorted list; it
appears only once complete (its counts ``image2d-NNNNNN.json`` first, then the tar renamed into
place), so a rerun writes exactly the missing shards; ``dataset.json`` records the configuration
and the file list's digest, and another configuration or folder in the same directory is refused.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import tarfile
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from fast3d import cameras
from fast3d.data.shards import MultiViewSample, ShardWriter, claim_output
from fast3d.inference.common import default_device
from fast3d.io.atomic import atomic_path, write_atomic
from fast3d.io.images import composite, read_image

PREFIX = "image2d"
TILES = 4   # Bootstrap3D: one image as the 4 identical views of a 2x2 grid
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def list_images(folder: str) -> list[str]:
    """The image files under ``folder`` (recursively, by extension), sorted by relative path."""
    if not isinstance(folder, str) or not os.path.isdir(folder):
        raise ValueError(f"images must be a directory of image files; got {folder!r}, which is not a directory")
    files = [p for p in glob.glob(os.path.join(folder, "**", "*"), recursive=True)
             if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise ValueError(f"images {folder!r} holds no image files (extensions {list(IMAGE_EXTENSIONS)})")
    return sorted(files, key=lambda p: os.path.relpath(p, folder))


def square(rgba: Tensor,  # [4, H, W] straight alpha in [0, 1]
           resolution: int) -> tuple[Tensor, Tensor]:  # -> [3, R, R] over white, [1, R, R]
    """The centre square of an image, resized to ``resolution`` (antialiased), over white, and its alpha."""
    _, H, W = rgba.shape
    s = min(H, W)
    top, left = (H - s) // 2, (W - s) // 2
    crop = rgba[:, top:top + s, left:left + s]
    rgb = composite(crop)                                                          # [3, s, s]
    x = torch.cat([rgb, crop[3:]])[None]
    if s != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    x = x[0].clamp(0, 1)
    return x[:3], x[3:]


def _shard_path(out: str, j: int, ext: str = "tar") -> str:
    return os.path.join(out, f"{PREFIX}-{j:06d}.{ext}")


def _manifest(folder: str, files: list[str], resolution: int, samples_per_shard: int, caption_model: str,
              max_tokens: int) -> dict:
    digest = hashlib.sha256("\n".join(os.path.relpath(p, folder) for p in files).encode()).hexdigest()
    return {"kind": "image2d", "config": {"resolution": resolution, "samples_per_shard": samples_per_shard,
                                         "caption_model": caption_model, "max_tokens": max_tokens,
                                         "files": len(files), "files_sha256": digest}}


def _write_shard(out: str, j: int, samples: list[MultiViewSample], counts: dict) -> None:
    write_atomic(_shard_path(out, j, "json"), json.dumps(counts).encode())
    if samples:
        with ShardWriter(out, prefix=PREFIX, samples_per_shard=len(samples), start_index=j) as w:
            for s in samples:
                w.write(s)
        return
    with atomic_path(_shard_path(out, j)) as tmp, tarfile.open(tmp, "w"):   # every file unreadable
        pass


def images_to_shards(images: str, out: str, caption_model: str, resolution: int = 512, samples_per_shard: int = 256,
                     max_tokens: int = 40, batch_size: int = 16, device: str | None = None,
                     progress: bool = True) -> dict:
    """Turn the image files under ``images`` into ``image2d`` shards in ``out`` (module docstring).

    Args:
        images: the folder of images (searched recursively).
        out: the output directory (created; a rerun continues it).
        caption_model: a local BLIP directory or ``"random-tiny"`` (the caption stage's model).
        resolution: the side of the square views.
        samples_per_shard: files per shard.
        max_tokens: caption length limit.
        batch_size: images per captioning call.
        device: where the captioner runs (default: CUDA when there is one).
        progress: show a progress bar on stderr.

    Returns:
        counts: shards_written, shards_skipped, written (samples in the shards written now),
        unreadable (files skipped now), unreadable_files (their paths), seconds; and over every
        shard of the dataset: total_samples, total_unreadable.
    """
    from fast3d.datagen.pipeline.stages import Recaptioner, check_model_source

    for name, value in (("resolution", resolution), ("samples_per_shard", samples_per_shard),
                        ("max_tokens", max_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    check_model_source("caption_model", caption_model)
    files = list_images(images)
    claim_output(out, _manifest(images, files, resolution, samples_per_shard, caption_model, max_tokens), PREFIX)
    n_shards = -(-len(files) // samples_per_shard)
    for tmp in glob.glob(os.path.join(out, f".{PREFIX}-*")):  # a killed run's temporary files
        os.unlink(tmp)
    todo = [j for j in range(n_shards) if not os.path.exists(_shard_path(out, j))]
    t0 = time.perf_counter()
    written, unreadable = 0, []
    if todo:
        dev = default_device(device)
        captioner = Recaptioner(caption_model, max_tokens, dev)
        viewmats, Ks = cameras.turntable(1, resolution, elevation_deg=0.0)
        viewmats, Ks = viewmats.float().expand(TILES, 4, 4).clone(), Ks.float().expand(TILES, 3, 3).clone()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(min(samples_per_shard, len(files) - j * samples_per_shard) for j in todo),
                       unit="image", desc="datagen images", file=sys.stderr, dynamic_ncols=True)
        try:
            for j in todo:
                indices = range(j * samples_per_shard, min((j + 1) * samples_per_shard, len(files)))
                views, keys, bad = [], [], []
                for i in indices:
                    try:
                        views.append(square(read_image(files[i], name=files[i]), resolution))
                        keys.append(f"img2d{i:08d}")
                    except ValueError as e:
                        bad.append(files[i])
                        print(f"fast3d datagen images: skipping {e}", file=sys.stderr)
                    if bar is not None:
                        bar.update(1)
                captions = []
                for b in range(0, len(views), batch_size):
                    captions += captioner(torch.stack([rgb for rgb, _ in views[b:b + batch_size]]))
                samples = [MultiViewSample(key=k, images=rgb.expand(TILES, -1, -1, -1).contiguous(),
                                           alphas=a.expand(TILES, -1, -1, -1).contiguous(), viewmats=viewmats,
                                           Ks=Ks, caption=c, source="image2d")
                           for k, (rgb, a), c in zip(keys, views, captions)]
                _write_shard(out, j, samples, {"samples": len(samples), "unreadable": [os.path.relpath(p, images)
                                                                                       for p in bad]})
                written, unreadable = written + len(samples), unreadable + bad
        finally:
            if bar is not None:
                bar.close()
    totals = {"total_samples": 0, "total_unreadable": 0}
    for j in range(n_shards):
        with open(_shard_path(out, j, "json"), "rb") as f:
            c = json.loads(f.read())
        totals["total_samples"] += int(c["samples"])
        totals["total_unreadable"] += len(c["unreadable"])
    return {"shards_written": len(todo), "shards_skipped": n_shards - len(todo), "written": written,
            "unreadable": len(unreadable), "unreadable_files": unreadable, "seconds": time.perf_counter() - t0,
            **totals}
