"""Magic-Boost (Yang et al. 2024): a diffusion model that synthesises a target view of an object
conditioned on K anchor views of it, the prior that ``fast3d refine`` distils into a coarse 3D asset.

* :class:`MagicBoostConfig` (presets ``tiny`` and ``base``, the sizes of
  :class:`fast3d.models.mvdiff.MVDiffConfig`'s; YAML through ``dataclass_from_dict``) holds the
  UNet's size, the number of anchors, the fixed anchor timestep and where the VAE, image encoder
  and initial UNet weights come from (the same sources as ``MVDiffConfig``, read by its helpers).
* :class:`MagicBoostDenoiser` is the trained part: a diffusers ``UNet2DConditionModel`` in Stable
  Diffusion 2.x layout whose self-attention runs through :class:`AnchorAttnProcessor` (a
  :class:`fast3d.nn.MultiViewAttnProcessor`, layout ``"views"``), the projection of the anchors'
  CLIP image embeddings and a learned null token.
* :class:`MagicBoost` bundles the denoiser with the frozen VAE and CLIP image encoder; it saves and
  loads a model directory (``model_type`` ``"magicboost"``).

How a target is predicted (one target and its K anchors are the K + 1 views of one sample, the
target first, consecutive along the UNet's batch):

* dense local features: the anchors' clean latents pass the same UNet at the fixed timestep
  ``anchor_timestep``, the target's noisy latent at its own timestep; every self-attention layer
  attends across the target and the anchors (3D self-attention), so the target reads the anchors'
  features at every level;
* global features: every view's cross-attention sees the learned null token and the K anchors'
  CLIP image embeddings, projected to the cross-attention width;
* cameras: each view's camera relative to the target, ``(sin e, cos e, sin da, cos da, log(d /
  d_target))`` of its elevation e, its azimuth minus the target's da and its distance d from the
  origin, through the UNet's ``class_embedding`` (diffusers' ``class_embed_type="projection"``: an
  MLP whose output is added to the time embedding);
* dropped anchors (``drop``; training's random view drop, the Anchor Iterative Update dropping the
  anchor being updated, classifier-free guidance dropping all) are left out of the sample: the
  UNet runs on the target and the kept anchors only (targets with the same kept anchors in one
  call), so a dropped anchor has no influence at all. With every anchor dropped the target is
  denoised alone with the null token: the unconditional model.

Only the target's output is the prediction (noise or velocity, ``prediction_type``); the anchors'
outputs are not used. With ``unet_init`` the UNet starts from a Stable Diffusion 2.x UNet (its
input and output channels are the latent's, as here; the camera MLP's output layer starts at zero,
so the network starts as the image model).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fast3d import cameras as cams
from fast3d import checks
from fast3d.models import checkpoints, mvdiff
from fast3d.models.checkpoints import seeded
from fast3d.models.mvdiff import NOISE_SCHEDULE, MVDiffConfig
from fast3d.nn import MultiViewAttnProcessor

MODEL_TYPE = "magicboost"
CAMERA_FEATURES = 5   # (sin e, cos e, sin da, cos da, log(d / d_target))
PRESETS = {name: dict(p) for name, p in mvdiff.PRESETS.items()}
# The MVDiffConfig fields MagicBoostConfig shares (the UNet, the latent space, the sources): they are
# checked, and the VAE / image encoder built, by models/mvdiff.py through MagicBoostConfig.mvdiff().
_SHARED = ("resolution", "block_out_channels", "layers_per_block", "attention_heads", "cross_attention_dim",
           "norm_num_groups", "down_block_types", "up_block_types", "prediction_type", "latent_channels",
           "vae_downsample", "vae_scaling_factor", "image_embed_dim", "background", "vae", "image_encoder",
           "unet_init", "random_seed")
_DEFAULT = MVDiffConfig()


@dataclass(frozen=True)
class MagicBoostConfig:
    num_anchors: int = 4              # K anchor views
    anchor_timestep: int = 0          # the timestep at which the clean anchors pass the UNet (the paper's 0)
    resolution: int = 256             # px side of the anchors and the target
    # The UNet (Stable Diffusion 2.x layout; attention_heads per level, linear projections).
    block_out_channels: tuple = _DEFAULT.block_out_channels
    layers_per_block: int = 2
    attention_heads: tuple = _DEFAULT.attention_heads
    cross_attention_dim: int = 1024
    norm_num_groups: int = 32
    down_block_types: tuple = _DEFAULT.down_block_types
    up_block_types: tuple = _DEFAULT.up_block_types
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    # The latent space.
    latent_channels: int = 4
    vae_downsample: int = 8           # px per latent
    vae_scaling_factor: float = 0.18215
    image_embed_dim: int = 1024       # the image encoder's projection_dim
    background: float = 1.0           # grey level of the background the views are on (white)
    # Sources (models/mvdiff.py's module docstring).
    vae: str = mvdiff.RANDOM_TINY
    image_encoder: str = mvdiff.RANDOM_TINY
    unet_init: str = "random"
    random_seed: int = 0

    def __post_init__(self):
        checks.positive_int("num_anchors", self.num_anchors)
        T = NOISE_SCHEDULE["num_train_timesteps"]
        checks.integer("anchor_timestep", self.anchor_timestep, 0, T - 1, note="a training timestep")
        self.mvdiff()   # checks the shared fields, naming them

    def mvdiff(self) -> MVDiffConfig:
        """The :class:`MVDiffConfig` with this config's UNet, latent space and sources: what the
        shared helpers of models/mvdiff.py (VAE, image encoder, latents, UNet arguments) take."""
        return MVDiffConfig(**{k: getattr(self, k) for k in _SHARED})

    @classmethod
    def preset(cls, name: str, **overrides) -> MagicBoostConfig:
        """A named configuration (``tiny``: pixel latents, 32 px, CPU-fast; ``base``: Stable
        Diffusion 2.1's UNet at 256 px) with fields replaced by ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {name!r}")
        return checkpoints.dataclass_from_dict(cls, {**PRESETS[name], **overrides}, what=f"preset {name!r}")

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_downsample


@dataclass(frozen=True)
class AnchorCondition:
    """The anchors a target is conditioned on (:meth:`MagicBoost.condition`)."""
    latents: Tensor    # [K, C, h, w] scaled latents of the clean anchor views
    embeds: Tensor     # [K, E] their CLIP image embeddings
    viewmats: Tensor   # [K, 4, 4] their world-to-camera matrices (OpenCV)

    @property
    def num_anchors(self) -> int:
        return self.latents.shape[0]


def camera_inputs(target_viewmats: Tensor,   # [B, 4, 4] world-to-camera of each target
                  anchor_viewmats: Tensor,   # [B, K, 4, 4] of its anchors
                  ) -> Tensor:               # [B, K + 1, 5] float32: the target's own, then its anchors'
    """The denoiser's camera input of each view of a sample, relative to the target: (sin e, cos e,
    sin da, cos da, log(d / d_target)) with e the view's elevation, da its azimuth minus the
    target's and d its camera's distance from the origin (fast3d's world: +Z up)."""
    vm = torch.cat([target_viewmats[:, None], anchor_viewmats], 1).double()       # [B, K + 1, 4, 4]
    az, el = mvdiff.azimuth_elevation(vm)                                          # [B, K + 1]
    dist = cams.camera_centers(vm).norm(dim=-1)                                    # [B, K + 1]
    rel = torch.remainder(az - az[:, :1] + math.pi, 2 * math.pi) - math.pi
    log_d = torch.log(dist / dist[:, :1]).float()
    return torch.cat([mvdiff.camera_features(el, rel), log_d[..., None]], -1)


class AnchorAttnProcessor(MultiViewAttnProcessor):
    """:class:`MultiViewAttnProcessor` (layout ``"views"``) whose number of views a call may set
    (``cross_attention_kwargs={"num_views": V}``): a sample is the target and its kept anchors, so
    V varies with the anchors dropped. Without it, the processor's own ``num_views`` (K + 1)."""

    def __call__(self, attn, hidden_states: Tensor,   # [B*V, L, C] or [B*V, C, h, w]
                 encoder_hidden_states: Tensor | None = None,   # [B*V, T, C_cross]
                 attention_mask: Tensor | None = None, temb: Tensor | None = None,
                 num_views: int | None = None) -> Tensor:
        """One attention layer (:meth:`MultiViewAttnProcessor.__call__`) with ``num_views`` views a
        sample when given."""
        proc = self
        if num_views is not None and num_views != self.num_views:
            proc = copy.copy(self)          # per call: nothing shared is mutated
            proc.num_views = num_views
        return MultiViewAttnProcessor.__call__(proc, attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def unet_kwargs(cfg: MagicBoostConfig) -> dict:
    """``UNet2DConditionModel`` arguments for ``cfg``: Stable Diffusion 2.x's layout (as
    :func:`fast3d.models.mvdiff.unet_kwargs`) with the latent alone as input and the camera MLP
    taking :data:`CAMERA_FEATURES` inputs."""
    return dict(mvdiff.unet_kwargs(cfg.mvdiff()), in_channels=cfg.latent_channels,
                projection_class_embeddings_input_dim=CAMERA_FEATURES)


class MagicBoostDenoiser(nn.Module):
    """The trained network: the anchor-conditioned UNet, the projection of the anchors' CLIP
    embeddings and the null token.

    Args:
        cfg: the model configuration.
        attention_backend: passed to :class:`fast3d.nn.MultiViewAttnProcessor`.
    """

    def __init__(self, cfg: MagicBoostConfig, attention_backend: str = "auto"):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.config, self.num_anchors = cfg, cfg.num_anchors
        self.unet = UNet2DConditionModel(**unet_kwargs(cfg))
        self.unet.set_attn_processor(AnchorAttnProcessor(cfg.num_anchors + 1, "views", backend=attention_backend))
        self.image_proj = nn.Linear(cfg.image_embed_dim, cfg.cross_attention_dim)
        self.null_token = nn.Parameter(torch.zeros(cfg.cross_attention_dim))

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def forward(self,
                noisy: Tensor,           # [B, C, h, w] noisy target latents
                timesteps: Tensor,       # [B] int
                anchor_latents: Tensor,  # [B, K, C, h, w] clean scaled latents of each target's anchors
                anchor_embeds: Tensor,   # [B, K, E] their CLIP image embeddings
                cameras: Tensor,         # [B, K + 1, 5] camera_inputs: the target's, then the anchors'
                drop: Tensor | None = None,   # [B, K] bool: anchors left out of that target's conditioning
                ) -> Tensor:             # [B, C, h, w] the prediction (noise or v, per prediction_type)
        """The UNet's prediction for each target given its kept anchors (module docstring). Targets
        with the same kept anchors run in one UNet call; the outputs come back in input order."""
        cfg = self.config
        d = checks.check_shape(noisy, "[B, C, h, w]", "noisy", {"C": cfg.latent_channels, "h": cfg.latent_size,
                                                                 "w": cfg.latent_size})
        d = checks.check_shape(timesteps, "[B]", "timesteps", d)
        d = checks.check_shape(anchor_latents, "[B, K, C, h, w]", "anchor_latents", d)
        checks.check_shape(anchor_embeds, "[B, K, E]", "anchor_embeds", dict(d, E=cfg.image_embed_dim))
        checks.check_shape(cameras, f"[B, K1, {CAMERA_FEATURES}]", "cameras", dict(d, K1=d["K"] + 1))
        B, K = d["B"], d["K"]
        if K > self.num_anchors:
            raise ValueError(f"anchor_latents has K = {K} anchors; the model takes at most num_anchors = "
                             f"{self.num_anchors}")
        if drop is None:
            keep = torch.ones(B, K, dtype=torch.bool, device=noisy.device)
        else:
            checks.check_shape(drop, "[B, K]", "drop", d)
            if drop.dtype != torch.bool:
                raise ValueError(f"drop must be a bool tensor [B, K]; got {drop.dtype}")
            keep = ~drop.to(noisy.device)
        dtype = self.image_proj.weight.dtype
        tokens = self.image_proj(anchor_embeds.to(dtype))                               # [B, K, D]
        patterns, group = torch.unique(keep, dim=0, return_inverse=True)                # [P, K], [B]
        outs, order = [], []
        for p in range(patterns.shape[0]):
            idx = (group == p).nonzero()[:, 0]                                          # [G]
            kept = patterns[p].nonzero()[:, 0]                                          # [k]
            outs.append(self._run(noisy[idx].to(dtype), timesteps[idx], anchor_latents[idx][:, kept].to(dtype),
                                  tokens[idx][:, kept], cameras[idx][:, torch.cat([kept.new_zeros(1), kept + 1])]))
            order.append(idx)
        out = torch.cat(outs)                                                           # [B, C, h, w] grouped
        return out[torch.argsort(torch.cat(order))]

    def _run(self, noisy: Tensor,     # [G, C, h, w]
             timesteps: Tensor,       # [G]
             anchors: Tensor,         # [G, k, C, h, w] the kept anchors' latents
             tokens: Tensor,          # [G, k, D] their projected embeddings
             cameras: Tensor,         # [G, k + 1, 5]
             ) -> Tensor:             # [G, C, h, w]
        """One UNet call on samples with the same number k of kept anchors: views target, anchors."""
        G, k = anchors.shape[:2]
        V = k + 1
        x = torch.cat([noisy[:, None], anchors], 1).flatten(0, 1)                       # [G*V, C, h, w]
        t = torch.cat([timesteps[:, None].to(torch.long),
                       torch.full((G, k), self.config.anchor_timestep, dtype=torch.long, device=timesteps.device)],
                      1).flatten()                                                       # [G*V]
        null = self.null_token.to(tokens.dtype).expand(G, 1, -1)
        enc = torch.cat([null, tokens], 1).repeat_interleave(V, 0)                      # [G*V, 1 + k, D]
        out = self.unet(x, t, encoder_hidden_states=enc, class_labels=cameras.flatten(0, 1).to(x.dtype),
                        cross_attention_kwargs={"num_views": V}).sample                 # [G*V, C, h, w]
        return out.unflatten(0, (G, V))[:, 0]

    def load_unet_init(self, source: str) -> None:
        """Start from a Stable Diffusion 2.x UNet: every UNet weight is copied (the input and output
        are the latent's, as SD's); the camera MLP's output layer starts at zero (a no-op on the time
        embedding). ValueError if the UNet's layout differs from the config's."""
        state, path = mvdiff.read_unet_init(source, unet_kwargs(self.config))
        for k, v in self.unet.state_dict().items():
            if k.startswith("class_embedding."):
                state[k] = torch.zeros_like(v) if k.startswith("class_embedding.linear_2") else v
        checkpoints.load_state(self.unet, state, path)


def build_denoiser(cfg: MagicBoostConfig, attention_backend: str = "auto") -> MagicBoostDenoiser:
    """A denoiser for ``cfg``: random from ``random_seed`` (diffusers' initialisation), then
    ``unet_init``'s weights when it names a directory."""
    with seeded(cfg.random_seed + 2):
        model = MagicBoostDenoiser(cfg, attention_backend)
    if cfg.unet_init != "random":
        model.load_unet_init(cfg.unet_init)
    return model


def alphas_cumprod() -> Tensor:  # -> [T] float64
    """The training noise schedule's cumulative alphas (SD 2.x's ``NOISE_SCHEDULE``, as diffusers'
    ``DDPMScheduler`` computes them)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**NOISE_SCHEDULE).alphas_cumprod.double()


class MagicBoost(nn.Module):
    """Anchor-conditioned novel-view diffusion: the denoiser, the VAE and the CLIP image encoder.

    Args:
        config: the model configuration.
        denoiser: the trained :class:`MagicBoostDenoiser`, or None to build it (:func:`build_denoiser`).
        vae: the VAE, or None to build it from ``config.vae``.
        image_encoder: the CLIP image encoder, or None to build it from ``config.image_encoder``.
    """

    def __init__(self, config: MagicBoostConfig, denoiser: MagicBoostDenoiser | None = None, vae=None,
                 image_encoder=None):
        super().__init__()
        self.config = config
        self.denoiser = denoiser if denoiser is not None else build_denoiser(config)
        self.vae = vae if vae is not None else mvdiff.build_vae(config.mvdiff())
        self.image_encoder = image_encoder if image_encoder is not None else mvdiff.build_image_encoder(config.mvdiff())

    @property
    def num_anchors(self) -> int:
        return self.config.num_anchors

    @property
    def device(self) -> torch.device:
        return self.denoiser.image_proj.weight.device

    def _images(self, images: Tensor, name: str) -> None:
        R = self.config.resolution
        checks.check_shape(images, f"[N, 3, {R}, {R}]", name)

    def encode_latents(self, images: Tensor,   # [N, 3, R, R] in [0, 1]
                       ) -> Tensor:            # [N, C, h, w] scaled latents
        """The images' latents (the VAE posterior's mean) times the scaling factor, on the model's
        device; differentiable with respect to ``images``."""
        self._images(images, "images")
        return mvdiff.encode_latents(self.vae, self.config.mvdiff(), images)

    def decode_latents(self, z: Tensor,   # [N, C, h, w] scaled latents
                       ) -> Tensor:       # [N, 3, R, R] in [0, 1]
        """Images from scaled latents, on the model's device."""
        h = self.config.latent_size
        checks.check_shape(z, f"[N, {self.config.latent_channels}, {h}, {h}]", "z")
        return mvdiff.decode_latents(self.vae, self.config.mvdiff(), z)

    def condition(self, anchor_images: Tensor,    # [K, 3, R, R] in [0, 1]
                  anchor_viewmats: Tensor,        # [K, 4, 4] world-to-camera, OpenCV
                  ) -> AnchorCondition:
        """The anchors' latents (posterior means), CLIP image embeddings and cameras, on the model's
        device. K must be the model's ``num_anchors``."""
        self._images(anchor_images, "anchor_images")
        d = checks.check_shape(anchor_viewmats, "[K, 4, 4]", "anchor_viewmats", {"K": anchor_images.shape[0]})
        if d["K"] != self.num_anchors:
            raise ValueError(f"anchor_images must hold the model's num_anchors = {self.num_anchors} views; "
                             f"got {d['K']}")
        dev = self.device
        return AnchorCondition(latents=self.encode_latents(anchor_images),
                               embeds=mvdiff.image_embeds(self.image_encoder, anchor_images),
                               viewmats=anchor_viewmats.to(dev, torch.float32))

    def predict(self, noisy: Tensor,              # [B, C, h, w] noisy target latents
                timesteps: Tensor,                # [B] int
                target_viewmats: Tensor,          # [B, 4, 4] world-to-camera of each target view
                cond: AnchorCondition,            # the same K anchors for every target
                drop: Tensor | None = None,       # [B, K] bool: anchors left out of that target's conditioning
                ) -> Tensor:                      # [B, C, h, w] the prediction (noise or v per prediction_type)
        """The denoiser's prediction for each target view given the anchors (module docstring);
        ``drop`` all True is the unconditional model of classifier-free guidance."""
        if not isinstance(cond, AnchorCondition):
            raise ValueError(f"cond must be an AnchorCondition (MagicBoost.condition); got {type(cond).__name__}")
        d = checks.check_shape(noisy, "[B, C, h, w]", "noisy")
        checks.check_shape(target_viewmats, "[B, 4, 4]", "target_viewmats", d)
        if timesteps.dtype.is_floating_point or timesteps.dtype == torch.bool:
            raise ValueError(f"timesteps must be an integer tensor [B]; got {timesteps.dtype}")
        B, K = d["B"], cond.num_anchors
        dev = self.device
        cameras = camera_inputs(target_viewmats.to(dev), cond.viewmats.to(dev).expand(B, K, 4, 4))
        return self.denoiser(noisy.to(dev), timesteps.to(dev), cond.latents.to(dev).expand(B, *cond.latents.shape),
                             cond.embeds.to(dev).expand(B, *cond.embeds.shape), cameras,
                             None if drop is None else drop.to(dev))

    def alphas_cumprod(self) -> Tensor:  # -> [T] float64
        """The training noise schedule (:func:`alphas_cumprod`)."""
        return alphas_cumprod()

    # --- model directories ---

    def save_pretrained(self, path: str) -> None:
        """Write ``path/config.yaml``, ``path/model.safetensors`` (denoiser, VAE and image-encoder
        weights) and the VAE's and image encoder's configs (``vae.json``, ``image_encoder.json``)."""
        state = {f"denoiser.{k}": v for k, v in self.denoiser.state_dict().items()}
        state |= {f"vae.{k}": v for k, v in self.vae.state_dict().items()}
        state |= {f"image_encoder.{k}": v for k, v in self.image_encoder.state_dict().items()}
        checkpoints.save_pretrained(path, MODEL_TYPE, self.config, state)
        mvdiff.save_frozen_configs(path, self.vae, self.image_encoder)

    @classmethod
    def from_pretrained(cls, path: str, attention_backend: str = "auto") -> MagicBoost:
        """A model directory written by :meth:`save_pretrained`; ValueError if it is not one (or holds
        another model type). Needs none of the config's sources."""
        cfg = checkpoints.read_config(path, MODEL_TYPE, MagicBoostConfig)
        with seeded(0):
            model = cls(cfg, MagicBoostDenoiser(cfg, attention_backend), *mvdiff.build_frozen_parts(path, cfg.mvdiff()))
        checkpoints.load_state(model, checkpoints.read_weights(path), path)
        return model.eval()

