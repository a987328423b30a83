"""What the ``lrm`` recipe reads: the samples of its multi-view shards whose source is one of
``data.sources`` (pre-training on synthetic data, fine-tuning on rendered 3D assets), and the
check, before the first step, that the data holds some."""

from __future__ import annotations

import json
import tarfile

from torch.utils.data import IterableDataset

from fast3d.data.dataset import MultiViewDataset


def _shard_sources(shard: str, wanted: set) -> set:
    """The sources of the samples in a shard, read from their meta.json members alone; stops at
    the first source in ``wanted``. An unreadable shard has none (training would skip it too)."""
    seen: set = set()
    try:
        with tarfile.open(shard, "r:") as tar:
            for m in tar:
                if not (m.isfile() and m.name.endswith(".meta.json") and m.size <= 1 << 20):
                    continue
                try:
                    source = json.loads(tar.extractfile(m).read()).get("source")
                except (ValueError, AttributeError):
                    continue
                seen.add(source)
                if source in wanted:
                    break
    except (tarfile.TarError, OSError):
        pass
    return seen


def check_sources(paths: list[str], sources: tuple) -> None:
    """ValueError unless every path holds some sample of one of ``sources``."""
    wanted = set(sources)
    for p in paths:
        try:
            shards = MultiViewDataset(p).shards
        except ValueError as e:
            raise ValueError(f"data.train: {e}") from None
        seen: set = set()
        for shard in shards:
            seen |= _shard_sources(shard, wanted)
            if seen & wanted:
                break
        else:
            raise ValueError(f"data.train {p!r} holds no sample of data.sources {list(sources)}; its samples are "
                             f"{sorted(map(str, seen)) or 'none readable'}")


class SourceFiltered(IterableDataset):
    """The samples of a MultiViewDataset whose source is one of ``sources``, as the loss reads them."""

    def __init__(self, data: MultiViewDataset, sources: tuple):
        self.data, self.sources = data, set(sources)

    def set_epoch(self, epoch: int) -> None:
        self.data.set_epoch(epoch)

    def __iter__(self):
        for s in self.data:
            if s["source"] in self.sources:
                yield {k: s[k] for k in ("images", "alphas", "viewmats", "Ks", "key")}
