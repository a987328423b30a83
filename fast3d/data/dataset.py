"""`MultiViewDataset`: reads multi-view shards (fast3d.data.shards) for training.

Each DataLoader worker of each distributed rank reads a disjoint part: whole shards when there are
at least as many shards as readers, otherwise every reader opens every shard and keeps one sample in
`readers`. A malformed sample or shard is skipped with a warning naming it, never fatal.
"""

from __future__ import annotations

import glob
import os
import tarfile
import zlib

import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from fast3d.data.shards import SampleError, decode_sample, iter_tar_groups, warn_skipped


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def reader_index(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(this reader, all readers): one reader per DataLoader worker of each distributed rank."""
    rank, world = _rank_world(rank, world_size)
    info = get_worker_info()
    wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
    return rank * nworkers + wid, world * nworkers


class MultiViewDataset(IterableDataset):
    """Yields dicts: images [V, 3, R, R] in [0, 1], alphas [V, 1, R, R], viewmats [V, 4, 4],
    Ks [V, 3, 3] (scaled to R), caption, source, quality, elevation (NaN when unknown), key.

    `views`: samples with more views give their first `views` (or a random subset, seeded by the
    sample key, `seed` and the epoch of `set_epoch`, with `random_views=True`); `image2d` samples (one image) are tiled into `views`
    identical views (Bootstrap3D); other samples with fewer views are skipped with a warning.
    """

    def __init__(self, path: str | list, views: int = 4, resolution: int = 256, random_views: bool = False,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None):
        if views <= 0:
            raise ValueError(f"views must be positive; got {views}")
        if resolution <= 0:
            raise ValueError(f"resolution must be positive; got {resolution}")
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise ValueError(f"rank and world_size must be given together with 0 <= rank < world_size; "
                             f"got rank={rank}, world_size={world_size}")
        paths = [path] if isinstance(path, str) else list(path)
        shards = []
        for p in paths:
            if os.path.isdir(p):
                shards += sorted(glob.glob(os.path.join(p, "*.tar")))
            elif os.path.isfile(p):
                shards.append(p)
            else:
                raise ValueError(f"path {p!r} is neither a shard nor a directory of shards")
        if not shards:
            raise ValueError(f"no .tar shards under {paths}")
        self.shards, self.views, self.resolution = shards, views, resolution
        self.random_views, self.seed = random_views, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw other random view subsets this epoch (call before iterating, as with samplers)."""
        self.epoch = int(epoch)

    def _reader(self) -> tuple[int, int]:
        return reader_index(self.rank, self.world_size)

    def __iter__(self):
        reader, readers = self._reader()
        by_shard = len(self.shards) >= readers
        shards = self.shards[reader::readers] if by_shard else self.shards
        index = -1
        for shard in shards:
            try:
                for key, group in iter_tar_groups(shard):
                    index += 1
                    if not by_shard and index % readers != reader:
                        continue
                    try:
                        out = self._prepare(decode_sample(key, group))
                    except SampleError as e:
                        warn_skipped(f"sample {key!r} in {shard}", str(e))
                        continue
                    if out is not None:
                        yield out
            except (tarfile.TarError, SampleError, OSError, EOFError) as e:
                warn_skipped(f"the rest of shard {shard}", f"{type(e).__name__}: {e}")

    def _prepare(self, s) -> dict | None:
        V = s.images.shape[0]
        if V < self.views:
            if s.source != "image2d":
                warn_skipped(f"sample {s.key!r}", f"it has {V} views, fewer than views={self.views}")
                return None
            idx = torch.zeros(self.views, dtype=torch.long)
        elif self.random_views:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 4_294_967_311
                                              + zlib.crc32(s.key.encode()))
            idx = torch.randperm(V, generator=g)[: self.views]
        else:
            idx = torch.arange(self.views)
        images, alphas, Ks = s.images[idx], s.alphas[idx], s.Ks[idx].clone()
        H, W = images.shape[-2:]
        R = self.resolution
        if (H, W) != (R, R):
            images = F.interpolate(images, size=(R, R), mode="bilinear", antialias=True, align_corners=False)
            alphas = F.interpolate(alphas, size=(R, R), mode="bilinear", antialias=True, align_corners=False)
            # Pixel centres at +0.5: continuous image coordinates scale exactly with the image.
            Ks[:, 0] *= R / W
            Ks[:, 1] *= R / H
        return dict(images=images.clamp(0, 1), alphas=alphas.clamp(0, 1), viewmats=s.viewmats[idx], Ks=Ks,
                    caption=s.caption, source=s.source, quality=s.quality,
                    elevation=float("nan") if s.elevation is None else s.elevation, key=s.key)
