"""Stable Video Diffusion as VFusion3D's multi-view data engine: the model pieces, which parameters
its fine-tuning trains, SVD's conditioning and its EDM denoising loss.

VFusion3D (Han et al. 2024, section 3.1, /work/shared/seeds/vfusion3d-paper.txt) fine-tunes a
video diffusion model (EMU Video there; Stable Video Diffusion's
``UNetSpatioTemporalConditionModel`` here) on rendered orbits so that its videos are turntables:
"We freeze all parameters, except for the temporal convolutional and attention layers". In the
diffusers SVD U-Net those are the ``temporal_res_block`` of every ``SpatioTemporalResBlock`` (the
temporal convolutions, their norms and time-embedding projection) and the
``temporal_transformer_blocks`` of every ``TransformerSpatioTemporalModel`` (the temporal self- and
cross-attention, their feed-forwards and norms): :func:`temporal_parameter_names`. The learned
spatial/temporal blend factors (``time_mixer``) and the frame-position embeddings
(``time_pos_embed``) are neither, and stay frozen with the spatial layers. SVD's cross-attention
context is a single CLIP token, so in the temporal blocks the cross-attention's query and key
projections and the norm before them receive no gradient (a softmax over one key is 1): trainable,
they stay put.

A model is a diffusers ``StableVideoDiffusionPipeline`` directory (U-Net, temporal-decoder VAE, CLIP
image encoder, feature extractor, Euler scheduler), loaded with ``local_files_only`` (nothing is
ever downloaded), ``"random-tiny"``: random weights at diffusers' own test sizes, drawn from a
fixed seed (the same model every time), for CPU tests, or ``"random-tiny-pixel"``: the same tiny
U-Net over an exact latent space instead of the random VAE (:class:`PixelVideoAutoencoder`, the
``"pixel"`` latent of :mod:`fast3d.models.mvdiff`: the frame in [-1, 1] folded by
``pixel_unshuffle(2)``), so that a tiny model's decoded frames can be compared with renders (PSNR).
The fine-tuned model is written as a whole pipeline directory, so ``fast3d datagen pipeline`` loads
it with ``mv.model: DIR`` as it loads the stock weights.
"""

from __future__ import annotations

import json
import os

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from torch import Tensor

from fast3d.models.checkpoints import seeded
from fast3d.models.mvdiff import PixelAutoencoder

RANDOM_TINY = "random-tiny"
RANDOM_TINY_PIXEL = "random-tiny-pixel"
TINY_SOURCES = (RANDOM_TINY, RANDOM_TINY_PIXEL)
PIXEL_FACTOR = 2    # px per latent of the tiny models (their random VAE's downsampling too)
# The parameter-name parts of the layers VFusion3D fine-tunes (module docstring).
TEMPORAL_MODULES = ("temporal_res_block", "temporal_transformer_blocks")


