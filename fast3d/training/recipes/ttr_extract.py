"""``fast3d train ttr-extract``: the feature cache a ``ttr`` run trains on, encoded from its raw
multi-view shards with the VAE and text encoder of the run's model config."""

from __future__ import annotations

from fast3d.training import feature_cache
from fast3d.training.config import RunConfig
from fast3d.training.recipes.ttr import sections


def extract_features(cfg: RunConfig, out: str | None = None, rank: int = 0, world_size: int = 1,
                     progress: bool = True) -> dict:
    """``fast3d train ttr-extract``: encode ``data.raw`` into the feature cache ``data.cache`` (or
    ``out``) with the VAE and text encoder of the config's model, ``cfg.batch_size`` grids at a time,
    each grid of the views nearest to ``data.grid_azimuths``;
    this rank's shards of ``world_size``. Returns :func:`feature_cache.extract`'s counts."""
    model, d, _, _ = sections(cfg)
    if not isinstance(d.raw, str) or not d.raw:
        raise ValueError(f"data.raw must name the multi-view shards to extract; got {d.raw!r}")
    return feature_cache.extract(cfg.path(d.raw), out or cfg.path(d.cache), model, batch_size=cfg.batch_size,
                                 rank=rank, world_size=world_size, progress=progress,
                                 grid_azimuths=d.grid_azimuths)
