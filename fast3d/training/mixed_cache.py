"""The training stream of the ``ttr`` recipe: samples of a feature cache
(:class:`fast3d.training.feature_cache.FeatureCacheDataset`) with their sources mixed by the TTR
sampler's weights, exactly resumable (every draw is a pure function of seed, epoch and reader)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os

import torch

from fast3d.training import feature_cache
from fast3d.training.feature_cache import FeatureCacheDataset, FeatureCacheError
from fast3d.training.ttr import SOURCES, TTRConfig, TTRSampler


def check_mix(cache: str, manifest: dict, ttr: TTRConfig) -> list[str]:
    """The sources the mix draws (positive weight); ValueError if the cache has no samples of one."""
    counts = {s: int(manifest["sources"].get(s, 0)) for s in SOURCES}
    mixed = [s for s in SOURCES if ttr.source_weights.get(s, 0) > 0]
    absent = {s: ttr.source_weights[s] for s in mixed if counts[s] == 0}
    if absent:
        raise ValueError(f"data.cache {cache!r} has no samples of the source(s) {sorted(absent)} that "
                         f"loss.ttr.source_weights asks for ({absent}); the cache holds {counts}. Set their weight "
                         f"to 0 or add such data")
    return mixed


def _seed(*parts) -> int:
    """A 63-bit generator seed from a tuple of ints and strings (no collisions in practice)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


def _shuffled(items, size: int, gen: torch.Generator):
    """``items`` through a shuffle buffer of ``size`` drawn from ``gen``."""
    buf = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = int(torch.randint(size, (1,), generator=gen))
        yield buf[j]
        buf[j] = x
    for j in torch.randperm(len(buf), generator=gen).tolist():
        yield buf[j]


class MixedCacheStream(FeatureCacheDataset):
    """The training stream of one rank: FeatureCacheDataset samples, sources mixed by ``sampler``.

    An epoch of a reader (rank x DataLoader worker) is ``len(mixed samples) // readers`` samples;
    each draws its source from the mix weights (``sampler.sample_sources``, generator of (seed,
    epoch, reader)) and takes the next sample of that source's stream. A source stream makes passes
    over the shards holding the source (per-shard counts from the cache's ``features-*.json``), in
    an order drawn per (seed, epoch, source, pass) and the same on every reader; a reader takes every
    ``readers``-th shard of it (or, with fewer shards than readers, every ``readers``-th sample), then
    a shuffle buffer of (seed, epoch, source, pass, reader). A source is repeated or left partly unread
    in an epoch as its weight and size dictate; the next epoch starts new passes in a new order.
    """

    def __init__(self, path: str, expect_vae: str | None, expect_text: str | None, sampler: TTRSampler,
                 seed: int, shuffle_buffer: int, rank: int | None = None, world_size: int | None = None):
        super().__init__(path, expect_vae, expect_text, rank, world_size)
        self.sampler, self.seed, self.shuffle_buffer, self.epoch = sampler, seed, shuffle_buffer, 0
        self.mixed = check_mix(path, self.manifest, sampler.config)
        self.counts = {s: int(self.manifest["sources"][s]) for s in self.mixed}
        per_shard = {sh: self._shard_sources(sh) for sh in self.shards}
        self.by_source = {s: [sh for sh in self.shards if per_shard[sh][s] > 0] for s in self.mixed}

    def _shard_sources(self, shard: str) -> dict:
        f = shard[: -len(".tar")] + ".json"
        try:
            with open(f, "rb") as fh:
                counts = json.loads(fh.read())["sources"]
            out = {s: int(counts[s]) for s in SOURCES}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FeatureCacheError(f"{f}: unreadable per-source counts ({type(e).__name__}: {e})") from None
        if sum(out.values()) != self.manifest["shards"][os.path.basename(shard)]:
            raise FeatureCacheError(f"{f}: per-source counts {out} do not add up to the manifest's count of the shard")
        return out

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Samples of the mixed sources in the whole cache (all readers together)."""
        return sum(self.counts.values())

    def _entries(self, shards: list[str], source: str, reader: int, readers: int):
        """This reader's samples of ``source`` in ``shards`` (in that order)."""
        by_shard = len(shards) >= readers
        index = -1
        for shard in shards[reader::readers] if by_shard else shards:
            count = 0
            for key, group in feature_cache._iter_groups(shard):
                count += 1
                sample = self._decode(shard, key, group)
                if sample["source"] != source:
                    continue
                index += 1
                if by_shard or index % readers == reader:
                    yield sample
            if count != self.manifest["shards"][os.path.basename(shard)]:
                raise FeatureCacheError(f"shard {shard} has {count} entries; the manifest says "
                                        f"{self.manifest['shards'][os.path.basename(shard)]}")

    def _source_stream(self, source: str, reader: int, readers: int):
        shards = self.by_source[source]
        for n in itertools.count():
            order = [shards[i] for i in torch.randperm(len(shards), generator=_generator(
                self.seed, self.epoch, source, n)).tolist()]
            yield from _shuffled(self._entries(order, source, reader, readers), self.shuffle_buffer,
                                 _generator(self.seed, self.epoch, source, n, reader))

    def __iter__(self):
        reader, readers = self._reader()
        few = {s: n for s, n in self.counts.items() if n < readers}
        if few:
            raise ValueError(f"data.cache {self.path!r}: source(s) {few} have fewer samples than the {readers} "
                             f"readers (ranks x data_workers), so some reader would get none of them")
        ids = self.sampler.sample_sources(len(self) // readers, _generator(self.seed, self.epoch, "mix", reader))
        streams = {}
        for i in ids.tolist():
            s = SOURCES[i]
            if s not in streams:
                streams[s] = self._source_stream(s, reader, readers)
            yield next(streams[s])
