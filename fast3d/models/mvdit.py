"""The multi-view diffusion transformer of Bootstrap3D: PixArt-alpha (DiT-XL/2, T5 captions) that
generates the 4 views of an object as one 2x2 grid image, fine-tuned from PixArt-alpha.

* :class:`MVDiTConfig` (presets ``tiny``, ``xl-256``, ``xl-512``) holds the transformer's size, the
  grid size and where the VAE, text encoder and initial transformer weights come from.
* Builders: :func:`build_transformer` (diffusers ``PixArtTransformer2DModel`` whose self-attention
  runs on fast3d's fused attention), :func:`build_vae`, :func:`build_text_encoder`,
  :func:`encode_prompts`; :func:`make_grid` / :func:`split_grid` between views and the grid;
  :func:`fingerprint` tells one VAE or text encoder from another; :func:`save_transformer` /
  :func:`load_transformer` store a trained transformer (``fast3d.models.checkpoints``).

Self-attention: the grid is *one* image of (2h/p)(2w/p) patch tokens in raster order over the whole
grid, so the tokens of the 4 views are interleaved (a grid row holds tokens of two views), and every
token attends to every token of its grid, as in the paper (which changes PixArt's data, not its
attention). ``MultiViewAttnProcessor(num_views=1)`` is exactly that: each batch entry is one "view".
``num_views=4`` (layout "views") would instead join 4 *consecutive batch entries*, i.e. 4 different
objects, and no grid-aware layout applies because the views are not contiguous token ranges. The
processor brings fast3d's attention kernels (Triton on a GPU), not a different attention pattern.

Sources (``vae``, ``text_encoder``, ``transformer_init``): a local directory, either the model's own
or a diffusers pipeline directory holding it under ``vae/``, ``text_encoder/`` + ``tokenizer/``,
``transformer/`` (e.g. a PixArt-XL-2-512x512 snapshot), never a hub name (nothing is downloaded);
or ``"random-tiny"`` (``"random"`` for the transformer): random weights drawn from
``random_seed``, so the same config always builds the same model (tests, smoke runs, and sampling a
tiny checkpoint offline).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from fast3d import checks
from fast3d.models import checkpoints
from fast3d.models.checkpoints import local_model_dir, seeded

MODEL_TYPE = "mvdit"
RANDOM_TINY = "random-tiny"
NUM_VIEWS = 4
# PixArt-alpha's noise schedule: DDPMScheduler(**NOISE_SCHEDULE) to train,
# DPMSolverMultistepScheduler(**NOISE_SCHEDULE) to sample, as PixArt-alpha does.
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)

_XL = dict(num_layers=28, num_heads=16, head_dim=72, patch_size=2, caption_channels=4096, max_caption_tokens=120,
           latent_channels=4, vae_downsample=8, vae_scaling_factor=0.18215)
PRESETS = {
    "tiny": dict(grid_size=64, num_layers=2, num_heads=2, head_dim=32, patch_size=2, caption_channels=32,
                 max_caption_tokens=32, latent_channels=4, vae_downsample=8, vae_scaling_factor=0.18215),
    "xl-256": dict(grid_size=256, **_XL),
    "xl-512": dict(grid_size=512, **_XL),
}


@dataclass(frozen=True)
class MVDiTConfig:
    grid_size: int = 512              # px side of the 2x2 grid; each view is grid_size // 2
    num_layers: int = 28
    num_heads: int = 16
    head_dim: int = 72
    patch_size: int = 2
    caption_channels: int = 4096      # the text encoder's width (T5-XXL d_model)
    max_caption_tokens: int = 120     # captions are padded / truncated to this many tokens
    learn_sigma: bool = True          # predict the variance too (out channels 2x), as PixArt-alpha
    latent_channels: int = 4
    vae_downsample: int = 8           # px per latent
    vae_scaling_factor: float = 0.18215
    vae: str = RANDOM_TINY            # local directory or "random-tiny"
    text_encoder: str = RANDOM_TINY   # local directory (T5 + tokenizer) or "random-tiny"
    transformer_init: str = "random"  # local PixArt-alpha transformer directory or "random"
    random_seed: int = 0              # weights of the random models

    def __post_init__(self):
        for name in ("grid_size", "num_layers", "num_heads", "head_dim", "patch_size", "caption_channels",
                     "max_caption_tokens", "latent_channels", "vae_downsample"):
            checks.positive_int(name, getattr(self, name))
        if not isinstance(self.random_seed, int) or isinstance(self.random_seed, bool) or self.random_seed < 0:
            raise ValueError(f"random_seed must be an int >= 0; got {self.random_seed!r}")
        if not isinstance(self.learn_sigma, bool):
            raise ValueError(f"learn_sigma must be a bool; got {self.learn_sigma!r}")
        d = self.vae_downsample
        if d < 2 or d & (d - 1):
            raise ValueError(f"vae_downsample must be a power of two >= 2; got {d}")
        step = NUM_VIEWS // 2 * d * self.patch_size
        if self.grid_size % step:
            raise ValueError(f"grid_size must be a multiple of 2 * vae_downsample * patch_size = {step}, so each view "
                             f"is a whole number of patches; got {self.grid_size}")
        s = self.vae_scaling_factor
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not (math.isfinite(s) and s > 0):
            raise ValueError(f"vae_scaling_factor must be a positive finite number; got {s!r}")
        for name in ("vae", "text_encoder", "transformer_init"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a local directory or a random source name; got {value!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> MVDiTConfig:
        """A named configuration (``tiny``, ``xl-256``, ``xl-512``) with fields replaced by ``overrides``.
        Sources default to random models (an xl preset's random T5 is two layers of width 4096); a real
        run names them: ``preset("xl-512", vae=path, text_encoder=path, transformer_init=path)``."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {name!r}")
        return checkpoints.dataclass_from_dict(cls, {**PRESETS[name], **overrides}, what=f"preset {name!r}")

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def view_size(self) -> int:
        return self.grid_size // 2

    @property
    def latent_size(self) -> int:
        return self.grid_size // self.vae_downsample

    @property
    def num_tokens(self) -> int:
        return (self.latent_size // self.patch_size) ** 2

    def forward_flops(self, batch_size: int) -> int:
        """FLOPs of one forward of the transformer on ``batch_size`` grids with captions of
        ``max_caption_tokens`` tokens: its matmuls and attention, 2 FLOPs per multiply-accumulate
        (norms, activations, softmax and the sinusoidal timestep features are left out).

        With N = ``num_tokens``, D = ``width``, L = ``num_layers``, T = ``max_caption_tokens``,
        E = ``caption_channels``, C = ``latent_channels``, P = ``patch_size``**2 and
        O = C x (2 if ``learn_sigma`` else 1), the multiply-accumulates per grid are::

            block = 4 N D^2 + 2 N^2 D            self-attention: q, k, v, out; scores QK^T and weights x V
                  + 2 N D^2 + 2 T D^2 + 2 N T D  cross-attention: q, out on tokens; k, v on the caption;
                                                 scores and weights x V over the T caption keys
                  + 8 N D^2                      feed-forward D -> 4D -> D
            embed = N C P D                      patch embedding (a P-pixel conv per token)
                  + T (E D + D^2)                caption projection E -> D -> D
                  + 256 D + D^2 + 6 D^2          timestep MLP 256 -> D -> D, adaLN-single D -> 6D
                  + N D P O                      output projection D -> P x O per token

        and forward_flops = 2 x batch_size x (L x block + embed).

        Args:
            batch_size: grids per forward, a positive int.
        Returns:
            The FLOPs, an int.
        """
        checks.positive_int("batch_size", batch_size)
        N, D, L, T = self.num_tokens, self.width, self.num_layers, self.max_caption_tokens
        E, C, P = self.caption_channels, self.latent_channels, self.patch_size ** 2
        O = C * (2 if self.learn_sigma else 1)
        block = (4 * N * D * D + 2 * N * N * D
                 + 2 * N * D * D + 2 * T * D * D + 2 * N * T * D
                 + 8 * N * D * D)
        embed = N * C * P * D + T * (E * D + D * D) + 256 * D + D * D + 6 * D * D + N * D * P * O
        return 2 * batch_size * (L * block + embed)

    def step_flops(self, batch_size: int) -> int:
        """FLOPs of one training step on ``batch_size`` grids: the forward and the backward, which
        computes two matmuls (the gradients of both operands) per forward matmul, so 3 x
        :meth:`forward_flops`. This is the numerator of the MFU that ``fast3d bench ttr-step``
        reports.

        Args:
            batch_size: grids per step, a positive int.
        Returns:
            The FLOPs, an int.
        """
        return 3 * self.forward_flops(batch_size)




# --- the transformer ---------------------------------------------------------------------------------


def transformer_kwargs(cfg: MVDiTConfig) -> dict:
    """The ``PixArtTransformer2DModel`` constructor arguments of a config (the benchmark counts its
    weights from them).

    Args:
        cfg: the multi-view DiT's config.

    Returns:
        Keyword arguments of ``diffusers.PixArtTransformer2DModel``.
    """
    return dict(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, in_channels=cfg.latent_channels,
                out_channels=cfg.latent_channels * (2 if cfg.learn_sigma else 1), num_layers=cfg.num_layers,
                cross_attention_dim=cfg.width, sample_size=cfg.latent_size, patch_size=cfg.patch_size,
                norm_type="ada_norm_single", num_embeds_ada_norm=1000, use_additional_conditions=False,
                caption_channels=cfg.caption_channels)


def _new_transformer(cfg: MVDiTConfig, attention_backend: str):
    from diffusers import PixArtTransformer2DModel

    from fast3d.nn import MultiViewAttnProcessor

    model = PixArtTransformer2DModel(**transformer_kwargs(cfg))
    for block in model.transformer_blocks:  # self-attention over the whole grid (see the module docstring)
        block.attn1.set_processor(MultiViewAttnProcessor(num_views=1, backend=attention_backend))
    return model


def build_transformer(cfg: MVDiTConfig, attention_backend: str = "auto"):
    """A ``PixArtTransformer2DModel`` for ``cfg`` (PixArt-alpha at 256/512: ada_norm_single, no
    resolution conditions), its self-attention on ``fast3d.multiview_attention`` (``attention_backend``),
    with weights from ``cfg.transformer_init``: a PixArt-alpha checkpoint, or random from ``random_seed``
    (diffusers' default initialisation: for smoke runs; the recipe fine-tunes PixArt-alpha)."""
    with seeded(cfg.random_seed + 2):
        model = _new_transformer(cfg, attention_backend)
    if cfg.transformer_init != "random":
        from diffusers import PixArtTransformer2DModel

        path = local_model_dir(cfg.transformer_init, "transformer_init", "transformer")
        state = PixArtTransformer2DModel.from_pretrained(path, local_files_only=True,
                                                         torch_dtype=torch.float32).state_dict()
        checkpoints.load_state(model, state, path)
    return model.eval()


def save_transformer(path: str, cfg: MVDiTConfig, transformer) -> None:
    """Write ``path/config.yaml`` (``cfg``) and ``path/model.safetensors`` (the transformer's weights)."""
    want = transformer_kwargs(cfg)
    got = {k: transformer.config.get(k) for k in want}
    if got != want:
        diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        raise ValueError(f"transformer does not match cfg: (model, cfg) differ in {diff}")
    checkpoints.save_pretrained(path, MODEL_TYPE, cfg, transformer.state_dict())


def load_transformer(path: str, attention_backend: str = "auto"):
    """(cfg, transformer) from a directory written by :func:`save_transformer`; ValueError if it is not one."""
    cfg = checkpoints.read_config(path, MODEL_TYPE, MVDiTConfig)
    model = _new_transformer(cfg, attention_backend)
    checkpoints.load_state(model, checkpoints.read_weights(path), path)
    return cfg, model.eval()


# --- the VAE and the text encoder --------------------------------------------------------------------


def build_vae(cfg: MVDiTConfig):
    """An ``AutoencoderKL`` in float32 from ``cfg.vae`` (checked against the config's downsampling,
    latent channels and scaling factor), or a random tiny one (blocks of 16-32 channels) from
    ``random_seed``."""
    from diffusers import AutoencoderKL

    if cfg.vae == RANDOM_TINY:
        n = int(math.log2(cfg.vae_downsample)) + 1
        with seeded(cfg.random_seed):
            vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                                up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=(16,) + (32,) * (n - 1),
                                layers_per_block=1, latent_channels=cfg.latent_channels, norm_num_groups=8,
                                sample_size=cfg.grid_size, scaling_factor=cfg.vae_scaling_factor)
    else:
        vae = AutoencoderKL.from_pretrained(local_model_dir(cfg.vae, "vae", "vae"), local_files_only=True,
                                            torch_dtype=torch.float32)
    c = vae.config
    got = dict(vae_downsample=2 ** (len(c.block_out_channels) - 1), latent_channels=c.latent_channels,
               vae_scaling_factor=c.scaling_factor, shift_factor=c.get("shift_factor"))
    want = dict(vae_downsample=cfg.vae_downsample, latent_channels=cfg.latent_channels,
                vae_scaling_factor=cfg.vae_scaling_factor, shift_factor=None)
    if got != want:
        raise ValueError(f"vae {cfg.vae!r} does not match the config: it has {got}, the config expects {want} "
                         f"(PixArt pipelines apply no shift_factor)")
    return vae.eval()


