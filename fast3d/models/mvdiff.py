"""Image-conditioned multi-view diffusion (Era3D / ImageDream / Zero123++ style): one image in, the
V views of a camera rig out.

* :class:`MVDiffConfig` (presets ``tiny`` and ``base``; YAML through ``dataclass_from_dict``) holds
  the UNet's size, the rig, the attention layout and where the VAE, image encoder and initial UNet
  weights come from.
* :class:`MVDenoiser` is the trained part: a diffusers ``UNet2DConditionModel`` in Stable Diffusion
  2.x layout whose self-attention runs through :class:`fast3d.nn.MultiViewAttnProcessor`
  (``layout="views"``: every token sees all views, ImageDream / MVDream; ``layout="rows"``: a token
  sees its row in every view, Era3D), plus the projection of the input image's CLIP embedding.
* :class:`MVDiffusion` bundles the denoiser with the frozen VAE and CLIP image encoder; it saves
  and loads a model directory (``model_type`` ``"mvdiff"``) and gives the rig's cameras.

Conditioning, per view of a sample (views are consecutive along the batch, ``(B V)``):

* the input image's VAE latent, concatenated to the view's noisy latent along channels
  (``in_channels = 2 * latent_channels``);
* the input image's CLIP image embedding (``CLIPVisionModelWithProjection.image_embeds``),
  projected to the UNet's cross-attention width, as one cross-attention token;
* the view's camera relative to the input: ``(sin e, cos e, sin a, cos a)`` of its elevation e and
  its azimuth a minus the input's, through the UNet's ``class_embedding`` (diffusers'
  ``class_embed_type="projection"``: a linear-SiLU-linear MLP whose output is added to the time
  embedding).

Classifier-free guidance drops the image (its latent and its embedding token are zeroed; the
camera stays), as Zero123 does.

``conditioning="imagedream"`` is ImageDream's conditioning instead (the layout of its released
weights, ``fast3d convert imagedream``):

* the input image's latent is an extra, last view of the sample (the "pixel controller"), clean at
  every step, its camera all zeros; every view's tokens see it through the multi-view
  self-attention (``in_channels = latent_channels``; its output is discarded);
* the input image's CLIP tokens (the image encoder's penultimate hidden states, a
  ``CLIPVisionModel``) through a perceiver resampler (diffusers' ``IPAdapterPlusImageProjection``)
  to ``image_tokens`` tokens, which the cross-attention reads with their own keys and values
  (:class:`fast3d.nn.ImageTokenAttnProcessor`) beside a fixed text context (``text_context``, the
  text encoder's output for ImageDream's prompt and negative prompt, stored with the weights);
* the view's camera as ImageDream's 16 numbers (:func:`imagedream_camera_features`) through the
  class embedding;
* dropping the image (classifier-free guidance) zeroes its latent and its CLIP tokens before the
  resampler and takes the negative text context, as ImageDream's pipeline does.

Rigs (``rig``): ``"lgm4"``: 4 views at azimuths 0, 90, 180, 270 degrees, elevation 0, LGM's field
of view and distance (``fast3d.inference.lgm.default_input_cameras`` of an LGM with the default
``fov_y_deg`` / ``camera_distance``); ``"era3d6"``: Era3D's 6 views front, front-right, right,
back, left, front-left (azimuths 0, 45, 90, 180, 270, 315 degrees in fast3d's convention, from +X
towards +Y), elevation 0, orthographic-like: a 10 degree pinhole far enough away to frame the
unit box as the lgm4 rig does. View 0 of both rigs is the input's own view. ``fov_y_deg`` /
``camera_distance`` override a rig's optics.

Sources: ``vae``: a local directory (an ``AutoencoderKL``, or a diffusers pipeline holding it under
``vae/``), ``"random-tiny"`` (a random ``AutoencoderKL`` of 16-32 channels, drawn from
``random_seed``) or ``"pixel"`` (no network: the latent is the image in [-1, 1] folded by
``pixel_unshuffle(vae_downsample)``, so ``latent_channels = 3 vae_downsample^2``; it decodes
exactly, which a random VAE cannot, so the CPU tests can measure image quality).
``image_encoder``: a local ``CLIPVisionModelWithProjection`` directory (or a pipeline holding
``image_encoder/``) or ``"random-tiny"``. ``unet_init``: a local Stable Diffusion 2.x UNet (or a
pipeline holding ``unet/``) whose weights start the denoiser (``conv_in``'s extra image-latent
input channels start at zero, the camera MLP's output layer at zero, so the network starts as the
image model), or ``"random"``. Nothing is ever downloaded. A saved model directory keeps the VAE's
and the image encoder's configs and weights, so loading it needs none of the sources.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fast3d import cameras as cams
from fast3d import checks
from fast3d.io.atomic import atomic_open
from fast3d.models import checkpoints
from fast3d.models.checkpoints import local_model_dir, seeded

MODEL_TYPE = "mvdiff"
RANDOM_TINY = "random-tiny"
PIXEL = "pixel"
CAMERA_FEATURES = 4   # (sin e, cos e, sin a, cos a)
IMAGEDREAM_CAMERA_FEATURES = 16   # a flattened 4 x 4 camera-to-world matrix
CONDITIONINGS = ("zero123", "imagedream")
VAE_FILE, IMAGE_ENCODER_FILE = "vae.json", "image_encoder.json"
# Stable Diffusion 2.x's training schedule (DDPMScheduler(**NOISE_SCHEDULE)); the samplers take it too.
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
PREDICTION_TYPES = ("epsilon", "v_prediction")
LAYOUTS = ("views", "rows")
# CLIP's image normalisation (the constants of OpenAI's CLIP preprocessing).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The rigs: azimuths (degrees, relative to the input view, which is view 0), elevation (degrees),
# and the default optics. era3d6: a 10 degree pinhole framing the unit box as the 49.1 degree one at
# DEFAULT_DISTANCE does (same distance * tan(fov / 2)), nearly orthographic.
_ERA3D_FOV = 10.0
RIGS = {
    "lgm4": dict(azimuths=(0.0, 90.0, 180.0, 270.0), elevation=0.0, fov_y_deg=cams.DEFAULT_FOV_Y_DEG,
                 distance=cams.DEFAULT_DISTANCE),
    "era3d6": dict(azimuths=(0.0, 45.0, 90.0, 180.0, 270.0, 315.0), elevation=0.0, fov_y_deg=_ERA3D_FOV,
                   distance=cams.DEFAULT_DISTANCE * math.tan(math.radians(cams.DEFAULT_FOV_Y_DEG / 2))
                   / math.tan(math.radians(_ERA3D_FOV / 2))),
}

_SD2 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_heads=(5, 10, 20, 20),
            cross_attention_dim=1024, norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
PRESETS = {
    "tiny": dict(resolution=32, block_out_channels=(32, 64), layers_per_block=1, attention_heads=(2, 4),
                 cross_attention_dim=32, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 vae=PIXEL, vae_downsample=4, latent_channels=48, vae_scaling_factor=1.0, image_embed_dim=32),
    "base": dict(resolution=256, **_SD2, vae_downsample=8, latent_channels=4, vae_scaling_factor=0.18215,
                 image_embed_dim=1024),
}


@dataclass(frozen=True)
class MVDiffConfig:
    rig: str = "lgm4"                 # lgm4 | era3d6
    layout: str = "views"             # views (ImageDream / MVDream) | rows (Era3D)
    conditioning: str = "zero123"     # zero123 | imagedream (module docstring)
    resolution: int = 256             # px side of every view and of the input image
    # The UNet (Stable Diffusion 2.x layout; attention_heads per level, linear projections).
    block_out_channels: tuple = _SD2["block_out_channels"]
    layers_per_block: int = 2
    attention_heads: tuple = _SD2["attention_heads"]
    cross_attention_dim: int = 1024
    norm_num_groups: int = 32
    down_block_types: tuple = _SD2["down_block_types"]
    up_block_types: tuple = _SD2["up_block_types"]
    prediction_type: str = "epsilon"  # epsilon | v_prediction (SD 2.1 768 px is v_prediction)
    # The latent space.
    latent_channels: int = 4
    vae_downsample: int = 8           # px per latent
    vae_scaling_factor: float = 0.18215
    image_embed_dim: int = 1024       # the image encoder's projection_dim (imagedream: its hidden_size)
    # imagedream only: the resampler (ImageDream's: 16 tokens, depth 4, 12 heads of 64) and the
    # length of the fixed text context.
    image_tokens: int = 16
    resampler_depth: int = 4
    resampler_heads: int = 12
    resampler_head_dim: int = 64
    text_tokens: int = 77
    background: float = 1.0           # grey level of the background the views are on (white)
    fov_y_deg: float | None = None    # None: the rig's
    camera_distance: float | None = None
    # Sources (module docstring).
    vae: str = RANDOM_TINY
    image_encoder: str = RANDOM_TINY
    unet_init: str = "random"
    random_seed: int = 0

    def __post_init__(self):
        checks.one_of("rig", self.rig, tuple(RIGS))
        checks.one_of("layout", self.layout, LAYOUTS)
        checks.one_of("conditioning", self.conditioning, CONDITIONINGS)
        checks.one_of("prediction_type", self.prediction_type, PREDICTION_TYPES)
        for name in ("resolution", "layers_per_block", "cross_attention_dim", "norm_num_groups", "latent_channels",
                     "vae_downsample", "image_embed_dim", "image_tokens", "resampler_depth", "resampler_heads",
                     "resampler_head_dim", "text_tokens"):
            checks.positive_int(name, getattr(self, name))
        checks.nonneg_int("random_seed", self.random_seed)
        n = len(self.block_out_channels)
        for name in ("block_out_channels", "attention_heads", "down_block_types", "up_block_types"):
            v = getattr(self, name)
            if not isinstance(v, tuple) or len(v) != n or n == 0:
                raise ValueError(f"{name} must be a list of {n} entries (one per UNet level, as block_out_channels); "
                                 f"got {v!r}")
        for c, h in zip(self.block_out_channels, self.attention_heads):
            checks.positive_int("block_out_channels[i]", c)
            checks.positive_int("attention_heads[i]", h)
            if c % h or c % self.norm_num_groups:
                raise ValueError(f"block_out_channels {list(self.block_out_channels)} must be multiples of their "
                                 f"attention_heads {list(self.attention_heads)} and of norm_num_groups "
                                 f"{self.norm_num_groups}")
        d = self.vae_downsample
        if d & (d - 1):
            raise ValueError(f"vae_downsample must be a power of two; got {d}")
        if self.resolution % (d * 2 ** (n - 1)):
            raise ValueError(f"resolution must be a multiple of vae_downsample * 2^(levels - 1) = {d * 2 ** (n - 1)} "
                             f"(the UNet halves the latent {n - 1} times); got {self.resolution}")
        if self.vae == PIXEL and self.latent_channels != 3 * d * d:
            raise ValueError(f"latent_channels must be 3 * vae_downsample^2 = {3 * d * d} with vae='pixel'; "
                             f"got {self.latent_channels}")
        checks.real("vae_scaling_factor", self.vae_scaling_factor, 0, lo_open=True)
        checks.real("background", self.background, 0, 1)
        checks.real("fov_y_deg", self.fov_y_deg, 0, 180, lo_open=True, hi_open=True, optional=True)
        checks.real("camera_distance", self.camera_distance, 0, lo_open=True, optional=True)
        for name in ("vae", "image_encoder", "unet_init"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a local directory or a random source name; got {value!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> MVDiffConfig:
        """A named configuration (``tiny``, ``base``) with fields replaced by ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {name!r}")
        return checkpoints.dataclass_from_dict(cls, {**PRESETS[name], **overrides}, what=f"preset {name!r}")

    @property
    def num_views(self) -> int:
        return len(RIGS[self.rig]["azimuths"])

    @property
    def camera_dim(self) -> int:
        """The width of the denoiser's per-view camera input."""
        return IMAGEDREAM_CAMERA_FEATURES if self.conditioning == "imagedream" else CAMERA_FEATURES

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_downsample

    @property
    def rig_fov_y_deg(self) -> float:
        return self.fov_y_deg if self.fov_y_deg is not None else RIGS[self.rig]["fov_y_deg"]

    @property
    def rig_distance(self) -> float:
        return self.camera_distance if self.camera_distance is not None else RIGS[self.rig]["distance"]

    def rig_angles(self) -> tuple[Tensor, Tensor]:  # -> azimuths [V], elevations [V], radians, float64
        """The rig's azimuths (relative to the input view) and elevations."""
        r = RIGS[self.rig]
        az = torch.deg2rad(torch.tensor(r["azimuths"], dtype=torch.float64))
        return az, torch.full_like(az, math.radians(r["elevation"]))


