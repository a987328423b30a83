"""ImageDream's released pipeline in diffusers format (``ashawkey/imagedream-ipmv-diffusers``, the
pixel-controller model of bytedance/ImageDream, which LGM generates its four views with) ->
fast3d's MVDiffusion with ``conditioning="imagedream"`` (rig ``lgm4``, layout ``views``): a model
that computes what ImageDream's ``MultiViewUNetModel`` computes (facts in
``manifest_mvdiff.IMAGEDREAM_FACTS``).

* The UNet's ldm key names map onto diffusers' ``UNet2DConditionModel`` of the same layout
  (``manifest_mvdiff.imagedream_key_map``); ``attn2.to_k_ip`` / ``to_v_ip`` go to
  :class:`fast3d.nn.ImageTokenAttnProcessor`; the ``camera_embed`` MLP is the projection class
  embedding; the Resampler goes to diffusers' ``IPAdapterPlusImageProjection`` (its ``to_kv`` split
  into ``to_k`` and ``to_v``). Every UNet key is converted; nothing is dropped.
* The text encoder is run once, on the prompt and the negative prompt (LGM's: both empty), and
  its output is stored as the denoiser's ``text_context``; its weights are not part of the fast3d
  model (fast3d's generation is image-conditioned).
* The VAE and the CLIP image encoder (``CLIPVisionModel``, read at its penultimate hidden states)
  are kept as they are.

What differs from ImageDream's pipeline, outside the UNet: the image goes to CLIP resized with
torch's antialiased bicubic instead of ``CLIPImageProcessor``'s PIL resize and centre crop (the
same for a square image up to the resampling filter), and its latent is the VAE posterior's mean
instead of a sample of it.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from fast3d.models import checkpoints
from fast3d.models.convert import manifest, manifest_mvdiff
from fast3d.models.convert.common import Consumer, check_layout, load_state_dict
from fast3d.models.convert.pipeline import (
    load_frozen,
    load_vae_and_image_encoder,
    part_weights,
    pipeline_dirs,
    read_json,
    scheduler_settings,
)

SUBDIRS = ("unet", "vae", "text_encoder", "image_encoder")
RESAMPLER = "image_embed."
_TO_KV = ".0.to_kv.weight"


def check_unet_config(cfg: dict, what: str) -> dict:
    """``cfg`` (ImageDream's ``unet/config.json``) with the class defaults filled in; ValueError
    unless it is an ImageDream UNet the converter knows (``manifest_mvdiff.IMAGEDREAM_SETTINGS``)."""
    need = ("in_channels", "out_channels", "model_channels", "attention_resolutions", "num_res_blocks",
            "channel_mult", "num_head_channels", "context_dim", "camera_dim", "ip_dim")
    absent = [k for k in need if k not in cfg]
    if absent:
        raise ValueError(f"{what} is not an ImageDream UNet config (MultiViewUNetModel): it lacks {absent}")
    cfg = {**manifest_mvdiff.IMAGEDREAM_DEFAULTS, **cfg}
    ints = ("in_channels", "out_channels", "model_channels", "num_res_blocks", "num_head_channels", "context_dim",
            "camera_dim", "ip_dim")
    lists = ("channel_mult", "attention_resolutions")
    bad = {k: cfg[k] for k in ints if type(cfg[k]) is not int or cfg[k] < 0}
    bad |= {k: cfg[k] for k in lists if not isinstance(cfg[k], list) or not all(type(m) is int and m > 0 for m in cfg[k])}
    if bad:
        raise ValueError(f"{what}: expected non-negative integers for {list(ints)} and lists of positive integers for "
                         f"{list(lists)}; got {bad}")
    if not cfg["channel_mult"] or cfg["channel_mult"][0] != 1:
        # diffusers' UNet sizes its conv_in and time embedding by the first level's width
        bad["channel_mult"] = cfg["channel_mult"]
    bad |= {k: cfg[k] for k, ok in manifest_mvdiff.IMAGEDREAM_SETTINGS.items() if cfg[k] not in ok}
    if cfg["ip_dim"] <= 0:
        bad["ip_dim"] = cfg["ip_dim"]          # MVDream (text only): not fast3d's image-conditioned model
    if cfg["camera_dim"] != 16:
        bad["camera_dim"] = cfg["camera_dim"]
    if cfg["ip_weight"] != 1.0:
        bad["ip_weight"] = cfg["ip_weight"]
    if cfg["in_channels"] != cfg["out_channels"]:
        bad["in_channels"] = cfg["in_channels"]
    if cfg["num_head_channels"] <= 0 or any(cfg["model_channels"] * m % cfg["num_head_channels"]
                                            for m in cfg["channel_mult"]):
        bad["num_head_channels"] = cfg["num_head_channels"]
    if bad:
        raise ValueError(f"{what}: an ImageDream UNet of another kind than the released pixel-controller one: {bad} "
                         f"(accepted: ip_dim > 0, camera_dim 16, ip_weight 1, in_channels = out_channels, "
                         f"channel_mult starting at 1, {manifest_mvdiff.IMAGEDREAM_SETTINGS})")
    return cfg


def resampler_settings(state: dict) -> dict:
    """The resampler's depth, heads (at ImageDream's 64 channels a head) and input width, read from
    the weights' shapes (the original fixes them in code); the released values where a key is
    absent (the layout check then names it)."""
    r = dict(manifest_mvdiff.IMAGEDREAM_RESAMPLER)
    layers = {int(k.split(".")[2]) for k in state if k.startswith(f"{RESAMPLER}layers.")}
    if layers:
        r["depth"] = max(layers) + 1
    q = state.get(f"{RESAMPLER}layers.0.0.to_q.weight")
    if q is not None and q.shape[0] % r["dim_head"] == 0:
        r["heads"] = q.shape[0] // r["dim_head"]
    w = state.get(f"{RESAMPLER}proj_in.weight")
    if w is not None and w.dim() == 2:
        r["embedding_dim"] = w.shape[1]
    return r


def mvdiff_config(ucfg: dict, resampler: dict, vae, text_tokens: int, dirs: dict, prediction_type: str):
    """fast3d's MVDiffConfig for an ImageDream UNet config, its resampler, VAE and text length."""
    from fast3d.models.mvdiff import MVDiffConfig

    levels = manifest_mvdiff.imagedream_levels(ucfg)
    d = 2 ** (len(vae.config.block_out_channels) - 1)
    return MVDiffConfig(
        rig="lgm4", layout="views", conditioning="imagedream", resolution=ucfg.get("image_size", 32) * d,
        block_out_channels=tuple(lv["channels"] for lv in levels), layers_per_block=ucfg["num_res_blocks"],
        attention_heads=tuple(lv["heads"] for lv in levels), cross_attention_dim=ucfg["context_dim"],
        norm_num_groups=manifest_mvdiff.GROUPS,
        down_block_types=tuple("CrossAttnDownBlock2D" if lv["attention"] else "DownBlock2D" for lv in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if lv["attention"] else "UpBlock2D" for lv in reversed(levels)),
        prediction_type=prediction_type, latent_channels=ucfg["out_channels"], vae_downsample=d,
        vae_scaling_factor=float(vae.config.scaling_factor), image_embed_dim=resampler["embedding_dim"],
        image_tokens=ucfg["ip_dim"], resampler_depth=resampler["depth"], resampler_heads=resampler["heads"],
        resampler_head_dim=resampler["dim_head"], text_tokens=text_tokens, vae=dirs["vae"],
        image_encoder=dirs["image_encoder"], unet_init="random")


