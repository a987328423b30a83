"""fast3d convert imagedream: ImageDream's diffusers-format pipeline (ashawkey/mvdream_diffusers'
layout, fast3d.models.convert.manifest_mvdiff) -> fast3d's MVDiffusion with ImageDream's
conditioning. A tiny pipeline directory is written with a UNet drawn from the hand-written
re-derivation of ImageDream's MultiViewUNetModel (tests/models/imagedream_ref.py, ldm key names);
the converted denoiser must compute what that UNet computes (pixel controller, image tokens,
cameras, classifier-free guidance's unconditional branch), every key must be accounted for, bad
pipelines must be named, and the result must generate."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from helpers import assert_close, randomize_
from imagedream_ref import RefMultiViewUNet, get_camera
from safetensors.torch import load_file, save_file

from fast3d.models.convert import convert, manifest_mvdiff
from fast3d.models.mvdiff import MVDiffusion, imagedream_camera_features

# ImageDream's unet/config.json at a tiny size (the released one: manifest_mvdiff.IMAGEDREAM_RELEASED_UNET);
# three levels, attention on the first two (a DownBlock2D / UpBlock2D level as the release's last one)
UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
            num_res_blocks=1, channel_mult=[1, 2, 2], num_head_channels=16, transformer_depth=1, context_dim=32,
            use_checkpoint=False, camera_dim=16, ip_dim=4)
# the resampler's settings the original fixes in code, shrunk (dim_head stays ImageDream's 64)
RESAMPLER = dict(resampler_depth=2, resampler_dim_head=64, resampler_heads=2, resampler_embedding_dim=24)
SCHEDULER = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_schedule="scaled_linear",
                 beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False, set_alpha_to_one=False,
                 prediction_type="epsilon")
TEXT_TOKENS = 8

# (atol, rtol, why): the converted fast3d denoiser vs the re-derived ImageDream UNet, float32
TOL = {
    "unet": (2e-5, 1e-4, "float32 through ~40 layers: SDPA vs explicit softmax, GEGLU / GroupNorm order of sums; "
                         "the resampler's scale split as dim_head^-1/4 on q and k in the original"),
    "camera": (1e-6, 0.0, "float32 rounding of sin / cos of multiples of 90 degrees"),
}


def close(name, actual, expected):
    atol, rtol, _ = TOL[name]
    assert_close(actual, expected, atol=atol, rtol=rtol)


def _write_tokenizer(path):
    """A tiny CLIP BPE tokenizer: the two special tokens, '!' (the padding, as Stable Diffusion 2's) and
    a few words."""
    os.makedirs(path)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, "a</w>": 3, "cat</w>": 4, "blurry</w>": 5}
    json.dump(vocab, open(path / "vocab.json", "w"))
    (path / "merges.txt").write_text("#version: 0.2\n")
    json.dump({"model_max_length": TEXT_TOKENS, "pad_token": "!"}, open(path / "tokenizer_config.json", "w"))


def _write_pipeline(root, gen):
    """A tiny ImageDream pipeline directory; returns the reference UNet whose weights unet/ holds."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    ref = RefMultiViewUNet(**{k: v for k, v in UNET.items() if k not in ("image_size", "use_checkpoint")},
                           **RESAMPLER)
    randomize_(ref, gen)      # the original zero-inits its output layers: random ones keep every path visible
    for d in ("unet", "scheduler"):
        os.makedirs(root / d)
    json.dump({"_class_name": "MultiViewUNetModel", **UNET}, open(root / "unet" / "config.json", "w"))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
              str(root / "unet" / "diffusion_pytorch_model.safetensors"))
    json.dump(SCHEDULER, open(root / "scheduler" / "scheduler_config.json", "w"))
    AutoencoderKL(block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=8, layers_per_block=1,
                  sample_size=16).save_pretrained(str(root / "vae"))
    CLIPVisionModel(CLIPVisionConfig(hidden_size=RESAMPLER["resampler_embedding_dim"], intermediate_size=48,
                                     num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                     patch_size=8)).save_pretrained(str(root / "image_encoder"))
    CLIPTextModel(CLIPTextConfig(vocab_size=6, hidden_size=UNET["context_dim"], intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=TEXT_TOKENS,
                                 eos_token_id=1, bos_token_id=0, pad_token_id=2)).save_pretrained(str(root / "text_encoder"))
    _write_tokenizer(root / "tokenizer")
    return ref.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagedream")
    gen = torch.Generator().manual_seed(int(os.environ.get("FAST3D_TEST_SEED", "0")))
    ref = _write_pipeline(root / "pipe", gen)
    record = convert("imagedream", str(root / "pipe"), str(root / "out"), negative_prompt="a")
    return dict(root=root, pipe=str(root / "pipe"), out=str(root / "out"), ref=ref, record=record,
                model=MVDiffusion.from_pretrained(str(root / "out")))