def camera_features(elevations: Tensor,          # [...] radians
                    relative_azimuths: Tensor,   # [...] radians, the view's azimuth minus the input's
                    ) -> Tensor:                 # [..., 4] float32
    """The per-view camera input of the denoiser: (sin e, cos e, sin a, cos a)."""
    e, a = elevations.double(), relative_azimuths.double()
    return torch.stack([torch.sin(e), torch.cos(e), torch.sin(a), torch.cos(a)], -1).float()


# OpenGL (+Y up) -> Blender (+Z up) world, applied on the left of ImageDream's camera-to-world matrices
_OPENGL_TO_BLENDER = ((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, -1.0, 0.0), (0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 0.0, 1.0))
# ImageDream's azimuth of the input (front) view: its cameras' +X in Blender's world, threestudio's
# azimuth 0 (LGM's infer.py reorders ImageDream's four outputs 1, 2, 3, 0 into its own rig)
IMAGEDREAM_FRONT_AZIMUTH = math.pi / 2


def imagedream_camera_features(elevations: Tensor,          # [...] radians
                               relative_azimuths: Tensor,   # [...] radians, the view's azimuth minus the input's
                               ) -> Tensor:                 # [..., 16] float32
    """ImageDream's / MVDream's camera input: the camera-to-world matrix of a camera on the unit
    sphere looking at the origin (OpenGL axes: azimuth 0 at +Z, 90 degrees at +X, elevation
    towards +Y; columns right, up, backward, position), its world turned to Blender's (+Z up),
    flattened row by row. ImageDream's azimuth is the relative azimuth plus
    ``IMAGEDREAM_FRONT_AZIMUTH`` (its input view is at 90 degrees; it turns the same way as fast3d's,
    right-handed about the up axis), so the lgm4 rig's views 0..3 are ImageDream's outputs 1, 2, 3,
    0. Undefined at elevation +-90 degrees, as the original."""
    e, a = elevations.double(), relative_azimuths.double() + IMAGEDREAM_FRONT_AZIMUTH
    pos = torch.stack([torch.cos(e) * torch.sin(a), torch.sin(e), torch.cos(e) * torch.cos(a)], -1)   # [..., 3]
    forward = -pos
    up = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand_as(pos)
    right = F.normalize(torch.linalg.cross(forward, up), dim=-1)
    new_up = F.normalize(torch.linalg.cross(right, forward), dim=-1)
    c2w = torch.zeros(*pos.shape[:-1], 4, 4, dtype=torch.float64)
    c2w[..., :3, :3] = torch.stack([right, new_up, pos], -1)                    # columns; -forward = pos
    c2w[..., :3, 3] = pos
    c2w[..., 3, 3] = 1
    return (torch.tensor(_OPENGL_TO_BLENDER, dtype=torch.float64) @ c2w).flatten(-2).float()


