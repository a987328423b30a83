"""Magic-Boost training: ``fast3d train magicboost``.

The denoiser (:class:`fast3d.models.magicboost.MagicBoostDenoiser`) learns to denoise the VAE
latent of a target view of an object given K anchor views of the same object (their clean latents,
their CLIP image embeddings, their cameras relative to the target). The VAE and the CLIP image
encoder are frozen, built in ``prepare`` outside the module DeepSpeed trains; latents are computed
in the step.

Config sections (YAML), each validated with its unknown keys named:

* ``model``: ``preset`` (tiny | base) and ``overrides`` (:class:`MagicBoostConfig` fields; the
  ``vae`` / ``image_encoder`` / ``unet_init`` directories are relative to the YAML file).
* ``data``: ``train`` (multi-view shards), ``views`` (views read per sample, more than K),
  ``anchors`` (``ring``: K views about 360/K degrees apart in azimuth around a random first one,
  as the refinement's anchors usually are, matched within ``max_azimuth_error_deg``; ``random``: K
  distinct random views), ``target_anchor_prob`` (share of samples whose target is one of its
  anchors, that anchor dropped: what the Anchor Iterative Update asks of the model; the others'
  target is a random view that is not an anchor), and ``augment``, the paper's augmentations of
  the anchors, each switchable and on by default:

  - ``noise`` (``noise_prob``, ``noise_max_timestep``): random noise disturbance, simulating the
    blur and inconsistency of generated views: an anchor's latent is taken by the forward process
    to a timestep s uniform in [1, noise_max_timestep], sqrt(a_s) z + sqrt(1 - a_s) e, while the
    UNet still takes it at the clean ``anchor_timestep``;
  - ``scale`` (``scale_prob``, ``scale_range``): random scale: an anchor's object is zoomed about
    the image centre by a factor uniform in ``scale_range`` (its colour and alpha resampled, then
    composited on the background), simulating generated views' inconsistent object sizes;
  - ``drop`` (``drop_prob``): random view drop: each anchor is left out of its target's
    conditioning with probability ``drop_prob`` (the ``drop`` mask of the denoiser), so the model
    does not lean on the nearest anchor.

* ``loss``: ``uncond_prob`` (share of samples with every anchor dropped, the unconditional model
  of classifier-free guidance), ``snr_gamma`` (> 0: min-SNR-gamma weighting; 0: off),
  ``timestep_buckets`` (edges of the per-timestep loss metrics).

Loss: z = the target's latent (a posterior sample) times the scaling factor; t uniform in [0,
1000); the DDPM forward process of SD 2.x's schedule (``NOISE_SCHEDULE``); MSE between the
target's prediction and the noise (``epsilon``) or the velocity (``v_prediction``), optionally
min-SNR weighted. Metrics (per micro batch; the loop averages them): ``loss``, ``mse``, ``mean_t``,
``loss_t<lo>_<hi>`` and ``kept_anchors`` (mean anchors a target is conditioned on).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fast3d import checks
from fast3d.data.dataset import MultiViewDataset
from fast3d.models import magicboost, mvdiff
from fast3d.models.checkpoints import dataclass_from_dict
from fast3d.models.magicboost import MagicBoostConfig
from fast3d.training import augment
from fast3d.training.config import RunConfig
from fast3d.training.loop import Recipe, StepContext
from fast3d.training.recipes import mvdiff as mvdiff_recipe

_SOURCE_FIELDS = ("vae", "image_encoder", "unet_init")   # MagicBoostConfig fields that may be directories
_RANDOM_SOURCES = (mvdiff.RANDOM_TINY, mvdiff.PIXEL, "random")
ANCHOR_LAYOUTS = ("ring", "random")


@dataclass(frozen=True)
class ModelSection:
    preset: str = "tiny"
    overrides: dict = dataclasses.field(default_factory=dict)   # MagicBoostConfig fields


@dataclass(frozen=True)
class AugmentSection:
    noise: bool = True
    noise_prob: float = 0.5
    noise_max_timestep: int = 200
    scale: bool = True
    scale_prob: float = 0.5
    scale_range: tuple = (0.85, 1.15)
    drop: bool = True
    drop_prob: float = 0.25


@dataclass(frozen=True)
class DataSection:
    train: str = ""                     # multi-view shards (relative to the YAML)
    views: int = 16                     # views read per sample
    anchors: str = "ring"               # ring | random
    max_azimuth_error_deg: float = 10.0
    target_anchor_prob: float = 0.25
    augment: dict = dataclasses.field(default_factory=dict)   # AugmentSection fields


@dataclass(frozen=True)
class LossSection:
    uncond_prob: float = 0.1
    snr_gamma: float = 0.0
    timestep_buckets: tuple = (0, 50, 200, 500, 1000)


def sections(cfg: RunConfig) -> tuple[MagicBoostConfig, DataSection, AugmentSection, LossSection]:
    """The parsed and checked model, data, augmentation and loss sections of a ``magicboost`` run config."""
    m = dataclass_from_dict(ModelSection, cfg.model, "model")
    if not isinstance(m.overrides, dict):
        raise ValueError(f"model.overrides must be a mapping of MagicBoostConfig fields; got {m.overrides!r}")
    overrides = {k: cfg.path(v) if k in _SOURCE_FIELDS and isinstance(v, str) and v not in _RANDOM_SOURCES else v
                 for k, v in m.overrides.items()}
    try:
        model = MagicBoostConfig.preset(m.preset, **overrides)
    except ValueError as e:
        raise ValueError(f"model: {e}") from None
    d = dataclass_from_dict(DataSection, cfg.data, "data")
    if not isinstance(d.train, str) or not d.train:
        raise ValueError(f"data.train must name a shard directory; got {d.train!r}")
    K = model.num_anchors
    checks.integer("data.views", d.views, K + 1, note="more than the model's num_anchors")
    checks.one_of("data.anchors", d.anchors, ANCHOR_LAYOUTS)
    checks.real("data.max_azimuth_error_deg", d.max_azimuth_error_deg, 0, 180, lo_open=True)
    checks.real("data.target_anchor_prob", d.target_anchor_prob, 0, 1)
    a = dataclass_from_dict(AugmentSection, d.augment, "data.augment")
    for name in ("noise", "scale", "drop"):
        checks.boolean(f"data.augment.{name}", getattr(a, name))
    for name in ("noise_prob", "scale_prob", "drop_prob"):
        checks.real(f"data.augment.{name}", getattr(a, name), 0, 1)
    T = mvdiff.NOISE_SCHEDULE["num_train_timesteps"]
    checks.integer("data.augment.noise_max_timestep", a.noise_max_timestep, 1, T - 1)
    r = a.scale_range
    if not (isinstance(r, tuple) and len(r) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                          for x in r) and 0 < r[0] <= r[1]):
        raise ValueError(f"data.augment.scale_range must be [lo, hi] with 0 < lo <= hi; got {r!r}")
    loss = dataclass_from_dict(LossSection, cfg.loss, "loss")
    checks.real("loss.uncond_prob", loss.uncond_prob, 0, 1)
    checks.real("loss.snr_gamma", loss.snr_gamma, 0, note="0: no min-SNR weighting")
    mvdiff_recipe.check_timestep_buckets(loss.timestep_buckets)
    return model, d, a, loss


# --- views ---------------------------------------------------------------------------------------


def select_anchors(viewmats: Tensor,          # [B, N, 4, 4] the samples' cameras
                   num_anchors: int, layout: str, max_error_deg: float, target_anchor_prob: float,
                   generator: torch.Generator, keys: list | None = None,
                   ) -> tuple[Tensor, Tensor, Tensor]:   # -> anchors [B, K], target [B], target_anchor [B]
    """Each sample's K anchor views, its target view, and which anchor the target is (-1: none).

    ``ring``: K views about 360/K degrees apart in azimuth (the first drawn at random; ValueError
    naming the sample when its views hold no such ring); ``random``: K distinct random views. The
    target is, with probability ``target_anchor_prob``, a random one of the anchors (the AIU case:
    that anchor is then dropped), else a random view that is no anchor.
    """
    B, N = viewmats.shape[:2]
    K = num_anchors
    if layout == "ring":
        ring = torch.arange(K, dtype=torch.float64) * (2 * math.pi / K)
        _, anchors = mvdiff_recipe.select_views(viewmats, ring, -1, max_error_deg, generator, keys)
    else:
        anchors = torch.stack([torch.randperm(N, generator=generator)[:K] for _ in range(B)])
    target = torch.empty(B, dtype=torch.long)
    target_anchor = torch.full((B,), -1, dtype=torch.long)
    on_anchor = torch.rand(B, generator=generator) < target_anchor_prob
    for b in range(B):
        if on_anchor[b]:
            k = int(torch.randint(K, (1,), generator=generator))
            target[b], target_anchor[b] = anchors[b, k], k
        else:
            free = torch.ones(N, dtype=torch.bool)
            free[anchors[b]] = False
            choices = free.nonzero()[:, 0]
            target[b] = choices[torch.randint(len(choices), (1,), generator=generator)]
    return anchors, target, target_anchor


# --- the anchors' augmentations ----------------------------------------------------------------------


def scale_views(images: Tensor,    # [N, 3, H, W] composited over white (1.0)
                alphas: Tensor,    # [N, 1, H, W]
                scales: Tensor,    # [N] zoom factors about the image centre (> 1: larger)
                background: Tensor,  # [N, 3] the background to composite on
                ) -> Tensor:       # [N, 3, H, W]
    """The random scale augmentation: each object zoomed by its factor about the image centre (its
    premultiplied colour and alpha resampled bilinearly, nothing outside the image), then composited
    on ``background``."""
    N = images.shape[0]
    premult = images - (1 - alphas)                                       # a * colour (over white)
    theta = torch.zeros(N, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scales.to(images)              # output p samples the input at p / s
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    x = F.grid_sample(torch.cat([premult, alphas], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    premult, a = x[:, :3], x[:, 3:].clamp(0, 1)
    return premult + (1 - a) * background[..., None, None].to(images)


def disturb_latents(z: Tensor,              # [..., C, h, w] clean scaled latents
                    steps: Tensor,          # [...] int timesteps s; 0: left as is
                    alphas_cumprod: Tensor,  # [T] the noise schedule
                    noise: Tensor,          # [..., C, h, w] standard normal
                    ) -> Tensor:            # [..., C, h, w]
    """The random noise disturbance: latents taken by the forward process to timestep s,
    sqrt(a_s) z + sqrt(1 - a_s) e (s = 0: unchanged)."""
    a = alphas_cumprod.to(z.device, torch.float64)[steps.to(z.device)]
    a = torch.where(steps.to(z.device) > 0, a, torch.ones_like(a))[..., None, None, None]
    return (a.sqrt() * z.double() + (1 - a).sqrt() * noise.to(z.device).double()).to(z.dtype)


def drop_mask(B: int, K: int, aug: AugmentSection, uncond_prob: float, target_anchor: Tensor,
              generator: torch.Generator) -> Tensor:   # -> [B, K] bool
    """Which anchors each target is not conditioned on: each with probability ``drop_prob`` (random
    view drop, when on), every anchor of a sample with probability ``uncond_prob`` (classifier-free
    guidance), and the anchor that is the target's own view (``target_anchor`` >= 0)."""
    draws = torch.rand(B, K, generator=generator)
    uncond = torch.rand(B, generator=generator) < uncond_prob
    drop = (draws < aug.drop_prob) if aug.drop else torch.zeros(B, K, dtype=torch.bool)
    drop = drop | uncond[:, None]
    rows = (target_anchor >= 0).nonzero()[:, 0]
    drop[rows, target_anchor[rows]] = True
    return drop


