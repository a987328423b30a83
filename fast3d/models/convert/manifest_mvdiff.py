"""Era3D's released multi-view diffusion UNet (``pengHTYX/MacLab-Era3D-512-6view``), written down from
reading pengHTYX/Era3D at the commit of ``manifest.SOURCES["era3d"]``; not yet checked against a
real file (none can be downloaded where this was written).

:func:`era3d_unet_shapes` re-derives ``UNetMV2DConditionModel.state_dict()`` from its
``unet/config.json``. Era3D builds its blocks from diffusers' own modules (``ResnetBlock2D``,
``Downsample2D`` / ``Upsample2D``, ``Attention``, ``FeedForward``, ``TimestepEmbedding``) under
diffusers' attribute names, so the Stable Diffusion part of the layout is that of diffusers'
``UNet2DConditionModel`` of the same config (taken from it on the meta device); to it Era3D adds,
by hand below: ``norm_mv`` + ``attn_mv`` in every transformer block (the row-wise multi-view
attention), and the EFReg head (``camera_embedding``, ``elevation_regressor``, ``focal_regressor``).
"""

from __future__ import annotations

# (fact, value, source file) for Era3D; every one is used by the converter, its checks or its record
ERA3D_FACTS = [
    ("released files", "a diffusers pipeline directory (pengHTYX/MacLab-Era3D-512-6view): unet/ (config.json + "
     "diffusion_pytorch_model weights), vae/ (AutoencoderKL), image_encoder/ (CLIPVisionModelWithProjection, "
     "SD 2.1-unclip's), scheduler/, image_normalizer/, image_noising_scheduler/, feature_extractor/",
     "configs/test_unclip-512-6view.yaml (pretrained_model_name_or_path), test_mvdiffusion_unclip.py "
     "(load_era3d_pipeline), mvdiffusion/pipelines/pipeline_mvdiffusion_unclip.py"),
    ("unet settings", "unclip, num_views 6, sample_size 64 (512 px), camera_embedding_type e_de_da_sincos, "
     "projection_camera_embeddings_input_dim 4, regress_elevation and regress_focal_length true, "
     "num_regress_blocks 3, multiview_attention, sparse_mv_attention, selfattn_block self_rowwise, "
     "mvcd_attention true, cd_attention_mid / cd_attention_last false, use_dino false",
     "configs/test_unclip-512-6view.yaml (unet_from_pretrained_kwargs)"),
    ("unet layout", "Stable Diffusion 2.1: block_out_channels (320, 640, 1280, 1280), attention_head_dim "
     "(5, 10, 20, 20) heads, cross_attention_dim 1024, linear projections; CrossAttnDownBlockMV2D / "
     "UNetMidBlockMV2DCrossAttn / CrossAttnUpBlockMV2D keep diffusers' attentions / resnets / downsamplers / "
     "upsamplers names", "mvdiffusion/models/unet_mv2d_condition.py, unet_mv2d_blocks.py"),
    ("conv_in", "8 input channels: torch.cat([noisy latents, image latents], dim=1) (the noisy latent first)",
     "mvdiffusion/pipelines/pipeline_mvdiffusion_unclip.py (__call__)"),
    ("class embedding", "class_embed_type projection: TimestepEmbedding(2 E -> T) on class_labels = "
     "cat(CLIP image_embeds after the unclip normaliser and noise at noise_level (default 0), the sinusoidal "
     "embedding of noise_level (E dims, flip_sin_to_cos)); the unconditional branch zeroes image_embeds and the "
     "image latents", "mvdiffusion/pipelines/pipeline_mvdiffusion_unclip.py (noise_image_embeddings, "
     "_encode_image)"),
    ("cross-attention", "encoder_hidden_states are fixed CLIP text embeddings [77, 1024] per view and domain "
     "('a rendering image of 3D models, {view} view, color map.' / 'normal map.'), shipped in the GitHub repo "
     "(mvdiffusion/data/fixed_prompt_embeds_6view/{clr,normal}_embeds.pt), not in the weights",
     "mvdiffusion/data/generate_fixed_text_embeds.py, mvdiffusion/data/single_image_dataset.py"),
    ("transformer block", "x += attn1(norm1(x)) (per view; with mvcd_attention the keys of a view's normal and "
     "colour images are joined: JointAttnProcessor); x += attn_mv(norm_mv(x)) (row-wise: '(b v) (h w) c -> "
     "(b h) (v w) c', a token sees its row in all 6 views: MVAttnProcessor); x += attn2(norm2(x), prompt "
     "tokens); x += ff(norm3(x)); attn_mv has the shapes of attn1 (to_q/k/v without bias, to_out.0 with)",
     "mvdiffusion/models/transformer_mv2d_self_rowwise.py (BasicMVTransformerBlock, MVAttnProcessor, "
     "JointAttnProcessor)"),
    ("domains", "the batch holds both domains (normals, then colours: 2 x B x 6 images); the output is 6 normal "
     "maps and 6 colour images", "mvdiffusion/pipelines/pipeline_mvdiffusion_unclip.py"),
    ("EFReg", "after the mid block: pooled features (normal and colour concatenated: 2 x 1280) -> "
     "elevation_regressor and focal_regressor (ResidualLiner: linear_in.0 [1280, 2560], blocks.i.linear1/2 "
     "[1280, 1280], linear_out [1, 1280]), averaged over views; (sin, cos) of both -> camera_embedding "
     "(TimestepEmbedding 4 -> 1280) added to the up blocks' time embedding",
     "mvdiffusion/models/unet_mv2d_condition.py (ResidualLiner, forward)"),
    ("views", "front, front_right, right, back, left, front_left (orthographic renders at elevation 0)",
     "mvdiffusion/data/single_image_dataset.py, mvdiffusion/data/generate_fixed_text_embeds.py"),
    ("diffusers", "diffusers 0.26.0, transformers 4.37.2 (the UNet's SD key names are unchanged in the installed "
     "diffusers)", "requirements.txt"),
]

