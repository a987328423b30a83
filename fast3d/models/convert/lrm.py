"""OpenLRM v1.1 and VFusion3D checkpoints -> fast3d's LRM (``LRMConfig.layout`` "openlrm" /
"vfusion3d"), rendering through fast3d's fused triplane marcher.

The key mapping (facts in ``manifest_lrm``):

* encoder: OpenLRM's DINOv2 hub ViT (``encoder.model.blocks.i.attn.qkv`` [3E, E] rows [q; k; v],
  ``ls1.gamma``, ``pos_embed``, ``register_tokens``, ``norm``) or VFusion3D's transformers
  Dinov2Model of 2024 (``attention.attention.query/key/value``, ``attention.output.dense``) ->
  transformers' current names (``attention.q_proj/k_proj/v_proj/o_proj``, ``layer_scale1.lambda1``,
  ``embeddings.position_embeddings``, ``layernorm``).
* ``camera_embedder.mlp.{0,2}`` -> ``camera_embed.{0,2}``; ``pos_embed`` [1, 3 h w, D] -> ``tokens``.
* each block's ``nn.MultiheadAttention``: ``in_proj_weight`` [3D, D] (rows q, k, v) or
  ``q/k/v_proj_weight`` -> ``q.weight`` and ``kv.weight`` = [k; v]; ``out_proj`` -> ``out``;
  ``mlp.{0,3}`` -> ``mlp.{0,2}``; ModLN ``norm{1,2,3}.{norm, mlp.1}`` keep their names.
* ``upsampler`` / ``transformer.deconv`` -> ``upsample``; ``synthesizer.decoder.net.{0,2,4,6}``
  -> ``renderer.decoder.layers.{0,1,2,3}``.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from fast3d.models import checkpoints
from fast3d.models.convert import manifest, manifest_lrm
from fast3d.models.convert.common import Consumer, check_layout, load_state_dict
from fast3d.models.lrm import LRM, LRMConfig

BOUND = 1.0   # box_warp 2: the planes span [-1, 1]^3
MASK_TOKEN = "encoder.embeddings.mask_token"


def lrm_config(kind: str, p: dict) -> LRMConfig:
    """fast3d's LRMConfig for an original model of sizes ``p``."""
    return LRMConfig(image_size=p["image_size"], encoder_dim=p["encoder_dim"], encoder_layers=p["encoder_layers"],
                     encoder_heads=p["encoder_heads"], encoder_patch_size=p["patch"],
                     encoder_image_size=p["pos_table"] * p["patch"], camera_dim=p["camera_dim"], width=p["width"],
                     layers=p["layers"], heads=p["heads"], token_res=p["token_res"], plane_channels=p["planes"],
                     render_hidden=p["decoder_hidden"], render_layers=p["decoder_layers"],
                     n_samples=p["samples"] // 2, n_importance=p["samples"] // 2, bound=BOUND,
                     encoder_registers=p["registers"], layout=kind, source_camera=manifest_lrm.source_camera(kind))