def build_text_encoder(cfg: MVDiTConfig):
    """(T5EncoderModel in float32, tokenizer) from ``cfg.text_encoder``, or, for ``random-tiny``, a random
    two-layer T5 v1.1 (gated-GELU, 2 heads x 16) of width ``caption_channels`` from ``random_seed``
    with the byte-level ``ByT5Tokenizer`` (it needs no vocabulary file)."""
    from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5EncoderModel

    if cfg.text_encoder == RANDOM_TINY:
        tokenizer = ByT5Tokenizer()
        config = T5Config(vocab_size=len(tokenizer), d_model=cfg.caption_channels, d_kv=16, num_heads=2,
                          d_ff=2 * cfg.caption_channels, num_layers=2, feed_forward_proj="gated-gelu",
                          tie_word_embeddings=False)
        with seeded(cfg.random_seed + 1):
            model = T5EncoderModel(config)
    else:
        model = T5EncoderModel.from_pretrained(local_model_dir(cfg.text_encoder, "text_encoder", "text_encoder"),
                                               local_files_only=True, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(local_model_dir(cfg.text_encoder, "text_encoder", "tokenizer"),
                                                  local_files_only=True)
        if model.config.d_model != cfg.caption_channels:
            raise ValueError(f"text_encoder {cfg.text_encoder!r} has width d_model={model.config.d_model}; the config "
                             f"expects caption_channels={cfg.caption_channels}")
    return model.eval(), tokenizer


def encode_prompts(text_encoder, tokenizer, captions: list[str], max_length: int) -> tuple[Tensor, Tensor]:
    """Caption embeddings [B, L, C] and attention mask [B, L] (int64, 1 = token), L = ``max_length``,
    on the text encoder's device, exactly as ``PixArtAlphaPipeline.encode_prompt`` computes them with
    ``clean_caption=False`` (lower-cased, stripped, padded to L), so cached features match sampling."""
    if isinstance(captions, str) or not isinstance(captions, (list, tuple)) or not captions \
            or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"captions must be a non-empty list of str; got {type(captions).__name__} {captions!r:.80}")
    checks.positive_int("max_length", max_length)
    tokens = tokenizer([c.lower().strip() for c in captions], padding="max_length", max_length=max_length,
                       truncation=True, add_special_tokens=True, return_tensors="pt")
    device = text_encoder.device
    mask = tokens.attention_mask.to(device)
    with torch.no_grad():
        embeds = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
    return embeds, mask


