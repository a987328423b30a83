"""fast3d convert lgm: LGM's released layout (fast3d.models.convert.manifest, written down from
3DTopia/LGM's code) -> fast3d's LGM with LGM's own head.

The original cannot ship here, so its forward is re-derived by hand below from the same reading
(core/unet.py, core/attention.py, core/models.py, core/utils.py, kiui's orbit_camera), straight
from the state dict in the original's key names: that is what the converted model must equal,
Gaussian for Gaussian, on the original's own default input rig."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from fast3d import cameras
from fast3d.cameras import plucker_rays, rotmat_to_quat
from fast3d.inference.lgm import default_input_cameras, reconstruct
from fast3d.models.convert import convert, manifest
from fast3d.models.convert import lgm as convert_lgm
from fast3d.models.convert.common import RECORD_FILE
from fast3d.models.lgm import LGM, LGMConfig, apply_transform_to_gaussians
from fast3d.models.lgm.model import lgm_axes, viewmats_to_lgm_world
from fast3d.models.lgm.normalize import quat_multiply
from fast3d.ops.rasterization.reference import quat_to_rotmat

# A small layout in LGM's form: 16 px in, 16 x 16 Gaussians a view, attention at the lower level
# (the released "big" one is checked by shape only: 415 M parameters do not run in a CPU test)
SMALL = dict(down_channels=(32, 64), down_attention=(False, True), mid_attention=True, up_channels=(64, 32),
             up_attention=(True, False))
SIZE = 16
FOVY, RADIUS = 49.1, 1.5            # LGM's Options.fovy, cam_radius
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# (atol, rtol, why) per compared quantity: the converted model vs the hand-derived original, both float32
TOL = {
    "means": (2e-5, 1e-4, "float32 U-Net; the folded 1x1 conv and the attention kernels round differently"),
    "opacities": (1e-5, 1e-4, "as means, through a sigmoid"),
    "colors": (1e-5, 1e-4, "as means, through 0.5 tanh + 0.5"),
    "scales": (1e-5, 1e-4, "as means, through 0.1 softplus"),
    "covariances": (1e-5, 1e-4, "R diag(s^2) R^T, entries up to ~0.3 from float32 scales (~1e-5 relative, doubled); float64 eigh"),
    "quats": (1e-4, 1e-4, "normalised float32 quaternions (compared up to sign)"),
    "rays": (1e-6, 1e-6, "float32 ray directions and moments of norm <= 1.5"),
    "fold": (1e-5, 1e-5, "one float32 3x3 conv vs a 3x3 then a 1x1 conv"),
}


def close(name: str, actual, expected) -> None:
    atol, rtol, _ = TOL[name]
    assert_close(actual, expected, atol=atol, rtol=rtol, name=name)


def lgm_state(gen: torch.Generator, opt: dict, dtype=torch.float16) -> dict:
    """Random weights in LGM's key names and shapes (the manifest's), initialised like a network
    (fan-in scaled) so activations stay O(1); stored in the release's dtype."""
    sd = {}
    for k, shape in manifest.lgm_shapes(opt).items():
        if len(shape) > 1:
            fan_in = math.prod(shape[1:])
            w = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
            if k == "conv.weight":
                w = w * 4     # spread the head's inputs past +-1, so the position clamp matters
        elif ".norm" in k and k.endswith(".weight"):
            w = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            w = 0.2 * torch.randn(shape, generator=gen)
        sd[k] = w.to(dtype)
    return sd


def save(sd: dict, path: str) -> str:
    from safetensors.torch import save_file

    save_file(sd, path)
    return path


# ---- the original, by hand (3DTopia/LGM) --------------------------------------------------------

