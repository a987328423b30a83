"""VFusion3D's data engine: fine-tuning a video diffusion model on rendered orbits, ``fast3d train mvvideo``.

VFusion3D (Han et al. 2024, section 3.1 and "Camera Noise Injection", /work/shared/seeds/vfusion3d-paper.txt):
"For each asset, we render 16 views with a random elevation within the range of [0, pi/4]. The camera
is positioned at uniform intervals (2 pi/16 radians) around the object with a constant distance. ...
we do not send the camera parameters into the video diffusion model ... the first frame (the
rendered image with 0 azimuth) ... The fine-tuning ... is conducted using a standard diffusion model
training loss. We freeze all parameters, except for the temporal convolutional and attention layers",
and renders get "a random minor offset (ranging from -0.05 to 0.05)". The video model here is Stable
Video Diffusion (:mod:`fast3d.models.mvvideo`): its U-Net is the module DeepSpeed trains, with only
the temporal layers trainable; the VAE and the CLIP image encoder are frozen, outside the engine.

Config sections (YAML), each validated with its unknown keys named:

* ``model``: ``pretrained`` ("random-tiny", "random-tiny-pixel": the tiny U-Net over an exact
  pixel latent space, or a local SVD pipeline directory, relative to the YAML),
  ``views`` (frames per orbit: 16), ``fps`` / ``motion_bucket_id`` / ``noise_aug_strength`` (SVD's
  micro-conditioning, the values ``fast3d datagen pipeline`` samples with).
* ``data``: ``train`` (a directory of orbit16 multi-view shards, e.g. ``fast3d datagen procedural
  --rig orbit16``) or empty for procedural assets rendered on the fly: ``objects_per_epoch``,
  ``gaussians``, ``max_parts``; both use ``resolution``. On the fly, each object gets
  :func:`fast3d.cameras.orbit16` (the paper's orbit: uniform azimuths from 0, one elevation drawn in
  ``[0, elevation_max_deg]``, camera centres jittered by up to ``jitter`` per axis) at ``distance``
  and ``fov_deg`` over a white background.
* ``loss``: ``p_mean`` / ``p_std`` (the log-normal noise levels, EDM's, shifted towards more noise as
  SVD trains), ``condition_dropout`` (share of samples whose image conditions are zeroed, the
  unconditional branch of the pipeline's classifier-free guidance).

Loss: :func:`fast3d.models.mvvideo.edm_loss` on the VAE latents of the V views, conditioned on frame
0 (the 0-azimuth render) as the pipeline conditions on its input picture. Metrics: ``loss``,
``mean_log_sigma``, ``trainable_params`` (the temporal layers' count, constant).

Export: a whole ``StableVideoDiffusionPipeline`` directory (the fine-tuned U-Net with the frozen
VAE, encoder and scheduler), which ``fast3d datagen pipeline`` runs with ``mv.model: <dir>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from fast3d import cameras
from fast3d.checks import integer, nonneg_int, positive_int, real
from fast3d.data.dataset import MultiViewDataset
from fast3d.models import mvvideo
from fast3d.models.checkpoints import dataclass_from_dict
from fast3d.training.loop import Recipe, StepContext


@dataclass(frozen=True)
class ModelSection:
    pretrained: str = mvvideo.RANDOM_TINY   # local SVD pipeline directory (relative to the YAML), random-tiny(-pixel)
    views: int = 16                         # VFusion3D's 16 views per orbit
    fps: int = 7                            # SVD's pipeline defaults (the micro-conditioning it samples with)
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02


@dataclass(frozen=True)
class DataSection:
    train: str = ""                  # orbit16 shards; empty: procedural assets rendered on the fly
    resolution: int = 256
    objects_per_epoch: int = 1024    # on the fly: objects per rank and epoch
    gaussians: int = 20_000          # on the fly: Gaussians per asset
    max_parts: int = 3
    elevation_max_deg: float = 45.0  # VFusion3D: elevation in [0, pi/4]
    jitter: float = 0.05             # VFusion3D: render offset in [-0.05, 0.05] (per axis of the camera centre)
    distance: float = cameras.DEFAULT_DISTANCE
    fov_deg: float = cameras.DEFAULT_FOV_Y_DEG


@dataclass(frozen=True)
class LossSection:
    p_mean: float = 0.7              # log sigma ~ N(p_mean, p_std^2)
    p_std: float = 1.6
    condition_dropout: float = 0.1   # zero both image conditions (classifier-free guidance's branch)


def sections(cfg) -> tuple[ModelSection, DataSection, LossSection]:
    """The checked model, data and loss sections of an ``mvvideo`` run config."""
    m = dataclass_from_dict(ModelSection, cfg.model, "model")
    d = dataclass_from_dict(DataSection, cfg.data, "data")
    loss = dataclass_from_dict(LossSection, cfg.loss, "loss")
    if m.pretrained not in mvvideo.TINY_SOURCES:
        m = ModelSection(**{**m.__dict__, "pretrained": cfg.path(m.pretrained)})
    mvvideo.check_source("model.pretrained", m.pretrained)
    for key, v in (("model.views", m.views), ("model.fps", m.fps), ("data.resolution", d.resolution),
                   ("data.objects_per_epoch", d.objects_per_epoch), ("data.gaussians", d.gaussians)):
        positive_int(key, v)
    if m.views < 2:
        raise ValueError(f"model.views must be >= 2 (an orbit); got {m.views}")
    nonneg_int("model.motion_bucket_id", m.motion_bucket_id)
    real("model.noise_aug_strength", m.noise_aug_strength, lo=0.0)
    if d.resolution % 8:
        raise ValueError(f"data.resolution must be a multiple of 8 (the VAE's and U-Net's downsampling); "
                         f"got {d.resolution}")
    integer("data.gaussians", d.gaussians, 16)
    integer("data.max_parts", d.max_parts, 1, 3)
    real("data.elevation_max_deg", d.elevation_max_deg, lo=0.0, hi=89.0)
    real("data.jitter", d.jitter, lo=0.0)
    real("data.distance", d.distance, lo=1e-6)
    real("data.fov_deg", d.fov_deg, lo=1e-3, hi=179.0)
    real("loss.p_mean", loss.p_mean)
    real("loss.p_std", loss.p_std, lo=0.0)
    real("loss.condition_dropout", loss.condition_dropout, lo=0.0, hi=1.0)
    return m, d, loss


def render_orbit(gen: torch.Generator, data: DataSection, views: int) -> tuple[Tensor, float]:
    """One procedural asset on VFusion3D's jittered orbit over white: (images [V, 3, R, R] in [0, 1],
    elevation in radians). A pure function of the generator's state."""
    import fast3d
    from fast3d.datagen.assets import make_asset

    asset = make_asset(gen, data.gaussians, data.max_parts)
    rig = cameras.orbit16(gen, resolution=data.resolution, n_views=views, distance=data.distance,
                          fov_y_deg=data.fov_deg, elevation_range=(0.0, math.radians(data.elevation_max_deg)),
                          position_noise=data.jitter)
    R = data.resolution
    with torch.no_grad():
        rgb, _, _ = fast3d.rasterization(asset.means[None], asset.quats[None], asset.scales[None],
                                         asset.opacities[None], asset.sh[None], rig.viewmats[None], rig.Ks[None],
                                         R, R, sh_degree=0, backgrounds=torch.ones(1, views, 3))
    return rgb[0].permute(0, 3, 1, 2).clamp(0, 1).contiguous(), float(rig.elevations[0])


