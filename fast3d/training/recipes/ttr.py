"""Multi-view DiT training with Training Timestep Reschedule (Bootstrap3D): ``fast3d train ttr``.

The transformer (PixArt-alpha, :mod:`fast3d.models.mvdit`) learns to denoise the VAE latents of 2x2
view grids, conditioned on T5 caption embeddings, both read from a feature cache
(:mod:`fast3d.training.feature_cache`, made by :func:`fast3d.training.recipes.ttr_extract.extract_features`
/ ``fast3d train ttr-extract``),
so no encoder runs in training and none is inside the module DeepSpeed trains or partitions.

Config sections (YAML), each validated with its unknown keys named:

* ``model``: ``preset`` (tiny | xl-256 | xl-512) and ``overrides`` (:class:`MVDiTConfig` fields; the
  ``vae`` / ``text_encoder`` / ``transformer_init`` directories are relative to the YAML file).
* ``data``: ``cache`` (the feature cache), ``raw`` (the multi-view shards it is extracted from),
  ``shuffle_buffer`` (samples per source in the seeded shuffle buffer).
* ``loss``: ``caption_dropout`` (share of captions replaced by the empty caption, for classifier-free
  guidance), ``timestep_buckets`` (edges of the per-timestep loss metrics), ``ttr``
  (:class:`TTRConfig` fields: the per-source timestep intervals and the source mix).

Before the first step the cache is checked against the config: its VAE and text-encoder
fingerprints, latent and caption shapes, and that it holds every source the mix gives a weight.

Loss: z = (latent_mean + latent_std * eps) * scaling_factor; t per sample from :class:`TTRSampler`
by the sample's source; the DDPM forward process of PixArt-alpha's schedule (``NOISE_SCHEDULE``,
``DDPMScheduler.add_noise``); MSE between the noise and the first ``latent_channels`` output
channels. The learned-variance channels (``learn_sigma``) get no loss: the DPM-Solver sampler
discards them, and PixArt-alpha's variational-bound term on them is not trained here, so a
fine-tuned model keeps the variance head it started from. Metrics (per micro batch; the loop
averages them): ``loss``, ``mean_t``, ``loss_<source>`` for the sources in the batch,
``loss_t<lo>_<hi>`` for the timestep buckets in the batch, ``share_<source>`` for each source of
the mix.

Data order (exactly resumable, see :class:`fast3d.training.mixed_cache.MixedCacheStream`): each source of the mix is its own
stream (shards in a seeded order per pass, then a seeded shuffle buffer); each sample of an epoch
draws its source with ``TTRSampler.sample_sources``. Every draw is a pure function of (seed, epoch,
reader), so the loop restores a position by replaying the batches of the current epoch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from fast3d.models import mvdit
from fast3d.models.checkpoints import dataclass_from_dict
from fast3d.models.mvdit import MVDiTConfig
from fast3d.training.config import RunConfig
from fast3d.training.feature_cache import FeatureCacheDataset, FeatureCacheError, check_azimuths
from fast3d.training.loop import Recipe, StepContext
from fast3d.training.mixed_cache import MixedCacheStream, check_mix
from fast3d.training.ttr import SOURCES, TTRConfig, TTRSampler

_SOURCE_FIELDS = ("vae", "text_encoder", "transformer_init")   # MVDiTConfig fields that may be directories
_RANDOM_SOURCES = (mvdit.RANDOM_TINY, "random")


@dataclass(frozen=True)
class ModelSection:
    preset: str = "tiny"
    overrides: dict = dataclasses.field(default_factory=dict)   # MVDiTConfig fields


@dataclass(frozen=True)
class DataSection:
    cache: str = ""               # feature-cache directory (relative to the YAML)
    raw: str = ""                 # multi-view shards that ttr-extract encodes into `cache`
    shuffle_buffer: int = 128     # per source stream; holds decoded samples
    grid_azimuths: tuple = (0.0, 90.0, 180.0, 270.0)  # degrees from the first view: the 2x2 grid's views


@dataclass(frozen=True)
class LossSection:
    caption_dropout: float = 0.1                      # PixArt-alpha's class_dropout_prob
    timestep_buckets: tuple = (0, 50, 200, 500, 1000)  # edges of the loss_t<lo>_<hi> metrics
    ttr: dict = dataclasses.field(default_factory=dict)   # TTRConfig fields; {} = the paper's


def sections(cfg: RunConfig) -> tuple[MVDiTConfig, DataSection, LossSection, TTRConfig]:
    """The parsed and checked model, data and loss sections of a ``ttr`` run config."""
    m = dataclass_from_dict(ModelSection, cfg.model, "model")
    if not isinstance(m.overrides, dict):
        raise ValueError(f"model.overrides must be a mapping of MVDiTConfig fields; got {m.overrides!r}")
    overrides = {k: cfg.path(v) if k in _SOURCE_FIELDS and isinstance(v, str) and v not in _RANDOM_SOURCES else v
                 for k, v in m.overrides.items()}
    try:
        model = MVDiTConfig.preset(m.preset, **overrides)
    except ValueError as e:
        raise ValueError(f"model: {e}") from None
    d = dataclass_from_dict(DataSection, cfg.data, "data")
    if not isinstance(d.cache, str) or not d.cache:
        raise ValueError(f"data.cache must name the feature-cache directory; got {d.cache!r}")
    if isinstance(d.shuffle_buffer, bool) or not isinstance(d.shuffle_buffer, int) or d.shuffle_buffer < 1:
        raise ValueError(f"data.shuffle_buffer must be a positive int; got {d.shuffle_buffer!r}")
    try:
        d = dataclasses.replace(d, grid_azimuths=check_azimuths(d.grid_azimuths))
    except ValueError as e:
        raise ValueError(f"data.{e}") from None
    loss = dataclass_from_dict(LossSection, cfg.loss, "loss")
    if not isinstance(loss.ttr, dict):
        raise ValueError(f"loss.ttr must be a mapping of TTRConfig fields; got {loss.ttr!r}")
    ttr = TTRConfig.from_dict(loss.ttr)
    T = mvdit.NOISE_SCHEDULE["num_train_timesteps"]
    if ttr.num_train_timesteps != T:
        raise ValueError(f"loss.ttr.num_train_timesteps must be the noise schedule's {T}; "
                         f"got {ttr.num_train_timesteps}")
    p = loss.caption_dropout
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"loss.caption_dropout must be a number in [0, 1]; got {p!r}")
    b = loss.timestep_buckets
    ints = isinstance(b, tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in b)
    if not (ints and len(b) >= 2 and b[0] == 0 and b[-1] == T and all(lo < hi for lo, hi in zip(b, b[1:]))):
        raise ValueError(f"loss.timestep_buckets must be increasing ints from 0 to {T}; got {b!r}")
    return model, d, loss, ttr


class TTRRecipe(Recipe):
    """``fast3d train ttr``: the multi-view DiT on a feature cache with TTR timesteps (module docstring)."""
    name = "ttr"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.model_cfg, self.data_section, self.loss_section, ttr = sections(cfg)
        self.sampler = TTRSampler(ttr)
        self.cache = cfg.path(self.data_section.cache)
        try:
            self.manifest = m = FeatureCacheDataset(self.cache, None, None).manifest
        except FeatureCacheError as e:
            raise ValueError(f"data.cache: {e} (make it with fast3d train ttr-extract --config "
                             f"{cfg.source or 'CONFIG'})") from None
        self.mixed = check_mix(self.cache, m, ttr)
        c = self.model_cfg
        want = {"grid_size": c.grid_size, "latent_shape": [c.latent_channels, c.latent_size, c.latent_size],
                "scaling_factor": c.vae_scaling_factor, "caption_tokens": c.max_caption_tokens,
                "caption_channels": c.caption_channels, "grid_azimuths": list(self.data_section.grid_azimuths)}
        diff = {k: (m[k], v) for k, v in want.items() if m[k] != v}
        if diff:
            raise ValueError(f"data.cache {self.cache!r} was made for another model: (cache, model config) differ in "
                             f"{diff}")
        self.scaling_factor = float(m["scaling_factor"])
        self.fingerprints: tuple[str, str] | None = None
        self.null_caption: tuple[Tensor, Tensor] | None = None
        self.scheduler = None

    def build_model(self) -> torch.nn.Module:
        model = mvdit.build_transformer(self.model_cfg).train()
        if self.cfg.activation_checkpointing:
            model.enable_gradient_checkpointing()
        return model

    def _encoder_fingerprints(self) -> tuple[str, str]:
        """(VAE, text encoder) fingerprints of the config's models, computed on rank 0 (the models are
        built on the CPU, hashed and freed) and broadcast."""
        fps = [None]
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            vae_fp = mvdit.fingerprint(mvdit.build_vae(self.model_cfg))
            fps[0] = (vae_fp, mvdit.fingerprint(*mvdit.build_text_encoder(self.model_cfg)))
        if torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(fps, src=0)
        return fps[0]

    def prepare(self, device: torch.device) -> None:
        from diffusers import DDPMScheduler

        self.fingerprints = self._encoder_fingerprints()
        m = self.manifest
        for key, name, fp in (("vae", "VAE", self.fingerprints[0]), ("text_encoder", "text encoder",
                                                                      self.fingerprints[1])):
            if m[key] != fp:
                raise ValueError(f"data.cache {self.cache!r} was made with another {name}: its fingerprint is "
                                 f"{m[key]}, the model config's {name} ({key}={getattr(self.model_cfg, key)!r}, "
                                 f"random_seed={self.model_cfg.random_seed}) has {fp}; re-run fast3d train "
                                 f"ttr-extract into another directory")
        self.null_caption = FeatureCacheDataset(self.cache, *self.fingerprints).null_caption()
        self.scheduler = DDPMScheduler(**mvdit.NOISE_SCHEDULE)

    def dataset(self, rank: int, world: int) -> MixedCacheStream:
        if self.fingerprints is None:
            raise ValueError("TTRRecipe.dataset: call prepare() first (it checks the cache's encoders)")
        return MixedCacheStream(self.cache, *self.fingerprints, self.sampler, self.cfg.seed, self.data_section.shuffle_buffer,
                                rank, world)

    def collate(self, samples: list) -> dict:
        out = {k: torch.stack([s[k] for s in samples])
               for k in ("latent_mean", "latent_std", "caption_embeds", "caption_mask")}
        return out | {k: [s[k] for s in samples] for k in ("source", "caption", "key")}

    def loss(self, model, batch: dict, ctx: StepContext) -> tuple[Tensor, dict]:
        if self.scheduler is None:
            raise ValueError("TTRRecipe.loss: call prepare() first (it loads the null caption and the scheduler)")
        mean, std = batch["latent_mean"], batch["latent_std"]            # [B, C, h, w] unscaled VAE posterior
        embeds, mask = batch["caption_embeds"], batch["caption_mask"]    # [B, L, C_text], [B, L]
        sources, gen, dev = batch["source"], ctx.generator, ctx.device
        B, C = mean.shape[:2]
        t = self.sampler.sample_timesteps(sources, gen)                   # [B] int64
        eps = torch.randn(mean.shape, generator=gen)
        noise = torch.randn(mean.shape, generator=gen)
        drop = torch.rand(B, generator=gen) < self.loss_section.caption_dropout
        null_embeds, null_mask = self.null_caption
        embeds = torch.where(drop[:, None, None], null_embeds, embeds)
        mask = torch.where(drop[:, None], null_mask, mask)
        z = (mean + std * eps) * self.scaling_factor
        noisy = self.scheduler.add_noise(z, noise, t)                     # [B, C, h, w]
        out = model(noisy.to(dev, ctx.dtype), encoder_hidden_states=embeds.to(dev, ctx.dtype),
                    encoder_attention_mask=mask.to(dev), timestep=t.to(dev),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        per_sample = (out[:, :C].float() - noise.to(dev)).pow(2).mean((1, 2, 3))   # [B]
        loss = per_sample.mean()
        return loss, self._metrics(loss.detach(), per_sample.detach().cpu(), t, sources)

    def _metrics(self, loss: Tensor,        # []
                 per_sample: Tensor,        # [B]
                 t: Tensor,                 # [B]
                 sources: list[str]) -> dict:
        m = {"loss": loss, "mean_t": t.float().mean()}
        ids = TTRSampler.source_ids(sources)
        for i, s in enumerate(SOURCES):
            if (ids == i).any():
                m[f"loss_{s}"] = per_sample[ids == i].mean()
        for s in self.mixed:
            m[f"share_{s}"] = (ids == SOURCES.index(s)).float().mean()
        edges = self.loss_section.timestep_buckets
        for lo, hi in zip(edges, edges[1:]):
            sel = (t >= lo) & (t < hi)
            if sel.any():
                m[f"loss_t{lo}_{hi}"] = per_sample[sel].mean()
        return m

    def export(self, module: torch.nn.Module, path: str) -> None:
        mvdit.save_transformer(path, self.model_cfg, module)
