"""Era3D's released pipeline (``pengHTYX/MacLab-Era3D-512-6view``) -> fast3d's MVDiffusion
(``rig="era3d6"``, ``layout="rows"``): an initialisation from Era3D's weights, NOT a model that
computes what Era3D computes.

What carries over exactly (facts in ``manifest_mvdiff``): the VAE and the CLIP image encoder
(``vae/``, ``image_encoder/``); every Stable Diffusion part of the UNet (``conv_in``, whose 8
channels are [noisy latent, image latent] in both, time embedding, resnets, samplers, the
transformers' norms, projections, cross-attention and feed-forward, ``conv_out``); Era3D's
row-wise multi-view attention (``attn_mv`` / ``norm_mv``) as the block's self-attention
(``attn1`` / ``norm1``), which fast3d's ``MultiViewAttnProcessor(layout="rows")`` runs as Era3D's
``MVAttnProcessor`` does; and the class embedding as Era3D's at image_embeds = 0 (its
unconditional branch; noise level 0).

What fast3d's MVDiffusion has no place for (dropped with the reasons in ``DROP``): the per-view
joint normal/colour self-attention (``attn1``/``norm1``: the block has one self-attention), the
normal-map domain, the EFReg elevation / focal head, and the CLIP image embedding's path through
the class embedding (fast3d feeds it to the cross-attention as one token through ``image_proj``,
which starts at zero; Era3D's cross-attention reads fixed text prompts instead). A converted model
is a starting point for fine-tuning, not Era3D; ``fast3d generate --mv-model`` takes it.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from fast3d.models import checkpoints
from fast3d.models.convert import manifest, manifest_mvdiff
from fast3d.models.convert.common import Consumer, check_layout, load_state_dict
from fast3d.models.convert.pipeline import (
    load_vae_and_image_encoder,
    part_weights,
    pipeline_dirs,
    read_json,
    scheduler_settings,
)

SUBDIRS = ("unet", "vae", "image_encoder")
DROP = {
    "attn1": "Era3D's per-view self-attention, joint over a view's normal and colour images (JointAttnProcessor); "
             "fast3d's block has one self-attention, which takes Era3D's row-wise attn_mv",
    "norm1": "the LayerNorm before Era3D's per-view attn1 (dropped with it)",
    "class_embedding": "Era3D's unclip class embedding (CLIP image embedding + noise-level embedding, 2 E inputs); "
                       "folded into fast3d's camera MLP at image_embeds = 0 (see filled)",
    "camera_embedding": "EFReg: the embedding of the regressed elevation / focal length; fast3d's era3d6 rig has "
                        "fixed elevation 0 and optics",
    "elevation_regressor": "EFReg elevation head (not in fast3d's MVDiffusion)",
    "focal_regressor": "EFReg focal-length head (not in fast3d's MVDiffusion)",
}


def check_unet_config(cfg: dict, what: str) -> None:
    """ValueError unless ``cfg`` is an Era3D UNet config the converter knows (``ERA3D_SETTINGS``,
    its block types)."""
    need = ("sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
            "layers_per_block", "attention_head_dim", "cross_attention_dim", "norm_num_groups",
            "use_linear_projection", "projection_class_embeddings_input_dim", "num_views")
    absent = [k for k in need if k not in cfg]
    if absent:
        raise ValueError(f"{what} is not an Era3D UNet config (UNetMV2DConditionModel): it lacks {absent}")
    bad = {k: cfg.get(k) for k, ok in manifest_mvdiff.ERA3D_SETTINGS.items() if cfg.get(k) not in ok}
    types = [t for t in (*cfg["down_block_types"], *cfg["up_block_types"])
             if t not in manifest_mvdiff.ERA3D_DOWN and t not in manifest_mvdiff.ERA3D_UP]
    if cfg.get("mid_block_type", manifest_mvdiff.ERA3D_MID) != manifest_mvdiff.ERA3D_MID:
        types.append(cfg["mid_block_type"])
    if bad or types:
        raise ValueError(f"{what}: an Era3D UNet of another kind than the released one: settings {bad} (accepted: "
                         f"{ {k: manifest_mvdiff.ERA3D_SETTINGS[k] for k in bad} }), unknown block types {types}")
    if cfg["in_channels"] != 2 * cfg["out_channels"]:
        raise ValueError(f"{what}: in_channels {cfg['in_channels']} must be 2 x out_channels {cfg['out_channels']} "
                         f"(noisy latent + image latent)")


def noise_level_embedding(dim: int) -> torch.Tensor:  # -> [dim]
    """diffusers' sinusoidal timestep embedding of noise level 0 with flip_sin_to_cos (Era3D's
    unclip noise-level input): cos(0) = 1 on the first half, sin(0) = 0 on the second."""
    return torch.cat([torch.ones(dim // 2), torch.zeros(dim - dim // 2)])


def convert_unet(state: dict, cfg: dict, own: dict, what: str = "--weights") -> tuple[dict, dict, dict]:
    """Era3D's UNet state dict -> the state dict of fast3d's ``MVDenoiser``.

    Args:
        state: Era3D's ``UNetMV2DConditionModel`` state dict, checked against
            ``manifest_mvdiff.era3d_unet_shapes(cfg)`` (ValueError listing every difference).
        cfg: its ``unet/config.json``.
        own: the target ``MVDenoiser.state_dict()`` (shapes of the keys Era3D has no source of).
        what: the argument named in errors.

    Returns:
        The denoiser's state dict, the dropped source keys and the filled denoiser keys (each
        with why).
    """
    check_layout(state, manifest_mvdiff.era3d_unet_shapes(cfg), what, "Era3D's UNet (UNetMV2DConditionModel)")
    src, out, filled = Consumer(state), {}, {}
    blocks = manifest_mvdiff.transformer_blocks(state)
    for b in blocks:
        for name in ("attn_mv", "norm_mv"):
            fast = "attn1" if name == "attn_mv" else "norm1"
            for k in [k for k in state if k.startswith(f"{b}.{name}.")]:
                out[f"unet.{k.replace(f'{b}.{name}.', f'{b}.{fast}.')}"] = src.take(k)
        for name in ("attn1", "norm1"):
            for k in [k for k in state if k.startswith(f"{b}.{name}.")]:
                src.drop(k, DROP[name])
    for k in state:
        head = k.split(".")[0]
        if head in DROP:
            src.drop(k, DROP[head])
    for k in state:
        if k not in src.used and k not in src.dropped:
            out[f"unet.{k}"] = src.take(k)
    # Era3D's class embedding at image_embeds = 0: linear_1 sees [0 (E), noise-level embedding (E)],
    # a constant; fast3d's camera MLP gets it as linear_1's bias with a zero weight.
    w1 = state["class_embedding.linear_1.weight"].float()
    E = w1.shape[1] // 2
    out["unet.class_embedding.linear_1.bias"] = (state["class_embedding.linear_1.bias"].float()
                                                 + w1[:, E:] @ noise_level_embedding(E).to(w1))
    out["unet.class_embedding.linear_1.weight"] = torch.zeros_like(own["unet.class_embedding.linear_1.weight"])
    for t in ("weight", "bias"):
        out[f"unet.class_embedding.linear_2.{t}"] = state[f"class_embedding.linear_2.{t}"].float()
    filled["unet.class_embedding"] = ("Era3D's class embedding at image_embeds = 0 and noise level 0 (its "
                                      "unconditional class input); zero weight on fast3d's camera features")
    for k in ("image_proj.weight", "image_proj.bias"):
        out[k] = torch.zeros_like(own[k])
    filled["image_proj"] = ("zeros: Era3D's cross-attention reads fixed text prompts, not an image token; "
                            "fast3d's image token starts at zero (cross-attention adds only its output bias)")
    return out, src.finish(), filled


def mvdiff_config(ucfg: dict, vae, encoder, prediction_type: str, dirs: dict):
    """fast3d's MVDiffConfig for an Era3D UNet config and its VAE and image encoder."""
    from fast3d.models.mvdiff import MVDiffConfig

    d = 2 ** (len(vae.config.block_out_channels) - 1)
    return MVDiffConfig(rig="era3d6", layout="rows", resolution=ucfg["sample_size"] * d,
                        block_out_channels=tuple(ucfg["block_out_channels"]),
                        layers_per_block=ucfg["layers_per_block"], attention_heads=tuple(ucfg["attention_head_dim"]),
                        cross_attention_dim=ucfg["cross_attention_dim"], norm_num_groups=ucfg["norm_num_groups"],
                        down_block_types=tuple(manifest_mvdiff.ERA3D_DOWN[t] for t in ucfg["down_block_types"]),
                        up_block_types=tuple(manifest_mvdiff.ERA3D_UP[t] for t in ucfg["up_block_types"]),
                        prediction_type=prediction_type, latent_channels=ucfg["out_channels"], vae_downsample=d,
                        vae_scaling_factor=float(vae.config.scaling_factor),
                        image_embed_dim=encoder.config.projection_dim, vae=dirs["vae"],
                        image_encoder=dirs["image_encoder"], unet_init="random")


