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


# --- ImageDream ----------------------------------------------------------------------------------
# (fact, value, source file) for ImageDream as released in diffusers format by
# ashawkey/mvdream_diffusers (manifest.SOURCES["imagedream"]; the UNet is bytedance/ImageDream's
# MultiViewUNetModel, its config sd_v2_base_ipmv.yaml at manifest.SOURCES["imagedream-original"]).
IMAGEDREAM_FACTS = [
    ("released files", "ashawkey/imagedream-ipmv-diffusers: unet/ (config.json of MultiViewUNetModel + "
     "diffusion_pytorch_model.safetensors, fp16, ldm key names), vae/ (AutoencoderKL), text_encoder/ + tokenizer/ "
     "(Stable Diffusion 2.1's CLIPTextModel), image_encoder/ (CLIPVisionModel, laion CLIP-ViT-H-14) + "
     "feature_extractor/, scheduler/ (DDIMScheduler)", "README.md, convert_mvdream_to_diffusers.py"),
    ("unet settings", "in_channels 4, out_channels 4, model_channels 320, channel_mult [1, 2, 4, 4], "
     "num_res_blocks 2, attention_resolutions [4, 2, 1], num_head_channels 64, transformer_depth 1, context_dim "
     "1024, camera_dim 16, ip_dim 16 (ip_weight 1)", "extern/ImageDream/imagedream/configs/sd_v2_base_ipmv.yaml "
     "(bytedance/ImageDream), convert_mvdream_to_diffusers.py (create_unet_config)"),
    ("unet layout", "input_blocks[0] = conv_in; per level num_res_blocks x [ResBlock, SpatialTransformer3D where "
     "2^level is in attention_resolutions], then a Downsample (conv 'op', stride 2) but after the last level; "
     "middle_block = ResBlock, SpatialTransformer3D, ResBlock; output_blocks per level from the deepest: "
     "num_res_blocks + 1 x [ResBlock on cat(h, skip), SpatialTransformer3D where attention], an Upsample "
     "(nearest x2, conv) ending every level but the first; out = GroupNorm, SiLU, conv", "mv_unet.py "
     "(MultiViewUNetModel.__init__)"),
    ("ResBlock", "in_layers = GroupNorm(32), SiLU, conv3x3; emb_layers = SiLU, Linear(time_embed_dim, out); h + "
     "emb; out_layers = GroupNorm(32), SiLU, Dropout, conv3x3; skip_connection = conv1x1 when the channels "
     "change; GroupNorm eps 1e-5 (torch's default)", "mv_unet.py (ResBlock)"),
    ("transformer", "norm = GroupNorm(32, eps 1e-6); proj_in / proj_out Linear; block: x += attn1(norm1(x)) over "
     "all tokens of all frames of a sample ('(b f) l c -> b (f l) c'); x += attn2(norm2(x), context); x += "
     "ff(norm3(x)) with GEGLU (net.0.proj Linear(C, 8 C), net.2 Linear(4 C, C)); to_q / to_k / to_v without "
     "bias, to_out.0 with", "mv_unet.py (SpatialTransformer3D, BasicTransformerBlock3D, "
     "MemoryEfficientCrossAttention)"),
    ("image tokens", "attn2 of every block: context = [text tokens, ip_dim image tokens]; out = attn(q, to_k(text), "
     "to_v(text)) + ip_weight attn(q, to_k_ip(ip), to_v_ip(ip)) (to_k_ip / to_v_ip without bias), then to_out",
     "mv_unet.py (MemoryEfficientCrossAttention.forward)"),
    ("resampler", "image_embed = Resampler(dim context_dim, depth 4, dim_head 64, heads 12, num_queries ip_dim, "
     "embedding_dim 1280, output_dim context_dim, ff_mult 4): latents [1, ip_dim, dim], proj_in, then per layer "
     "latents += PerceiverAttention(x, latents) (norm1 on x, norm2 on latents, to_q on latents, to_kv on "
     "cat(x, latents) -> k, v halves, to_out; no biases; scale dim_head^-1/2) and latents += ff(latents) "
     "(LayerNorm, Linear(dim, 4 dim, no bias), GELU, Linear(4 dim, dim, no bias)); proj_out; norm_out",
     "mv_unet.py (Resampler, PerceiverAttention)"),
    ("embeddings", "time_embed = Linear(320, 1280), SiLU, Linear(1280, 1280) on cat(cos, sin) of t * exp(-ln(1e4) "
     "i / 160); camera_embed = Linear(16, 1280), SiLU, Linear(1280, 1280), added to the time embedding",
     "mv_unet.py (timestep_embedding, MultiViewUNetModel.forward)"),
    ("pixel controller", "num_frames = views + 1; the last frame of every sample is overwritten by the input "
     "image's latent (x[(F - 1)::F] = ip_img), its camera all zeros", "mv_unet.py (forward), pipeline_mvdream.py "
     "(__call__), get_camera(extra_view=True)"),
    ("conditioning", "ip = image_encoder(CLIPImageProcessor(image)).hidden_states[-2] [B, 257, 1280]; ip_img = "
     "vae.encode(2 image - 1 at 256 px, bilinear).latent_dist.sample() * scaling_factor; the unconditional "
     "branch: the negative prompt's text tokens, zeros for ip and ip_img", "pipeline_mvdream.py (encode_image, "
     "encode_image_latents, __call__)"),
    ("cameras", "get_camera(4, elevation, extra_view): per azimuth 0, 90, 180, 270 the camera-to-world matrix "
     "of a unit-sphere camera looking at the origin (OpenGL: az 0 at +Z, 90 at +X, elevation towards +Y; "
     "columns right, up, -forward, position), rows turned to Blender's world (row 1 = -row 2, row 2 = row 1), "
     "flattened", "mv_unet.py (get_camera), extern/ImageDream/imagedream/camera_utils.py"),
    ("front view", "the input (front) view is ImageDream's azimuth 90 (Blender +X, threestudio's azimuth 0): LGM "
     "takes ImageDream's outputs in the order 1, 2, 3, 0 as its views at kiui azimuths 0, 90, 180, 270",
     "3DTopia/LGM infer.py (mv_image reordered), threestudio/data/random_multiview.py (bytedance/ImageDream)"),
    ("sampling", "LGM runs it with prompt '', negative prompt '', guidance 5, 30 DDIM steps, elevation 0; DDIM "
     "with beta 0.00085..0.012 scaled_linear, steps_offset 1, set_alpha_to_one false, epsilon",
     "3DTopia/LGM infer.py, convert_mvdream_to_diffusers.py"),
]
# ImageDream's MultiViewUNetModel settings the converter accepts (defaults of the class when absent)
IMAGEDREAM_SETTINGS = {"transformer_depth": (1,), "use_scale_shift_norm": (False,), "resblock_updown": (False,),
                       "conv_resample": (True,), "dims": (2,), "num_classes": (None,)}
