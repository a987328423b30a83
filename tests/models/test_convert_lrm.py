"""fast3d convert openlrm / vfusion3d: the released LRMs' layouts (fast3d.models.convert.manifest_lrm)
-> fast3d's LRM. The originals' forward (DINOv2, camera embedder, ModLN transformer, upsampler,
EG3D plane lookup, OSGDecoder) and camera/ray conventions are re-derived by hand below from the
same reading, from the state dict in the originals' key names; the converted model must match."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from fast3d import cameras
from fast3d.models.convert import convert, manifest_lrm
from fast3d.models.convert import lrm as convert_lrm
from fast3d.models.lrm import LRM, LRMConfig

# small sizes in the originals' form; image 24 px on a 4 x 4 (32 px) position table: the encoder
# interpolates its table as at the released 224 / 336 / 448 px
TINY = dict(camera_dim=32, token_res=4, patch=8, pos_table=4, mlp_ratio=4, decoder_hidden=16, decoder_layers=4,
            encoder_dim=32, encoder_layers=2, encoder_heads=2, registers=4, width=48, layers=2, heads=4, planes=8,
            image_size=24, samples=8)
# OpenLRM's default source camera (runners/infer/lrm.py): c2w [3 x 4], f 0.75, c 0.5 (normalised)
OPENLRM_SOURCE = [1, 0, 0, 0, 0, 0, -1, -2.0, 0, 1, 0, 0, 0.75, 0.75, 0.5, 0.5]
VFUSION3D_SOURCE = [0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0.75, 0.75, 0.5, 0.5]
FOV_F075 = math.degrees(2 * math.atan(0.5 / 0.75))   # a normalised focal of 0.75: 67.38 degrees

# (atol, rtol, why): converted model vs the hand-derived original, float32
TOL = {
    "camera": (1e-6, 0, "a float64 inverse of a float32 look-at matrix"),
    "rays": (1e-6, 1e-6, "unit directions in float32"),
    "sigma": (2e-5, 1e-4, "float32 encoder + 2 decoder layers; SDPA vs explicit softmax attention"),
    "rgb": (1e-5, 1e-4, "as sigma, through the widened sigmoid"),
}


def close(name, actual, expected):
    atol, rtol, _ = TOL[name]
    assert_close(actual, expected, atol=atol, rtol=rtol, name=name)


def original_state(gen, kind: str, p: dict) -> dict:
    sd = {}
    for k, shape in manifest_lrm.lrm_shapes(kind, p).items():
        if k.endswith(("gamma", "lambda1")):
            w = 0.5 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) >= 2 and not k.endswith(("pos_embed", "cls_token", "register_tokens", "position_embeddings",
                                                  "mask_token")):
            w = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        elif ("norm" in k and k.endswith(".weight")) or k.endswith("layernorm.weight"):
            w = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            w = 0.3 * torch.randn(shape, generator=gen)
        sd[k] = w
    return sd


# ---- the originals, by hand ------------------------------------------------------------------------

def _ln(sd, p, x):
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], 1e-6)


def _vit_attention(x, w, b, proj_w, proj_b, heads):   # DINOv2's Attention (qkv reshape B, N, 3, heads, d)
    B, N, C = x.shape
    qkv = (x @ w.T + b).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    attn = ((qkv[0] * (C // heads) ** -0.5) @ qkv[1].transpose(-2, -1)).softmax(-1)
    return (attn @ qkv[2]).transpose(1, 2).reshape(B, N, C) @ proj_w.T + proj_b


def dinov2_tokens(sd, kind: str, p: dict, img: torch.Tensor) -> torch.Tensor:
    """OpenLRM: DinoVisionTransformer(register tokens) on the [0, 1] image, [cls, patches] after the
    final norm. VFusion3D: transformers' Dinov2Model (2024 key names) on the ImageNet-normalised
    image, all tokens."""
    pre = "encoder.model."
    hub = kind == "openlrm"
    if not hub:
        img = (img - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    pe = "patch_embed.proj" if hub else "embeddings.patch_embeddings.projection"
    x = F.conv2d(img, sd[f"{pre}{pe}.weight"], sd[f"{pre}{pe}.bias"], stride=p["patch"]).flatten(2).transpose(1, 2)
    B = x.shape[0]
    x = torch.cat([sd[f"{pre}{'cls_token' if hub else 'embeddings.cls_token'}"].expand(B, -1, -1), x], 1)
    pos = sd[f"{pre}{'pos_embed' if hub else 'embeddings.position_embeddings'}"]
    n = int(math.sqrt(pos.shape[1] - 1))
    g = img.shape[-1] // p["patch"]
    if g != n:   # interpolate_pos_encoding: offset 0, antialiased bicubic, by scale factor
        grid = pos[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=(g / n, g / n), mode="bicubic", antialias=True)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, g * g, -1)], 1)
    x = x + pos
    R = p["registers"]
    if R:
        x = torch.cat([x[:, :1], sd[f"{pre}register_tokens"].expand(B, -1, -1), x[:, 1:]], 1)
    for i in range(p["encoder_layers"]):
        if hub:
            b = f"{pre}blocks.{i}"
            qkv_w, qkv_b = sd[f"{b}.attn.qkv.weight"], sd[f"{b}.attn.qkv.bias"]
            proj, ls1, ls2 = f"{b}.attn.proj", sd[f"{b}.ls1.gamma"], sd[f"{b}.ls2.gamma"]
        else:
            b = f"{pre}encoder.layer.{i}"
            a = f"{b}.attention.attention"
            qkv_w = torch.cat([sd[f"{a}.{m}.weight"] for m in ("query", "key", "value")])
            qkv_b = torch.cat([sd[f"{a}.{m}.bias"] for m in ("query", "key", "value")])
            proj, ls1, ls2 = f"{b}.attention.output.dense", sd[f"{b}.layer_scale1.lambda1"], sd[f"{b}.layer_scale2.lambda1"]
        x = x + ls1 * _vit_attention(_ln(sd, f"{b}.norm1", x), qkv_w, qkv_b, sd[f"{proj}.weight"], sd[f"{proj}.bias"],
                                     p["encoder_heads"])
        h = F.gelu(_ln(sd, f"{b}.norm2", x) @ sd[f"{b}.mlp.fc1.weight"].T + sd[f"{b}.mlp.fc1.bias"])
        x = x + ls2 * (h @ sd[f"{b}.mlp.fc2.weight"].T + sd[f"{b}.mlp.fc2.bias"])
    x = _ln(sd, f"{pre}{'norm' if hub else 'layernorm'}", x)
    return torch.cat([x[:, :1], x[:, 1 + R:]], 1)


def _mha(sd, pre, q, kv, D, heads):   # nn.MultiheadAttention(bias=False, batch_first=True) with these weights
    m = torch.nn.MultiheadAttention(D, heads, bias=False, kdim=kv.shape[-1], vdim=kv.shape[-1], batch_first=True)
    m.load_state_dict({k[len(pre) + 1:]: v for k, v in sd.items() if k.startswith(pre + ".")})
    return m(q, kv, kv, need_weights=False)[0]


def original_planes(sd, kind: str, p: dict, image: torch.Tensor, camera: torch.Tensor) -> torch.Tensor:
    """forward_planes: [N, 3, P, 2h, 2h], the planes in EG3D's orientation."""
    cond = dinov2_tokens(sd, kind, p, image)
    mod = F.linear(F.silu(F.linear(camera, sd["camera_embedder.mlp.0.weight"], sd["camera_embedder.mlp.0.bias"])),
                   sd["camera_embedder.mlp.2.weight"], sd["camera_embedder.mlp.2.bias"])
    tr = "transformer."
    x = sd["pos_embed" if kind == "openlrm" else f"{tr}pos_embed"].repeat(image.shape[0], 1, 1)
    D = p["width"]

    def modln(b, n, x):
        shift, scale = F.linear(F.silu(mod), sd[f"{b}.{n}.mlp.1.weight"], sd[f"{b}.{n}.mlp.1.bias"]).chunk(2, -1)
        return _ln(sd, f"{b}.{n}.norm", x) * (1 + scale[:, None]) + shift[:, None]

    for i in range(p["layers"]):
        b = f"{tr}layers.{i}"
        x = x + _mha(sd, f"{b}.cross_attn", modln(b, "norm1", x), cond, D, p["heads"])
        h = modln(b, "norm2", x)
        x = x + _mha(sd, f"{b}.self_attn", h, h, D, p["heads"])
        h = F.gelu(modln(b, "norm3", x) @ sd[f"{b}.mlp.0.weight"].T + sd[f"{b}.mlp.0.bias"])
        x = x + h @ sd[f"{b}.mlp.3.weight"].T + sd[f"{b}.mlp.3.bias"]
    x = _ln(sd, f"{tr}norm", x)
    N, H = x.shape[0], p["token_res"]
    x = torch.einsum("nihwd->indhw", x.view(N, 3, H, H, -1)).reshape(3 * N, -1, H, H)
    up = "upsampler" if kind == "openlrm" else f"{tr}deconv"
    x = F.conv_transpose2d(x, sd[f"{up}.weight"], sd[f"{up}.bias"], stride=2)
    return torch.einsum("indhw->nidhw", x.view(3, N, *x.shape[-3:]))