def view_camera_features(cfg: MVDiffConfig,
                         elevations: Tensor,          # [...] radians
                         relative_azimuths: Tensor,   # [...] radians
                         ) -> Tensor:                 # [..., cfg.camera_dim] float32
    """The denoiser's camera input for ``cfg``'s conditioning."""
    f = imagedream_camera_features if cfg.conditioning == "imagedream" else camera_features
    return f(elevations, relative_azimuths)


def azimuth_elevation(viewmats: Tensor) -> tuple[Tensor, Tensor]:  # [..., 4, 4] -> azimuths [...], elevations [...]
    """Each camera's direction from the origin in fast3d's world (+Z up; azimuth from +X towards +Y)."""
    c = cams.camera_centers(viewmats.double())
    return torch.atan2(c[..., 1], c[..., 0]), torch.atan2(c[..., 2], c[..., :2].norm(dim=-1))




# --- the denoiser --------------------------------------------------------------------------------


def unet_kwargs(cfg: MVDiffConfig) -> dict:
    """``UNet2DConditionModel`` arguments for ``cfg``: SD 2.x's layout (linear projections in the
    transformers, head counts per level), the image latent as extra input channels, the camera MLP
    as a projection class embedding."""
    image_latent_channels = 0 if cfg.conditioning == "imagedream" else cfg.latent_channels
    return dict(sample_size=cfg.latent_size, in_channels=cfg.latent_channels + image_latent_channels,
                out_channels=cfg.latent_channels,
                down_block_types=tuple(cfg.down_block_types), up_block_types=tuple(cfg.up_block_types),
                block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                attention_head_dim=tuple(cfg.attention_heads), cross_attention_dim=cfg.cross_attention_dim,
                norm_num_groups=cfg.norm_num_groups, use_linear_projection=True,
                class_embed_type="projection", projection_class_embeddings_input_dim=cfg.camera_dim)


