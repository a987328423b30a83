"""Image-conditioned multi-view diffusion training: ``fast3d train mvdiff``.

The denoiser (:class:`fast3d.models.mvdiff.MVDenoiser`) learns to denoise the VAE latents of the
rig's V views of an object given one view of it (its latent, its CLIP image embedding) and each
view's camera relative to it. The VAE and the CLIP image encoder are frozen, built in ``prepare``
outside the module DeepSpeed trains; latents are computed in the step.

Config sections (YAML), each validated with its unknown keys named:

* ``model``: ``preset`` (tiny | base) and ``overrides`` (:class:`MVDiffConfig` fields; the ``vae`` /
  ``image_encoder`` / ``unet_init`` directories are relative to the YAML file); or ``init_from``: a
  model directory (``fast3d convert imagedream``'s, a checkpoint or a run directory: its newest
  weights) to fine-tune, whose configuration, VAE and image encoder are used (no ``overrides``).
* ``data``: ``train`` (multi-view shards), ``views`` (views read per sample), ``condition_view``
  (-1: a random view of each sample is the condition; else that view), ``max_azimuth_error_deg``.
* ``loss``: ``condition_dropout`` (share of samples whose image condition is dropped, for
  classifier-free guidance), ``snr_gamma`` (> 0: min-SNR-gamma weighting, Hang et al. 2023; 0: off),
  ``timestep_buckets`` (edges of the per-timestep loss metrics).

Views: a sample's views are placed by their cameras (azimuth and elevation of each camera centre
seen from the origin). For a condition view k, rig view i is the sample's view whose azimuth minus
k's is nearest the rig's azimuth i; a condition view qualifies when every rig view is matched
within ``max_azimuth_error_deg``, and one qualifying view is drawn per sample (orbit16 shards:
every view qualifies for lgm4, views k, k+4, k+8, k+12, and for era3d6). The views' field of view
and distance must be the rig's (within 2% and 10%). The denoiser's camera input is each target's
own elevation and azimuth relative to the condition, so the cameras it learns are the data's.

Loss: z = latents of the targets (a posterior sample) and of the condition (its mean), both times
the scaling factor; t uniform in [0, 1000); the DDPM forward process of SD 2.x's schedule
(``NOISE_SCHEDULE``); MSE between the prediction and the noise (``epsilon``) or the velocity
(``v_prediction``), averaged over views, optionally min-SNR weighted. Metrics (per micro batch; the
loop averages them): ``loss`` (the weighted training loss), ``mse`` (unweighted), ``mean_t``,
``loss_t<lo>_<hi>`` (unweighted MSE of the samples in each timestep bucket present).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fast3d import checks
from fast3d.data.dataset import MultiViewDataset
from fast3d.models import checkpoints, mvdiff
from fast3d.models.checkpoints import dataclass_from_dict, read_config, resolve_checkpoint
from fast3d.models.mvdiff import MVDiffConfig
from fast3d.training import augment
from fast3d.training.config import RunConfig
from fast3d.training.loop import Recipe, StepContext

_SOURCE_FIELDS = ("vae", "image_encoder", "unet_init")   # MVDiffConfig fields that may be directories
_RANDOM_SOURCES = (mvdiff.RANDOM_TINY, mvdiff.PIXEL, "random")
FOV_TOLERANCE, DISTANCE_TOLERANCE = 0.02, 0.10   # relative: the data's optics against the rig's


@dataclass(frozen=True)
class ModelSection:
    preset: str = "tiny"
    overrides: dict = dataclasses.field(default_factory=dict)   # MVDiffConfig fields
    init_from: str = ""            # a model / checkpoint / run directory to fine-tune ("": preset + overrides)


@dataclass(frozen=True)
class DataSection:
    train: str = ""                     # multi-view shards (relative to the YAML)
    views: int = 16                     # views read per sample
    condition_view: int = -1            # -1: a random qualifying view per sample
    max_azimuth_error_deg: float = 10.0


@dataclass(frozen=True)
class LossSection:
    condition_dropout: float = 0.1
    snr_gamma: float = 0.0
    timestep_buckets: tuple = (0, 50, 200, 500, 1000)


def init_dir(cfg: RunConfig) -> str | None:
    """The model directory ``model.init_from`` means (None without one); ValueError if none is there."""
    path = cfg.model.get("init_from", "") if isinstance(cfg.model, dict) else ""
    if not path:
        return None
    if not isinstance(path, str):
        raise ValueError(f"model.init_from must be a directory path; got {path!r}")
    return resolve_checkpoint(cfg.path(path), what="model.init_from")


def sections(cfg: RunConfig) -> tuple[MVDiffConfig, DataSection, LossSection]:
    """The parsed and checked model, data and loss sections of an ``mvdiff`` run config."""
    m = dataclass_from_dict(ModelSection, cfg.model, "model")
    if not isinstance(m.overrides, dict):
        raise ValueError(f"model.overrides must be a mapping of MVDiffConfig fields; got {m.overrides!r}")
    overrides = {k: cfg.path(v) if k in _SOURCE_FIELDS and isinstance(v, str) and v not in _RANDOM_SOURCES else v
                 for k, v in m.overrides.items()}
    try:
        init = init_dir(cfg)
        if init is not None:
            given = sorted({"preset", "overrides"} & set(cfg.model))
            if given:
                raise ValueError(f"{' / '.join(given)} cannot be combined with init_from: the model directory's "
                                 f"configuration is used")
            model = read_config(init, mvdiff.MODEL_TYPE, MVDiffConfig)
        else:
            model = MVDiffConfig.preset(m.preset, **overrides)
    except ValueError as e:
        raise ValueError(f"model: {e}") from None
    d = dataclass_from_dict(DataSection, cfg.data, "data")
    if not isinstance(d.train, str) or not d.train:
        raise ValueError(f"data.train must name a shard directory; got {d.train!r}")
    checks.integer("data.views", d.views, model.num_views, note="at least the rig's views")
    checks.integer("data.condition_view", d.condition_view, -1, d.views - 1, note="-1: a random view")
    checks.real("data.max_azimuth_error_deg", d.max_azimuth_error_deg, 0, 180, lo_open=True)
    loss = dataclass_from_dict(LossSection, cfg.loss, "loss")
    checks.real("loss.condition_dropout", loss.condition_dropout, 0, 1)
    checks.real("loss.snr_gamma", loss.snr_gamma, 0, note="0: no min-SNR weighting")
    check_timestep_buckets(loss.timestep_buckets)
    return model, d, loss


def check_timestep_buckets(b) -> None:
    """ValueError unless ``loss.timestep_buckets`` are increasing ints from 0 to the schedule's T."""
    T = mvdiff.NOISE_SCHEDULE["num_train_timesteps"]
    ints = isinstance(b, tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in b)
    if not (ints and len(b) >= 2 and b[0] == 0 and b[-1] == T and all(lo < hi for lo, hi in zip(b, b[1:]))):
        raise ValueError(f"loss.timestep_buckets must be increasing ints from 0 to {T}; got {b!r}")