class PixelVideoAutoencoder(ModelMixin, ConfigMixin):
    """mvdiff's exact ``"pixel"`` latent space (:class:`fast3d.models.mvdiff.PixelAutoencoder`) behind
    the interface a diffusers video pipeline uses of ``AutoencoderKLTemporalDecoder``:
    ``encode(x).latent_dist`` is a zero-variance Gaussian at ``pixel_unshuffle(x)`` (``mode()`` and
    ``sample()`` are the latent itself) and ``decode(z).sample`` is ``pixel_shuffle(z)``. No weights;
    saved and loaded as a diffusers model (config only) inside a pipeline directory. Its config
    states ``block_out_channels`` only because diffusers' pipelines read their downsampling factor
    from it (``2 ** (len - 1)``).

    Args:
        factor: px per latent (a power of two); the latent has ``3 factor^2`` channels.
        scaling_factor: what the pipelines multiply latents by (1: the frame in [-1, 1] as it is).
    """

    config_name = "config.json"

    def __init__(self, factor: int = PIXEL_FACTOR, scaling_factor: float = 1.0):
        super().__init__()
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1 or factor & (factor - 1):
            raise ValueError(f"factor must be a power of two >= 1; got {factor!r}")
        self.register_to_config(factor=factor, scaling_factor=float(scaling_factor), force_upcast=False,
                                block_out_channels=(3,) * factor.bit_length())
        self.pixel = PixelAutoencoder(factor)
        # Empty: where diffusers reads a model's device and dtype from (there are no weights to read them from).
        self.register_buffer("placement", torch.empty(0), persistent=False)

    @classmethod
    def from_directory(cls, path: str) -> PixelVideoAutoencoder:
        """The autoencoder whose config ``save_pretrained`` wrote in ``path``."""
        with open(os.path.join(path, cls.config_name)) as f:
            c = json.load(f)
        return cls(c["factor"], c["scaling_factor"])

    def encode(self, x: Tensor,  # [N, 3, H, W] in [-1, 1]
               return_dict: bool = True):  # latent_dist over [N, 3 f^2, H/f, W/f]
        z = self.pixel.encode_images(x)
        dist = DiagonalGaussianDistribution(torch.cat([z, torch.zeros_like(z)], dim=1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: Tensor,  # [N, 3 f^2, h, w]
               num_frames: int | None = None, return_dict: bool = True):  # sample [N, 3, h f, w f]
        x = self.pixel.decode_latents(z)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, x: Tensor,  # [N, 3, H, W] in [-1, 1]
                num_frames: int | None = None) -> Tensor:  # -> [N, 3, H, W]: x itself
        return self.decode(self.encode(x).latent_dist.mode(), num_frames).sample


def check_source(key: str, source: str) -> None:
    """ValueError naming ``key`` unless ``source`` is one of :data:`TINY_SOURCES` or a local SVD
    pipeline directory."""
    want = f"{RANDOM_TINY!r}, {RANDOM_TINY_PIXEL!r} or a local Stable Video Diffusion pipeline directory"
    if not isinstance(source, str) or not source:
        raise ValueError(f"{key} must be {want}; got {source!r}")
    if source in TINY_SOURCES:
        return
    if not os.path.isdir(source):
        raise ValueError(f"{key} must be {want}; got {source!r}, which is not a directory (weights are never "
                         f"downloaded)")
    if not os.path.isfile(os.path.join(source, "model_index.json")) or \
            not os.path.isdir(os.path.join(source, "unet")):
        raise ValueError(f"{key} {source!r} is not a diffusers pipeline directory (expected model_index.json and "
                         f"unet/ in it)")


