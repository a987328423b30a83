"""LGM's released checkpoints (3DTopia/LGM) -> a fast3d LGM with LGM's own Gaussian head.

The key mapping (facts in ``manifest.LGM_FACTS``):

* ``unet.{down,up}_blocks.i.nets.j.*`` -> ``unet.{down,up}_blocks.i.layers.j.resnet.*``;
  ``...attns.j.norm.*`` -> ``...layers.j.attn.norm.*``; ``...attns.j.attn.qkv.weight`` [3C, C]
  -> ``to_q`` / ``to_k`` / ``to_v`` (its three row blocks, in that order); ``attn.proj`` -> ``to_out``.
* ``unet.mid_block.nets.0`` / ``attns.0`` / ``nets.1`` -> ``mid_block.first.resnet`` /
  ``first.attn`` / ``second`` (the same order: ResNet, attention, ResNet).
* ``unet.conv_out`` (3x3) followed by LGM's extra 1x1 ``conv`` -> one 3x3 ``unet.conv_out``:
  two linear maps in a row are one, W = W1 W3 and b = W1 b3 + b1 (computed in float64).
* ``lpips_loss.*`` (LPIPS's VGG, a loss, should a training checkpoint carry it) is dropped.

The fast3d model takes cameras in its normalised world with ``camera_distance`` 1.5 (LGM's
cam_radius) and computes the Pluecker rays of LGM's world (``model.viewmats_to_lgm_world``), so
LGM's default rig is fast3d's default input rig for this config (4 views at azimuths 0, 90, 180,
270, elevation 0, distance 1.5, fov 49.1)."""

from __future__ import annotations

import dataclasses
import os

import torch

from fast3d.models.convert import manifest
from fast3d.models.convert.common import Consumer, check_layout, load_state_dict
from fast3d.models.lgm import LGM, LGMConfig
from fast3d.models.lgm.config import LGM_CAMERA_RADIUS

VARIANTS = {"fixrot": "original", "prefix": "original-prefix"}
LPIPS_PREFIX = "lpips_loss."


def head_for(path: str, variant: str | None) -> str:
    """The LGMConfig.head of a checkpoint: from ``variant`` ("fixrot" | "prefix") or, without one,
    from the released file's name."""
    if variant is not None:
        if variant not in VARIANTS:
            raise ValueError(f"--variant must be one of {sorted(VARIANTS)} for lgm; got {variant!r}")
        return VARIANTS[variant]
    name = os.path.basename(path)
    if name in manifest.LGM_RELEASES:
        return manifest.LGM_RELEASES[name]
    raise ValueError(f"--variant must be given for {name!r} (not a released file name: "
                     f"{sorted(manifest.LGM_RELEASES)}): 'fixrot' for weights trained after LGM's rotation fix "
                     f"(commit 9a0797c, quaternions normalised per Gaussian), 'prefix' for weights trained before it")


def lgm_config(opt: dict, head: str, input_size: int) -> LGMConfig:
    """fast3d's LGMConfig for an LGM Options layout; ValueError if fast3d's U-Net cannot express
    it (attention on the k lowest down levels, the middle block and the k first up blocks)."""
    n_down, n_up = len(opt["down_channels"]), len(opt["up_channels"])
    k = sum(opt["down_attention"])
    want = dict(down_attention=(False,) * (n_down - k) + (True,) * k, mid_attention=k > 0,
                up_attention=tuple(i < k for i in range(n_up)))
    got = dict(down_attention=tuple(opt["down_attention"]), mid_attention=bool(opt["mid_attention"]),
               up_attention=tuple(opt["up_attention"][:n_up]))
    if got != want:
        raise ValueError(f"--weights: an LGM with attention {got} has no fast3d LGMConfig (it needs attention on the "
                         f"lowest levels: {want})")
    preset = manifest.lgm_preset_name(opt)
    render = LGMConfig().render_size if preset == "big" else LGMConfig().render_size // 2  # Options.output_size
    return LGMConfig(input_size=input_size, splat_size=input_size * 2 ** (n_up - 1) // 2 ** (n_down - 1),
                     render_size=render, down_channels=tuple(opt["down_channels"]),
                     up_channels=tuple(opt["up_channels"]), layers_per_block=manifest.LGM_LAYERS,
                     attention_levels=k, attention_heads=16, norm_groups=32,
                     camera_distance=LGM_CAMERA_RADIUS, head=head)