IMAGEDREAM_DEFAULTS = {"transformer_depth": 1, "use_scale_shift_norm": False, "resblock_updown": False,
                       "conv_resample": True, "dims": 2, "num_classes": None, "ip_weight": 1.0}
# The resampler's settings, fixed in MultiViewUNetModel.__init__ (not in its config); the converter
# reads depth, heads (at dim_head 64) and embedding_dim from the weights' shapes
IMAGEDREAM_RESAMPLER = dict(depth=4, dim_head=64, heads=12, embedding_dim=1280)
GROUPS = 32   # every GroupNorm of the ldm UNet
# The released unet/config.json as the facts give it
IMAGEDREAM_RELEASED_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
    num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64, transformer_depth=1, context_dim=1024,
    use_checkpoint=False, camera_dim=16, ip_dim=16)


def imagedream_levels(cfg: dict) -> list[dict]:
    """Per level of an ImageDream UNet config: its width, heads and whether it has attention."""
    mc, heads = cfg["model_channels"], cfg["num_head_channels"]
    return [dict(channels=mc * m, heads=mc * m // heads, attention=2 ** i in cfg["attention_resolutions"])
            for i, m in enumerate(cfg["channel_mult"])]


def imagedream_key_map(cfg: dict, resampler_depth: int) -> dict[str, str]:
    """ImageDream UNet key prefix -> fast3d ``MVDenoiser`` key prefix (``unet.`` = diffusers'
    ``UNet2DConditionModel``, ``image_proj.`` = ``IPAdapterPlusImageProjection``), for every module
    of the UNet config ``cfg`` with a resampler of ``resampler_depth`` layers, but the resampler's
    fused ``to_kv`` (split by the converter)."""
    levels, n = imagedream_levels(cfg), cfg["num_res_blocks"]
    L = len(levels)
    resnet = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
              "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    m = {"time_embed.0": "unet.time_embedding.linear_1", "time_embed.2": "unet.time_embedding.linear_2",
         "camera_embed.0": "unet.class_embedding.linear_1", "camera_embed.2": "unet.class_embedding.linear_2",
         "input_blocks.0.0": "unet.conv_in", "out.0": "unet.conv_norm_out", "out.2": "unet.conv_out",
         "image_embed.latents": "image_proj.latents", "image_embed.proj_in": "image_proj.proj_in",
         "image_embed.proj_out": "image_proj.proj_out", "image_embed.norm_out": "image_proj.norm_out"}

    def res(src, dst):
        m.update({f"{src}.{a}": f"{dst}.{b}" for a, b in resnet.items()})

    for i, lv in enumerate(levels):
        for j in range(n):
            k = 1 + i * (n + 1) + j
            res(f"input_blocks.{k}.0", f"unet.down_blocks.{i}.resnets.{j}")
            if lv["attention"]:
                m[f"input_blocks.{k}.1"] = f"unet.down_blocks.{i}.attentions.{j}"
        if i < L - 1:
            m[f"input_blocks.{1 + i * (n + 1) + n}.0.op"] = f"unet.down_blocks.{i}.downsamplers.0.conv"
    res("middle_block.0", "unet.mid_block.resnets.0")
    m["middle_block.1"] = "unet.mid_block.attentions.0"
    res("middle_block.2", "unet.mid_block.resnets.1")
    for u, i in enumerate(reversed(range(L))):   # up block u is level i, deepest first
        for j in range(n + 1):
            k = u * (n + 1) + j
            res(f"output_blocks.{k}.0", f"unet.up_blocks.{u}.resnets.{j}")
            if levels[i]["attention"]:
                m[f"output_blocks.{k}.1"] = f"unet.up_blocks.{u}.attentions.{j}"
            if i > 0 and j == n:
                m[f"output_blocks.{k}.{2 if levels[i]['attention'] else 1}.conv"] = f"unet.up_blocks.{u}.upsamplers.0.conv"
    for r in range(resampler_depth):
        src, dst = f"image_embed.layers.{r}", f"image_proj.layers.{r}"
        m.update({f"{src}.0.norm1": f"{dst}.ln0", f"{src}.0.norm2": f"{dst}.ln1", f"{src}.0.to_q": f"{dst}.attn.to_q",
                  f"{src}.0.to_out": f"{dst}.attn.to_out.0", f"{src}.1.0": f"{dst}.ff.0",
                  f"{src}.1.1": f"{dst}.ff.1.net.0.proj", f"{src}.1.3": f"{dst}.ff.1.net.2"})
    return m


def rename(key: str, key_map: dict[str, str]) -> str | None:
    """``key`` with its longest mapped prefix replaced, with transformer internals carried over
    (ImageDream's names inside a SpatialTransformer3D are diffusers' but ``attn2.to_k_ip`` /
    ``to_v_ip``, which diffusers keeps in the attention's processor); None if unmapped."""
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in key_map:
            tail = ".".join(parts[cut:])
            for ip in ("to_k_ip", "to_v_ip"):
                tail = tail.replace(f"attn2.{ip}.", f"attn2.processor.{ip}.0.")
            return ".".join([key_map[head], tail]) if tail else key_map[head]
    return None
