"""The released LRMs' layouts (OpenLRM v1.1, VFusion3D), written down from reading their code at
the commits of ``manifest.SOURCES``; like the LGM tables, not yet checked against a real file.

:func:`lrm_shapes` re-derives ``state_dict()`` of OpenLRM's ``ModelLRM``
(openlrm/models/modeling_lrm.py) and VFusion3D's ``LRMGenerator`` (lrm/models/generator.py) by
hand from their constructors.
"""

from __future__ import annotations

import math

OPENLRM_FACTS = [
    ("released files", "zxhezexin/openlrm-{obj,mix}-{small,base,large}-1.1 on the Hugging Face hub: "
     "ModelLRM weights through PyTorchModelHubMixin (model.safetensors + config.json)", "model_card.md, "
     "openlrm/runners/infer/lrm.py (wrap_model_hub(...).from_pretrained)"),
    ("sizes", "small: dinov2_vits14_reg (384), 12 x 512, 8 heads, planes 32, 224 px; base: dinov2_vitb14_reg "
     "(768), 12 x 768, 12 heads, planes 48, 336 px; large: dinov2_vitb14_reg, 16 x 1024, 16 heads, planes 80, "
     "448 px; camera_embed_dim 1024, triplane 32 -> 64, samples per ray 96 / 96 / 128", "model_card.md, "
     "configs/train-sample.yaml"),
    ("modules", "encoder.model (DINOv2 hub ViT), camera_embedder.mlp (Linear 16->C, SiLU, Linear C->C), "
     "pos_embed [1, 3 * 32^2, D], transformer.layers (ConditionModulationBlock) + transformer.norm, upsampler "
     "ConvTranspose2d(D, P, 2, 2), synthesizer.decoder.net (OSGDecoder)", "openlrm/models/modeling_lrm.py"),
    ("encoder", "DinoVisionTransformer: cls_token, pos_embed [1, 1 + 37^2, E] (img_size 518 / 14), "
     "register_tokens [1, 4, E], patch_embed.proj, blocks.i.{norm1, attn.qkv (bias), attn.proj, ls1.gamma, "
     "norm2, mlp.fc1, mlp.fc2, ls2.gamma}, norm; no mask_token (commented out); LayerNorm eps 1e-6",
     "openlrm/models/encoders/dinov2/models/vision_transformer.py, layers/block.py, hub/backbones.py"),
    ("encoder input/output", "images in [0, 1], not normalised; output [x_norm_clstoken, x_norm_patchtokens] "
     "(register tokens left out); pos table interpolated bicubic, antialias, offset 0",
     "openlrm/models/encoders/dinov2_wrapper.py, hub/backbones.py (dinov2_vit*14_reg)"),
    ("block", "x += cross_attn(ModLN1(x), cond); x += self_attn(ModLN2(x)); x += mlp(ModLN3(x)); "
     "nn.MultiheadAttention(bias=False, kdim=vdim=encoder dim for the cross-attention: q/k/v_proj_weight, or "
     "in_proj_weight [3D, D] when the encoder dim equals D); mlp Linear, GELU, Dropout, Linear, Dropout; "
     "ModLN: LayerNorm(eps 1e-6) * (1 + scale) + shift, (shift, scale) = Linear(SiLU(mod)).chunk(2)",
     "openlrm/models/block.py, modulate.py, transformer.py"),
    ("planes", "tokens viewed [N, 3, 32, 32, D] -> upsampler per plane; planes XY, XZ and (z, y) "
     "(generate_planes, EG3D issue 67 fix); box_warp 2: the planes span [-1, 1]^3",
     "openlrm/models/modeling_lrm.py, rendering/utils/renderer.py, rendering/synthesizer.py"),
    ("decoder", "Linear(3P, 64), ReLU, Linear(64, 64), ReLU, Linear(64, 64), ReLU, Linear(64, 4); features "
     "concatenated plane-major; sigma softplus(x - 1), rgb sigmoid * 1.002 - 0.001", "rendering/synthesizer.py, "
     "rendering/utils/renderer.py"),
    ("camera", "source camera vector: c2w [3 x 4] (OpenGL/Blender camera axes: the ray sampler multiplies by "
     "diag(1, -1, -1, 1)) flattened, then fx/W, fy/H, cx/W, cy/H; default source camera c2w "
     "[[1, 0, 0, 0], [0, 0, -1, -2], [0, 1, 0, 0]] (at -Y, distance 2, +Z up), f 0.75, c 0.5",
     "openlrm/datasets/cam_utils.py, runners/infer/lrm.py, rendering/utils/ray_sampler.py"),
]
VFUSION3D_FACTS = [
    ("released files", "model.safetensors on the Hugging Face hub (facebook/vfusion3d) and a Google Drive "
     ".pth; the GitHub inferrer loads torch.load(...)['model_state_dict'] into LRMGenerator",
     "README.md, lrm/inferrer.py"),
    ("sizes", "camera_embed_dim 1024, transformer 16 x 1024, 16 heads, triplane 32 -> 64 x 80, 128 samples per "
     "ray; encoder facebook/dinov2-base (transformers Dinov2Model: 768, 12 layers, 12 heads, /14, 518, no "
     "registers); 512 px input", "lrm/inferrer.py, lrm/models/encoders/dino_wrapper2.py, gradio_app.py"),
    ("modules", "encoder.model (transformers Dinov2Model: embeddings.{cls_token, mask_token, "
     "position_embeddings, patch_embeddings.projection}, encoder.layer.i.{norm1, attention.attention.{query, "
     "key, value}, attention.output.dense, layer_scale1.lambda1, norm2, mlp.fc1, mlp.fc2, "
     "layer_scale2.lambda1}, layernorm), camera_embedder.mlp, transformer.{pos_embed, layers, norm, deconv}, "
     "synthesizer.decoder.net", "lrm/models/generator.py, lrm/models/transformer.py"),
    ("encoder input/output", "AutoImageProcessor (ImageNet mean/std, no resize/crop/rescale) on [0, 1] images; "
     "last_hidden_state: all tokens", "lrm/models/encoders/dino_wrapper2.py"),
    ("block, planes, decoder", "as OpenLRM's (ConditionModulationBlock, EG3D planes with box_warp 2, "
     "OSGDecoder)", "lrm/models/transformer.py, lrm/models/rendering/"),
    ("camera", "default source camera c2w [[0, 0, 1, 1], [1, 0, 0, 0], [0, 1, 0, 0]] (at +X, distance 1, +Z up), "
     "fx = fy = 384, cx = cy = 256 of 512 (normalised 0.75, 0.5)", "lrm/inferrer.py"),
    ("Hugging Face release", "facebook/vfusion3d (AutoModel, trust_remote_code; first published as "
     "jadechoghari/vfusion3d): model.safetensors + config.json (model_type lrm_generator) of a PreTrainedModel "
     "LRMGenerator with the GitHub model's modules (encoder = DinoWrapper over transformers' Dinov2Model, "
     "camera_embedder.mlp, transformer, synthesizer), so its keys are the GitHub .pth's, without the "
     "model_state_dict wrapper; config.json: camera_embed_dim 1024, rendering_samples_per_ray 128, "
     "transformer_dim 1024, transformer_layers 16, transformer_heads 16, triplane_low_res 32, triplane_high_res "
     "64, triplane_dim 80, encoder_model_name facebook/dinov2-base, encoder_feat_dim 768; the same default "
     "source camera", "jadechoghari/vfusion3d@d10e953 modeling.py, @e875abe config.json, @43d6306 lrm/inferrer.py"),
]
# VFusion3D's Hugging Face config.json field -> the manifest's size name (triplane_high_res is 2 x token_res)
HUB_CONFIG_FIELDS = {"camera_embed_dim": "camera_dim", "rendering_samples_per_ray": "samples",
                     "transformer_dim": "width", "transformer_layers": "layers", "transformer_heads": "heads",
                     "triplane_low_res": "token_res", "triplane_dim": "planes", "encoder_feat_dim": "encoder_dim"}
