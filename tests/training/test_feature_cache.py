"""fast3d.training.feature_cache: extract a tiny procedural dataset with the tiny random VAE and T5,
read it back (counts, shapes, the VAE's and T5's own outputs), resume and multi-rank runs that write
exactly the missing shards, disjoint readers, refusal of another VAE / text encoder, and clear
errors on corrupted shards and entries.

The dataset and its cache are built once per module (procedural data seed fixed at 0: their content
is not what is tested); the randomness of each test (corruptions) comes from its `gen`."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import pytest
import torch
from helpers import assert_close
from safetensors.torch import load, save
from torch.utils.data import DataLoader

from fast3d.data import MultiViewDataset
from fast3d.datagen import procedural
from fast3d.models.mvdit import MVDiTConfig, build_text_encoder, build_vae, encode_prompts, fingerprint, make_grid
from fast3d.training import feature_cache
from fast3d.training.feature_cache import FeatureCacheDataset, FeatureCacheError

TINY = MVDiTConfig.preset("tiny")
DATA = dict(num_objects=5, views=4, rig="orbit16", resolution=TINY.view_size, gaussians_per_object=600,
            samples_per_shard=2, batch_size=5, save_ply=False)
SHARDS = ["features-000000.tar", "features-000001.tar", "features-000002.tar"]
# bfloat16 caption embeddings: half a unit in the last of 8 significant bits.
BF16_RTOL = 2.0 ** -8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data"))
    procedural.run(out, procedural.ProceduralConfig(seed=0, **DATA))
    return out


@pytest.fixture(scope="module")
def cache(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache") / "cache")
    return out, feature_cache.extract(data, out, TINY, batch_size=2, progress=False)


@pytest.fixture(scope="module")
def models():
    text_encoder, tokenizer = build_text_encoder(TINY)
    vae = build_vae(TINY)
    return vae, text_encoder, tokenizer, fingerprint(vae), fingerprint(text_encoder, tokenizer)


def files(path):
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = f.read()
    return out


def test_extract_writes_a_complete_cache(cache, models):
    path, result = cache
    assert result == dict(result, shards_written=3, shards_skipped=0, samples=5, complete=True)
    counts = [s.replace(".tar", ".json") for s in SHARDS]
    assert sorted(os.listdir(path)) == sorted(["cache.json", "null_caption.safetensors"] + SHARDS + counts)
    with open(os.path.join(path, "cache.json")) as f:
        m = json.load(f)
    assert (m["vae"], m["text_encoder"]) == models[3:]
    assert m == dict(m, complete=True, samples=5, shards=dict(zip(SHARDS, [2, 2, 1])), grid_size=64,
                     latent_shape=[4, 8, 8], scaling_factor=0.18215, caption_tokens=32, caption_channels=32,
                     sources={"synthetic": 0, "rendered3d": 5, "image2d": 0, "boost": 0})


def test_cache_holds_what_the_vae_and_text_encoder_give(cache, data, models):
    vae, text_encoder, tokenizer, vae_fp, text_fp = models
    ds = FeatureCacheDataset(cache[0], expect_vae=vae_fp, expect_text=text_fp)
    got = list(ds)
    ref = list(MultiViewDataset(data, views=4, resolution=TINY.view_size))
    assert len(ds) == 5 and [g["key"] for g in got] == [r["key"] for r in ref]
    for g, r in zip(got, ref):
        assert (g["source"], g["caption"], g["quality"]) == (r["source"], r["caption"], r["quality"])
        assert g["latent_mean"].shape == g["latent_std"].shape == (4, 8, 8) and g["latent_mean"].dtype == torch.float32
        assert g["caption_embeds"].shape == (32, 32) and g["caption_embeds"].dtype == torch.bfloat16
        n = min(len(r["caption"].lower().strip().encode()) + 1, 32)       # ByT5: bytes and </s>
        assert g["caption_mask"].tolist() == [1] * n + [0] * (32 - n)
        assert not g["caption_embeds"][n:].any()
    images = torch.stack([r["images"] for r in ref])
    with torch.no_grad():
        direct = vae.encode(make_grid(images) * 2 - 1).latent_dist
        mean = torch.stack([g["latent_mean"] for g in got])
        assert_close(mean, direct.mean, atol=1e-5, rtol=1e-5, name="latent_mean")
        assert_close(torch.stack([g["latent_std"] for g in got]), direct.std, atol=1e-5, rtol=1e-5, name="latent_std")
        assert_close(vae.decode(mean).sample, vae.decode(direct.mean).sample, atol=1e-4, rtol=1e-4,
                     name="decoded stored mean vs the VAE's own")
    embeds, mask = encode_prompts(text_encoder, tokenizer, [r["caption"] for r in ref], 32)
    assert torch.equal(torch.stack([g["caption_mask"] for g in got]), mask)
    assert_close(torch.stack([g["caption_embeds"] for g in got]).float(), embeds * mask[..., None], atol=1e-6,
                 rtol=BF16_RTOL, name="caption_embeds")
    null, null_mask = ds.null_caption()
    e, m = encode_prompts(text_encoder, tokenizer, [""], 32)
    assert torch.equal(null_mask, m[0]) and null_mask.sum() == 1
    assert_close(null.float(), e[0] * m[0, :, None], atol=1e-6, rtol=BF16_RTOL, name="null caption")


def test_resume_writes_only_the_missing_shards(cache, data, tmp_path):
    path = str(tmp_path / "cache")
    shutil.copytree(cache[0], path)
    before = files(path)
    os.unlink(os.path.join(path, SHARDS[1]))
    for tmp in (f".{SHARDS[1]}.tmp4242", ".features-000001.json.tmp4242"):   # a killed run's partial files
        with open(os.path.join(path, tmp), "wb") as f:
            f.write(b"partial")
    kept = {n: os.stat(os.path.join(path, n)).st_mtime_ns for n in (SHARDS[0], SHARDS[2])}
    result = feature_cache.extract(data, path, TINY, batch_size=2, progress=False)
    assert result == dict(result, shards_written=1, shards_skipped=2, samples=2, complete=True)
    assert {n: os.stat(os.path.join(path, n)).st_mtime_ns for n in kept} == kept, "a complete shard was rewritten"
    assert files(path) == before, "the rewritten shard or the manifest differs from the first run's"


def test_ranks_write_disjoint_shards_and_the_last_completes_the_manifest(cache, data, tmp_path):
    path = str(tmp_path / "cache")
    r0 = feature_cache.extract(data, path, TINY, batch_size=2, rank=0, world_size=2, progress=False)
    assert r0 == dict(r0, shards_written=2, samples=3, complete=False)
    with pytest.raises(FeatureCacheError, match="incomplete feature cache"):
        FeatureCacheDataset(path, None, None)
    r1 = feature_cache.extract(data, path, TINY, batch_size=2, rank=1, world_size=2, progress=False)
    assert r1 == dict(r1, shards_written=1, samples=2, complete=True)
    assert files(path) == files(cache[0])


@pytest.mark.parametrize("world", [2, 4])   # by shard (3 shards >= 2 readers); by entry (3 < 4)
def test_readers_are_disjoint_and_cover_the_cache(cache, world):
    keys = [[s["key"] for s in FeatureCacheDataset(cache[0], None, None, rank=r, world_size=world)]
            for r in range(world)]
    flat = [k for ks in keys for k in ks]
    assert sorted(flat) == [f"obj{i:08d}" for i in range(5)] and len(set(flat)) == 5


def test_dataloader_workers_batch_the_cache(cache):
    loader = DataLoader(FeatureCacheDataset(cache[0], None, None), batch_size=2, num_workers=2)
    batches = list(loader)
    assert sorted(k for b in batches for k in b["key"]) == [f"obj{i:08d}" for i in range(5)]
    assert batches[0]["latent_mean"].shape == (2, 4, 8, 8) and batches[0]["caption_mask"].shape == (2, 32)


def test_another_vae_or_text_encoder_is_refused(cache, data, models, tmp_path):
    vae_fp, text_fp = models[3:]
    with pytest.raises(ValueError, match=f"made with another VAE: its fingerprint is {vae_fp}, "
                                         "expected 0123456789abcdef"):
        FeatureCacheDataset(cache[0], expect_vae="0123456789abcdef", expect_text=text_fp)
    with pytest.raises(ValueError, match=f"made with another text encoder: its fingerprint is {text_fp}, "
                                         "expected fedcba9876543210"):
        FeatureCacheDataset(cache[0], expect_vae=vae_fp, expect_text="fedcba9876543210")
    path = str(tmp_path / "cache")
    shutil.copytree(cache[0], path)
    other = MVDiTConfig.preset("tiny", random_seed=7)
    other_fp = fingerprint(build_vae(other))
    with pytest.raises(ValueError, match=f"a feature cache made with another VAE \\(fingerprint {vae_fp}; "
                                         f"this VAE's is {other_fp}\\)"):
        feature_cache.extract(data, path, other, progress=False)
    with pytest.raises(ValueError, match="differ in \\{'caption_tokens': \\(32, 16\\)\\}"):
        feature_cache.extract(data, path, MVDiTConfig.preset("tiny", max_caption_tokens=16), progress=False)


def rewrite(path, edit):
    """Rewrite a tar shard with ``edit(name, data) -> data | None`` applied to each member (None drops it)."""
    with tarfile.open(path) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t]
    with tarfile.open(path, "w") as t:
        for name, data in members:
            data = edit(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


def _tensors(data, **changes):
    t = load(data)
    t.update(changes)
    return save({k: v for k, v in t.items() if v is not None})


CORRUPTIONS = {  # member suffix -> (edit(data, gen) -> data | None, expected error)
    "garbage": ("features.safetensors", lambda d, g: bytes(torch.randint(0, 256, (len(d),), generator=g).tolist()),
                "not a readable safetensors blob"),
    "pickle": ("features.safetensors", lambda d, g: _pickled(load(d)), "not a readable safetensors blob"),
    "shape": ("features.safetensors", lambda d, g: _tensors(d, latent_mean=torch.randn(4, 8, 7, generator=g)),
              "latent_mean must be float32 \\[4, 8, 8\\]; got float32 \\[4, 8, 7\\]"),
    "dtype": ("features.safetensors", lambda d, g: _tensors(d, caption_embeds=torch.randn(3, 32, generator=g)),
              "caption_embeds must be bfloat16 \\[1..32, 32\\]; got float32 \\[3, 32\\]"),
    "missing tensor": ("features.safetensors", lambda d, g: _tensors(d, latent_std=None),
                       "missing tensor 'latent_std'"),
    "nan": ("features.safetensors", lambda d, g: _tensors(d, latent_std=torch.full((4, 8, 8), float("nan"))),
            "latent_std has non-finite values"),
    "source": ("meta.json", lambda d, g: json.dumps({**json.loads(d), "source": "video"}).encode(),
               "meta.json must hold source"),
    "missing meta": ("meta.json", lambda d, g: None, "missing meta.json"),
}


def _pickled(tensors):
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_corrupted_entry_names_its_shard_and_key(cache, tmp_path, gen, kind):
    path = str(tmp_path / "cache")
    shutil.copytree(cache[0], path)
    suffix, edit, message = CORRUPTIONS[kind]
    rewrite(os.path.join(path, SHARDS[1]),
            lambda name, data: edit(data, gen) if name == f"obj00000003.{suffix}" else data)
    read = iter(FeatureCacheDataset(path, None, None))
    assert [next(read)["key"] for _ in range(3)] == ["obj00000000", "obj00000001", "obj00000002"]
    with pytest.raises(FeatureCacheError, match=f"entry 'obj00000003' of shard .*{SHARDS[1]}: {message}"):
        next(read)


@pytest.mark.parametrize("cut", ["mid-member", "member boundary"])
def test_a_truncated_shard_is_an_error(cache, tmp_path, cut):
    path = str(tmp_path / "cache")
    shutil.copytree(cache[0], path)
    shard = os.path.join(path, SHARDS[0])
    with tarfile.open(shard) as t:
        members = t.getmembers()
    # The second entry's first member: cut inside its data, or just before its header.
    second = next(m for m in members if m.name.startswith("obj00000001"))
    size = second.offset_data + second.size // 2 if cut == "mid-member" else second.offset
    with open(shard, "r+b") as f:
        f.truncate(size)
    match = (f"shard .*{SHARDS[0]}: unreadable" if cut == "mid-member"
             else f"shard .*{SHARDS[0]} has 1 entries; the manifest says 2")
    with pytest.raises(FeatureCacheError, match=match):
        list(FeatureCacheDataset(path, None, None))


@pytest.mark.parametrize("edit, match", [
    (lambda m: "{not json", "cache.json: unreadable"),
    (lambda m: json.dumps({**m, "format": "webdataset"}), "not a fast3d-feature-cache manifest of version 2"),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "vae"}), "missing keys \\['vae'\\]"),
    (lambda m: json.dumps({**m, "latent_shape": [4, 8]}), "latent_shape \\[C, h, w\\] must be positive ints"),
    (lambda m: json.dumps({**m, "shards": {"../../x.tar": 2}}), "shards must map features-NNNNNN.tar names"),
], ids=["json", "format", "key", "shape", "traversal"])
def test_a_malformed_manifest_is_named(cache, tmp_path, edit, match):
    path = str(tmp_path / "cache")
    shutil.copytree(cache[0], path)
    with open(os.path.join(path, "cache.json")) as f:
        manifest = json.load(f)
    with open(os.path.join(path, "cache.json"), "w") as f:
        f.write(edit(manifest))
    with pytest.raises(FeatureCacheError, match=match):
        FeatureCacheDataset(path, None, None)


def test_bad_arguments_and_paths_are_named(tmp_path, data):
    with pytest.raises(ValueError, match="cfg must be an MVDiTConfig; got dict"):
        feature_cache.extract(data, str(tmp_path / "c"), {"grid_size": 64})
    with pytest.raises(ValueError, match="batch_size must be a positive int; got 0"):
        feature_cache.extract(data, str(tmp_path / "c"), TINY, batch_size=0)
    with pytest.raises(ValueError, match="0 <= rank < world_size; got rank=2, world_size=2"):
        feature_cache.extract(data, str(tmp_path / "c"), TINY, rank=2, world_size=2)
    with pytest.raises(ValueError, match="is neither a shard nor a directory of shards"):
        feature_cache.extract(str(tmp_path / "absent"), str(tmp_path / "c"), TINY)
    with pytest.raises(FeatureCacheError, match="has no cache.json"):
        FeatureCacheDataset(str(tmp_path), None, None)


def write_orbits(out, gen, frames=16, n=2, elevation_deg=20.0):
    """``n`` samples of a ``frames``-view turntable orbit (uniform azimuths from 0), every view its own
    random image; returns what the shards hold ([n, frames, 3, R, R], 8-bit)."""
    from fast3d import cameras
    from fast3d.data.shards import MultiViewSample, ShardWriter

    R = TINY.view_size
    viewmats, Ks = cameras.turntable(frames, R, elevation_deg=elevation_deg)
    videos = torch.rand(n, frames, 3, R, R, generator=gen)
    with ShardWriter(str(out), prefix="orbit", samples_per_shard=n) as w:
        for i in range(n):
            w.write(MultiViewSample(key=f"orbit{i}", images=videos[i], alphas=torch.ones(frames, 1, R, R),
                                    viewmats=viewmats.float(), Ks=Ks.float(), caption="a thing", source="synthetic"))
    return torch.stack([s["images"] for s in MultiViewDataset(str(out), views=frames, resolution=R)])


def test_the_grid_holds_views_spread_over_the_orbit(tmp_path, gen, models):
    """Defect: the cache took each sample's first 4 frames (0, 22.5, 45, 67.5 degrees of a 16-frame
    orbit) for the 2x2 grid; it must take the views at 0, 90, 180 and 270 degrees (or the
    configured azimuths)."""
    videos = write_orbits(tmp_path / "data", gen)
    vae = models[0]
    for azimuths, idx in (((0, 90, 180, 270), [0, 4, 8, 12]), ((0, 45, 180, 315), [0, 2, 8, 14])):
        out = str(tmp_path / f"cache{idx[1]}")
        kw = {} if azimuths == (0, 90, 180, 270) else {"grid_azimuths": azimuths}
        feature_cache.extract(str(tmp_path / "data"), out, TINY, batch_size=2, progress=False, **kw)
        got = torch.stack([g["latent_mean"] for g in FeatureCacheDataset(out, None, None)])
        with torch.no_grad():
            want = vae.encode(make_grid(videos[:, idx]) * 2 - 1).latent_dist.mean
        assert_close(got, want, atol=1e-5, rtol=1e-5, name=f"grid latents at azimuths {azimuths}")


def test_grid_view_indices_and_azimuth_errors(tmp_path, gen):
    from fast3d import cameras

    viewmats, _ = cameras.turntable(24, 16)
    idx, gap = feature_cache.grid_view_indices(viewmats)
    assert idx.tolist() == [0, 6, 12, 18] and gap < 1e-6
    # the first 4 frames of this orbit (15-degree steps) have no view near 90 degrees: such a sample is skipped
    viewmats4 = viewmats[:4]
    assert feature_cache.grid_view_indices(viewmats4)[1] > feature_cache.max_azimuth_gap((0, 90, 180, 270))
    with pytest.raises(ValueError, match=r"grid_azimuths must be 4 distinct finite azimuths .* got \(0, 90, 450, 270\)"):
        feature_cache.check_azimuths((0, 90, 450, 270))
    with pytest.raises(ValueError, match=r"grid_azimuths must be 4 distinct"):
        feature_cache.check_azimuths((0, 90, 180))