def _wrap(a: Tensor) -> Tensor:  # angles -> (-pi, pi]
    return torch.remainder(a + math.pi, 2 * math.pi) - math.pi


def select_views(viewmats: Tensor,          # [B, N, 4, 4] the samples' cameras
                 rig_azimuths: Tensor,      # [V] radians, relative to the condition view
                 condition_view: int,       # -1: a random qualifying view
                 max_error_deg: float,
                 generator: torch.Generator,
                 keys: list | None = None) -> tuple[Tensor, Tensor]:   # -> [B], [B, V] indices
    """The condition view and the rig's target views of each sample (module docstring).

    Returns:
        (condition [B], targets [B, V]): view indices into N. ValueError naming the sample when no
        view of it qualifies.
    """
    B, N = viewmats.shape[:2]
    az, _ = mvdiff.azimuth_elevation(viewmats)                                   # [B, N]
    rel = _wrap(az[:, None, :] - az[:, :, None])                                 # [B, k, j]: j's azimuth - k's
    err = _wrap(rel[:, :, None, :] - rig_azimuths.double()[None, None, :, None]).abs()   # [B, k, V, j]
    best_err, best = err.min(-1)                                                 # [B, k, V]
    ok = best_err.max(-1).values <= math.radians(max_error_deg)                  # [B, k]
    if condition_view >= 0:
        ok = ok & (torch.arange(N) == condition_view)[None]
    cond = torch.empty(B, dtype=torch.long)
    for b in range(B):
        choices = ok[b].nonzero()[:, 0]
        if len(choices) == 0:
            name = f" {keys[b]!r}" if keys else ""
            which = f"view {condition_view}" if condition_view >= 0 else "no view"
            raise ValueError(f"data.train: sample{name}: {which} has the rig's views (azimuths "
                             f"{[round(math.degrees(a), 1) for a in rig_azimuths.tolist()]} deg relative to it) "
                             f"among its views within data.max_azimuth_error_deg={max_error_deg}")
        cond[b] = choices[torch.randint(len(choices), (1,), generator=generator)]
    targets = best[torch.arange(B), cond]                                        # [B, V]
    return cond, targets


def camera_inputs(viewmats: Tensor,   # [B, N, 4, 4]
                  cond: Tensor,       # [B]
                  targets: Tensor,    # [B, V]
                  cfg: MVDiffConfig,
                  ) -> Tensor:        # [B, V, cfg.camera_dim]
    """The denoiser's camera input (``mvdiff.view_camera_features`` of ``cfg``'s conditioning):
    each target's elevation and azimuth relative to the condition."""
    az, el = mvdiff.azimuth_elevation(viewmats)                                  # [B, N]
    B = viewmats.shape[0]
    rows = torch.arange(B)[:, None]
    el, rel = el[rows, targets], _wrap(az[rows, targets] - az[torch.arange(B), cond][:, None])
    return mvdiff.view_camera_features(cfg, el, rel)


