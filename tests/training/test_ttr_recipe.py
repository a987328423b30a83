"""The ``ttr`` recipe (fast3d.training.recipes.ttr): 2-rank CPU runs of train/configs/ttr_tiny.yaml
that resume exactly and log per-source and per-bucket losses, ZeRO-3 with EMA and activation
checkpointing, refusal of a cache of another VAE or lacking a source of the mix, TTR timesteps by
source, the noise-prediction loss, caption dropout, the mixed data stream, the export that
``fast3d.inference.ttr.sample`` loads, and the FLOP model (MVDiTConfig.step_flops) against the executed model.

The data (procedural rendered3d objects plus hand-written synthetic and image2d shards) and its
feature cache are built once per module from fixed seeds: their content is not what is tested."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from helpers import assert_close

from fast3d.data.shards import MultiViewSample, ShardWriter
from fast3d.datagen import procedural
from fast3d.inference import ttr as ttr_inference
from fast3d.models import mvdit
from fast3d.training import config as run_config
from fast3d.training import mixed_cache
from fast3d.training.loop import StepContext
from fast3d.training.metrics import read_metrics
from fast3d.training.recipes import ttr as recipe_ttr
from fast3d.training.recipes import ttr_extract
from fast3d.training.ttr import SOURCES, TTRConfig, TTRSampler

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_YAML = os.path.join(ROOT, "train", "configs", "ttr_tiny.yaml")
ALL_SOURCES = {"synthetic": 1.0, "rendered3d": 1.0, "image2d": 1.0}
SCALING = 0.18215           # the tiny preset's vae_scaling_factor
RESUME_AT, STEPS = 4, 7      # 12 samples, 2 ranks x batch 2: 3 steps per epoch, so the resume is mid-epoch 1


def write_hand_shards(out: str, source: str, n: int, views: int) -> None:
    """``n`` samples of ``source`` (smooth random colours, 32 px) in shards of 2, on a turntable orbit
    (the feature cache picks the grid's views by their cameras' azimuths)."""
    from fast3d import cameras

    g = torch.Generator().manual_seed(SOURCES.index(source))
    viewmats, Ks = (x.float() for x in cameras.turntable(views, 32))
    with ShardWriter(out, prefix=source, samples_per_shard=2) as w:
        for i in range(n):
            low = torch.rand(views, 3, 4, 4, generator=g)
            images = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
            w.write(MultiViewSample(key=f"{source}{i:03d}", images=images, alphas=torch.ones(views, 1, 32, 32),
                                    viewmats=viewmats, Ks=Ks,
                                    caption=f"a {source} thing number {i}", source=source))


def make_config(directory, name: str, **changes) -> str:
    """ttr_tiny.yaml with the test cache, all three sources, a metrics row per step and ``changes``
    (``section__key=value`` for a key of the model / data / loss section); returns its path."""
    d = run_config.load_config(TINY_YAML, "ttr").to_dict()
    del d["source"]
    d["deepspeed"] = os.path.join(ROOT, "train", "configs", "ds_zero2.json")
    d["data"] = dict(d["data"], raw=str(directory / "raw"), cache=str(directory / "cache"))
    d["loss"] = dict(d["loss"], ttr=dict(d["loss"]["ttr"], source_weights=ALL_SOURCES))
    d["log_every"] = 1
    for k, v in changes.items():
        section, _, key = k.partition("__")
        if key:
            d[section] = dict(d[section], **{key: v})
        else:
            d[k] = v
    path = directory / f"{name}.yaml"
    path.write_text(json.dumps(d))  # JSON is YAML
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A directory with raw/ (12 samples, 4 per source) and cache/ (their features)."""
    root = tmp_path_factory.mktemp("ttr")
    raw = str(root / "raw")
    procedural.run(raw, procedural.ProceduralConfig(num_objects=4, views=4, rig="mvdream", resolution=32, seed=0,
                                                    gaussians_per_object=600, samples_per_shard=2, batch_size=4,
                                                    save_ply=False))
    write_hand_shards(raw, "synthetic", 4, views=4)
    write_hand_shards(raw, "image2d", 4, views=1)
    cfg = run_config.load_config(make_config(root, "base"))
    result = ttr_extract.extract_features(cfg, progress=False)
    assert result == dict(result, shards_written=6, samples=12, complete=True)
    return root