def kiui_orbit_camera(elevation: float, azimuth: float, radius: float) -> np.ndarray:  # -> [4, 4] c2w, OpenGL
    """kiui.cam.orbit_camera (opengl=True): azimuth 0 at +Z, 90 at +X; elevation -90 at +Y."""
    el, az = np.deg2rad(elevation), np.deg2rad(azimuth)
    campos = np.array([radius * np.cos(el) * np.sin(az), -radius * np.sin(el), radius * np.cos(el) * np.cos(az)])
    forward = campos / np.linalg.norm(campos)
    right = np.cross([0.0, 1.0, 0.0], forward)
    right = right / np.linalg.norm(right)
    up = np.cross(forward, right)
    T = np.eye(4)
    T[:3, :3] = np.stack([right, up / np.linalg.norm(up), forward], axis=1)
    T[:3, 3] = campos
    return T


def lgm_get_rays(pose: torch.Tensor, h: int, w: int, fovy: float) -> tuple:  # core/utils.py get_rays (opengl)
    x, y = torch.meshgrid(torch.arange(w, dtype=torch.float64), torch.arange(h, dtype=torch.float64), indexing="xy")
    x, y = x.flatten(), y.flatten()
    focal = h * 0.5 / np.tan(0.5 * np.deg2rad(fovy))
    dirs = F.pad(torch.stack([(x - w * 0.5 + 0.5) / focal, -(y - h * 0.5 + 0.5) / focal], -1), (0, 1), value=-1.0)
    rays_d = F.normalize(dirs @ pose[:3, :3].T, dim=-1).view(h, w, 3)
    rays_o = pose[:3, 3].expand(h * w, 3).reshape(h, w, 3)
    return rays_o, rays_d


def lgm_default_rays(size: int) -> torch.Tensor:  # -> [4, 6, h, w]: LGM.prepare_default_rays
    out = []
    for az in (0, 90, 180, 270):
        o, d = lgm_get_rays(torch.from_numpy(kiui_orbit_camera(0, az, RADIUS)), size, size, FOVY)
        out.append(torch.cat([torch.cross(o, d, dim=-1), d], -1))
    return torch.stack(out).permute(0, 3, 1, 2).float()


def _gn(sd, p, x):
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], 1e-5)


def _resnet(sd, p, x):
    h = F.conv2d(F.silu(_gn(sd, f"{p}.norm1", x)), sd[f"{p}.conv1.weight"], sd[f"{p}.conv1.bias"], padding=1)
    h = F.conv2d(F.silu(_gn(sd, f"{p}.norm2", h)), sd[f"{p}.conv2.weight"], sd[f"{p}.conv2.bias"], padding=1)
    res = F.conv2d(x, sd[f"{p}.shortcut.weight"], sd[f"{p}.shortcut.bias"]) if f"{p}.shortcut.weight" in sd else x
    return (h + res) * np.sqrt(0.5)