HUB_MODEL_TYPE = "lrm_generator"

# The originals' default source cameras (the "camera" facts): camera-to-world [3 x 4] in their world
# (+Z up, as fast3d's) and the normalised focal length / principal point of build_camera_principle.
OPENLRM_SOURCE_C2W = ((1, 0, 0, 0), (0, 0, -1, -2), (0, 1, 0, 0))     # openlrm/runners/infer/lrm.py
VFUSION3D_SOURCE_C2W = ((0, 0, 1, 1), (1, 0, 0, 0), (0, 1, 0, 0))     # lrm/inferrer.py
SOURCE_FOCAL, SOURCE_PRINCIPAL = 0.75, 0.5                            # fx/W = fy/H, cx/W = cy/H


def source_camera(kind: str) -> dict:
    """The original's default source camera of ``kind`` ("openlrm" | "vfusion3d") as fast3d's
    camera dict: azimuth (from +X towards +Y) and elevation of its centre, its distance to the
    origin, and the vertical field of view of its normalised focal length."""
    c2w = OPENLRM_SOURCE_C2W if kind == "openlrm" else VFUSION3D_SOURCE_C2W
    x, y, z = (float(row[3]) for row in c2w)
    d = math.sqrt(x * x + y * y + z * z)
    return {"azimuth_deg": math.degrees(math.atan2(y, x)), "elevation_deg": math.degrees(math.asin(z / d)),
            "distance": d, "fov_y_deg": math.degrees(2 * math.atan(0.5 / SOURCE_FOCAL))}


