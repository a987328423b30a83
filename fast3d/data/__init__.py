"""The synthetic multi-view data engine: camera rigs, multi-view shards and the dataset reader
(procedural assets and batched rendering land with the rasterizer)."""

from fast3d.data import cameras
from fast3d.data.dataset import MultiViewDataset
from fast3d.data.shards import SOURCES, MultiViewSample, ShardWriter

__all__ = ["cameras", "MultiViewDataset", "MultiViewSample", "ShardWriter", "SOURCES"]