ORBIT_TOL = 0.1   # radians: the +-0.05 centre jitter at distance 2.2 moves an azimuth by <= 0.03


def check_orbit(viewmats: Tensor,  # [V, 4, 4] world-to-camera of one sample's views
                key: str) -> None:
    """ValueError naming the sample unless its cameras are an orbit like VFusion3D's: azimuths from 0
    in uniform steps of 2 pi / V (within ORBIT_TOL), so frame 0 is the 0-azimuth condition view."""
    c = cameras.camera_centers(viewmats.double())                          # [V, 3]
    az = torch.atan2(c[:, 1], c[:, 0])
    V = len(az)
    want = torch.arange(V, dtype=torch.float64) * (2 * math.pi / V)
    err = torch.remainder(az - want + math.pi, 2 * math.pi) - math.pi    # wrapped to (-pi, pi]
    if err.abs().max() > ORBIT_TOL:
        raise ValueError(f"sample {key!r}: its {V} cameras are not an orbit from azimuth 0 in steps of 2 pi / {V} "
                         f"(largest azimuth error {float(err.abs().max()):.3f} rad; make the shards with the orbit16 "
                         f"rig: fast3d datagen procedural --rig orbit16)")


class ProceduralOrbits(IterableDataset):
    """Procedural assets rendered on the fly on VFusion3D's orbit: ``objects_per_epoch`` per rank and
    epoch, object i of (seed, epoch, rank) a pure function of them (so a resumed run replays it)."""

    def __init__(self, data: DataSection, views: int, seed: int, rank: int, world: int):
        self.data, self.views, self.seed, self.rank, self.world = data, views, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def object_seed(self, i: int) -> int:
        return ((self.seed * 1_000_003 + self.epoch) * 65_537 + self.rank) * 1_000_033 + i

    def __iter__(self):
        for i in range(self.data.objects_per_epoch):
            images, el = render_orbit(torch.Generator().manual_seed(self.object_seed(i)), self.data, self.views)
            yield {"images": images, "elevation": el, "key": f"orbit{self.epoch}-{self.rank}-{i}"}