_COMMON = dict(camera_dim=1024, token_res=32, patch=14, pos_table=37, mlp_ratio=4, decoder_hidden=64,
               decoder_layers=4)
OPENLRM_PRESETS = {
    "small": dict(_COMMON, encoder_dim=384, encoder_layers=12, encoder_heads=6, registers=4, width=512, layers=12,
                  heads=8, planes=32, image_size=224, samples=96),
    "base": dict(_COMMON, encoder_dim=768, encoder_layers=12, encoder_heads=12, registers=4, width=768, layers=12,
                 heads=12, planes=48, image_size=336, samples=96),
    "large": dict(_COMMON, encoder_dim=768, encoder_layers=12, encoder_heads=12, registers=4, width=1024, layers=16,
                  heads=16, planes=80, image_size=448, samples=128),
}
VFUSION3D = dict(_COMMON, encoder_dim=768, encoder_layers=12, encoder_heads=12, registers=0, width=1024, layers=16,
                 heads=16, planes=80, image_size=512, samples=128)


def _linear(s: dict, name: str, out: int, inp: int, bias: bool = True) -> None:
    s[f"{name}.weight"] = (out, inp)
    if bias:
        s[f"{name}.bias"] = (out,)


def _ln(s: dict, name: str, c: int) -> None:
    s[f"{name}.weight"] = (c,)
    s[f"{name}.bias"] = (c,)


def _hub_dinov2(s: dict, p: dict, pre: str) -> None:
    """DINOv2's own ViT (facebookresearch/dinov2 as vendored by OpenLRM)."""
    E, R = p["encoder_dim"], p["registers"]
    s[f"{pre}cls_token"] = (1, 1, E)
    s[f"{pre}pos_embed"] = (1, 1 + p["pos_table"] ** 2, E)
    if R:
        s[f"{pre}register_tokens"] = (1, R, E)
    s[f"{pre}patch_embed.proj.weight"] = (E, 3, p["patch"], p["patch"])
    s[f"{pre}patch_embed.proj.bias"] = (E,)
    for i in range(p["encoder_layers"]):
        b = f"{pre}blocks.{i}"
        _ln(s, f"{b}.norm1", E)
        _linear(s, f"{b}.attn.qkv", 3 * E, E)
        _linear(s, f"{b}.attn.proj", E, E)
        s[f"{b}.ls1.gamma"] = (E,)
        _ln(s, f"{b}.norm2", E)
        _linear(s, f"{b}.mlp.fc1", p["mlp_ratio"] * E, E)
        _linear(s, f"{b}.mlp.fc2", E, p["mlp_ratio"] * E)
        s[f"{b}.ls2.gamma"] = (E,)
    _ln(s, f"{pre}norm", E)