def convert(weights: str, variant: str | None = None):
    """Era3D's released pipeline -> a fast3d MVDiffusion (module docstring: an initialisation).

    Args:
        weights: the pipeline directory (``unet/``, ``vae/``, ``image_encoder/``, ``scheduler/``).
        variant: must be None (one released model).

    Returns:
        The model and the conversion record (source file and sha256 of each part, dropped and
        filled keys with reasons, ``equal_outputs: False``, what is not converted).
    """
    from transformers import CLIPVisionModelWithProjection

    from fast3d.models.mvdiff import MVDenoiser, MVDiffusion

    if variant is not None:
        raise ValueError(f"--variant does not apply to era3d (one released model); got {variant!r}")
    dirs = pipeline_dirs(weights, SUBDIRS, "Era3D")
    ucfg = read_json(os.path.join(dirs["unet"], "config.json"), "--weights unet/")
    check_unet_config(ucfg, f"--weights {os.path.join(dirs['unet'], 'config.json')!r}")
    prediction = scheduler_settings(dirs["scheduler"], "--weights scheduler/")
    state, record = load_state_dict(part_weights(dirs["unet"]), "--weights unet/")

    vae, encoder, vrec, erec = load_vae_and_image_encoder(dirs, CLIPVisionModelWithProjection, weights)
    E = ucfg["projection_class_embeddings_input_dim"] // 2
    if encoder.config.projection_dim != E or vae.config.latent_channels != ucfg["out_channels"]:
        raise ValueError(f"--weights {weights!r}: the parts do not fit together: image_encoder projection_dim "
                         f"{encoder.config.projection_dim} (the UNet's class embedding expects {E}), vae latent_channels "
                         f"{vae.config.latent_channels} (the UNet's out_channels {ucfg['out_channels']})")

    cfg = mvdiff_config(ucfg, vae, encoder, prediction, dirs)
    with checkpoints.seeded(cfg.random_seed + 2):
        denoiser = MVDenoiser(cfg)
    new, dropped, filled = convert_unet(state, ucfg, denoiser.state_dict(), "--weights unet/")
    checkpoints.load_state(denoiser, new, record["file"])
    model = MVDiffusion(cfg, denoiser, vae.eval().requires_grad_(False), encoder.eval().requires_grad_(False))
    record.update(kind="era3d", source=list(manifest.SOURCES["era3d"]), size="512-6view" if ucfg["sample_size"] == 64
                  else f"sample_size {ucfg['sample_size']}", dropped=dropped, filled=filled,
                  parts={"vae": vrec, "image_encoder": erec}, dropped_frozen=erec["dropped"],
                  source_dtypes=sorted({str(v.dtype) for v in state.values()}),
                  config=dataclasses.asdict(cfg), equal_outputs=False,
                  not_converted=["the normal-map domain and its joint attention", "EFReg (elevation / focal head)",
                                 "the fixed per-view text prompts of the cross-attention "
                                 "(mvdiffusion/data/fixed_prompt_embeds_6view, not in the weights)"],
                  checked_against_real_release=False)
    return model, record