class MVVideoRecipe(Recipe):
    """``fast3d train mvvideo``: SVD's temporal layers fine-tuned on rendered orbits (module docstring)."""
    name = "mvvideo"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.model_section, self.data_section, self.loss_section = sections(cfg)
        self.pipe = None          # the frozen pieces (VAE, image encoder), loaded by build_model
        self.n_trainable = 0

    def build_model(self) -> torch.nn.Module:
        self.pipe = mvvideo.load_pipeline(self.model_section.pretrained, self.model_section.views)
        unet = self.pipe.unet
        self.n_trainable = mvvideo.freeze_all_but_temporal(unet)
        if self.cfg.activation_checkpointing:
            unet.enable_gradient_checkpointing()
        return unet.train()

    def prepare(self, device: torch.device) -> None:
        if self.pipe is None:
            raise ValueError("MVVideoRecipe.prepare: call build_model() first (it loads the pipeline)")
        for m in (self.pipe.vae, self.pipe.image_encoder):
            m.requires_grad_(False).eval().to(device)

    def dataset(self, rank: int, world: int):
        d, views = self.data_section, self.model_section.views
        if not d.train:
            return ProceduralOrbits(d, views, self.cfg.seed, rank, world)
        return MultiViewDataset(self.cfg.path(d.train), views=views, resolution=d.resolution, seed=self.cfg.seed,
                                rank=rank, world_size=world)

    def collate(self, samples: list) -> dict:
        for s in samples:
            if "viewmats" in s:
                check_orbit(s["viewmats"], s["key"])
        return {"images": torch.stack([s["images"] for s in samples]), "key": [s["key"] for s in samples]}

    def loss(self, model, batch: dict, ctx: StepContext) -> tuple[Tensor, dict]:
        if self.pipe is None:
            raise ValueError("MVVideoRecipe.loss: call build_model() and prepare() first")
        m, ls, gen, dev = self.model_section, self.loss_section, ctx.generator, ctx.device
        frames = batch["images"].float()                               # [B, V, 3, R, R] in [0, 1]
        B, V = frames.shape[:2]
        if V != m.views:
            raise ValueError(f"batch has {V} views per orbit; model.views is {m.views}")
        vae, enc = self.pipe.vae, self.pipe.image_encoder
        cond_noise = torch.randn(frames[:, 0].shape, generator=gen)
        with torch.no_grad():
            x = (frames.flatten(0, 1) * 2 - 1).to(dev, vae.dtype)
            post = vae.encode(x).latent_dist
            eps = torch.randn(post.mean.shape, generator=gen).to(dev, post.mean.dtype)
            latents = ((post.mean + post.std * eps) * vae.config.scaling_factor).float().unflatten(0, (B, V))
            cond = mvvideo.condition_latents(vae, frames[:, 0].to(dev), cond_noise.to(dev), m.noise_aug_strength)
            embeds = mvvideo.clip_embeddings(enc, self.pipe.feature_extractor, frames[:, 0].to(dev))
        keep = (torch.rand(B, generator=gen) >= ls.condition_dropout).float().to(dev)
        cond, embeds = cond.float() * keep[:, None, None, None], embeds.float() * keep[:, None, None]
        log_sigma = ls.p_mean + ls.p_std * torch.randn(B, generator=gen)
        noise = torch.randn(latents.shape, generator=gen).to(dev)
        ids = mvvideo.added_time_ids(m.fps, m.motion_bucket_id, m.noise_aug_strength, B).to(dev)
        per_sample = mvvideo.edm_loss(model, latents, cond, embeds, ids, log_sigma.exp().to(dev), noise, ctx.dtype)
        loss = per_sample.mean()
        return loss, {"loss": loss.detach(), "mean_log_sigma": log_sigma.mean(),
                      "trainable_params": float(self.n_trainable)}

    def export(self, module: torch.nn.Module, path: str) -> None:
        mvvideo.save_pipeline(path, self.pipe, module)