def _hf_dinov2(s: dict, p: dict, pre: str) -> None:
    """transformers' Dinov2Model as saved in 2024 (query/key/value, output.dense; mask_token)."""
    E = p["encoder_dim"]
    s[f"{pre}embeddings.cls_token"] = (1, 1, E)
    s[f"{pre}embeddings.mask_token"] = (1, E)
    s[f"{pre}embeddings.position_embeddings"] = (1, 1 + p["pos_table"] ** 2, E)
    s[f"{pre}embeddings.patch_embeddings.projection.weight"] = (E, 3, p["patch"], p["patch"])
    s[f"{pre}embeddings.patch_embeddings.projection.bias"] = (E,)
    for i in range(p["encoder_layers"]):
        b = f"{pre}encoder.layer.{i}"
        _ln(s, f"{b}.norm1", E)
        for m in ("query", "key", "value"):
            _linear(s, f"{b}.attention.attention.{m}", E, E)
        _linear(s, f"{b}.attention.output.dense", E, E)
        s[f"{b}.layer_scale1.lambda1"] = (E,)
        _ln(s, f"{b}.norm2", E)
        _linear(s, f"{b}.mlp.fc1", p["mlp_ratio"] * E, E)
        _linear(s, f"{b}.mlp.fc2", E, p["mlp_ratio"] * E)
        s[f"{b}.layer_scale2.lambda1"] = (E,)
    _ln(s, f"{pre}layernorm", E)


def _mha(s: dict, name: str, D: int, kdim: int) -> None:
    """nn.MultiheadAttention(D, heads, bias=False, kdim=vdim=kdim)."""
    if kdim == D:
        s[f"{name}.in_proj_weight"] = (3 * D, D)
    else:
        s[f"{name}.q_proj_weight"] = (D, D)
        s[f"{name}.k_proj_weight"] = (D, kdim)
        s[f"{name}.v_proj_weight"] = (D, kdim)
    s[f"{name}.out_proj.weight"] = (D, D)


def lrm_shapes(kind: str, p: dict) -> dict[str, tuple]:
    """Key -> shape of the original model's ``state_dict()``: ``kind`` "openlrm" (ModelLRM) or
    "vfusion3d" (LRMGenerator), sizes ``p`` (an ``OPENLRM_PRESETS`` entry or ``VFUSION3D``)."""
    s: dict[str, tuple] = {}
    (_hub_dinov2 if kind == "openlrm" else _hf_dinov2)(s, p, "encoder.model.")
    C, D, E, P = p["camera_dim"], p["width"], p["encoder_dim"], p["planes"]
    _linear(s, "camera_embedder.mlp.0", C, 16)
    _linear(s, "camera_embedder.mlp.2", C, C)
    tr = "transformer."
    s["pos_embed" if kind == "openlrm" else f"{tr}pos_embed"] = (1, 3 * p["token_res"] ** 2, D)
    for i in range(p["layers"]):
        b = f"{tr}layers.{i}"
        for n in ("norm1", "norm2", "norm3"):
            _ln(s, f"{b}.{n}.norm", D)
            _linear(s, f"{b}.{n}.mlp.1", 2 * D, C)
        _mha(s, f"{b}.cross_attn", D, E)
        _mha(s, f"{b}.self_attn", D, D)
        _linear(s, f"{b}.mlp.0", p["mlp_ratio"] * D, D)
        _linear(s, f"{b}.mlp.3", D, p["mlp_ratio"] * D)
    _ln(s, f"{tr}norm", D)
    up = "upsampler" if kind == "openlrm" else f"{tr}deconv"
    s[f"{up}.weight"] = (D, P, 2, 2)
    s[f"{up}.bias"] = (P,)
    widths = [3 * P] + [p["decoder_hidden"]] * (p["decoder_layers"] - 1) + [4]
    for j in range(p["decoder_layers"]):
        _linear(s, f"synthesizer.decoder.net.{2 * j}", widths[j + 1], widths[j])
    return s