def _reference(ref, noisy, latent, tokens, text, cameras, t, drop):
    """ImageDream's pipeline around its UNet (pipeline_mvdream.py): V views + the pixel-controller
    frame, per frame the text context (the negative one when dropped) and the image tokens, the
    image latent in the last frame (zeros when dropped), cameras with a zero row appended."""
    B, V = noisy.shape[:2]
    F_ = V + 1
    keep = (~drop).float()
    x = torch.cat([noisy, torch.zeros_like(noisy[:, :1])], 1).flatten(0, 1)           # [(B F), C, h, w]
    ctx = torch.where(drop[:, None, None], text[1], text[0]).repeat_interleave(F_, 0)   # [(B F), T, D]
    ip = (tokens * keep[:, None, None]).repeat_interleave(F_, 0)                        # [(B F), N, E]
    cams = torch.cat([cameras, torch.zeros(B, 1, 16)], 1).flatten(0, 1)                # [(B F), 16]
    out = ref(x, t.repeat_interleave(F_).float(), ctx, cams, F_, ip=ip, ip_img=latent * keep[:, None, None, None])
    return out.unflatten(0, (B, F_))[:, :V]


def test_the_converted_unet_computes_imagedreams(converted, gen):
    """Same weights, same inputs: the fast3d denoiser (diffusers UNet, fast3d multi-view attention,
    IP-Adapter processors, diffusers' resampler) equals the re-derived MultiViewUNetModel, for the
    conditional and the unconditional (classifier-free guidance) branch in one batch."""
    model, ref = converted["model"], converted["ref"]
    B, V, C, h = 2, 4, 4, 8
    noisy = torch.randn(B, V, C, h, h, generator=gen)
    latent = torch.randn(B, C, h, h, generator=gen)
    tokens = torch.randn(B, 17, RESAMPLER["resampler_embedding_dim"], generator=gen)
    cameras = model.rig_camera_features()[None].expand(B, V, 16)
    t = torch.tensor([981, 41])
    drop = torch.tensor([False, True])
    with torch.no_grad():
        got = model.denoiser(noisy, latent, tokens, cameras, t, drop)
        want = _reference(ref, noisy, latent, tokens, model.denoiser.text_context, cameras, t, drop)
        close("unet", got, want)
        assert want.abs().max() > 0.1 and (want[0] - want[1]).abs().max() > 1e-2
        # no drop given: every sample conditional
        close("unet", model.denoiser(noisy, latent, tokens, cameras, t),
              _reference(ref, noisy, latent, tokens, model.denoiser.text_context, cameras, t, torch.zeros(B, dtype=bool)))


