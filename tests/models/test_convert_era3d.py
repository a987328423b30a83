"""fast3d convert era3d: Era3D's pipeline layout (fast3d.models.convert.manifest_mvdiff) -> fast3d's
MVDiffusion as an initialisation. A tiny pipeline directory is built in Era3D's layout from the
manifest (random tensors); the tests check the key accounting, the parts that carry over exactly
(re-derived by hand from Era3D's code: its row-wise MVAttnProcessor, conv_in's channel order, the
unclip class embedding at image_embeds = 0), the bad inputs, and that the result generates."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, object_png
from safetensors.torch import save_file

from fast3d.models.convert import convert, manifest_mvdiff
from fast3d.models.mvdiff import MVDiffusion, camera_features

# Era3D's unet/config.json at a tiny size (the released one: SD 2.1's sizes, sample_size 64)
UNET = dict(sample_size=8, in_channels=8, out_channels=4, down_block_types=["CrossAttnDownBlockMV2D"] * 2,
            up_block_types=["CrossAttnUpBlockMV2D"] * 2, mid_block_type="UNetMidBlockMV2DCrossAttn",
            block_out_channels=[32, 64], layers_per_block=1, attention_head_dim=[2, 4], cross_attention_dim=32,
            norm_num_groups=8, use_linear_projection=True, class_embed_type="projection",
            projection_class_embeddings_input_dim=64, num_views=6, selfattn_block="self_rowwise",
            multiview_attention=True, sparse_mv_attention=True, mvcd_attention=True, cd_attention_mid=False,
            cd_attention_last=False, regress_elevation=True, regress_focal_length=True,
            projection_camera_embeddings_input_dim=4, num_regress_blocks=1, use_dino=False)
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 prediction_type="v_prediction")

# (atol, rtol, why): converted fast3d modules vs the hand-derived Era3D computation, float32
TOL = {
    "rows": (2e-6, 1e-5, "float32 softmax attention over 6 x 8 tokens; SDPA vs explicit softmax"),
    "class": (2e-6, 1e-6, "a folded float32 matrix-vector product (W [0; c] + b vs W_c c + b)"),
}


def close(name, actual, expected):
    atol, rtol, _ = TOL[name]
    assert_close(actual, expected, atol=atol, rtol=rtol)


def _write_pipeline(root, gen, unet=None, scheduler=None, state=None):
    """A tiny Era3D pipeline directory: unet/ from the manifest (random), a tiny AutoencoderKL, a
    tiny CLIP image encoder, scheduler/."""
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = dict(UNET if unet is None else unet)
    os.makedirs(root / "unet")
    os.makedirs(root / "scheduler")
    json.dump(unet, open(root / "unet" / "config.json", "w"))
    json.dump(SCHEDULER if scheduler is None else scheduler, open(root / "scheduler" / "scheduler_config.json", "w"))
    if state is None:
        state = {k: torch.randn(s, generator=gen) * 0.2 for k, s in manifest_mvdiff.era3d_unet_shapes(unet).items()}
    save_file(state, str(root / "unet" / "diffusion_pytorch_model.safetensors"))
    AutoencoderKL(block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8, layers_per_block=1,
                  sample_size=16).save_pretrained(str(root / "vae"))
    E = unet["projection_class_embeddings_input_dim"] // 2
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=2, image_size=32, patch_size=8,
                                                   projection_dim=E)).save_pretrained(str(root / "image_encoder"))
    return state


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("era3d")
    gen = torch.Generator().manual_seed(int(os.environ.get("FAST3D_TEST_SEED", "0")))
    state = _write_pipeline(root / "pipe", gen)
    record = convert("era3d", str(root / "pipe"), str(root / "out"))
    return dict(root=root, pipe=str(root / "pipe"), out=str(root / "out"), state=state, record=record,
                model=MVDiffusion.from_pretrained(str(root / "out")))


def test_every_key_is_converted_or_dropped_with_its_reason(converted):
    state, record, model = converted["state"], converted["record"], converted["model"]
    blocks = manifest_mvdiff.transformer_blocks(state)
    assert len(blocks) == 7      # 2 down (1 layer each) + 1 mid + 2 up (2 layers each) transformer blocks
    dropped = set(record["dropped"])
    want = {k for k in state if any(k.startswith(f"{b}.attn1.") or k.startswith(f"{b}.norm1.") for b in blocks)}
    want |= {k for k in state if k.split(".")[0] in ("class_embedding", "camera_embedding", "elevation_regressor",
                                                      "focal_regressor")}
    assert dropped == want and all(record["dropped"].values())
    own = model.denoiser.unet.state_dict()
    for k, v in state.items():
        if k in dropped or ".attn_mv." in k or ".norm_mv." in k:
            continue
        assert torch.equal(own[k], v), k       # every other Stable Diffusion key: the same tensor
    for b in blocks:                          # the row-wise attention is the block's self-attention
        for k in [k for k in state if k.startswith(f"{b}.attn_mv.") or k.startswith(f"{b}.norm_mv.")]:
            assert torch.equal(own[k.replace(".attn_mv.", ".attn1.").replace(".norm_mv.", ".norm1.")], state[k])
    assert torch.equal(model.denoiser.image_proj.weight, torch.zeros_like(model.denoiser.image_proj.weight))
    cfg = model.config
    assert (cfg.rig, cfg.layout, cfg.prediction_type, cfg.resolution, cfg.latent_channels) == \
        ("era3d6", "rows", "v_prediction", 16, 4)
    assert record["file"].endswith(os.path.join("unet", "diffusion_pytorch_model.safetensors"))
    on_disk = json.load(open(os.path.join(converted["out"], "conversion.json")))
    assert on_disk["equal_outputs"] is False and on_disk["kind"] == "era3d" and on_disk["sha256"]
    # the VAE and the image encoder are the pipeline's, exactly
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionModelWithProjection

    vae = AutoencoderKL.from_pretrained(os.path.join(converted["pipe"], "vae"))
    enc = CLIPVisionModelWithProjection.from_pretrained(os.path.join(converted["pipe"], "image_encoder"))
    for a, b in ((model.vae, vae), (model.image_encoder, enc)):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_vae_with_the_old_attention_names_loads(converted, tmp_path):
    """Stable Diffusion 2.x's hub VAEs were saved before diffusers 0.15 renamed the mid block's
    attention (query, key, value, proj_attn -> to_q, to_k, to_v, to_out.0): such a vae/ converts;
    a part folder with other weight files beside it reads diffusers' safetensors file."""
    import shutil

    from safetensors.torch import load_file

    pipe = tmp_path / "pipe"
    shutil.copytree(converted["pipe"], pipe)
    f = pipe / "vae" / "diffusion_pytorch_model.safetensors"
    new = load_file(str(f))
    back = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in new.items():
        for a, b in back.items():
            if ".mid_block.attentions.0." in k and f".{a}." in k:
                k = k.replace(f".{a}.", f".{b}.")
        old[k] = v
    assert len(set(old) - set(new)) == 16          # encoder and decoder: 4 projections x weight, bias
    save_file(old, str(f))
    for extra in ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors"):
        (pipe / "unet" / extra).write_bytes(b"not read: the safetensors file comes first")
    r = convert("era3d", str(pipe), str(tmp_path / "out"))
    assert sorted(r["parts"]["vae"]["renamed"]) == sorted(set(old) - set(new))
    got = MVDiffusion.from_pretrained(str(tmp_path / "out")).vae.state_dict()
    assert all(torch.equal(got[k], v) for k, v in new.items()) and set(got) == set(new)


