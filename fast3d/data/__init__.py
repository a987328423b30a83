"""Multi-view data at rest: the tar shard format (shards: samples, the atomic ShardWriter, the
background colour the views were composited over) and its reader (MultiViewDataset). Camera
geometry is fast3d.cameras; what writes shards (procedural assets, the pretrained pipeline, the
quality filter) is fast3d.datagen."""

from fast3d.data.dataset import MultiViewDataset
from fast3d.data.shards import SOURCES, MultiViewSample, ShardWriter

__all__ = ["MultiViewDataset", "MultiViewSample", "ShardWriter", "SOURCES"]