def tiny_pipeline(num_frames: int = 16, seed: int = 0, pixel: bool = False):
    """A random tiny ``StableVideoDiffusionPipeline`` (diffusers' test sizes: 32/64 channels, a
    latent at half the frame size, CLIP at 224 px with 32-px patches), the same for the same seed.
    ``pixel``: the exact :class:`PixelVideoAutoencoder` (12 latent channels) instead of a random VAE
    (4 channels), the U-Net sized for it (``"random-tiny-pixel"``)."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    latent = 3 * PIXEL_FACTOR ** 2 if pixel else 4
    with seeded(seed):
        unet = UNetSpatioTemporalConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, num_frames=num_frames, in_channels=2 * latent,
            out_channels=latent, down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=32,
            num_attention_heads=8, transformer_layers_per_block=1, addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24)
        if pixel:
            vae = PixelVideoAutoencoder(PIXEL_FACTOR)
        else:
            vae = AutoencoderKLTemporalDecoder(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                                               down_block_types=("DownEncoderBlock2D",) * 2, latent_channels=latent)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=224,
            intermediate_size=37, patch_size=32))
    # SVD-img2vid's scheduler configuration (continuous timesteps 0.25 log sigma, v-prediction, Karras sigmas).
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
        timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True)
    return StableVideoDiffusionPipeline(vae=vae, image_encoder=encoder, unet=unet, scheduler=scheduler,
                                        feature_extractor=CLIPImageProcessor(crop_size=224, size=224))


def load_pipeline(source: str, num_frames: int = 16, key: str = "model.pretrained"):
    """The SVD pipeline of ``source`` (one of :data:`TINY_SOURCES` or a local directory), in float32
    on the CPU. ValueError naming ``key`` when it is none of them."""
    from diffusers import StableVideoDiffusionPipeline

    check_source(key, source)
    if source in TINY_SOURCES:
        pipe = tiny_pipeline(num_frames, pixel=source == RANDOM_TINY_PIXEL)
    else:
        with open(os.path.join(source, "model_index.json")) as f:
            vae_kind = json.load(f).get("vae", [None, None])[1]
        pixel = vae_kind == PixelVideoAutoencoder.__name__
        try:  # a pixel latent space has no weights to load: the rest is loaded, then it is put in
            pipe = StableVideoDiffusionPipeline.from_pretrained(source, local_files_only=True, dtype=torch.float32,
                                                                **({"vae": None} if pixel else {}))
            if pixel:
                pipe = StableVideoDiffusionPipeline(**{**pipe.components, "vae": PixelVideoAutoencoder.from_directory(
                    os.path.join(source, "vae"))})
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{key} {source!r}: cannot load it as a Stable Video Diffusion pipeline ({e})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def temporal_parameter_names(unet: torch.nn.Module) -> list[str]:
    """Names of the U-Net parameters VFusion3D fine-tunes: those inside a temporal convolution block
    or a temporal transformer block (module docstring)."""
    names = [n for n, _ in unet.named_parameters() if any(f".{m}." in f".{n}" for m in TEMPORAL_MODULES)]
    if not names:
        raise ValueError(f"the U-Net ({type(unet).__name__}) has no parameters under {TEMPORAL_MODULES}: not a "
                         f"spatio-temporal Stable Video Diffusion U-Net")
    return names


def freeze_all_but_temporal(unet: torch.nn.Module) -> int:
    """Set ``requires_grad`` on the temporal layers only. Returns their parameter count."""
    keep = set(temporal_parameter_names(unet))
    n = 0
    for name, p in unet.named_parameters():
        p.requires_grad_(name in keep)
        n += p.numel() if name in keep else 0
    return n


def clip_embeddings(image_encoder, feature_extractor,
                    frames: Tensor,   # [B, 3, H, W] in [0, 1]
                    ) -> Tensor:      # [B, 1, C] image embeddings (SVD's cross-attention context)
    """SVD's image conditioning, as its pipeline computes it from a picture: resized to 224 px with
    antialiasing in [-1, 1], then CLIP-normalised."""
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

    x = (_resize_with_antialiasing(frames * 2 - 1, (224, 224)) + 1) / 2
    mean = torch.tensor(feature_extractor.image_mean, device=x.device, dtype=x.dtype)[:, None, None]
    std = torch.tensor(feature_extractor.image_std, device=x.device, dtype=x.dtype)[:, None, None]
    dtype = next(image_encoder.parameters()).dtype
    return image_encoder(((x - mean) / std).to(dtype)).image_embeds[:, None]


def condition_latents(vae,
                      frames: Tensor,  # [B, 3, H, W] in [0, 1]
                      noise: Tensor,   # [B, 3, H, W] standard normal
                      noise_aug_strength: float) -> Tensor:  # -> [B, c, h, w]
    """SVD's concatenated image conditioning: the VAE posterior mode of the noise-augmented frame
    (unscaled, as the pipeline feeds it)."""
    x = frames * 2 - 1 + noise_aug_strength * noise
    return vae.encode(x.to(vae.dtype)).latent_dist.mode()


def added_time_ids(fps: int, motion_bucket_id: int, noise_aug_strength: float, batch: int) -> Tensor:  # -> [B, 3]
    """SVD's micro-conditioning as the pipeline passes it (it subtracts 1 from ``fps``)."""
    return torch.tensor([[fps - 1, motion_bucket_id, noise_aug_strength]], dtype=torch.float32).repeat(batch, 1)