def test_released_layout_converts_key_for_key():
    """The released UNet (SD 2.1 sizes, with its DownBlock2D / UpBlock2D levels and 3 regressor
    blocks) converts onto fast3d's base-size denoiser key for key (meta tensors); its parameter
    count is the README's."""
    from fast3d.models.convert.era3d import convert_unet
    from fast3d.models.mvdiff import MVDenoiser, MVDiffConfig

    cfg = manifest_mvdiff.ERA3D_RELEASED_UNET
    shapes = manifest_mvdiff.era3d_unet_shapes(cfg)
    assert sum(math.prod(s) for s in shapes.values()) == pytest.approx(947.7e6, abs=0.05e6)
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    fast = MVDiffConfig.preset("base", rig="era3d6", layout="rows", resolution=512, image_embed_dim=1024)
    with torch.device("meta"):
        own = MVDenoiser(fast).state_dict()
    new, dropped, filled = convert_unet(sd, cfg, own)
    assert {k: tuple(v.shape) for k, v in new.items()} == {k: tuple(v.shape) for k, v in own.items()}
    blocks = manifest_mvdiff.transformer_blocks(shapes)
    assert len(blocks) == 16    # 2 x 3 down + 1 mid + 3 x 3 up
    # per block attn1 (q, k, v, out weight + bias) and norm1 (2); per regressor linear_in (2), 3 blocks of
    # 2 linears (12), linear_out (2); camera_embedding and class_embedding (4 each)
    assert len(dropped) == 7 * len(blocks) + 2 * (2 + 12 + 2) + 4 + 4
    assert set(filled) == {"unet.class_embedding", "image_proj"}