def _mvattention(sd, p, x, heads=16, frames=4):
    BV, C, H, W = x.shape
    B = BV // frames
    t = _gn(sd, f"{p}.norm", x).reshape(B, frames, C, H, W).permute(0, 1, 3, 4, 2).reshape(B, -1, C)
    N = t.shape[1]
    qkv = (t @ sd[f"{p}.attn.qkv.weight"].T).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    attn = (qkv[0] * (C // heads) ** -0.5) @ qkv[1].transpose(-2, -1)
    t = (attn.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(B, N, C)
    t = t @ sd[f"{p}.attn.proj.weight"].T + sd[f"{p}.attn.proj.bias"]
    return (t.reshape(B, frames, H, W, C).permute(0, 1, 4, 2, 3).reshape(BV, C, H, W) + x) * np.sqrt(0.5)


def lgm_forward_gaussians(sd: dict, opt: dict, x: torch.Tensor, fixed_rotation: bool) -> torch.Tensor:
    """LGM.forward_gaussians: x [B, 4, 9, H, W] -> [B, N, 14] (pos, opacity, scale, rotation, rgb)."""
    sd = {k: v.float() for k, v in sd.items()}
    B, V, C, H, W = x.shape
    h = F.conv2d(x.view(B * V, C, H, W), sd["unet.conv_in.weight"], sd["unet.conv_in.bias"], padding=1)
    xss = [h]
    for i in range(len(opt["down_channels"])):
        for j in range(2):
            h = _resnet(sd, f"unet.down_blocks.{i}.nets.{j}", h)
            if opt["down_attention"][i]:
                h = _mvattention(sd, f"unet.down_blocks.{i}.attns.{j}", h)
            xss.append(h)
        if i != len(opt["down_channels"]) - 1:
            h = F.conv2d(h, sd[f"unet.down_blocks.{i}.downsample.weight"], sd[f"unet.down_blocks.{i}.downsample.bias"],
                         stride=2, padding=1)
            xss.append(h)
    h = _resnet(sd, "unet.mid_block.nets.0", h)
    if opt["mid_attention"]:
        h = _mvattention(sd, "unet.mid_block.attns.0", h)
    h = _resnet(sd, "unet.mid_block.nets.1", h)
    for i in range(len(opt["up_channels"])):
        xs, xss = xss[-3:], xss[:-3]
        for j in range(3):
            h = torch.cat([h, xs[-1]], 1)
            xs = xs[:-1]
            h = _resnet(sd, f"unet.up_blocks.{i}.nets.{j}", h)
            if opt["up_attention"][i]:
                h = _mvattention(sd, f"unet.up_blocks.{i}.attns.{j}", h)
        if i != len(opt["up_channels"]) - 1:
            h = F.conv2d(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd[f"unet.up_blocks.{i}.upsample.weight"],
                         sd[f"unet.up_blocks.{i}.upsample.bias"], padding=1)
    h = F.conv2d(F.silu(_gn(sd, "unet.norm_out", h)), sd["unet.conv_out.weight"], sd["unet.conv_out.bias"], padding=1)
    h = F.conv2d(h, sd["conv.weight"], sd["conv.bias"])
    p = h.shape[-1]
    h = h.reshape(B, 4, 14, p, p).permute(0, 1, 3, 4, 2).reshape(B, -1, 14)
    rot = F.normalize(h[..., 7:11], dim=-1) if fixed_rotation else F.normalize(h[..., 7:11])  # dim=1: the bug
    return torch.cat([h[..., 0:3].clamp(-1, 1), torch.sigmoid(h[..., 3:4]), 0.1 * F.softplus(h[..., 4:7]), rot,
                      0.5 * torch.tanh(h[..., 11:]) + 0.5], -1)


def raster_covariance(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """diff-gaussian-rasterization's computeCov3D: R from q as given (no normalisation), R S^2 R^T."""
    w, x, y, z = q.double().unbind(-1)
    R = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                     2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                     2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).unflatten(-1, (3, 3))
    return R @ torch.diag_embed(s.double() ** 2) @ R.transpose(-1, -2)


# ---- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["fixrot", "prefix"])
def test_converted_equals_original(tmp_path, gen, variant):
    """Same Gaussians as LGM's forward_gaussians on LGM's default rig, in LGM's world: positions
    (clamped), opacities, scales, colours, and the covariance LGM's rasterizer built (for the
    pre-fix release from quaternions normalised across Gaussians)."""
    sd = lgm_state(gen, SMALL)
    name = "model_fp16_fixrot.safetensors" if variant == "fixrot" else "model_fp16.safetensors"
    record = convert("lgm", save(sd, str(tmp_path / name)), str(tmp_path / "out"), input_size=SIZE)
    assert record["head"] == ("original" if variant == "fixrot" else "original-prefix") and record["dropped"] == {}
    model = LGM.from_pretrained(str(tmp_path / "out")).eval()
    images = torch.rand(1, 4, 3, SIZE, SIZE, generator=gen)

    x = (images[0] - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = torch.cat([x, lgm_default_rays(SIZE)], 1)[None]                    # infer.py's [1, 4, 9, H, W]
    with torch.no_grad():
        ref = lgm_forward_gaussians(sd, SMALL, x, fixed_rotation=variant == "fixrot")[0]
    vm, K = default_input_cameras(model.config, SIZE)                      # no cameras file: the default rig
    g, T = reconstruct(model, images, vm[None], K[None])
    close("fold", T, torch.eye(4)[None])     # LGM's rig is already normalised: view 0 is the canonical camera
    A = lgm_axes(torch.float64)
    g = {k: v[0].double() for k, v in g.items()}
    assert (ref[:, 0:3].abs() == 1).any(), "no position reached the clamp; the test would not see its order"
    close("means", g["means"] @ A.T, ref[:, 0:3].double())
    close("opacities", g["opacities"], ref[:, 3].double())
    close("colors", g["colors"], ref[:, 11:14].double())
    cov = A @ (quat_to_rotmat(g["quats"]) @ torch.diag_embed(g["scales"] ** 2)
               @ quat_to_rotmat(g["quats"]).transpose(-1, -2)) @ A.T
    close("covariances", cov, raster_covariance(ref[:, 7:11], ref[:, 4:7]))
    if variant == "fixrot":   # the quaternions and scales themselves, not only their covariance
        close("scales", g["scales"], ref[:, 4:7].double())      # fast3d's quats rotated into LGM's world:
        q_lgm = quat_multiply(rotmat_to_quat(A).expand(len(g["quats"]), 4), g["quats"])
        sign = torch.sign((q_lgm * ref[:, 7:11].double()).sum(-1, keepdim=True))
        close("quats", q_lgm * sign, ref[:, 7:11].double())


def test_default_rig_is_lgms():
    """Issue item 3: a converted LGM's default input rig (no cameras file) is LGM's: the four
    kiui orbit cameras at elevation 0, radius 1.5, fov 49.1, in LGM's world; their Pluecker rays
    agree at every pixel, corners included (OpenGL vs OpenCV camera axes, pixel centres)."""
    cfg = LGMConfig.preset("lgm-big")
    vm, K = default_input_cameras(cfg, SIZE)
    vm_lgm = viewmats_to_lgm_world(vm.double())
    gl_to_cv = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
    for v, az in enumerate((0, 90, 180, 270)):
        c2w = torch.from_numpy(kiui_orbit_camera(0, az, RADIUS)) @ gl_to_cv
        close("rays", torch.linalg.inv(vm_lgm[v]), c2w)
    close("rays", plucker_rays(vm_lgm.float(), K, SIZE, SIZE), lgm_default_rays(SIZE))
    assert K[0, 0, 0].item() == pytest.approx(SIZE / 2 / math.tan(math.radians(FOVY) / 2), rel=1e-6)


@pytest.mark.parametrize("preset", sorted(manifest.LGM_PRESETS))
def test_release_layouts_convert_by_shape(preset):
    """LGM's Options presets (big: the released weights) convert key for key onto fast3d's U-Net
    (meta tensors: no memory), their layout is recognised, and big is fast3d's "lgm-big"."""
    opt = manifest.LGM_PRESETS[preset]
    sd = {k: torch.empty(s, device="meta", dtype=torch.float16) for k, s in manifest.lgm_shapes(opt).items()}
    got = manifest.lgm_options_from_state(sd)
    assert manifest.lgm_preset_name(got) == preset
    cfg = convert_lgm.lgm_config(got, "original", opt["input_size"])
    assert cfg.splat_size == opt["splat_size"]
    new, dropped = convert_lgm.convert_state(sd, got)
    assert dropped == {}
    with torch.device("meta"):
        own = LGM(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in new.items()} == {k: tuple(v.shape) for k, v in own.items()}
    if preset == "big":
        assert cfg == LGMConfig.preset("lgm-big")
        assert sum(v.numel() for v in sd.values()) == 415_042_848


def test_lpips_keys_dropped_with_reason(tmp_path, gen):
    sd = lgm_state(gen, SMALL)
    sd["lpips_loss.net.slice1.0.weight"] = torch.zeros(64, 3, 3, 3)
    record = convert("lgm", save(sd, str(tmp_path / "x.safetensors")), str(tmp_path / "out"), variant="fixrot",
                     input_size=SIZE)
    assert list(record["dropped"]) == ["lpips_loss.net.slice1.0.weight"] and "LPIPS" in record["dropped"][
        "lpips_loss.net.slice1.0.weight"]
    on_disk = json.loads((tmp_path / "out" / RECORD_FILE).read_text())
    assert on_disk["dropped"] == record["dropped"] and on_disk["checked_against_real_release"] is False


@pytest.mark.parametrize("damage", ["missing", "extra", "shape"])
def test_layout_errors_list_the_keys(tmp_path, gen, damage):
    sd = lgm_state(gen, SMALL)
    key = "unet.mid_block.nets.1.conv2.weight"
    if damage == "missing":
        del sd[key]
    elif damage == "extra":
        sd["unet.mid_block.nets.2.conv2.weight"] = sd[key].clone()
    else:
        sd[key] = sd[key][:, :, :1].contiguous()
    with pytest.raises(ValueError) as e:
        convert("lgm", save(sd, str(tmp_path / "w.safetensors")), str(tmp_path / "out"), variant="fixrot",
                input_size=SIZE)
    msg = str(e.value)
    assert "--weights" in msg and {"missing": "1 missing", "extra": "1 unexpected", "shape": "1 mis-shaped"}[damage] in msg
    assert (key if damage != "extra" else "unet.mid_block.nets.2.conv2.weight") in msg
    assert not (tmp_path / "out").exists()


def test_variant_needed_for_unknown_file_name(tmp_path, gen):
    path = save(lgm_state(gen, SMALL), str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="--variant must be given"):
        convert("lgm", path, str(tmp_path / "out"), input_size=SIZE)


def test_config_of_lgm_big_preset():
    cfg = LGMConfig.preset("lgm-big")
    assert (cfg.head, cfg.camera_distance, cfg.input_size, cfg.num_input_views, cfg.fov_y_deg) == (
        "original", 1.5, 256, 4, 49.1)
    assert dataclasses.replace(cfg, head="anchored", camera_distance=LGMConfig().camera_distance) == LGMConfig()
    with pytest.raises(ValueError, match="LGMConfig.head"):
        LGMConfig(head="gaussian")
    assert os.path.basename(manifest.SOURCES["lgm"][0]) == "LGM"


def test_cameras_at_another_distance(tmp_path, gen):
    """Inputs whose cameras are not at LGM's 1.5 (fast3d's data: 2.2) are scaled to it and back:
    the same images from the same directions give the same object, scaled by 2.2 / 1.5, placed
    around the same centre (LGM itself would put view 0 at 1.5 and the object 0.7 off centre)."""
    sd = lgm_state(gen, SMALL)
    convert("lgm", save(sd, str(tmp_path / "model_fp16_fixrot.safetensors")), str(tmp_path / "out"), input_size=SIZE)
    model = LGM.from_pretrained(str(tmp_path / "out")).eval()
    images = torch.rand(1, 4, 3, SIZE, SIZE, generator=gen)
    az = torch.arange(4, dtype=torch.float64) * (math.pi / 2) + 0.3
    worlds = []
    for dist in (RADIUS, 2.2):
        vm, K = cameras.orbit_cameras(az, torch.full((4,), 0.2, dtype=torch.float64), dist, FOVY, SIZE)
        g, T = reconstruct(model, images, vm[None], K[None])
        worlds.append(apply_transform_to_gaussians(g, torch.linalg.inv(T.double()).float()))
    k = 2.2 / RADIUS
    close("means", worlds[1]["means"], worlds[0]["means"] * k)
    close("scales", worlds[1]["scales"], worlds[0]["scales"] * k)
    for key in ("opacities", "colors"):
        close(key, worlds[1][key], worlds[0][key])
    close("quats", worlds[1]["quats"], worlds[0]["quats"])