class MagicBoostRecipe(Recipe):
    """``fast3d train magicboost``: Magic-Boost's anchor-conditioned diffusion (module docstring)."""
    name = "magicboost"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.model_cfg, self.data_section, self.augment, self.loss_section = sections(cfg)
        self.vae = self.image_encoder = self.scheduler = None

    def build_model(self) -> torch.nn.Module:
        model = magicboost.build_denoiser(self.model_cfg).train()
        if self.cfg.activation_checkpointing:
            model.enable_gradient_checkpointing()
        return model

    def prepare(self, device: torch.device) -> None:
        from diffusers import DDPMScheduler

        self.vae = mvdiff.build_vae(self.model_cfg.mvdiff()).to(device)
        self.image_encoder = mvdiff.build_image_encoder(self.model_cfg.mvdiff()).to(device)
        self.scheduler = DDPMScheduler(**mvdiff.NOISE_SCHEDULE, prediction_type=self.model_cfg.prediction_type)

    def dataset(self, rank: int, world: int) -> MultiViewDataset:
        return MultiViewDataset(self.cfg.path(self.data_section.train), views=self.data_section.views,
                                resolution=self.model_cfg.resolution, seed=self.cfg.seed, rank=rank, world_size=world)

    def collate(self, samples: list) -> dict:
        keys = ("images", "alphas", "viewmats")
        return {**{k: torch.stack([s[k] for s in samples]) for k in keys}, "key": [s["key"] for s in samples]}

    def views(self, batch: dict, gen: torch.Generator) -> dict:
        """A step's views, drawn from ``gen``: ``target`` [B, 3, R, R] and ``target_viewmats`` [B, 4,
        4]; ``anchors`` [B, K, 3, R, R] (randomly scaled when on) and ``anchor_viewmats`` [B, K, 4,
        4]; ``target_anchor`` [B] (-1 or the anchor that is the target's view); ``scales`` [B, K]."""
        cfg, d, aug = self.model_cfg, self.data_section, self.augment
        images, alphas, viewmats = batch["images"].float(), batch["alphas"].float(), batch["viewmats"].float()
        B, N = images.shape[:2]
        K = cfg.num_anchors
        anchors, target, target_anchor = select_anchors(viewmats, K, d.anchors, d.max_azimuth_error_deg,
                                                        d.target_anchor_prob, gen, batch.get("key"))
        rows = torch.arange(B)
        bg = torch.full((B, K, 3), cfg.background)
        scales = torch.ones(B, K)
        if aug.scale:
            lo, hi = aug.scale_range
            on = torch.rand(B, K, generator=gen) < aug.scale_prob
            scales = torch.where(on, lo + (hi - lo) * torch.rand(B, K, generator=gen), scales)
        a_img, a_alpha = images[rows[:, None], anchors], alphas[rows[:, None], anchors]      # [B, K, ...]
        if aug.scale:
            anchor_images = scale_views(a_img.flatten(0, 1), a_alpha.flatten(0, 1), scales.flatten(),
                                        bg.flatten(0, 1)).unflatten(0, (B, K))
        else:
            anchor_images = augment.recomposite(a_img, a_alpha, bg)
        target_images = augment.recomposite(images[rows, target], alphas[rows, target], bg[:, 0])
        return dict(target=target_images, target_viewmats=viewmats[rows, target], anchors=anchor_images,
                    anchor_viewmats=viewmats[rows[:, None], anchors], target_anchor=target_anchor, scales=scales)

    def noise_steps(self, B: int, K: int, gen: torch.Generator) -> Tensor:   # -> [B, K] int, 0: none
        """The random noise disturbance's timestep of each anchor (0 where it is off or not drawn)."""
        aug = self.augment
        if not aug.noise:
            return torch.zeros(B, K, dtype=torch.long)
        on = torch.rand(B, K, generator=gen) < aug.noise_prob
        s = torch.randint(1, aug.noise_max_timestep + 1, (B, K), generator=gen)
        return torch.where(on, s, torch.zeros_like(s))

    def loss(self, model, batch: dict, ctx: StepContext) -> tuple[Tensor, dict]:
        if self.scheduler is None:
            raise ValueError("MagicBoostRecipe.loss: call prepare() first (it builds the VAE and the image encoder)")
        cfg, gen, mcfg = self.model_cfg, ctx.generator, self.model_cfg.mvdiff()
        v = self.views(batch, gen)
        B, K = v["anchors"].shape[:2]
        with torch.no_grad():
            z = mvdiff.encode_latents(self.vae, mcfg, v["target"], gen)                                  # [B, C, h, w]
            anchors = mvdiff.encode_latents(self.vae, mcfg, v["anchors"].flatten(0, 1)).unflatten(0, (B, K))
            embeds = mvdiff.image_embeds(self.image_encoder, v["anchors"].flatten(0, 1)).unflatten(0, (B, K))
        steps = self.noise_steps(B, K, gen)
        anchors = disturb_latents(anchors, steps, self.scheduler.alphas_cumprod,
                                  torch.randn(anchors.shape, generator=gen))
        drop = drop_mask(B, K, self.augment, self.loss_section.uncond_prob, v["target_anchor"], gen)
        cameras = magicboost.camera_inputs(v["target_viewmats"], v["anchor_viewmats"])
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (B,), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        weighted, mse = denoising_loss(model, self.scheduler, cfg, z, t, noise, anchors, embeds, cameras, drop,
                                       self.loss_section.snr_gamma, ctx.dtype)
        loss = weighted.mean()
        m = mvdiff_recipe.timestep_metrics(loss.detach(), mse.detach().cpu(), t, self.loss_section.timestep_buckets)
        m["kept_anchors"] = (~drop).sum(1).float().mean()
        return loss, m

    def export(self, module: torch.nn.Module, path: str) -> None:
        magicboost.MagicBoost(self.model_cfg, module, self.vae, self.image_encoder).save_pretrained(path)


