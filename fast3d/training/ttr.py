"""Training Timestep Reschedule (TTR, Bootstrap3D): each data source trains only the denoising
timesteps where it helps.

Large t shape the global structure, small t the texture. So, with T training timesteps:

* ``synthetic`` multi-view data (video-diffusion views, slightly blurry): t in [200, T) only —
  structure and view consistency, never texture;
* ``image2d`` single images tiled into identical views: t in [0, 50) only — texture detail only;
* ``rendered3d`` views of real 3D assets: unrestricted, but a share of them is drawn from
  [50, 200) so that band is sampled more often than a uniform draw would.

Per sample, t is uniform over its source's interval. The paper fixes the thresholds (200 from its
ablation; 50; T = 1000) but not the rendered3d share: 0.5 here, which makes [50, 200) about 7.7x
denser than the rest for rendered data. The mix of sources in a batch is set by `source_weights`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fast3d.data import shards

# TTR's three data sources (Bootstrap3D): the shard source tags it trains on, in id order. Shards
# carry other tags too (``boost``: MVBoost's pseudo ground truth), which TTR does not mix.
SOURCES = ("synthetic", "rendered3d", "image2d")
assert set(SOURCES) <= set(shards.SOURCES), "a TTR source the shard format does not know"


@dataclass(frozen=True)
class TTRConfig:
    num_train_timesteps: int = 1000
    synthetic_min_t: int = 200                    # synthetic: [synthetic_min_t, T)
    image2d_max_t: int = 50                       # image2d: [0, image2d_max_t)
    rendered3d_band: tuple = (50, 200)            # the band rendered3d samples favour
    rendered3d_band_share: float = 0.5            # share of rendered3d samples drawn from the band
    source_weights: dict = field(default_factory=lambda: {"synthetic": 1.0, "rendered3d": 1.0, "image2d": 1.0})

    def __post_init__(self):
        T = self.num_train_timesteps
        if not isinstance(T, int) or T < 2:
            raise ValueError(f"num_train_timesteps must be an int >= 2; got {T!r}")
        if not 0 <= self.synthetic_min_t < T:
            raise ValueError(f"synthetic_min_t must be in [0, {T}); got {self.synthetic_min_t}")
        if not 0 < self.image2d_max_t <= T:
            raise ValueError(f"image2d_max_t must be in (0, {T}]; got {self.image2d_max_t}")
        lo, hi = self.rendered3d_band
        if not 0 <= lo < hi <= T:
            raise ValueError(f"rendered3d_band must satisfy 0 <= lo < hi <= {T}; got {self.rendered3d_band}")
        if not 0.0 <= self.rendered3d_band_share <= 1.0:
            raise ValueError(f"rendered3d_band_share must be in [0, 1]; got {self.rendered3d_band_share}")
        unknown = set(self.source_weights) - set(SOURCES)
        if unknown:
            raise ValueError(f"source_weights has unknown sources {sorted(unknown)}; valid: {', '.join(SOURCES)}")
        if any(w < 0 for w in self.source_weights.values()) or sum(self.source_weights.values()) <= 0:
            raise ValueError(f"source_weights must be >= 0 with a positive sum; got {self.source_weights}")

    @classmethod
    def from_dict(cls, d: dict) -> TTRConfig:
        """From a config mapping (e.g. the `ttr:` section of a YAML file); unknown keys are errors."""
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown TTR config keys {sorted(unknown)}; valid: {', '.join(sorted(known))}")
        d = dict(d)
        if "rendered3d_band" in d:
            d["rendered3d_band"] = tuple(d["rendered3d_band"])
        return cls(**d)


class TTRSampler:
    """Draws sources for a batch (by `source_weights`) and a timestep per sample (by source)."""

    def __init__(self, config: TTRConfig | None = None):
        self.config = config or TTRConfig()
        c = self.config
        T = c.num_train_timesteps
        # Per source id (index into SOURCES): the restricted interval [lo, hi).
        self._lo = torch.tensor([c.synthetic_min_t, 0, 0])
        self._hi = torch.tensor([T, T, c.image2d_max_t])

    @staticmethod
    def source_ids(sources) -> Tensor:
        """Source names (or ids) -> ids [B] into SOURCES."""
        if isinstance(sources, Tensor):
            ids = sources.long()
            if ids.numel() and (ids.min() < 0 or ids.max() >= len(SOURCES)):
                raise ValueError(f"source ids must be in [0, {len(SOURCES)}); got {ids.tolist()}")
            return ids
        bad = [s for s in sources if s not in SOURCES]
        if bad:
            raise ValueError(f"unknown sources {sorted(set(bad))}; valid: {', '.join(SOURCES)}")
        return torch.tensor([SOURCES.index(s) for s in sources], dtype=torch.long)

    def sample_sources(self, n: int, gen: torch.Generator) -> Tensor:
        """Source ids [n] drawn by the configured mixing weights."""
        w = torch.tensor([float(self.config.source_weights.get(s, 0.0)) for s in SOURCES], dtype=torch.float64)
        return torch.multinomial(w, n, replacement=True, generator=gen)

    def sample_timesteps(self, sources, gen: torch.Generator) -> Tensor:
        """Timesteps [B] (int64), one per sample, uniform over its source's interval."""
        ids = self.source_ids(sources)
        lo, hi = self._lo[ids].clone(), self._hi[ids].clone()
        rendered = ids == SOURCES.index("rendered3d")
        in_band = rendered & (torch.rand(ids.shape, generator=gen) < self.config.rendered3d_band_share)
        lo[in_band], hi[in_band] = self.config.rendered3d_band
        u = torch.rand(ids.shape, generator=gen, dtype=torch.float64)
        return (lo + (u * (hi - lo)).long()).clamp(max=hi - 1)