def _source_key(key: str, inverse: dict[str, str]) -> str | None:
    """The ImageDream key of fast3d denoiser key ``key`` (``imagedream_key_map`` inverted)."""
    for ip in ("to_k_ip", "to_v_ip"):
        key = key.replace(f"attn2.processor.{ip}.0.", f"attn2.{ip}.")
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in inverse:
            return ".".join([inverse[head], *parts[cut:]])
    return None


def source_shapes(own: dict, key_map: dict[str, str]) -> dict[str, tuple]:
    """Key -> shape of ImageDream's UNet state dict, for the fast3d denoiser state dict ``own`` of
    the same configuration: every denoiser key but ``text_context`` has one source, but the
    resampler's ``to_k`` and ``to_v``, which are one ``to_kv`` (k rows first)."""
    inverse = {v: k for k, v in key_map.items()}
    shapes = {}
    for k, v in own.items():
        if k == "text_context" or (k.startswith("image_proj.layers.") and k.endswith(".attn.to_v.weight")):
            continue
        if k.startswith("image_proj.layers.") and k.endswith(".attn.to_k.weight"):
            shapes[f"{RESAMPLER}layers.{k.split('.')[2]}{_TO_KV}"] = (2 * v.shape[0], v.shape[1])
            continue
        src = _source_key(k, inverse)
        if src is None:
            raise ValueError(f"converter bug: fast3d key {k!r} has no ImageDream source in the key map")
        shapes[src] = tuple(v.shape)
    return shapes


def convert_unet(state: dict, ucfg: dict, resampler: dict, own: dict, what: str = "--weights") -> dict:
    """ImageDream's UNet state dict -> the state dict of fast3d's ``MVDenoiser`` (without its
    ``text_context``); ValueError listing every missing, extra or mis-shaped key."""
    key_map = manifest_mvdiff.imagedream_key_map(ucfg, resampler["depth"])
    check_layout(state, source_shapes(own, key_map), what, "ImageDream's UNet (MultiViewUNetModel, ip_dim > 0)")
    src, out = Consumer(state), {}
    for k in state:
        if k.startswith(f"{RESAMPLER}layers.") and k.endswith(_TO_KV):
            # PerceiverAttention: k, v = to_kv(x).chunk(2, dim=-1): the first half of the rows is k
            r = k.split(".")[2]
            kv = src.take(k)
            out[f"image_proj.layers.{r}.attn.to_k.weight"], out[f"image_proj.layers.{r}.attn.to_v.weight"] = kv.chunk(2)
        else:
            out[manifest_mvdiff.rename(k, key_map)] = src.take(k)
    src.finish()
    return out