def check_optics(cfg: MVDiffConfig,
                 viewmats: Tensor,   # [B, N, 4, 4]
                 Ks: Tensor,         # [B, N, 3, 3] pixels of cfg.resolution px images
                 ) -> None:
    """ValueError unless the views' vertical field of view and distance are the rig's."""
    fov = torch.rad2deg(2 * torch.atan(0.5 * cfg.resolution / Ks[..., 1, 1].double()))
    dist = mvdiff.cams.camera_centers(viewmats.double()).norm(dim=-1)
    want_fov, want_dist = cfg.rig_fov_y_deg, cfg.rig_distance
    if ((fov - want_fov).abs() > FOV_TOLERANCE * want_fov).any():
        raise ValueError(f"data.train: views with a vertical field of view of {fov.min():.2f}..{fov.max():.2f} deg; the "
                         f"model's rig {cfg.rig!r} has {want_fov:.2f} (set model.overrides.fov_y_deg to the data's)")
    if ((dist - want_dist).abs() > DISTANCE_TOLERANCE * want_dist).any():
        raise ValueError(f"data.train: cameras at distance {dist.min():.3f}..{dist.max():.3f}; the model's rig "
                         f"{cfg.rig!r} has {want_dist:.3f} (set model.overrides.camera_distance to the data's)")


def views_and_condition(batch: dict, cfg: MVDiffConfig, cond: Tensor, targets: Tensor,
                        ) -> tuple[Tensor, Tensor, Tensor]:  # -> [B, 3, R, R], [B, V, 3, R, R], [B, V, camera_dim]
    """The condition image, the target views (on the model's background) and the camera inputs."""
    images, alphas, viewmats = batch["images"].float(), batch["alphas"].float(), batch["viewmats"].float()
    B, N = images.shape[:2]
    images = augment.recomposite(images, alphas, torch.full((B, N, 3), cfg.background))
    rows = torch.arange(B)
    return images[rows, cond], images[rows[:, None], targets], camera_inputs(viewmats, cond, targets, cfg)


def denoising_loss(denoiser, scheduler, cfg: MVDiffConfig,
                   z: Tensor,             # [B, V, C, h, w] the targets' scaled latents
                   cond_latent: Tensor,   # [B, C, h, w]
                   embeds: Tensor,        # [B, E] (imagedream: [B, T, E])
                   cameras: Tensor,       # [B, V, cfg.camera_dim]
                   t: Tensor,             # [B] int64
                   noise: Tensor,         # [B, V, C, h, w]
                   drop: Tensor | None = None,   # [B] bool
                   snr_gamma: float = 0.0, dtype: torch.dtype = torch.float32,
                   ) -> tuple[Tensor, Tensor]:   # -> weighted [B], unweighted [B]
    """Per-sample diffusion loss: the MSE between the denoiser's prediction and its target (the
    noise, or the velocity for ``v_prediction``), and the same min-SNR-gamma weighted
    (``snr_gamma`` > 0: weight min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v)."""
    dev = next(denoiser.parameters()).device
    z, noise = z.to(dev, torch.float32), noise.to(dev, torch.float32)
    t_dev = t.to(dev)
    noisy = scheduler.add_noise(z, noise, t_dev)
    target = noise if cfg.prediction_type == "epsilon" else scheduler.get_velocity(z, noise, t_dev)
    pred = denoiser(noisy.to(dtype), cond_latent.to(dev, dtype), embeds.to(dev, dtype), cameras.to(dev, dtype), t_dev,
                    None if drop is None else drop.to(dev))
    mse = (pred.float() - target).pow(2).mean((1, 2, 3, 4))                     # [B]
    if snr_gamma > 0:
        return mse * min_snr_weight(scheduler, t_dev, cfg.prediction_type, snr_gamma), mse
    return mse, mse


def min_snr_weight(scheduler, t: Tensor,   # [B] int
                   prediction_type: str, snr_gamma: float) -> Tensor:   # -> [B] float32
    """Min-SNR-gamma loss weights (Hang et al. 2023) of timesteps ``t``: min(SNR, gamma) / SNR for
    epsilon, min(SNR, gamma) / (SNR + 1) for v, with SNR = a / (1 - a) of the schedule's alphas_cumprod."""
    a = scheduler.alphas_cumprod.to(t.device)[t].double()
    snr = a / (1 - a)
    return (snr.clamp(max=snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)).float()