def load(work, name="variant", **changes) -> run_config.RunConfig:
    return run_config.load_config(make_config(work, name, **changes))


def train(config, out, *extra, check=True):
    cmd = [sys.executable, "-m", "fast3d.cli", "train", "ttr", "--config", config, "--output", str(out),
           "--ranks", "2", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


def rows(out):
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_metrics(str(out))]


@pytest.fixture(scope="module")
def whole_run(work):
    """The tiny config on 2 ranks (ZeRO-2) for STEPS steps, checkpointed at RESUME_AT and STEPS."""
    out = work / "whole"
    train(make_config(work, "zero2", ckpt_every=RESUME_AT), out, "--max-steps", str(STEPS))
    return out


@pytest.mark.slow
def test_two_rank_run_resumes_exactly_and_logs_the_ttr_metrics(work, whole_run):
    # A run killed after its step-RESUME_AT checkpoint: that checkpoint alone in a fresh directory.
    out = work / "resumed"
    tag = f"step{RESUME_AT:08d}"
    shutil.copytree(whole_run / "checkpoints" / tag, out / "checkpoints" / tag)
    (out / "checkpoints" / "latest").write_text(tag)
    train(make_config(work, "zero2", ckpt_every=RESUME_AT), out, "--max-steps", str(STEPS), "--resume")
    whole, resumed = rows(whole_run), rows(out)
    assert [r["step"] for r in whole] == list(range(1, STEPS + 1))
    assert resumed == whole[RESUME_AT:]  # same data order, mix, timesteps, noise, caption dropout: bitwise
    every = read_metrics(str(whole_run))
    assert all({"loss", "lr", "samples_per_s", "mean_t", "epoch"} <= set(r) for r in every)
    assert every[-1]["epoch"] == 2 and every[0]["lr"] < every[-1]["lr"]   # epochs turn over; warm-up
    keys = set().union(*every)
    assert {f"loss_{s}" for s in SOURCES} <= keys and {f"share_{s}" for s in SOURCES} <= keys
    assert {"loss_t0_50", "loss_t200_500", "loss_t500_1000"} <= keys
    assert all(abs(sum(r[f"share_{s}"] for s in SOURCES) - 1) < 1e-6 for r in every)
    final = whole_run / "checkpoints" / f"step{STEPS:08d}"
    assert sorted(os.listdir(final / "model")) == ["config.yaml", "model.safetensors"]


@pytest.mark.slow
def test_zero3_with_ema_and_activation_checkpointing_trains_and_exports(work, whole_run):
    cfg = make_config(work, "zero3", deepspeed=os.path.join(ROOT, "train", "configs", "ds_zero3.json"),
                      activation_checkpointing=True)
    out = work / "zero3"
    train(cfg, out, "--max-steps", "3")   # the warm-up's first steps have a learning rate of 0
    z2, z3 = rows(whole_run)[:3], rows(out)
    assert [r["step"] for r in z3] == [1, 2, 3]
    for a, b in zip(z2, z3):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * max(1.0, abs(a["loss"])), f"step {a['step']}: {a} vs {b}"
    ck = out / "checkpoints" / "step00000003"
    cfg_w, w = mvdit.load_transformer(str(ck / "model"))
    cfg_e, e = mvdit.load_transformer(str(ck / "model_ema"))
    assert cfg_w == cfg_e == recipe_ttr.TTRRecipe(run_config.load_config(cfg)).model_cfg
    diff = max((p - q).abs().max().item() for p, q in zip(w.parameters(), e.parameters()))
    assert 0 < diff < 0.1, "the gathered EMA trails the weights"


def test_a_cache_of_another_vae_is_refused_naming_both_fingerprints(work):
    cfg = load(work, model__overrides={"random_seed": 1})
    recipe = recipe_ttr.TTRRecipe(cfg)
    ours = mvdit.fingerprint(mvdit.build_vae(recipe.model_cfg))
    theirs = json.loads((work / "cache" / "cache.json").read_text())["vae"]
    assert ours != theirs
    with pytest.raises(ValueError, match=f"another VAE: its fingerprint is {theirs}.*has {ours}"):
        recipe.prepare(torch.device("cpu"))