def _encoder(kind: str, src: Consumer, p: dict, out: dict) -> None:
    pre = "encoder.model."
    if kind == "openlrm":
        names = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
                 "register_tokens": "embeddings.register_tokens",
                 "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
                 "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
                 "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
        for a, b in names.items():
            if f"{pre}{a}" in src.state:
                out[f"encoder.{b}"] = src.take(f"{pre}{a}")
        for i in range(p["encoder_layers"]):
            a, b = f"{pre}blocks.{i}", f"encoder.encoder.layer.{i}"
            for t in ("weight", "bias"):
                q, k, v = src.take(f"{a}.attn.qkv.{t}").chunk(3, 0)            # reshape(B, N, 3, heads, d)
                out[f"{b}.attention.q_proj.{t}"], out[f"{b}.attention.k_proj.{t}"] = q, k
                out[f"{b}.attention.v_proj.{t}"] = v
                out[f"{b}.attention.o_proj.{t}"] = src.take(f"{a}.attn.proj.{t}")
                for m in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                    out[f"{b}.{m}.{t}"] = src.take(f"{a}.{m}.{t}")
            out[f"{b}.layer_scale1.lambda1"] = src.take(f"{a}.ls1.gamma")
            out[f"{b}.layer_scale2.lambda1"] = src.take(f"{a}.ls2.gamma")
        return
    for a in ("embeddings.cls_token", "embeddings.position_embeddings", "embeddings.patch_embeddings.projection.weight",
              "embeddings.patch_embeddings.projection.bias", "layernorm.weight", "layernorm.bias"):
        out[f"encoder.{a}"] = src.take(f"{pre}{a}")
    src.drop(f"{pre}embeddings.mask_token", "masked-image pretraining only (bool_masked_pos); VFusion3D never "
                                            "masks, and fast3d's encoder is built without it")
    renames = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
               "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj",
               "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(p["encoder_layers"]):
        a, b = f"{pre}encoder.layer.{i}", f"encoder.encoder.layer.{i}"
        for x, y in renames.items():
            for t in ("weight", "bias"):
                out[f"{b}.{y}.{t}"] = src.take(f"{a}.{x}.{t}")
        for n in ("layer_scale1.lambda1", "layer_scale2.lambda1"):
            out[f"{b}.{n}"] = src.take(f"{a}.{n}")


def convert_state(kind: str, state: dict, p: dict) -> tuple[dict, dict, dict]:
    """The original state dict (checked against ``manifest_lrm.lrm_shapes(kind, p)``) -> fast3d's
    LRM state dict, the dropped source keys and the fast3d keys with no source (each with why)."""
    name = "an OpenLRM v1.1 checkpoint" if kind == "openlrm" else "a VFusion3D checkpoint"
    check_layout(state, manifest_lrm.lrm_shapes(kind, p), "--weights", f"{name} of this size")
    src, out, filled = Consumer(state), {}, {}
    _encoder(kind, src, p, out)
    if p["registers"]:   # transformers' register variant always builds a mask token; OpenLRM's has none
        E = p["encoder_dim"]
        out[MASK_TOKEN] = torch.zeros(1, E)
        filled[MASK_TOKEN] = "zeros: OpenLRM's DINOv2 has no mask token (commented out); fast3d never masks"
    for j in (0, 2):
        for t in ("weight", "bias"):
            out[f"camera_embed.{j}.{t}"] = src.take(f"camera_embedder.mlp.{j}.{t}")
    tr = "transformer."
    out["tokens"] = src.take("pos_embed" if kind == "openlrm" else f"{tr}pos_embed")[0]
    D = p["width"]
    for i in range(p["layers"]):
        a, b = f"{tr}layers.{i}", f"layers.{i}"
        for n in ("norm1", "norm2", "norm3"):
            for t in ("weight", "bias"):
                out[f"{b}.{n}.norm.{t}"] = src.take(f"{a}.{n}.norm.{t}")
                out[f"{b}.{n}.mlp.1.{t}"] = src.take(f"{a}.{n}.mlp.1.{t}")
        for att in ("cross_attn", "self_attn"):
            if f"{a}.{att}.in_proj_weight" in state:
                q, k, v = src.take(f"{a}.{att}.in_proj_weight").split(D, 0)
            else:
                q, k, v = (src.take(f"{a}.{att}.{x}_proj_weight") for x in "qkv")
            out[f"{b}.{att}.q.weight"], out[f"{b}.{att}.kv.weight"] = q, torch.cat([k, v], 0)
            out[f"{b}.{att}.out.weight"] = src.take(f"{a}.{att}.out_proj.weight")
        for x, y in ((0, 0), (3, 2)):
            for t in ("weight", "bias"):
                out[f"{b}.mlp.{y}.{t}"] = src.take(f"{a}.mlp.{x}.{t}")
    for t in ("weight", "bias"):
        out[f"norm.{t}"] = src.take(f"{tr}norm.{t}")
        out[f"upsample.{t}"] = src.take(f"upsampler.{t}" if kind == "openlrm" else f"{tr}deconv.{t}")
        for j in range(p["decoder_layers"]):
            out[f"renderer.decoder.layers.{j}.{t}"] = src.take(f"synthesizer.decoder.net.{2 * j}.{t}")
    return out, src.finish(), filled