def convert_state(state: dict, opt: dict) -> tuple[dict, dict]:
    """LGM's state dict (checked against ``manifest.lgm_shapes(opt)``) -> fast3d's LGM state
    dict, and the dropped source keys with their reasons."""
    src = Consumer(state)
    for k in state:
        if k.startswith(LPIPS_PREFIX):
            src.drop(k, "LPIPS's VGG: the training loss, not part of the model (LGM's state_dict drops it too)")
    net = {k: v for k, v in state.items() if not k.startswith(LPIPS_PREFIX)}
    check_layout(net, manifest.lgm_shapes(opt), "--weights", "an LGM checkpoint of this layout")
    out = {}

    def copy(a: str, b: str) -> None:
        for p in ("weight", "bias"):
            if f"{a}.{p}" in state:
                out[f"{b}.{p}"] = src.take(f"{a}.{p}")

    def resnet(a: str, b: str) -> None:
        for m in ("norm1", "conv1", "norm2", "conv2", "shortcut"):
            copy(f"{a}.{m}", f"{b}.{m}")

    def attention(a: str, b: str) -> None:
        copy(f"{a}.norm", f"{b}.norm")
        q, k, v = src.take(f"{a}.attn.qkv.weight").chunk(3, 0)     # rows [q; k; v] (reshape B, N, 3, H, D)
        out[f"{b}.to_q.weight"], out[f"{b}.to_k.weight"], out[f"{b}.to_v.weight"] = q, k, v
        copy(f"{a}.attn.proj", f"{b}.to_out")

    copy("unet.conv_in", "unet.conv_in")
    for kind, n in (("down_blocks", len(opt["down_channels"])), ("up_blocks", len(opt["up_channels"]))):
        for i in range(n):
            a, b = f"unet.{kind}.{i}", f"unet.{kind}.{i}"
            j = 0
            while f"{a}.nets.{j}.conv1.weight" in state:
                resnet(f"{a}.nets.{j}", f"{b}.layers.{j}.resnet")
                if f"{a}.attns.{j}.norm.weight" in state:
                    attention(f"{a}.attns.{j}", f"{b}.layers.{j}.attn")
                j += 1
            copy(f"{a}.downsample", f"{b}.downsample")
            copy(f"{a}.upsample", f"{b}.upsample")
    resnet("unet.mid_block.nets.0", "unet.mid_block.first.resnet")
    if "unet.mid_block.attns.0.norm.weight" in state:
        attention("unet.mid_block.attns.0", "unet.mid_block.first.attn")
    resnet("unet.mid_block.nets.1", "unet.mid_block.second")
    copy("unet.norm_out", "unet.norm_out")
    w3, b3 = src.take("unet.conv_out.weight").double(), src.take("unet.conv_out.bias").double()
    w1, b1 = src.take("conv.weight").double()[:, :, 0, 0], src.take("conv.bias").double()
    out["unet.conv_out.weight"] = torch.einsum("om,mikl->oikl", w1, w3).float()
    out["unet.conv_out.bias"] = (w1 @ b3 + b1).float()
    return out, src.finish()


def convert(weights: str, variant: str | None = None, input_size: int = 256) -> tuple[LGM, dict]:
    """A released LGM checkpoint -> (a fast3d LGM, the conversion record for ``conversion.json``).

    Args:
        weights: the checkpoint file (or a directory holding it).
        variant: "fixrot" or "prefix" (see :func:`head_for`); None: from the released file's name.
        input_size: LGM's ``Options.input_size`` (not stored in the weights; 256 in every release).
    """
    state, record = load_state_dict(weights)
    head = head_for(record["file"], variant)
    try:
        opt = manifest.lgm_options_from_state(state)
    except ValueError as e:
        raise ValueError(f"--weights {record['file']!r} is not an LGM checkpoint ({e}); its first keys: "
                         f"{sorted(state)[:8]}") from None
    cfg = lgm_config(opt, head, input_size)
    new, dropped = convert_state(state, opt)
    model = LGM(cfg)
    from fast3d.models import checkpoints

    checkpoints.load_state(model, new, record["file"])
    record.update(kind="lgm", source=list(manifest.SOURCES["lgm"]), preset=manifest.lgm_preset_name(opt),
                  options={k: list(v) if isinstance(v, tuple) else v for k, v in opt.items()}, head=head,
                  source_dtypes=sorted({str(v.dtype) for v in state.values()}), dropped=dropped,
                  folded="conv (1x1, 14 -> 14) folded into unet.conv_out",
                  config=dataclasses.asdict(cfg), checked_against_real_release=False)
    return model, record