def test_a_mix_asking_for_a_source_the_cache_lacks_is_refused(work, tmp_path):
    cfg = load(work, data__raw=str(work / "raw" / "procedural-000000.tar"), data__cache=str(tmp_path / "cache"))
    ttr_extract.extract_features(cfg, progress=False)   # rendered3d only
    with pytest.raises(ValueError, match=r"no samples of the source\(s\) \['image2d', 'synthetic'\]"):
        recipe_ttr.TTRRecipe(cfg)
    only_rendered = cfg.replace(loss=dict(cfg.loss, ttr=dict(cfg.loss["ttr"], source_weights={"rendered3d": 1.0})))
    assert recipe_ttr.TTRRecipe(only_rendered).mixed == ["rendered3d"]


@pytest.mark.parametrize("changes, match", [
    ({"data__bogus": 1}, r"data: unknown keys \['bogus'\]"),
    ({"data__shuffle_buffer": 0}, "data.shuffle_buffer must be a positive int; got 0"),
    ({"loss__caption_dropout": 1.5}, r"loss.caption_dropout must be a number in \[0, 1\]; got 1.5"),
    ({"loss__timestep_buckets": [0, 500]}, r"loss.timestep_buckets must be increasing ints from 0 to 1000"),
    ({"loss__ttr": {"num_train_timesteps": 500}}, "loss.ttr.num_train_timesteps must be the noise schedule's 1000"),
    ({"model__preset": "huge"}, "model: preset must be one of"),
    ({"model__overrides": {"depth": 3}}, r"model: preset 'tiny': unknown keys \['depth'\]"),
    ({"data__cache": "/nonexistent"}, "data.cache: '/nonexistent' has no cache.json.*ttr-extract"),
    ({"model__overrides": {"max_caption_tokens": 16}}, r"another model: .*'caption_tokens': \(32, 16\)"),
])
def test_bad_sections_are_named(work, changes, match):
    with pytest.raises(ValueError, match=match):
        recipe_ttr.TTRRecipe(load(work, **changes))


class InvertsTheForwardProcess(torch.nn.Module):
    """A stand-in transformer that knows the clean latents ``z``: its noise prediction is the exact
    noise of the DDPM forward process plus ``offset``, so the recipe's loss must be offset**2."""

    def __init__(self, z: torch.Tensor,  # [B, C, h, w]
                 offset: float):
        super().__init__()
        self.z, self.offset = z, offset
        self.alphas_cumprod = DDPMScheduler(**mvdit.NOISE_SCHEDULE).alphas_cumprod

    def forward(self, noisy: torch.Tensor,                   # [B, C, h, w]
                encoder_hidden_states: torch.Tensor,         # [B, L, C_text]
                encoder_attention_mask: torch.Tensor,        # [B, L]
                timestep: torch.Tensor,                      # [B]
                added_cond_kwargs: dict) -> SimpleNamespace:
        self.seen = dict(t=timestep, embeds=encoder_hidden_states, mask=encoder_attention_mask)
        a = self.alphas_cumprod[timestep][:, None, None, None]
        noise = (noisy - a.sqrt() * self.z) / (1 - a).sqrt()
        variance = torch.full_like(noise, 1e3)   # the learned-variance channels get no loss
        return SimpleNamespace(sample=torch.cat([noise + self.offset, variance], 1))


def batch_of(recipe, sources: list[str], gen: torch.Generator) -> dict:
    B, L, C = len(sources), recipe.model_cfg.max_caption_tokens, recipe.model_cfg.caption_channels
    mask = (torch.arange(L) < torch.randint(1, L, (B, 1), generator=gen)).long()
    return {"latent_mean": torch.randn(B, 4, 8, 8, generator=gen), "latent_std": torch.zeros(B, 4, 8, 8),
            "caption_embeds": (torch.randn(B, L, C, generator=gen) * mask[..., None]).bfloat16(),
            "caption_mask": mask, "source": sources, "key": [f"k{i}" for i in range(B)]}