class MVDenoiser(nn.Module):
    """The trained network: the multi-view UNet and the image-embedding projection.

    Args:
        cfg: the model configuration.
        attention_backend: passed to :class:`fast3d.nn.MultiViewAttnProcessor`.
    """

    def __init__(self, cfg: MVDiffConfig, attention_backend: str = "auto"):
        super().__init__()
        from diffusers import UNet2DConditionModel

        from fast3d.nn import ImageTokenAttnProcessor, MultiViewAttnProcessor

        self.config, self.num_views = cfg, cfg.num_views
        self.imagedream = cfg.conditioning == "imagedream"
        self.unet = UNet2DConditionModel(**unet_kwargs(cfg))
        D = cfg.cross_attention_dim
        if not self.imagedream:
            self.unet.set_attn_processor(MultiViewAttnProcessor(cfg.num_views, cfg.layout, backend=attention_backend))
            self.image_proj = nn.Linear(cfg.image_embed_dim, D)
            return
        from diffusers.models.embeddings import IPAdapterPlusImageProjection

        # the input image is one more view (the pixel controller) in the self-attention
        views = MultiViewAttnProcessor(cfg.num_views + 1, cfg.layout, backend=attention_backend)
        attn = dict(self.unet.named_modules())
        self.unet.set_attn_processor({
            name: views if name.endswith("attn1.processor") else
            ImageTokenAttnProcessor(attn[name.removesuffix(".processor")].to_q.out_features, D, cfg.image_tokens)
            for name in self.unet.attn_processors})
        self.image_proj = IPAdapterPlusImageProjection(
            embed_dims=cfg.image_embed_dim, output_dims=D, hidden_dims=D, depth=cfg.resampler_depth,
            dim_head=cfg.resampler_head_dim, heads=cfg.resampler_heads, num_queries=cfg.image_tokens)
        # the text encoder's output for the prompt (row 0) and the negative prompt (row 1)
        self.register_buffer("text_context", torch.zeros(2, cfg.text_tokens, D))

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def forward(self,
                noisy: Tensor,         # [B, V, C, h, w] noisy latents of the views
                cond_latent: Tensor,   # [B, C, h, w] the input image's (scaled) latent
                image_embeds: Tensor,  # [B, E] the input image's CLIP image embedding (imagedream: [B, T, E] tokens)
                cameras: Tensor,       # [B, V, cfg.camera_dim] view_camera_features of each view
                timesteps: Tensor,     # [B] int
                drop: Tensor | None = None,  # [B] bool: drop the image condition (classifier-free guidance)
                ) -> Tensor:           # [B, V, C, h, w] the prediction (noise or v, per prediction_type)
        """The UNet's prediction for each view. Args are as the shape comments say; ``drop`` zeroes
        the sample's image latent and image token (the unconditional model of classifier-free
        guidance; imagedream: zeroes its latent and CLIP tokens and takes the negative text context)."""
        B, V, C, h, w = noisy.shape
        if V != self.num_views:
            raise ValueError(f"noisy has V = {V} views; the model's rig {self.config.rig!r} has {self.num_views}")
        if tuple(cameras.shape) != (B, V, self.config.camera_dim):
            raise ValueError(f"cameras must be [B, V, {self.config.camera_dim}] = [{B}, {V}, {self.config.camera_dim}] "
                             f"({self.config.conditioning}'s camera features); got {tuple(cameras.shape)}")
        want = 3 if self.imagedream else 2
        if image_embeds.dim() != want or image_embeds.shape[0] != B:
            raise ValueError(f"image_embeds must be [B, {'T, ' if self.imagedream else ''}E] with B = {B} "
                             f"({self.config.conditioning}: the image encoder's "
                             f"{'penultimate tokens' if self.imagedream else 'embedding'}); got {tuple(image_embeds.shape)}")
        if self.imagedream:
            return self._forward_imagedream(noisy, cond_latent, image_embeds, cameras, timesteps, drop)
        dtype = self.image_proj.weight.dtype
        tokens = self.image_proj(image_embeds.to(dtype))[:, None]                  # [B, 1, D]
        cond = cond_latent.to(dtype)
        if drop is not None:
            keep = (~drop).to(dtype)
            tokens = tokens * keep[:, None, None]
            cond = cond * keep[:, None, None, None]
        x = torch.cat([noisy.to(dtype), cond[:, None].expand(B, V, C, h, w)], 2).flatten(0, 1)   # [B*V, 2C, h, w]
        out = self.unet(x, timesteps.repeat_interleave(V), encoder_hidden_states=tokens.repeat_interleave(V, 0),
                        class_labels=cameras.flatten(0, 1).to(dtype)).sample                  # [B*V, C, h, w]
        return out.unflatten(0, (B, V))

    def _forward_imagedream(self, noisy: Tensor, cond_latent: Tensor, image_tokens: Tensor, cameras: Tensor,
                            timesteps: Tensor, drop: Tensor | None) -> Tensor:
        """:meth:`forward` with ImageDream's conditioning (module docstring)."""
        B, V, C, h, w = noisy.shape
        dtype = self.unet.conv_in.weight.dtype
        tokens, cond = image_tokens.to(dtype), cond_latent.to(dtype)
        text = self.text_context[0].to(dtype).expand(B, -1, -1)                   # [B, L, D]
        if drop is not None:
            keep = (~drop).to(dtype)
            tokens = tokens * keep[:, None, None]
            cond = cond * keep[:, None, None, None]
            text = torch.where(drop[:, None, None], self.text_context[1].to(dtype), text)
        context = torch.cat([text, self.image_proj(tokens)], 1)                  # [B, L + K, D]
        x = torch.cat([noisy.to(dtype), cond[:, None]], 1).flatten(0, 1)        # [B*(V+1), C, h, w]
        cams = torch.cat([cameras.to(dtype), cameras.new_zeros(B, 1, cameras.shape[-1]).to(dtype)], 1)
        out = self.unet(x, timesteps.repeat_interleave(V + 1), encoder_hidden_states=context.repeat_interleave(V + 1, 0),
                        class_labels=cams.flatten(0, 1)).sample                  # [B*(V+1), C, h, w]
        return out.unflatten(0, (B, V + 1))[:, :V]

    def load_unet_init(self, source: str) -> None:
        """Start from a Stable Diffusion 2.x UNet (module docstring): every weight of the same shape
        is copied; ``conv_in`` gets its weights on the noisy-latent channels and zeros on the
        image-latent ones; the camera MLP's output layer starts at zero (a no-op on the time
        embedding). ValueError if the UNet's layout differs from the config's."""
        state, path = read_unet_init(source, unet_kwargs(self.config))
        own = self.unet.state_dict()
        C = self.config.latent_channels
        w = torch.zeros_like(own["conv_in.weight"])
        w[:, :C] = state["conv_in.weight"]
        state["conv_in.weight"] = w
        state |= {k: v for k, v in own.items() if ".processor." in k}      # imagedream's image-token keys: random
        for k in own:
            if k.startswith("class_embedding."):
                state[k] = torch.zeros_like(own[k]) if k.startswith("class_embedding.linear_2") else own[k]
        checkpoints.load_state(self.unet, state, path)