# --- views and grids ---------------------------------------------------------------------------------


def make_grid(views: Tensor,  # [B, 4, C, H, W]
              ) -> Tensor:    # [B, C, 2H, 2W]
    """The 4 views as a 2x2 grid, row-major: views 0 and 1 on top, 2 and 3 below."""
    if not isinstance(views, Tensor) or views.dim() != 5 or views.shape[1] != NUM_VIEWS:
        raise ValueError(f"views must be a tensor [B, 4, C, H, W]; got "
                         f"{tuple(views.shape) if isinstance(views, Tensor) else type(views).__name__}")
    B, _, C, H, W = views.shape
    return views.reshape(B, 2, 2, C, H, W).permute(0, 3, 1, 4, 2, 5).reshape(B, C, 2 * H, 2 * W)


def split_grid(grid: Tensor,  # [B, C, 2H, 2W]
               ) -> Tensor:   # [B, 4, C, H, W]
    """The inverse of :func:`make_grid`."""
    if not isinstance(grid, Tensor) or grid.dim() != 4 or grid.shape[2] % 2 or grid.shape[3] % 2:
        raise ValueError(f"grid must be a tensor [B, C, 2H, 2W] of even height and width; got "
                         f"{tuple(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__}")
    B, C, H2, W2 = grid.shape
    H, W = H2 // 2, W2 // 2
    return grid.reshape(B, C, 2, H, 2, W).permute(0, 2, 4, 1, 3, 5).reshape(B, NUM_VIEWS, C, H, W)


# --- fingerprints ------------------------------------------------------------------------------------

# Config entries that say where or how a model was loaded, not what it computes.
_VOLATILE = {"transformers_version", "architectures", "dtype", "torch_dtype"}


def fingerprint(module: torch.nn.Module, tokenizer=None) -> str:
    """A 16-hex-digit hash of a model's class, config and weights (names, dtypes, shapes, bytes), and of
    ``tokenizer``'s vocabulary when given (a text encoder's features depend on it too). The same model
    loaded anywhere, on any device, has the same fingerprint; another dtype is another model."""
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    h = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        d = {k: v for k, v in d.items() if not k.startswith("_") and k not in _VOLATILE}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    if tokenizer is not None:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:16]