def original_decode(sd, planes: torch.Tensor, points: torch.Tensor, p: dict) -> tuple:
    """sample_from_planes (generate_planes' axes, box_warp 2, grid_sample zeros) + OSGDecoder +
    the renderer's softplus(sigma - 1): points [N, M, 3] -> sigma [N, M], rgb [N, M, 3]."""
    axes = torch.tensor([[[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[1, 0, 0], [0, 0, 1], [0, 1, 0]],
                         [[0, 0, 1], [0, 1, 0], [1, 0, 0]]], dtype=torch.float32)
    N, M, _ = points.shape
    coords = (2 / 2.0) * points
    proj = torch.einsum("nmk,pkj->npmj", coords, torch.linalg.inv(axes))[..., :2]       # [N, 3, M, 2]
    feats = F.grid_sample(planes.flatten(0, 1), proj.reshape(N * 3, 1, M, 2), mode="bilinear", padding_mode="zeros",
                          align_corners=False).permute(0, 3, 2, 1).reshape(N, 3, M, -1)
    x = feats.permute(0, 2, 1, 3).reshape(N, M, -1)
    for j in range(p["decoder_layers"]):
        x = F.linear(x, sd[f"synthesizer.decoder.net.{2 * j}.weight"], sd[f"synthesizer.decoder.net.{2 * j}.bias"])
        if j < p["decoder_layers"] - 1:
            x = F.relu(x)
    return F.softplus(x[..., 0] - 1), torch.sigmoid(x[..., 1:]) * (1 + 2 * 0.001) - 0.001


def center_looking_at_camera_pose(position: torch.Tensor) -> torch.Tensor:   # cam_utils: [3] -> c2w [3, 4]
    z = position / position.norm()
    x = torch.linalg.cross(torch.tensor([0.0, 0, 1], dtype=position.dtype), z)
    x = x / x.norm()
    y = torch.linalg.cross(z, x)
    return torch.stack([x, y / y.norm(), z, position], -1)


def openlrm_rays(c2w: torch.Tensor, f: float, c: float, res: int) -> torch.Tensor:   # RaySampler: -> [res^2, 3]
    uv = torch.stack(torch.meshgrid(torch.arange(res, dtype=c2w.dtype), torch.arange(res, dtype=c2w.dtype),
                                    indexing="ij")).flip(0).reshape(2, -1).T
    x_cam, y_cam = uv[:, 0] / res + 0.5 / res, uv[:, 1] / res + 0.5 / res
    pts = torch.stack([(x_cam - c) / f, (y_cam - c) / f, torch.ones_like(x_cam), torch.ones_like(x_cam)], -1)
    E = torch.cat([c2w, torch.tensor([[0, 0, 0, 1.0]], dtype=c2w.dtype)]) @ torch.diag(
        torch.tensor([1, -1, -1, 1.0], dtype=c2w.dtype))
    return F.normalize((pts @ E.T)[:, :3] - c2w[:, 3], dim=-1)


# ---- tests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, width, registers", [("openlrm", 48, 4), ("openlrm", 32, 4), ("vfusion3d", 48, 0)])
def test_converted_equals_original(tmp_path, gen, kind, width, registers):
    """Same triplane features as the original's forward_planes + EG3D lookup + OSGDecoder, at
    random points of [-1, 1]^3, for the original's default source camera given in fast3d's
    terms. width 32 = the encoder's: the cross-attention's weights come as in_proj_weight."""
    p = dict(TINY, width=width, registers=registers)
    if kind == "vfusion3d":
        p["image_size"] = p["pos_table"] * p["patch"]   # see the README: its interpolation was not pinned
    sd = original_state(gen, kind, p)
    new, dropped, filled = convert_lrm.convert_state(kind, sd, p)
    assert set(dropped) == ({"encoder.model.embeddings.mask_token"} if kind == "vfusion3d" else set())
    assert set(filled) == ({convert_lrm.MASK_TOKEN} if registers else set())
    model = LRM(convert_lrm.lrm_config(kind, p)).eval()
    model.load_state_dict(new)
    model.save_pretrained(str(tmp_path / "m"))
    model = LRM.from_pretrained(str(tmp_path / "m")).eval()

    S = p["image_size"]
    image = torch.rand(2, 3, S, S, generator=gen)
    az, dist = (-math.pi / 2, 2.0) if kind == "openlrm" else (0.0, 1.0)
    vm, K = cameras.orbit_cameras(torch.full((2,), az, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                                  dist, FOV_F075, S)
    source = torch.tensor(OPENLRM_SOURCE if kind == "openlrm" else VFUSION3D_SOURCE).expand(2, 16)
    close("camera", LRM.camera_vector(vm, K, S, S, kind), source)
    points = torch.rand(2, 500, 3, generator=gen) * 2.2 - 1.1          # past the box too: zero padding
    with torch.no_grad():
        ref_sigma, ref_rgb = original_decode(sd, original_planes(sd, kind, p, image, source), points, p)
        planes = model(image, vm, K)
        for b in range(2):
            sigma, rgb = model.decode_points(planes[b], points[b])
            close("sigma", sigma, ref_sigma[b])
            close("rgb", rgb, ref_rgb[b])


@pytest.mark.parametrize("kind", ["openlrm", "vfusion3d"])
def test_converted_models_default_source_camera_is_the_originals(kind):
    """A converted LRM's config carries the original's default source camera (manifest_lrm's
    c2w and focal facts); fast3d's camera from it (inference.lrm.source_camera without a camera)
    gives the decoder the original's camera vector, written here from the originals' code."""
    from fast3d.inference.lrm import source_camera

    cfg = convert_lrm.lrm_config(kind, TINY)
    assert cfg.source_camera == manifest_lrm.source_camera(kind)
    S = cfg.image_size
    vm, K, cam = source_camera(None, S, cfg.source_camera)
    assert cam == pytest.approx(manifest_lrm.source_camera(kind))
    want = torch.tensor([OPENLRM_SOURCE if kind == "openlrm" else VFUSION3D_SOURCE])
    close("camera", LRM.camera_vector(vm, K, S, S, kind), want)
    c2w = manifest_lrm.OPENLRM_SOURCE_C2W if kind == "openlrm" else manifest_lrm.VFUSION3D_SOURCE_C2W
    f, c = manifest_lrm.SOURCE_FOCAL, manifest_lrm.SOURCE_PRINCIPAL
    assert want[0].tolist() == [float(x) for row in c2w for x in row] + [f, f, c, c]
    # a partial camera overrides the default key by key; fast3d's own models keep fast3d's camera
    _, _, cam = source_camera({"elevation_deg": 10.0}, S, cfg.source_camera)
    assert cam == pytest.approx({**manifest_lrm.source_camera(kind), "elevation_deg": 10.0})
    assert LRMConfig.preset("tiny").source_camera is None
    for bad in ({"azimuth_deg": 0.0}, {**cfg.source_camera, "distance": 0.0},
                {**cfg.source_camera, "elevation_deg": 90.0}, [0, 0, 1, 50]):
        with pytest.raises(ValueError, match="LRMConfig.source_camera"):
            dataclasses.replace(cfg, source_camera=bad)


def test_render_rays_match_openlrms_sampler():
    """OpenLRM's render cameras (c2w, OpenGL axes, normalised intrinsics) as fast3d viewmats and
    pixel intrinsics give the same rays, corner pixels included."""
    res, f, c = 8, 0.75, 0.5
    for position in ([1.2, -1.1, 0.8], [0.0, -2.0, 0.3], [-1.5, 0.4, -0.6]):
        c2w = center_looking_at_camera_pose(torch.tensor(position, dtype=torch.float64))
        E = torch.cat([c2w, torch.tensor([[0, 0, 0, 1.0]], dtype=torch.float64)])
        viewmat = torch.linalg.inv(E @ torch.diag(torch.tensor([1, -1, -1, 1.0], dtype=torch.float64)))
        K = torch.tensor([[f * res, 0, c * res], [0, f * res, c * res], [0, 0, 1]], dtype=torch.float64)
        o, d = cameras.camera_rays(viewmat[None], K[None], res, res)
        close("rays", d.reshape(-1, 3), openlrm_rays(c2w, f, c, res))
        close("rays", o[0, 0, 0], torch.tensor(position, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(manifest_lrm.OPENLRM_PRESETS) + ["vfusion3d"])
def test_release_layouts_convert_by_shape(name):
    """The released sizes convert key for key onto fast3d's LRM (meta tensors); the parameter
    counts are the model card's sizes (446M, 1.04G, 1.81G bytes in float32)."""
    kind = "vfusion3d" if name == "vfusion3d" else "openlrm"
    p = manifest_lrm.VFUSION3D if name == "vfusion3d" else manifest_lrm.OPENLRM_PRESETS[name]
    sd = {k: torch.empty(s, device="meta") for k, s in manifest_lrm.lrm_shapes(kind, p).items()}
    assert convert_lrm.sizes_for(kind, sd, None, "w") == (p, name)
    new, dropped, filled = convert_lrm.convert_state(kind, sd, p)
    with torch.device("meta"):
        own = LRM(convert_lrm.lrm_config(kind, p)).state_dict()
    assert {k: tuple(v.shape) for k, v in new.items()} == {k: tuple(v.shape) for k, v in own.items()}
    card = {"small": 446e6, "base": 1.04e9, "large": 1.81e9, "vfusion3d": 1.81e9}[name]
    assert sum(v.numel() for v in sd.values()) * 4 == pytest.approx(card, rel=0.006)


def test_openlrm_file_errors(tmp_path, gen):
    """A wrapped .pth converts through the command's path; a VFusion3D file is not an OpenLRM one;
    a missing transformer layer is listed."""
    from safetensors.torch import save_file

    p = dict(TINY)
    sd = original_state(gen, "vfusion3d", dict(p, registers=0))
    save_file(sd, str(tmp_path / "v.safetensors"))
    with pytest.raises(ValueError, match="is not an OpenLRM v1.1 checkpoint: its 'pos_embed' \\(None\\)"):
        convert("openlrm", str(tmp_path / "v.safetensors"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"does not hold a VFusion3D checkpoint of this size .* missing"):
        convert("vfusion3d", str(tmp_path / "v.safetensors"), str(tmp_path / "out"))   # tiny, not the release
    with pytest.raises(ValueError, match="--variant must be one of"):
        convert("openlrm", str(tmp_path / "v.safetensors"), str(tmp_path / "out"), variant="huge")
    assert not (tmp_path / "out").exists()


# VFusion3D's Hugging Face config.json (jadechoghari/vfusion3d@e875abe, published as facebook/vfusion3d)
HUB_CONFIG = {"camera_embed_dim": 1024, "rendering_samples_per_ray": 128, "transformer_dim": 1024,
              "transformer_layers": 16, "transformer_heads": 16, "triplane_low_res": 32, "triplane_high_res": 64,
              "triplane_dim": 80, "encoder_freeze": False, "encoder_model_name": "facebook/dinov2-base",
              "encoder_feat_dim": 768, "model_type": "lrm_generator"}


def test_vfusion3d_hugging_face_directory_converts_as_the_pth(tmp_path, gen, monkeypatch):
    """The Hugging Face release (model.safetensors + config.json, the GitHub keys without the
    model_state_dict wrapper) converts to the model the .pth gives; its config's sizes are
    checked against the manifest."""
    import json

    from safetensors.torch import save_file

    convert_lrm.check_hub_config(HUB_CONFIG, manifest_lrm.VFUSION3D, "w")   # the release's sizes: the manifest's
    with pytest.raises(ValueError, match=r"another model .*'transformer_layers': \(6, 16\)"):
        convert_lrm.check_hub_config({**HUB_CONFIG, "transformer_layers": 6}, manifest_lrm.VFUSION3D, "w")
    p = dict(TINY, registers=0, image_size=TINY["pos_table"] * TINY["patch"])
    monkeypatch.setattr(manifest_lrm, "VFUSION3D", p)           # the same two forms at a tiny size
    sd = original_state(gen, "vfusion3d", p)
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(sd, str(hub / "model.safetensors"))
    cfg = {**HUB_CONFIG, **{k: p[v] for k, v in manifest_lrm.HUB_CONFIG_FIELDS.items()},
           "triplane_high_res": 2 * p["token_res"]}
    (hub / "config.json").write_text(json.dumps(cfg))
    r = convert("vfusion3d", str(hub), str(tmp_path / "a"))
    assert r["hub_config"] == cfg and r["file"].endswith("model.safetensors") and "unwrapped" not in r
    torch.save({"model_state_dict": sd, "epoch": 3}, str(tmp_path / "v.pth"))
    r = convert("vfusion3d", str(tmp_path / "v.pth"), str(tmp_path / "b"))
    assert r["unwrapped"] == "model_state_dict" and "hub_config" not in r
    a, b = (LRM.from_pretrained(str(tmp_path / n)).state_dict() for n in "ab")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    (hub / "config.json").write_text(json.dumps({**cfg, "triplane_dim": p["planes"] + 1}))
    with pytest.raises(ValueError, match=r"--weights .*config.json describes another model.*'triplane_dim'"):
        convert("vfusion3d", str(hub), str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()


def test_infer_runs_on_a_converted_model(tmp_path, gen):
    """fast3d infer's LRM pipeline on a converted (tiny) OpenLRM, without a camera: the model's
    directory keeps OpenLRM's default source camera, which infer takes."""
    from PIL import Image

    from fast3d.inference import lrm as lrm_infer

    sd = original_state(gen, "openlrm", TINY)
    new, _, _ = convert_lrm.convert_state("openlrm", sd, TINY)
    model = LRM(convert_lrm.lrm_config("openlrm", TINY))
    model.load_state_dict(new)
    model.save_pretrained(str(tmp_path / "m"))
    Image.fromarray((torch.rand(24, 24, 3, generator=gen) * 255).to(torch.uint8).numpy()).save(tmp_path / "a.png")
    r = lrm_infer.infer(str(tmp_path / "m"), str(tmp_path / "a.png"), str(tmp_path / "out"),
                        device="cpu", turntable_frames=2, resolution=16, point_grid=16, mesh_grid=16)
    assert (tmp_path / "out" / "turntable.gif").stat().st_size > 0 and "latency_ms" in r
    assert r["camera"] == pytest.approx({"azimuth_deg": -90.0, "elevation_deg": 0.0, "distance": 2.0,
                                         "fov_y_deg": FOV_F075})
    # fast3d serve's LRM pipeline takes the same default for a request without cameras
    from fast3d.serving.pipelines import LRMPipeline

    pipe = LRMPipeline(LRM.from_pretrained(str(tmp_path / "m")).eval(), max_batch=1, turntable_frames=2)
    prep = pipe.prepare([torch.rand(3, 24, 24, generator=gen)], None, False)
    assert prep.extra["camera"] == pytest.approx(r["camera"])