class MVDiffRecipe(Recipe):
    """``fast3d train mvdiff``: image-conditioned multi-view diffusion (module docstring)."""
    name = "mvdiff"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.model_cfg, self.data_section, self.loss_section = sections(cfg)
        # pinned in the run's config, so config.json names the weights it started from
        self.init_dir = init_dir(cfg)
        if self.init_dir is not None:
            self.cfg = self.cfg.replace(model={**self.cfg.model, "init_from": self.init_dir})
        self.rig_azimuths, _ = self.model_cfg.rig_angles()
        self.vae = self.image_encoder = self.scheduler = None

    def build_model(self) -> torch.nn.Module:
        if self.init_dir is not None:
            model = mvdiff.MVDenoiser(self.model_cfg)
            checkpoints.load_state(model, checkpoints.read_weights(self.init_dir, "denoiser."), self.init_dir)
            model.train()
        else:
            model = mvdiff.build_denoiser(self.model_cfg).train()
        if self.cfg.activation_checkpointing:
            model.enable_gradient_checkpointing()
        return model

    def prepare(self, device: torch.device) -> None:
        from diffusers import DDPMScheduler

        if self.init_dir is not None:
            self.vae, self.image_encoder = mvdiff.build_frozen_parts(self.init_dir, self.model_cfg)
            for name in ("vae", "image_encoder"):
                part = getattr(self, name)
                checkpoints.load_state(part, checkpoints.read_weights(self.init_dir, f"{name}."), self.init_dir)
                setattr(self, name, part.to(device))
        else:
            self.vae = mvdiff.build_vae(self.model_cfg).to(device)
            self.image_encoder = mvdiff.build_image_encoder(self.model_cfg).to(device)
        self.scheduler = DDPMScheduler(**mvdiff.NOISE_SCHEDULE, prediction_type=self.model_cfg.prediction_type)

    def dataset(self, rank: int, world: int) -> MultiViewDataset:
        return MultiViewDataset(self.cfg.path(self.data_section.train), views=self.data_section.views,
                                resolution=self.model_cfg.resolution, seed=self.cfg.seed, rank=rank, world_size=world)

    def collate(self, samples: list) -> dict:
        keys = ("images", "alphas", "viewmats", "Ks")
        return {**{k: torch.stack([s[k] for s in samples]) for k in keys}, "key": [s["key"] for s in samples]}

    def loss(self, model, batch: dict, ctx: StepContext) -> tuple[Tensor, dict]:
        if self.scheduler is None:
            raise ValueError("MVDiffRecipe.loss: call prepare() first (it builds the VAE and the image encoder)")
        cfg, gen = self.model_cfg, ctx.generator
        check_optics(cfg, batch["viewmats"], batch["Ks"])
        cond, targets = select_views(batch["viewmats"], self.rig_azimuths, self.data_section.condition_view,
                                     self.data_section.max_azimuth_error_deg, gen, batch.get("key"))
        cond_img, views, cameras = views_and_condition(batch, cfg, cond, targets)
        B, V = views.shape[:2]
        with torch.no_grad():
            z = mvdiff.encode_latents(self.vae, cfg, views.flatten(0, 1), gen).unflatten(0, (B, V))
            cond_latent = mvdiff.encode_latents(self.vae, cfg, cond_img)
            embeds = mvdiff.image_embeds(self.image_encoder, cond_img)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (B,), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        drop = torch.rand(B, generator=gen) < self.loss_section.condition_dropout
        weighted, mse = denoising_loss(model, self.scheduler, cfg, z, cond_latent, embeds, cameras, t, noise, drop,
                                       self.loss_section.snr_gamma, ctx.dtype)
        loss = weighted.mean()
        return loss, self._metrics(loss.detach(), mse.detach().cpu(), t)

    def _metrics(self, loss: Tensor,   # []
                 mse: Tensor,          # [B]
                 t: Tensor,            # [B]
                 ) -> dict:
        return timestep_metrics(loss, mse, t, self.loss_section.timestep_buckets)

    def export(self, module: torch.nn.Module, path: str) -> None:
        mvdiff.MVDiffusion(self.model_cfg, module, self.vae, self.image_encoder).save_pretrained(path)


def timestep_metrics(loss: Tensor,   # []
                     mse: Tensor,    # [B]
                     t: Tensor,      # [B]
                     edges: tuple) -> dict:
    """A diffusion recipe's metrics: ``loss``, ``mse``, ``mean_t`` and ``loss_t<lo>_<hi>`` (the
    unweighted MSE of the samples in each timestep bucket present)."""
    m = {"loss": loss, "mse": mse.mean(), "mean_t": t.float().mean()}
    for lo, hi in zip(edges, edges[1:]):
        sel = (t >= lo) & (t < hi)
        if sel.any():
            m[f"loss_t{lo}_{hi}"] = mse[sel].mean()
    return m
