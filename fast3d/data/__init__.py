"""The synthetic multi-view data engine: camera rigs (cameras), procedural Gaussian assets
(assets), multi-view tar shards and their reader (shards, MultiViewDataset), and the resumable
`fast3d datagen procedural` generator (procedural)."""

from fast3d.data import cameras
from fast3d.data.dataset import MultiViewDataset
from fast3d.data.shards import SOURCES, MultiViewSample, ShardWriter

__all__ = ["cameras", "MultiViewDataset", "MultiViewSample", "ShardWriter", "SOURCES"]