def prepared(work, **changes):
    recipe = recipe_ttr.TTRRecipe(load(work, **changes))
    recipe.prepare(torch.device("cpu"))
    return recipe


def test_loss_is_noise_mse_at_each_sources_ttr_timesteps(work, gen):
    recipe = prepared(work)
    sources = [SOURCES[i] for i in torch.randint(3, (96,), generator=gen).tolist()]
    batch = batch_of(recipe, sources, gen)
    model = InvertsTheForwardProcess(batch["latent_mean"] * SCALING, offset=0.5)
    ctx = StepContext(step=0, device=torch.device("cpu"), dtype=torch.float32, generator=gen, rank=0, world_size=1)
    loss, m = recipe.loss(model, batch, ctx)
    t = model.seen["t"]
    ttr = TTRConfig()
    for s, lo, hi in (("synthetic", ttr.synthetic_min_t, 1000), ("image2d", 0, ttr.image2d_max_t),
                      ("rendered3d", 0, 1000)):
        ts = t[torch.tensor([x == s for x in sources])]
        assert len(ts) and ts.min() >= lo and ts.max() < hi, f"{s}: t in [{ts.min()}, {ts.max()}], not [{lo}, {hi})"
    assert_close(loss, torch.tensor(0.25), atol=1e-4, rtol=0, name="loss of a prediction off by 0.5")
    for s in SOURCES:
        assert_close(m[f"loss_{s}"], torch.tensor(0.25), atol=1e-4, rtol=0, name=f"loss_{s}")
    assert_close(m["mean_t"], t.double().mean(), atol=1e-3, rtol=0, name="mean_t")
    buckets = {f"loss_t{lo}_{hi}" for lo, hi in [(0, 50), (50, 200), (200, 500), (500, 1000)]
               if ((t >= lo) & (t < hi)).any()}
    assert {k for k in m if k.startswith("loss_t")} == buckets
    assert abs(sum(float(m[f"share_{s}"]) for s in SOURCES) - 1) < 1e-6


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_caption_dropout_swaps_in_the_caches_null_caption(work, gen, dropout):
    recipe = prepared(work, loss__caption_dropout=dropout)
    batch = batch_of(recipe, ["rendered3d"] * 8, gen)
    model = InvertsTheForwardProcess(batch["latent_mean"] * SCALING, offset=0.0)
    recipe.loss(model, batch, StepContext(0, torch.device("cpu"), torch.float32, gen, 0, 1))
    null, null_mask = recipe.null_caption
    want = (null.float().expand(8, -1, -1), null_mask.expand(8, -1)) if dropout else \
        (batch["caption_embeds"].float(), batch["caption_mask"])
    assert torch.equal(model.seen["embeds"], want[0]) and torch.equal(model.seen["mask"], want[1])


def keys_of(stream, epoch: int) -> list[str]:
    stream.set_epoch(epoch)
    return [s["key"] for s in stream]