# Era3D's extra settings (names of its unet/config.json) and the values the converter accepts
ERA3D_SETTINGS = {"num_views": (6,), "selfattn_block": ("self_rowwise",), "multiview_attention": (True,),
                  "cd_attention_mid": (False, None), "cd_attention_last": (False, None), "use_dino": (False, None),
                  "addition_downsample": (False, None), "class_embed_type": ("projection",)}
ERA3D_DOWN = {"CrossAttnDownBlockMV2D": "CrossAttnDownBlock2D", "DownBlock2D": "DownBlock2D"}
ERA3D_UP = {"CrossAttnUpBlockMV2D": "CrossAttnUpBlock2D", "UpBlock2D": "UpBlock2D"}
ERA3D_MID = "UNetMidBlockMV2DCrossAttn"
REGRESS_HIDDEN = 1280   # ResidualLiner(regress_in_dim, 1, 1280, ...): fixed in the code, not the config
# The released unet/config.json as the facts give it (SD 2.1-unclip's UNet + unet_from_pretrained_kwargs)
ERA3D_RELEASED_UNET = dict(
    sample_size=64, in_channels=8, out_channels=4, down_block_types=["CrossAttnDownBlockMV2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlockMV2D"] * 3, mid_block_type=ERA3D_MID,
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024, norm_num_groups=32, use_linear_projection=True, class_embed_type="projection",
    projection_class_embeddings_input_dim=2048, num_views=6, selfattn_block="self_rowwise", multiview_attention=True,
    sparse_mv_attention=True, mvcd_attention=True, cd_attention_mid=False, cd_attention_last=False,
    regress_elevation=True, regress_focal_length=True, projection_camera_embeddings_input_dim=4, num_regress_blocks=3,
    use_dino=False)


def sd_unet_kwargs(cfg: dict) -> dict:
    """diffusers ``UNet2DConditionModel`` arguments of the Stable Diffusion part of an Era3D UNet
    config (its block types mapped to diffusers' own)."""
    return dict(sample_size=cfg["sample_size"], in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
                down_block_types=tuple(ERA3D_DOWN[t] for t in cfg["down_block_types"]),
                up_block_types=tuple(ERA3D_UP[t] for t in cfg["up_block_types"]),
                block_out_channels=tuple(cfg["block_out_channels"]), layers_per_block=cfg["layers_per_block"],
                attention_head_dim=tuple(cfg["attention_head_dim"]), cross_attention_dim=cfg["cross_attention_dim"],
                norm_num_groups=cfg["norm_num_groups"], use_linear_projection=cfg["use_linear_projection"],
                class_embed_type="projection",
                projection_class_embeddings_input_dim=cfg["projection_class_embeddings_input_dim"])


def transformer_blocks(keys) -> list[str]:
    """The prefixes ``...transformer_blocks.j`` of every transformer block among ``keys``."""
    return sorted({k[:k.index(".attn1.")] for k in keys if ".transformer_blocks." in k and ".attn1." in k})


def era3d_unet_shapes(cfg: dict) -> dict[str, tuple]:
    """Key -> shape of Era3D's ``UNetMV2DConditionModel.state_dict()`` for its ``unet/config.json``
    ``cfg`` (module docstring)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        sd = UNet2DConditionModel(**sd_unet_kwargs(cfg)).state_dict()
    s = {k: tuple(v.shape) for k, v in sd.items()}
    for b in transformer_blocks(s):
        for k in [k for k in s if k.startswith(f"{b}.attn1.") or k.startswith(f"{b}.norm1.")]:
            s[k.replace(f"{b}.attn1.", f"{b}.attn_mv.").replace(f"{b}.norm1.", f"{b}.norm_mv.")] = s[k]
    T = 4 * cfg["block_out_channels"][0]          # time_embed_dim
    if cfg.get("regress_elevation") or cfg.get("regress_focal_length"):
        s["camera_embedding.linear_1.weight"] = (T, cfg["projection_camera_embeddings_input_dim"])
        s["camera_embedding.linear_1.bias"] = (T,)
        s["camera_embedding.linear_2.weight"] = (T, T)
        s["camera_embedding.linear_2.bias"] = (T,)
    C = cfg["block_out_channels"][-1] * (2 if cfg.get("mvcd_attention") else 1)
    H = REGRESS_HIDDEN
    for head, on in (("elevation_regressor", cfg.get("regress_elevation")),
                     ("focal_regressor", cfg.get("regress_focal_length"))):
        if not on:
            continue
        s[f"{head}.linear_in.0.weight"], s[f"{head}.linear_in.0.bias"] = (H, C), (H,)
        for i in range(cfg.get("num_regress_blocks", 4)):
            for j in (1, 2):
                s[f"{head}.blocks.{i}.linear{j}.weight"], s[f"{head}.blocks.{i}.linear{j}.bias"] = (H, H), (H,)
        s[f"{head}.linear_out.weight"], s[f"{head}.linear_out.bias"] = (1, H), (1,)
    return s