def test_text_context_is_the_pipelines_text_encoder_output(converted):
    """The prompt ('') and the negative prompt ('a') through tokenizer/ and text_encoder/ as
    ImageDream's pipeline encodes them (padded to model_max_length, last_hidden_state)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(os.path.join(converted["pipe"], "tokenizer"))
    enc = CLIPTextModel.from_pretrained(os.path.join(converted["pipe"], "text_encoder")).eval()
    ids = tok(["", "a"], padding="max_length", max_length=TEXT_TOKENS, return_tensors="pt").input_ids
    assert ids.tolist() == [[0, 1] + [2] * 6, [0, 3, 1] + [2] * 5]
    with torch.no_grad():
        want = enc(ids).last_hidden_state
    ctx = converted["model"].denoiser.text_context
    assert ctx.shape == (2, TEXT_TOKENS, UNET["context_dim"]) and torch.equal(ctx, want)
    assert (ctx[0] - ctx[1]).abs().max() > 1e-3
    assert converted["record"]["prompt"] == "" and converted["record"]["negative_prompt"] == "a"


def test_rig_cameras_are_imagedreams_get_camera(converted):
    """ImageDream's input view is its azimuth 90 degrees: LGM's infer.py takes ImageDream's outputs
    1, 2, 3, 0 as its rig's views 0..3 (fast3d's lgm4 rig), so fast3d's rig has the cameras
    get_camera(4, elevation 0)[[1, 2, 3, 0]]; other elevations and azimuths follow its construction
    at the same offset."""
    close("camera", converted["model"].rig_camera_features(), get_camera(4, 0.0)[[1, 2, 3, 0]])
    for el in (15.0, -30.0):
        az = torch.deg2rad(torch.arange(8, dtype=torch.float64) * 45)
        close("camera", imagedream_camera_features(torch.full_like(az, math.radians(el)), az),
              get_camera(8, el)[[2, 3, 4, 5, 6, 7, 0, 1]])


def test_every_key_is_converted_and_the_record_says_so(converted):
    model, record = converted["model"], converted["record"]
    cfg = model.config
    assert (cfg.conditioning, cfg.rig, cfg.layout, cfg.resolution, cfg.block_out_channels, cfg.attention_heads) == \
        ("imagedream", "lgm4", "views", 16, (32, 64, 64), (2, 4, 4))
    assert (cfg.down_block_types, cfg.up_block_types) == (
        ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    assert (cfg.image_tokens, cfg.resampler_depth, cfg.resampler_heads, cfg.image_embed_dim, cfg.text_tokens) == \
        (4, 2, 2, 24, TEXT_TOKENS)
    on_disk = json.load(open(os.path.join(converted["out"], "conversion.json")))
    assert on_disk["equal_outputs"] is True and on_disk["dropped"] == {} and on_disk["kind"] == "imagedream"
    assert on_disk["checked_against_real_release"] is False and on_disk["sha256"] == record["sha256"]
    assert record["out"] == os.path.abspath(converted["out"]) and set(record["parts"]) == {"vae", "image_encoder",
                                                                                        "text_encoder"}
    ref_state = converted["ref"].state_dict()
    n_ref = sum(v.numel() for v in ref_state.values())
    n_fast = sum(v.numel() for k, v in model.denoiser.state_dict().items() if k != "text_context")
    assert n_ref == n_fast


def test_released_layout_converts_key_for_key():
    """The released UNet (SD 2.1 sizes, ip_dim 16, the resampler's fixed settings) maps onto fast3d's
    denoiser key for key (meta tensors). Its parameter count, by hand: Stable Diffusion 2.1's UNet
    865.91M + camera MLP 1.66M + to_k_ip / to_v_ip 2 x 1024 x (5 x 320 + 5 x 640 + 6 x 1280) = 25.56M
    + resampler (proj_in 1.31M, 4 layers of 11.54M, proj_out and norms 1.07M) 48.54M = 941.67M."""
    from fast3d.models.convert.imagedream import convert_unet, mvdiff_config, source_shapes
    from fast3d.models.mvdiff import MVDenoiser

    ucfg = {**manifest_mvdiff.IMAGEDREAM_DEFAULTS, **manifest_mvdiff.IMAGEDREAM_RELEASED_UNET}
    r = dict(manifest_mvdiff.IMAGEDREAM_RESAMPLER)

    class _VAE:   # the released VAE's layout, as mvdiff_config reads it
        config = type("C", (), dict(block_out_channels=[128, 256, 512, 512], scaling_factor=0.18215))

    cfg = mvdiff_config(ucfg, r, _VAE, 77, dict(vae="v", image_encoder="e"), "epsilon")
    assert cfg.resolution == 256 and cfg.attention_heads == (5, 10, 20, 20)
    with torch.device("meta"):
        own = MVDenoiser(cfg).state_dict()
    shapes = source_shapes(own, manifest_mvdiff.imagedream_key_map(ucfg, r["depth"]))
    assert sum(math.prod(s) for s in shapes.values()) == pytest.approx(941.67e6, abs=0.01e6)
    assert shapes["image_embed.layers.0.0.to_kv.weight"] == (1536, 1024)
    assert shapes["output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)          # the level without attention
    assert shapes["output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes["input_blocks.1.1.transformer_blocks.0.attn2.to_k_ip.weight"] == (320, 1024)
    new = convert_unet({k: torch.empty(s, device="meta") for k, s in shapes.items()}, ucfg, r, own)
    assert {k: tuple(v.shape) for k, v in new.items()} == \
        {k: tuple(v.shape) for k, v in own.items() if k != "text_context"}


def test_bad_pipelines_are_named_and_nothing_is_written(converted, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(converted["pipe"], pipe)
    f = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    good = load_file(str(f))
    n = 0

    def fails(match, **kw):
        nonlocal n
        n += 1
        out = tmp_path / f"out{n}"
        with pytest.raises(ValueError, match=match):
            convert("imagedream", str(pipe), str(out), **kw)
        assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".convert-" in p]

    k_ip = "input_blocks.1.1.transformer_blocks.0.attn2.to_k_ip.weight"
    for state, match in (({k: v for k, v in good.items() if k != k_ip}, rf"1 missing \['{k_ip}'\]"),
                         ({**good, "extra.weight": torch.zeros(1)}, r"1 unexpected \['extra.weight'\]"),
                         ({**good, "out.2.weight": torch.zeros(4, 32, 1, 1)}, r"1 mis-shaped \['out.2.weight: got")):
        save_file(state, str(f))
        fails(match)
    f.write_bytes(f.read_bytes()[:1000])
    fails("not a readable safetensors file")
    save_file(good, str(f))
    cfg = json.load(open(pipe / "unet" / "config.json"))
    json.dump({**cfg, "ip_dim": 0}, open(pipe / "unet" / "config.json", "w"))
    fails(r"another kind than the released pixel-controller one: \{'ip_dim': 0\}")
    json.dump({**cfg, "num_res_blocks": [1, 1, 1]}, open(pipe / "unet" / "config.json", "w"))
    fails(r"expected non-negative integers for .* got \{'num_res_blocks': \[1, 1, 1\]\}")
    json.dump({**cfg, "channel_mult": [2, 2, 2]}, open(pipe / "unet" / "config.json", "w"))
    fails(r"another kind than the released pixel-controller one: \{'channel_mult': \[2, 2, 2\]\}")
    json.dump({k: v for k, v in cfg.items() if k != "camera_dim"}, open(pipe / "unet" / "config.json", "w"))
    fails(r"not an ImageDream UNet config \(MultiViewUNetModel\): it lacks \['camera_dim'\]")
    json.dump(cfg, open(pipe / "unet" / "config.json", "w"))
    shutil.rmtree(pipe / "text_encoder")
    fails(r"not ImageDream's pipeline directory: no config.json in \['text_encoder/'\]")
    with pytest.raises(ValueError, match="apply to imagedream only"):
        convert("lgm", str(pipe), str(tmp_path / "o"), prompt="x")
    with pytest.raises(ValueError, match="exists and is not empty"):
        convert("imagedream", converted["pipe"], converted["out"])


def test_converted_model_generates_and_the_cli_converts(converted, tmp_path):
    """sample_views on the converted model (the lgm4 rig, its cameras) and `fast3d convert
    imagedream` from the command line."""
    from fast3d.cli import main
    from fast3d.inference.mvdiff import sample_views

    model = converted["model"]
    image = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(1))
    out = sample_views(model, image, steps=2, guidance_scale=5.0, seed=3)
    assert out["images"].shape == (4, 3, 16, 16) and torch.isfinite(out["images"]).all()
    assert torch.equal(out["images"], sample_views(model, image, steps=2, guidance_scale=5.0, seed=3)["images"])
    assert main(["convert", "imagedream", "--weights", converted["pipe"], "--out", str(tmp_path / "cli"),
                 "--negative-prompt", "a"]) == 0
    again = load_file(str(tmp_path / "cli" / "model.safetensors"))
    first = load_file(os.path.join(converted["out"], "model.safetensors"))
    assert set(again) == set(first) and all(torch.equal(again[k], first[k]) for k in first)


def test_fine_tuning_starts_from_the_converted_model(converted, tmp_path, gen):
    """`fast3d train mvdiff --init-from OUT` (model.init_from): the recipe's denoiser, VAE and image
    encoder are the converted model's, a step trains it, and its export loads as ImageDream-conditioned
    again; overrides beside init_from are refused."""
    import torch.nn.functional as F

    from fast3d import cameras as cams
    from fast3d.data.shards import MultiViewSample, ShardWriter
    from fast3d.training import config as run_config
    from fast3d.training.loop import StepContext
    from fast3d.training.recipes import mvdiff as recipe

    data = str(tmp_path / "data")
    with ShardWriter(data, prefix="hand", samples_per_shard=2) as w:
        for i in range(2):
            rig = cams.orbit16(gen, 16)
            low = torch.rand(16, 3, 4, 4, generator=gen)
            w.write(MultiViewSample(key=f"obj{i}", images=F.interpolate(low, size=(16, 16), mode="bilinear"),
                                    alphas=torch.ones(16, 1, 16, 16), viewmats=rig.viewmats, Ks=rig.Ks, caption="",
                                    source="rendered3d"))
    base = run_config.load_config(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "train", "configs",
                                               "mvdiff_tiny.yaml"), "mvdiff").to_dict()
    del base["source"]
    base["data"] = dict(base["data"], train=data)
    base["model"] = {"init_from": converted["out"]}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(base))
    r = recipe.MVDiffRecipe(run_config.load_config(str(path)))
    assert r.model_cfg == converted["model"].config and r.cfg.model["init_from"] == os.path.abspath(converted["out"])
    model = r.build_model()
    r.prepare(torch.device("cpu"))
    for got, want in ((model, converted["model"].denoiser), (r.vae, converted["model"].vae),
                      (r.image_encoder, converted["model"].image_encoder)):
        a, b = got.state_dict(), want.state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    loss, _ = r.loss(model, r.collate(list(r.dataset(0, 1))), StepContext(1, torch.device("cpu"), torch.float32, gen, 0, 1))
    loss.backward()
    assert torch.isfinite(loss) and model.image_proj.proj_in.weight.grad.abs().sum() > 0
    r.export(model, str(tmp_path / "export"))
    again = MVDiffusion.from_pretrained(str(tmp_path / "export"))
    assert again.config.conditioning == "imagedream" and torch.equal(again.denoiser.text_context,
                                                                     model.text_context)
    base["model"] = {"init_from": converted["out"], "overrides": {"rig": "era3d6"}}
    path.write_text(json.dumps(base))
    with pytest.raises(ValueError, match=r"model: overrides cannot be combined with init_from"):
        recipe.MVDiffRecipe(run_config.load_config(str(path)))