def test_mixed_stream_is_seeded_by_epoch_and_rank_and_follows_the_weights(work, seed):
    cache = str(work / "cache")
    sampler = TTRSampler(TTRConfig(source_weights={"rendered3d": 3.0, "image2d": 1.0}))
    ranks = [mixed_cache.MixedCacheStream(cache, None, None, sampler, seed, 4, rank=r, world_size=2) for r in (0, 1)]
    again = mixed_cache.MixedCacheStream(cache, None, None, sampler, seed, 4, rank=0, world_size=2)
    assert len(ranks[0]) == 8   # rendered3d and image2d samples; synthetic has weight 0
    epochs = [keys_of(ranks[0], e) for e in range(40)]
    assert all(len(k) == 4 for k in epochs) and keys_of(again, 7) == epochs[7]
    assert len({tuple(k) for k in epochs}) > 10, "the order must change from epoch to epoch"
    counts = Counter(k.rstrip("0123456789") for keys in epochs for k in keys)
    assert set(counts) == {"obj", "image2d"} and abs(counts["obj"] / 160 - 0.75) < 5 * (0.75 * 0.25 / 160) ** 0.5
    for r in ranks:
        r.set_epoch(3)
    for source, n in (("rendered3d", 4), ("image2d", 4)):   # one pass of a source: readers split it
        passes = [list(itertools.islice(r._source_stream(source, r.rank, 2), n // 2)) for r in ranks]
        keys = [s["key"] for p in passes for s in p]
        assert len(set(keys)) == n and all(s["source"] == source for p in passes for s in p), keys


def test_export_loads_and_samples(work, tmp_path):
    recipe = recipe_ttr.TTRRecipe(load(work))
    model = recipe.build_model()
    recipe.export(model, str(tmp_path / "model"))
    cfg, loaded = mvdit.load_transformer(str(tmp_path / "model"))
    assert cfg == recipe.model_cfg
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    paths = ttr_inference.sample(str(tmp_path / "model"), "a red chair", str(tmp_path / "s" / "chair.png"), steps=2)
    from PIL import Image

    assert [Image.open(p).size for p in paths] == [(64, 64)] + [(32, 32)] * 4


def _executed_macs(model, inputs: dict) -> int:
    """Multiply-accumulates of one forward of ``model`` as it runs: every ``nn.Linear`` (in x out per
    row it is applied to) and ``nn.Conv2d`` (in / groups x kernel area per output element), and every
    attention module's scores and weighted values (2 x queries x keys x inner width), read from the
    shapes the modules are called with, not from the config."""
    from diffusers.models.attention_processor import Attention

    macs = []

    def linear(m, args, out):
        macs.append(args[0].numel() // m.in_features * m.in_features * m.out_features)

    def conv(m, args, out):
        kh, kw = m.kernel_size
        macs.append(out.numel() * m.in_channels // m.groups * kh * kw)

    def attention(m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]             # [B, Nq, D]
        ctx = kwargs.get("encoder_hidden_states")                     # [B, Nk, Dctx] or None
        keys = x.shape[1] if ctx is None else ctx.shape[1]
        macs.append(2 * x.shape[0] * x.shape[1] * keys * m.inner_dim)

    hooks = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear))
        elif isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, Attention):
            hooks.append(m.register_forward_pre_hook(attention, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return sum(macs)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_step_flops_is_three_forwards_of_the_executed_matmuls_and_attention(gen, learn_sigma):
    """The analytic FLOP model behind the ttr-step MFU against the matmuls and attention the built
    transformer actually executes (counted by hooks on its modules), at a shape whose token count,
    caption length, width and caption channels all differ (16, 24, 64, 40), 3 layers."""
    cfg = mvdit.MVDiTConfig.preset("tiny", num_layers=3, max_caption_tokens=24, grid_size=64, caption_channels=40,
                                   learn_sigma=learn_sigma)
    model = mvdit.build_transformer(cfg, attention_backend="torch")
    B, T = 3, cfg.max_caption_tokens
    s = cfg.latent_size
    inputs = dict(hidden_states=torch.randn(B, cfg.latent_channels, s, s, generator=gen),   # [B, C, h, w]
                  encoder_hidden_states=torch.randn(B, T, cfg.caption_channels, generator=gen),  # [B, T, E]
                  encoder_attention_mask=torch.ones(B, T),                                   # [B, T]
                  timestep=torch.randint(1000, (B,), generator=gen),                         # [B]
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    executed = 2 * _executed_macs(model, inputs)
    assert cfg.forward_flops(B) == executed
    assert cfg.step_flops(B) == 3 * executed
    with pytest.raises(ValueError, match="batch_size must be a positive integer; got 0"):
        cfg.step_flops(0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer; got True"):
        cfg.forward_flops(True)


@pytest.mark.parametrize("name", ["ttr_xl.yaml", "ttr_xl_zero3.yaml"])
def test_xl_configs_use_bootstrap3d_learning_rate(name):
    """Bootstrap3D: lr 8e-5 at a global batch of 1024 for 20K steps; batch_size 32 on its 32 GPUs."""
    cfg = run_config.load_config(os.path.join(ROOT, "train", "configs", name), "ttr")
    assert cfg.batch_size * cfg.grad_accum * 32 == 1024 and cfg.lr == 8e-5 and cfg.max_steps == 20000
