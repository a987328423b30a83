"""The synthetic multi-view data engine: camera rigs (more to come with issue 6: procedural assets,
batched rendering, shards and the dataset reader)."""

from fast3d.data import cameras

__all__ = ["cameras"]