def read_unet_init(source: str, want: dict) -> tuple[dict, str]:
    """The weights of the Stable Diffusion 2.x UNet in local directory ``source`` (or in its
    ``unet/``) and the directory read; ValueError if its layout (blocks, widths, heads, output
    channels) differs from ``want``, the ``UNet2DConditionModel`` arguments of the model it starts
    (its input channels and class embedding may differ: the caller adapts them)."""
    from diffusers import UNet2DConditionModel

    path = local_model_dir(source, "unet_init", "unet")
    sd = UNet2DConditionModel.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    keys = ("down_block_types", "up_block_types", "block_out_channels", "layers_per_block", "attention_head_dim",
            "cross_attention_dim", "norm_num_groups", "use_linear_projection", "out_channels")
    diff = {k: (sd.config.get(k), want[k]) for k in keys
            if (tuple(v) if isinstance(v := sd.config.get(k), list) else v) != want[k]}
    if diff:
        raise ValueError(f"unet_init {source!r} is another UNet than the config's: (snapshot, config) differ in {diff}")
    return dict(sd.state_dict()), path


# --- the frozen parts ----------------------------------------------------------------------------


class PixelAutoencoder(nn.Module):
    """The ``"pixel"`` latent space: images in [-1, 1] folded by ``pixel_unshuffle(factor)``; no
    weights, exactly invertible. The methods mirror what :class:`MVDiffusion` uses of an
    ``AutoencoderKL``."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor
        # no weights: an empty buffer, not saved, that .to() moves, tells the device latents go to
        self.register_buffer("device_tag", torch.empty(0), persistent=False)

    def encode_images(self, x: Tensor) -> Tensor:  # [N, 3, R, R] in [-1, 1] -> [N, 3 f^2, R/f, R/f]
        return F.pixel_unshuffle(x, self.factor)

    def decode_latents(self, z: Tensor) -> Tensor:  # [N, 3 f^2, R/f, R/f] -> [N, 3, R, R]
        return F.pixel_shuffle(z, self.factor)


def _tiny_vae_config(cfg: MVDiffConfig) -> dict:
    n = int(math.log2(cfg.vae_downsample)) + 1
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=[16] + [32] * (n - 1), layers_per_block=1,
                latent_channels=cfg.latent_channels, norm_num_groups=8, sample_size=cfg.resolution,
                scaling_factor=cfg.vae_scaling_factor)


def _tiny_image_encoder_config(cfg: MVDiffConfig) -> dict:
    hidden = cfg.image_embed_dim if cfg.conditioning == "imagedream" else 32
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
                image_size=32, patch_size=8, projection_dim=cfg.image_embed_dim)


def build_vae(cfg: MVDiffConfig, config: dict | None = None):
    """The VAE: from ``config`` (an ``AutoencoderKL`` config dict; a saved model's), else from
    ``cfg.vae`` (module docstring); checked against the config's latent space."""
    from diffusers import AutoencoderKL

    if cfg.vae == PIXEL:
        return PixelAutoencoder(cfg.vae_downsample)
    if config is not None:
        vae = AutoencoderKL.from_config(config)
    elif cfg.vae == RANDOM_TINY:
        with seeded(cfg.random_seed):
            vae = AutoencoderKL(**_tiny_vae_config(cfg))
    else:
        vae = AutoencoderKL.from_pretrained(local_model_dir(cfg.vae, "vae", "vae"), local_files_only=True,
                                            torch_dtype=torch.float32)
    c = vae.config
    got = dict(vae_downsample=2 ** (len(c.block_out_channels) - 1), latent_channels=c.latent_channels,
               vae_scaling_factor=c.scaling_factor)
    want = dict(vae_downsample=cfg.vae_downsample, latent_channels=cfg.latent_channels,
                vae_scaling_factor=cfg.vae_scaling_factor)
    if got != want:
        raise ValueError(f"vae {cfg.vae!r} does not match the config: it has {got}, the config expects {want}")
    return vae.eval().requires_grad_(False)


def build_image_encoder(cfg: MVDiffConfig, config: dict | None = None):
    """The CLIP image encoder (``CLIPVisionModelWithProjection``; imagedream: ``CLIPVisionModel``):
    from ``config`` (a saved model's ``CLIPVisionConfig`` dict), else from ``cfg.image_encoder``;
    its ``projection_dim`` (imagedream: ``hidden_size``) must be the config's ``image_embed_dim``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    imagedream = cfg.conditioning == "imagedream"
    cls = CLIPVisionModel if imagedream else CLIPVisionModelWithProjection
    if config is not None:
        enc = cls(CLIPVisionConfig.from_dict(config))
    elif cfg.image_encoder == RANDOM_TINY:
        with seeded(cfg.random_seed + 1):
            enc = cls(CLIPVisionConfig(**_tiny_image_encoder_config(cfg)))
    else:
        enc = cls.from_pretrained(local_model_dir(cfg.image_encoder, "image_encoder", "image_encoder"),
                                  local_files_only=True, dtype=torch.float32)
    field = "hidden_size" if imagedream else "projection_dim"
    if getattr(enc.config, field) != cfg.image_embed_dim:
        raise ValueError(f"image_encoder {cfg.image_encoder!r} has {field} {getattr(enc.config, field)}; the "
                         f"config expects image_embed_dim={cfg.image_embed_dim}")
    return enc.eval().requires_grad_(False)


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    if p is None:
        p = next(module.buffers(), None)
    return p.device if p is not None else torch.device("cpu")


def encode_latents(vae, cfg: MVDiffConfig,
                   images: Tensor,                               # [N, 3, R, R] in [0, 1]
                   generator: torch.Generator | None = None,
                   ) -> Tensor:                                  # [N, C, h, w]
    """The images' latents times ``vae_scaling_factor``, on the VAE's device: the posterior's mean,
    or a sample of it drawn from ``generator`` (a CPU generator) when one is given."""
    dev = _device(vae)
    x = images.to(dev, torch.float32) * 2 - 1
    if isinstance(vae, PixelAutoencoder):
        z = vae.encode_images(x)
    else:
        dist = vae.encode(x).latent_dist
        z = dist.mean
        if generator is not None:
            z = z + dist.std * torch.randn(z.shape, generator=generator).to(dev)
    return z * cfg.vae_scaling_factor


def decode_latents(vae, cfg: MVDiffConfig,
                   z: Tensor,        # [N, C, h, w], scaled
                   ) -> Tensor:      # [N, 3, R, R] in [0, 1]
    """Images from scaled latents, on the VAE's device."""
    z = z.to(_device(vae), torch.float32) / cfg.vae_scaling_factor
    x = vae.decode_latents(z) if isinstance(vae, PixelAutoencoder) else vae.decode(z).sample
    return ((x + 1) / 2).clamp(0, 1)


def image_embeds(encoder,
                 images: Tensor,  # [N, 3, R, R] in [0, 1]
                 ) -> Tensor:     # [N, E] (a CLIPVisionModel: [N, T, E])
    """CLIP image embeddings on the encoder's device: the images resized (bicubic, antialiased) to
    the encoder's size and normalised as CLIP's preprocessing does. A
    ``CLIPVisionModelWithProjection`` gives its projected embedding; a ``CLIPVisionModel``
    (imagedream) its penultimate hidden states, every token (ImageDream's image input)."""
    from transformers import CLIPVisionModelWithProjection

    s = encoder.config.image_size
    dev = _device(encoder)
    x = F.interpolate(images.to(dev, torch.float32), size=(s, s), mode="bicubic", antialias=True,
                      align_corners=False).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=dev)[:, None, None]
    std = torch.tensor(CLIP_STD, device=dev)[:, None, None]
    pixels = (x - mean) / std
    if isinstance(encoder, CLIPVisionModelWithProjection):
        return encoder(pixel_values=pixels).image_embeds
    return encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