def text_context(dirs: dict, prompt: str, negative_prompt: str, width: int) -> tuple[torch.Tensor, dict]:
    """The pipeline's text encoder's output for ``prompt`` and ``negative_prompt`` ([2, T, width],
    as ImageDream's pipeline encodes them: padded to the tokenizer's length) and its record."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    try:
        tok = CLIPTokenizer.from_pretrained(dirs["tokenizer"], local_files_only=True)
        cfg = CLIPTextConfig.from_dict(read_json(os.path.join(dirs["text_encoder"], "config.json"),
                                                 "--weights text_encoder/"))
    except (OSError, TypeError, ValueError, KeyError) as e:
        raise ValueError(f"--weights: tokenizer/ or text_encoder/ is not a transformers CLIPTokenizer / "
                         f"CLIPTextModel ({e})") from None
    with checkpoints.seeded(0):
        encoder = CLIPTextModel(cfg)
    state, record = load_state_dict(part_weights(dirs["text_encoder"]), "--weights text_encoder/")
    record["dropped"] = load_frozen(encoder, state, dirs["text_encoder"],
                                    drop=("text_model.embeddings.position_ids",))
    if cfg.hidden_size != width:
        raise ValueError(f"--weights: text_encoder/ has hidden_size {cfg.hidden_size}; the UNet's context_dim is {width}")
    ids = tok([prompt, negative_prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder.eval()(ids).last_hidden_state.float(), record


def convert(weights: str, variant: str | None = None, prompt: str = "", negative_prompt: str = ""):
    """ImageDream's diffusers-format pipeline -> a fast3d MVDiffusion (module docstring).

    Args:
        weights: the pipeline directory (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
            ``image_encoder/``, ``scheduler/``).
        variant: must be None (one released model).
        prompt, negative_prompt: the text the fixed text context encodes (LGM's: both empty).

    Returns:
        The model and the conversion record (source file and sha256 of each part, the prompts,
        ``equal_outputs: True`` for the UNet, what differs outside it).
    """
    from transformers import CLIPVisionModel

    from fast3d.models.mvdiff import MVDenoiser, MVDiffusion

    if variant is not None:
        raise ValueError(f"--variant does not apply to imagedream (one released model); got {variant!r}")
    for name, text in (("--prompt", prompt), ("--negative-prompt", negative_prompt)):
        if not isinstance(text, str):
            raise ValueError(f"{name} must be a string; got {type(text).__name__}")
    dirs = pipeline_dirs(weights, SUBDIRS, "ImageDream")
    dirs["tokenizer"] = os.path.join(weights, "tokenizer")       # vocab files, no config.json
    upath = os.path.join(dirs["unet"], "config.json")
    ucfg = check_unet_config(read_json(upath, "--weights unet/"), f"--weights {upath!r}")
    prediction = scheduler_settings(dirs["scheduler"], "--weights scheduler/")
    state, record = load_state_dict(part_weights(dirs["unet"]), "--weights unet/")
    resampler = resampler_settings(state)

    vae, encoder, vrec, erec = load_vae_and_image_encoder(dirs, CLIPVisionModel, weights)
    if encoder.config.hidden_size != resampler["embedding_dim"] or vae.config.latent_channels != ucfg["out_channels"]:
        raise ValueError(f"--weights {weights!r}: the parts do not fit together: image_encoder hidden_size "
                         f"{encoder.config.hidden_size} (the UNet's resampler reads {resampler['embedding_dim']}), vae "
                         f"latent_channels {vae.config.latent_channels} (the UNet's out_channels {ucfg['out_channels']})")
    context, trec = text_context(dirs, prompt, negative_prompt, ucfg["context_dim"])

    cfg = mvdiff_config(ucfg, resampler, vae, context.shape[1], dirs, prediction)
    with checkpoints.seeded(cfg.random_seed + 2):
        denoiser = MVDenoiser(cfg)
    new = convert_unet(state, ucfg, resampler, denoiser.state_dict(), "--weights unet/")
    new["text_context"] = context
    checkpoints.load_state(denoiser, new, record["file"])
    model = MVDiffusion(cfg, denoiser, vae.eval().requires_grad_(False), encoder.eval().requires_grad_(False))
    record.update(kind="imagedream", source=list(manifest.SOURCES["imagedream"]), dropped={},
                  parts={"vae": vrec, "image_encoder": erec, "text_encoder": trec}, prompt=prompt,
                  negative_prompt=negative_prompt, resampler=resampler,
                  source_dtypes=sorted({str(v.dtype) for v in state.values()}), config=dataclasses.asdict(cfg),
                  equal_outputs=True,
                  not_converted=["the text encoder and tokenizer (run once: the fixed text_context)",
                                 "feature_extractor/ (fast3d preprocesses the image itself; module docstring)"],
                  checked_against_real_release=False)
    return model, record