def sizes_for(kind: str, state: dict, variant: str | None, what: str) -> tuple[dict, str]:
    """The original's sizes and their name: VFusion3D's one model, or the OpenLRM size ``variant``
    names, or (without one) whose transformer width the checkpoint's ``pos_embed`` has."""
    if kind == "vfusion3d":
        if variant is not None:
            raise ValueError(f"--variant does not apply to vfusion3d (one released model); got {variant!r}")
        return manifest_lrm.VFUSION3D, "vfusion3d"
    presets = manifest_lrm.OPENLRM_PRESETS
    if variant is not None:
        if variant not in presets:
            raise ValueError(f"--variant must be one of {sorted(presets)} for openlrm; got {variant!r}")
        return presets[variant], variant
    pe = state.get("pos_embed")
    width = int(pe.shape[-1]) if pe is not None and pe.dim() == 3 else None
    for name, p in presets.items():
        if p["width"] == width:
            return p, name
    raise ValueError(f"{what} is not an OpenLRM v1.1 checkpoint: its 'pos_embed' ({None if pe is None else tuple(pe.shape)}) "
                     f"has none of the widths {({n: p['width'] for n, p in presets.items()})}; first keys: "
                     f"{sorted(state)[:8]}")


def hub_config(weights: str) -> dict | None:
    """The ``config.json`` of VFusion3D's Hugging Face release beside its ``model.safetensors``
    (``weights`` is that directory), or None when ``weights`` is not such a directory."""
    f = os.path.join(weights, "config.json") if isinstance(weights, str) and os.path.isdir(weights) else None
    if f is None or not os.path.isfile(f):
        return None
    try:
        with open(f) as fh:
            d = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--weights {weights!r}: cannot read its config.json ({e})") from None
    return d if isinstance(d, dict) and d.get("model_type") == manifest_lrm.HUB_MODEL_TYPE else None


def check_hub_config(cfg: dict, p: dict, what: str) -> None:
    """ValueError naming every size of VFusion3D's Hugging Face ``config.json`` that differs from
    the manifest's sizes ``p``."""
    want = {k: p[v] for k, v in manifest_lrm.HUB_CONFIG_FIELDS.items()}
    want["triplane_high_res"] = 2 * p["token_res"]
    bad = {k: (cfg.get(k), v) for k, v in want.items() if cfg.get(k) != v}
    if bad:
        raise ValueError(f"{what}: config.json describes another model than VFusion3D's release: (file, expected) "
                         f"{bad}")


def convert(kind: str, weights: str, variant: str | None = None) -> tuple[LRM, dict]:
    """A released OpenLRM v1.1 / VFusion3D checkpoint -> (a fast3d LRM, the conversion record).
    VFusion3D comes as the GitHub ``.pth`` or as the Hugging Face directory (``model.safetensors``
    + ``config.json``, whose sizes are checked); the keys are the same."""
    state, record = load_state_dict(weights)
    p, size = sizes_for(kind, state, variant, f"--weights {record['file']!r}")
    hub = hub_config(weights) if kind == "vfusion3d" else None
    if hub is not None:
        check_hub_config(hub, p, f"--weights {weights!r}")
        record["hub_config"] = hub
    new, dropped, filled = convert_state(kind, state, p)
    cfg = lrm_config(kind, p)
    model = LRM(cfg)
    checkpoints.load_state(model, new, record["file"])
    record.update(kind=kind, source=list(manifest.SOURCES[kind]), size=size, dropped=dropped, filled=filled,
                  source_dtypes=sorted({str(v.dtype) for v in state.values()}), config=dataclasses.asdict(cfg),
                  checked_against_real_release=False)
    return model, record