def edm_loss(unet,
             latents: Tensor,      # [B, F, c, h, w] clean video latents (scaled by the VAE's scaling factor)
             cond: Tensor,         # [B, c, h, w] condition-frame latents (condition_latents)
             embeds: Tensor,       # [B, 1, C] CLIP image embeddings
             time_ids: Tensor,     # [B, 3] added_time_ids
             sigma: Tensor,        # [B] noise levels
             noise: Tensor,        # [B, F, c, h, w] standard normal
             dtype: torch.dtype = torch.float32) -> Tensor:  # -> [B] per-sample loss
    """SVD's training objective (Blattmann et al. 2023, after Karras et al.'s EDM): the U-Net sees
    ``c_in * (x + sigma n)`` concatenated with the condition latents at ``c_noise = log(sigma) / 4``;
    its v-prediction is turned into a denoised estimate ``D = c_skip * x_noisy + c_out * F`` with
    ``c_skip = 1 / (sigma^2 + 1)``, ``c_out = -sigma / sqrt(sigma^2 + 1)`` (what the Euler scheduler
    of the pipeline inverts), and the loss is ``lambda(sigma) |D - x|^2`` with
    ``lambda = (1 + sigma^2) / sigma^2``, averaged over each sample's elements."""
    s = sigma.float().view(-1, 1, 1, 1, 1)
    noisy = latents + s * noise
    c_in, c_skip, c_out = 1 / (s * s + 1).sqrt(), 1 / (s * s + 1), -s / (s * s + 1).sqrt()
    F = latents.shape[1]
    x = torch.cat([noisy * c_in, cond[:, None].expand(-1, F, -1, -1, -1)], dim=2)
    out = unet(x.to(dtype), (sigma.float().log() / 4).to(dtype), encoder_hidden_states=embeds.to(dtype),
               added_time_ids=time_ids.to(dtype)).sample.float()
    denoised = c_skip * noisy + c_out * out
    weight = (1 + s * s) / (s * s)
    return (weight * (denoised - latents).pow(2)).flatten(1).mean(1)


def save_pipeline(path: str, pipe, unet: torch.nn.Module) -> None:
    """Write ``pipe`` with ``unet`` in place of its U-Net as a diffusers pipeline directory (float32)."""
    from diffusers import StableVideoDiffusionPipeline

    out = StableVideoDiffusionPipeline(vae=pipe.vae, image_encoder=pipe.image_encoder, unet=unet,
                                       scheduler=pipe.scheduler, feature_extractor=pipe.feature_extractor)
    unet_dtype = next(unet.parameters()).dtype
    if unet_dtype != torch.float32:  # bf16 / fp16 training: saved in float32, then back
        unet.to(torch.float32)
    try:
        out.save_pretrained(path, safe_serialization=True)
    finally:
        if unet_dtype != torch.float32:
            unet.to(unet_dtype)


@torch.no_grad()
def generate_orbits(pipe,
                    conditions: Tensor,   # [N, 3, H, W] in [0, 1]: the 0-azimuth views
                    num_frames: int, steps: int, seeds: list[int], min_guidance: float = 1.0,
                    max_guidance: float = 1.0, fps: int = 7, motion_bucket_id: int = 127,
                    noise_aug_strength: float = 0.02) -> Tensor:  # -> [N, F, 3, H, W] in [0, 1]
    """Orbit videos from condition frames, one pipeline call per video with its own seed, as
    ``fast3d datagen pipeline`` runs the model (8-bit pictures in)."""
    from PIL import Image

    from fast3d.io.images import to_uint8

    if conditions.dim() != 4 or conditions.shape[1] != 3:
        raise ValueError(f"conditions must be [N, 3, H, W]; got {tuple(conditions.shape)}")
    if len(seeds) != len(conditions):
        raise ValueError(f"seeds must have one seed per condition frame ({len(conditions)}); got {len(seeds)}")
    H, W = conditions.shape[-2:]
    dev = pipe.unet.device
    out = []
    for image, seed in zip(to_uint8(conditions), seeds):
        frames = pipe(Image.fromarray(image), height=H, width=W, num_frames=num_frames, num_inference_steps=steps,
                      min_guidance_scale=min_guidance, max_guidance_scale=max_guidance, fps=fps,
                      motion_bucket_id=motion_bucket_id, noise_aug_strength=noise_aug_strength,
                      decode_chunk_size=num_frames, generator=torch.Generator(dev).manual_seed(int(seed)),
                      output_type="pt").frames
        out.append(frames[0].float().clamp(0, 1).cpu())
    return torch.stack(out)