def _era3d_rows(x, norm, attn, heads, V, h):
    """Era3D's x -> attn_mv(norm_mv(x)) (transformer_mv2d_self_rowwise.py, MVAttnProcessor), by hand:
    LayerNorm; q, k, v; '(b v) (h w) c -> (b h) (v w) c'; softmax(q k^T / sqrt(d)) v per head; back;
    to_out.0."""
    n = F.layer_norm(x, x.shape[-1:], norm["weight"], norm["bias"])
    q, k, v = (n @ attn[f"to_{m}.weight"].T for m in "qkv")
    BV, L, C = q.shape
    w, d = L // h, C // heads

    def rows(t):   # [(b v), (h w), C] -> [(b h), heads, (v w), d]
        t = t.reshape(BV // V, V, h, w, heads, d).permute(0, 2, 4, 1, 3, 5)
        return t.reshape(BV // V * h, heads, V * w, d)

    q, k, v = rows(q), rows(k), rows(v)
    o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
    o = o.reshape(BV // V, h, heads, V, w, d).permute(0, 3, 1, 4, 2, 5).reshape(BV, L, C)
    return o @ attn["to_out.0.weight"].T + attn["to_out.0.bias"]


def test_rows_attention_is_era3ds_row_wise_attention(converted, gen):
    state, model = converted["state"], converted["model"]
    b = "down_blocks.0.attentions.0.transformer_blocks.0"
    block = model.denoiser.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    V, h, w = 6, 8, 8
    x = torch.randn(2 * V, h * w, 32, generator=gen)          # [(B V), (h w), C], 2 samples of 6 views
    sub = {k[len(b) + 1:]: v for k, v in state.items() if k.startswith(b + ".")}
    norm = {t: sub[f"norm_mv.{t}"] for t in ("weight", "bias")}
    attn = {k[len("attn_mv."):]: v for k, v in sub.items() if k.startswith("attn_mv.")}
    want = _era3d_rows(x, norm, attn, heads=2, V=V, h=h)
    with torch.no_grad():
        got = block.attn1(block.norm1(x))
    close("rows", got, want)
    # the layout matters: all-views attention ("views") gives another result on the same weights
    from fast3d.nn import MultiViewAttnProcessor

    block.attn1.set_processor(MultiViewAttnProcessor(V, "views"))
    try:
        with torch.no_grad():
            assert (block.attn1(block.norm1(x)) - want).abs().max() > 1e-3
    finally:
        block.attn1.set_processor(MultiViewAttnProcessor(V, "rows"))


def test_conv_in_sees_the_noisy_latent_first(converted, gen):
    """Era3D's pipeline: unet(torch.cat([latent_model_input, image_latents], dim=1)); fast3d's
    denoiser must hand conv_in the same channel order (the weights are copied as they are)."""
    model = converted["model"]
    seen = []
    hook = model.denoiser.unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    noisy = torch.randn(1, 6, 4, 8, 8, generator=gen)
    cond = torch.randn(1, 4, 8, 8, generator=gen)
    try:
        with torch.no_grad():
            model.denoiser(noisy, cond, torch.randn(1, 32, generator=gen),
                           model.rig_camera_features()[None], torch.tensor([500]))
    finally:
        hook.remove()
    want = torch.cat([noisy[0], cond.expand(6, 4, 8, 8)], 1)    # per view: [noisy latent; image latent]
    assert torch.equal(seen[0], want)
    assert torch.equal(model.denoiser.unet.conv_in.weight, converted["state"]["conv_in.weight"])


def test_class_embedding_is_era3ds_at_a_zero_image_embedding(converted):
    """Era3D's class input (pipeline noise_image_embeddings): cat(image_embeds, the sinusoidal
    embedding of noise level 0 by diffusers' get_timestep_embedding, flip_sin_to_cos); fast3d's
    camera MLP must give Era3D's class embedding at image_embeds = 0, for any camera."""
    from diffusers.models.embeddings import get_timestep_embedding

    state, model = converted["state"], converted["model"]
    E = UNET["projection_class_embeddings_input_dim"] // 2
    level = get_timestep_embedding(torch.tensor([0]), E, flip_sin_to_cos=True, downscale_freq_shift=0)[0]
    x = torch.cat([torch.zeros(E), level])
    hidden = F.silu(state["class_embedding.linear_1.weight"] @ x + state["class_embedding.linear_1.bias"])
    want = state["class_embedding.linear_2.weight"] @ hidden + state["class_embedding.linear_2.bias"]
    with torch.no_grad():
        got = model.denoiser.unet.class_embedding(model.rig_camera_features())      # [6, T]
    for v in range(6):
        close("class", got[v], want)
    e, a = torch.tensor([0.3]), torch.tensor([1.1])
    with torch.no_grad():
        close("class", model.denoiser.unet.class_embedding(camera_features(e, a))[0], want)


def test_bad_pipelines_are_named_and_nothing_is_written(converted, tmp_path, gen):
    good = converted["state"]
    out = tmp_path / "out"
    cases = {
        "missing": ({k: v for k, v in good.items() if not k.startswith("focal_regressor.")}, None, None,
                    r"unet/.*Era3D's UNet.*missing \['focal_regressor"),
        "extra": ({**good, "lpips.w": torch.zeros(1)}, None, None, r"1 unexpected \['lpips.w'\]"),
        "shape": ({**good, "conv_in.weight": torch.zeros(32, 4, 3, 3)}, None, None,
                  r"mis-shaped \['conv_in.weight: got \(32, 4, 3, 3\), expected \(32, 8, 3, 3\)"),
        "views": (None, {**UNET, "num_views": 4}, None, r"another kind.*'num_views': 4"),
        "schedule": (None, None, {**SCHEDULER, "beta_schedule": "linear"}, r"scheduler/.*not Stable Diffusion 2"),
    }
    for name, (state, unet, sched, msg) in cases.items():
        root = tmp_path / name
        if state is not None:
            _write_pipeline(root, gen, state=state)
        else:
            _write_pipeline(root, gen, unet=unet, scheduler=sched, state=good if unet is None else None)
        with pytest.raises(ValueError, match=msg):
            convert("era3d", str(root), str(out))
        assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    with pytest.raises(ValueError, match=r"--weights .*no config.json in \['vae/'"):
        os.makedirs(tmp_path / "half" / "unet")
        json.dump(UNET, open(tmp_path / "half" / "unet" / "config.json", "w"))
        convert("era3d", str(tmp_path / "half"), str(out))
    with pytest.raises(ValueError, match="--weights must be Era3D's pipeline directory"):
        convert("era3d", os.path.join(converted["pipe"], "unet", "diffusion_pytorch_model.safetensors"), str(out))
    cut = tmp_path / "cut"          # a truncated download of the UNet's weights
    _write_pipeline(cut, gen, state=good)
    f = cut / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"--weights unet/ .*not a readable safetensors file"):
        convert("era3d", str(cut), str(out))
    with pytest.raises(ValueError, match="--variant does not apply to era3d"):
        convert("era3d", converted["pipe"], str(out), variant="big")
    os.makedirs(out)
    (out / "x").write_text("")
    with pytest.raises(ValueError, match="--out .* is not empty"):
        convert("era3d", converted["pipe"], str(out))


@pytest.mark.slow
def test_converted_model_generates_through_the_cli(converted, tmp_path, gen):
    """``fast3d convert era3d`` then ``fast3d generate --mv-model`` with a tiny LGM of Era3D's
    optics (its 4 views: the rig's front, right, back, left)."""
    from fast3d.cli import main as cli_main
    from fast3d.models.lgm import LGM, LGMConfig
    from fast3d.models.mvdiff import RIGS

    out = str(tmp_path / "conv")
    assert cli_main(["convert", "era3d", "--weights", converted["pipe"], "--out", out]) == 0
    rig = RIGS["era3d6"]
    LGM(dataclasses.replace(LGMConfig.preset("tiny"), fov_y_deg=rig["fov_y_deg"], camera_distance=rig["distance"])).save_pretrained(
        str(tmp_path / "lgm"))
    img = tmp_path / "a.png"
    img.write_bytes(object_png(gen, (40, 30)))
    res = str(tmp_path / "res")
    assert cli_main(["generate", "--image", str(img), "--mv-model", out, "--recon", str(tmp_path / "lgm"),
                     "--views", "0,2,3,4", "--steps", "2", "--frames", "2", "--out", res]) == 0
    assert sorted(os.listdir(os.path.join(res, "views"))) == [f"view{i}.png" for i in range(6)]
    cams = json.load(open(os.path.join(res, "cameras.json")))
    assert cams["rig"] == "era3d6" and cams["recon_views"] == [0, 2, 3, 4]
    assert os.path.isfile(os.path.join(res, "gaussians.ply"))