def build_denoiser(cfg: MVDiffConfig, attention_backend: str = "auto") -> MVDenoiser:
    """A denoiser for ``cfg``: random from ``random_seed`` (diffusers' initialisation), then
    ``unet_init``'s weights when it names a directory."""
    with seeded(cfg.random_seed + 2):
        model = MVDenoiser(cfg, attention_backend)
    if cfg.unet_init != "random":
        model.load_unet_init(cfg.unet_init)
    return model


# --- the whole model -----------------------------------------------------------------------------


class MVDiffusion(nn.Module):
    """Image-conditioned multi-view diffusion: the denoiser, the VAE and the CLIP image encoder.

    Args:
        config: the model configuration.
        denoiser: the trained :class:`MVDenoiser`, or None to build it (:func:`build_denoiser`).
        vae: the VAE, or None to build it from ``config.vae``.
        image_encoder: the CLIP image encoder, or None to build it from ``config.image_encoder``.
    """

    def __init__(self, config: MVDiffConfig, denoiser: MVDenoiser | None = None, vae=None, image_encoder=None):
        super().__init__()
        self.config = config
        self.denoiser = denoiser if denoiser is not None else build_denoiser(config)
        self.vae = vae if vae is not None else build_vae(config)
        self.image_encoder = image_encoder if image_encoder is not None else build_image_encoder(config)

    @property
    def num_views(self) -> int:
        return self.config.num_views

    @property
    def device(self) -> torch.device:
        return self.denoiser.unet.conv_in.weight.device

    def rig_cameras(self, resolution: int | None = None) -> tuple[Tensor, Tensor]:  # -> [V, 4, 4], [V, 3, 3]
        """The rig's cameras (OpenCV world-to-camera ``viewmats``, pixel ``Ks`` of ``resolution``
        px images, default the model's), in a world where the input view is at azimuth 0."""
        r = self.config.resolution if resolution is None else checks.positive_int("resolution", resolution)
        az, el = self.config.rig_angles()
        return cams.orbit_cameras(az, el, self.config.rig_distance, self.config.rig_fov_y_deg, r)

    def rig_camera_features(self) -> Tensor:  # -> [V, camera_dim]
        """The denoiser's camera input for the rig's views."""
        az, el = self.config.rig_angles()
        return view_camera_features(self.config, el, az)

    def encode_latents(self, images: Tensor,                 # [N, 3, R, R] in [0, 1]
                       generator: torch.Generator | None = None) -> Tensor:  # -> [N, C, h, w], scaled
        """:func:`encode_latents` with this model's VAE."""
        return encode_latents(self.vae, self.config, images, generator)

    def decode_latents(self, z: Tensor,   # [N, C, h, w], scaled
                       ) -> Tensor:       # [N, 3, R, R] in [0, 1]
        """:func:`decode_latents` with this model's VAE."""
        return decode_latents(self.vae, self.config, z)

    def image_embeds(self, images: Tensor,  # [N, 3, R, R] in [0, 1]
                     ) -> Tensor:           # [N, E] (imagedream: [N, T, E])
        """:func:`image_embeds` with this model's image encoder."""
        return image_embeds(self.image_encoder, images)

    # --- model directories ---

    def save_pretrained(self, path: str) -> None:
        """Write ``path/config.yaml``, ``path/model.safetensors`` (denoiser, VAE and image-encoder
        weights) and the VAE's and image encoder's configs (``vae.json``, ``image_encoder.json``)."""
        state = {f"denoiser.{k}": v for k, v in self.denoiser.state_dict().items()}
        state |= {f"vae.{k}": v for k, v in self.vae.state_dict().items()}
        state |= {f"image_encoder.{k}": v for k, v in self.image_encoder.state_dict().items()}
        checkpoints.save_pretrained(path, MODEL_TYPE, self.config, state)
        save_frozen_configs(path, self.vae, self.image_encoder)

    @classmethod
    def from_pretrained(cls, path: str, attention_backend: str = "auto") -> MVDiffusion:
        """A model directory written by :meth:`save_pretrained`; ValueError if it is not one (or holds
        another model type). Needs none of the config's sources."""
        cfg = checkpoints.read_config(path, MODEL_TYPE, MVDiffConfig)
        with seeded(0):
            model = cls(cfg, MVDenoiser(cfg, attention_backend), *build_frozen_parts(path, cfg))
        checkpoints.load_state(model, checkpoints.read_weights(path), path)
        return model.eval()