def denoising_loss(denoiser, scheduler, cfg: MagicBoostConfig,
                   z: Tensor,         # [B, C, h, w] the targets' scaled latents
                   t: Tensor,         # [B] int64
                   noise: Tensor,     # [B, C, h, w]
                   anchors: Tensor,   # [B, K, C, h, w] the anchors' (disturbed) latents
                   embeds: Tensor,    # [B, K, E]
                   cameras: Tensor,   # [B, K + 1, 5]
                   drop: Tensor,      # [B, K] bool
                   snr_gamma: float = 0.0, dtype: torch.dtype = torch.float32,
                   ) -> tuple[Tensor, Tensor]:   # -> weighted [B], unweighted [B]
    """Per-target diffusion loss: the MSE between the denoiser's prediction and its target (the
    noise, or the velocity for ``v_prediction``), and the same min-SNR-gamma weighted when
    ``snr_gamma`` > 0."""
    dev = next(denoiser.parameters()).device
    z, noise, t_dev = z.to(dev, torch.float32), noise.to(dev, torch.float32), t.to(dev)
    noisy = scheduler.add_noise(z, noise, t_dev)
    target = noise if cfg.prediction_type == "epsilon" else scheduler.get_velocity(z, noise, t_dev)
    pred = denoiser(noisy.to(dtype), t_dev, anchors.to(dev, dtype), embeds.to(dev, dtype), cameras.to(dev, dtype),
                    drop.to(dev))
    mse = (pred.float() - target).pow(2).mean((1, 2, 3))                          # [B]
    if snr_gamma > 0:
        return mse * mvdiff_recipe.min_snr_weight(scheduler, t_dev, cfg.prediction_type, snr_gamma), mse
    return mse, mse