def save_frozen_configs(path: str, vae, image_encoder) -> None:
    """Write the VAE's and the image encoder's configs (``vae.json``, ``image_encoder.json``) into
    model directory ``path``, so that loading it needs none of the config's sources."""
    vae_cfg = None if isinstance(vae, PixelAutoencoder) else dict(vae.config)
    for name, d in ((VAE_FILE, vae_cfg), (IMAGE_ENCODER_FILE, image_encoder.config.to_dict())):
        with atomic_open(os.path.join(path, name)) as f:
            json.dump(d, f, indent=1, default=str)


def build_frozen_parts(path: str, cfg: MVDiffConfig) -> tuple:  # -> (vae, image_encoder)
    """The VAE and the image encoder of model directory ``path``, built from the configs
    :func:`save_frozen_configs` wrote (their weights come with the model's); ValueError naming the
    file when one is missing or unreadable."""
    sub = {}
    for name in (VAE_FILE, IMAGE_ENCODER_FILE):
        f = os.path.join(path, name)
        try:
            with open(f) as fh:
                sub[name] = json.load(fh)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"checkpoint {path!r}: cannot read {name} ({e})") from None
    vae_cfg = {k: v for k, v in (sub[VAE_FILE] or {}).items() if not k.startswith("_")} or None
    return build_vae(cfg, vae_cfg), build_image_encoder(cfg, sub[IMAGE_ENCODER_FILE])
