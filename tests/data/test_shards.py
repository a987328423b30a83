"""Multi-view shards: round trip, atomic writes, WebDataset compatibility, disjoint readers, and a
reader that survives malformed and hostile files (fuzzed)."""

import io
import json
import os
import random
import tarfile
import warnings

import pytest
import torch
from helpers import assert_close

from fast3d.data import MultiViewDataset, MultiViewSample, ShardWriter
from fast3d.data.shards import background_color, decode_sample, encode_sample, iter_tar_groups

# 8-bit PNG quantisation: at most half a step of 1/255 (plus float rounding).
QUANT = 0.5 / 255 + 1e-6


def make_sample(gen, key, V=3, H=12, W=10, source="rendered3d", elevation=0.3):
    return MultiViewSample(
        key=key, images=torch.rand(V, 3, H, W, generator=gen), alphas=torch.rand(V, 1, H, W, generator=gen),
        viewmats=torch.randn(V, 4, 4, generator=gen), Ks=torch.rand(V, 3, 3, generator=gen) * 50,
        caption=f"a red striped cylinder on a blue box ({key})", source=source,
        quality=float(torch.rand(1, generator=gen)), elevation=elevation)


def write_dataset(tmp_path, gen, n=7, per_shard=3, **kw):
    samples = [make_sample(gen, f"obj{i:04d}", **kw) for i in range(n)]
    with ShardWriter(str(tmp_path), samples_per_shard=per_shard) as w:
        for s in samples:
            w.write(s)
    return samples, w.written


def test_round_trip_to_8_bit(tmp_path, gen):
    samples, shards = write_dataset(tmp_path, gen)
    assert [os.path.basename(p) for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary files left
    got = list(MultiViewDataset(str(tmp_path), views=3, resolution=12))
    assert [g["key"] for g in got] == [s.key for s in samples]
    for g, s in zip(got, samples):
        assert g["images"].shape == (3, 3, 12, 12) and g["alphas"].shape == (3, 1, 12, 12)
        assert g["caption"] == s.caption and g["source"] == s.source
    # Pixels and cameras at the stored size (the dataset above resized 12x10 to 12x12):
    for (key, group), s in zip(iter_tar_groups(shards[0]), samples):
        d = decode_sample(key, group)
        assert_close(d.images, s.images, atol=QUANT, rtol=0, name="images")
        assert_close(d.alphas, s.alphas, atol=QUANT, rtol=0, name="alphas")
        assert_close(d.viewmats, s.viewmats, atol=0, rtol=1e-6, name="viewmats")
        assert_close(d.Ks, s.Ks, atol=0, rtol=1e-6, name="Ks")
        assert d.quality == pytest.approx(s.quality) and d.elevation == pytest.approx(s.elevation)


def test_resize_scales_intrinsics(tmp_path, gen):
    s = make_sample(gen, "one", V=2, H=16, W=8)
    with ShardWriter(str(tmp_path)) as w:
        w.write(s)
    (g,) = list(MultiViewDataset(str(tmp_path), views=2, resolution=32))
    assert g["images"].shape == (2, 3, 32, 32)
    assert_close(g["Ks"][:, 0], s.Ks[:, 0] * 4, atol=0, rtol=1e-6, name="K row x")   # 8 -> 32
    assert_close(g["Ks"][:, 1], s.Ks[:, 1] * 2, atol=0, rtol=1e-6, name="K row y")   # 16 -> 32
    assert_close(g["Ks"][:, 2], s.Ks[:, 2], atol=0, rtol=1e-6, name="K row 3")


def test_view_selection_and_image2d_tiling(tmp_path, gen):
    many = make_sample(gen, "many", V=6)
    with ShardWriter(str(tmp_path / "many6")) as w:
        w.write(many)
    with ShardWriter(str(tmp_path)) as w:
        w.write(many)
        w.write(make_sample(gen, "single", V=1, source="image2d", elevation=None))
        w.write(make_sample(gen, "few", V=2))
    with pytest.warns(RuntimeWarning, match=r"skipping sample 'few'.*2 views, fewer than views=4"):
        got = {g["key"]: g for g in MultiViewDataset(str(tmp_path), views=4, resolution=12)}
    assert set(got) == {"many", "single"}
    tiled = got["single"]
    assert tiled["images"].shape[0] == 4 and torch.equal(tiled["images"][0], tiled["images"][3])
    assert tiled["source"] == "image2d" and tiled["elevation"] != tiled["elevation"]  # NaN: unknown
    with pytest.warns(RuntimeWarning, match="skipping sample 'few'"):
        r1 = list(MultiViewDataset(str(tmp_path), views=4, resolution=12, random_views=True, seed=1))
    with pytest.warns(RuntimeWarning, match="skipping sample 'few'"):
        r2 = list(MultiViewDataset(str(tmp_path), views=4, resolution=12, random_views=True, seed=1))
    assert torch.equal(r1[0]["viewmats"], r2[0]["viewmats"])  # seeded by the key: reproducible
    ds = MultiViewDataset(str(tmp_path / "many6"), views=4, resolution=12, random_views=True, seed=1)
    subsets = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        subsets.add(tuple(next(iter(ds))["viewmats"][:, 0, 0].tolist()))
    assert len(subsets) > 1  # other epochs, other subsets


def test_webdataset_reads_our_shards(tmp_path, gen):
    wds = pytest.importorskip("webdataset", reason="webdataset (the [dev] extra) is not installed")
    samples, shards = write_dataset(tmp_path, gen, n=4, per_shard=4)
    got = list(wds.WebDataset(shards[0], shardshuffle=False))
    assert [g["__key__"] for g in got] == [s.key for s in samples]
    assert json.loads(got[0]["meta.json"])["source"] == "rendered3d"
    assert {f"rgb_{v:02d}.png" for v in range(3)} <= set(got[0])


@pytest.mark.parametrize("n_shards, readers", [(6, 3), (2, 3), (1, 2)])
def test_readers_see_disjoint_parts_covering_everything(tmp_path, gen, n_shards, readers):
    samples, _ = write_dataset(tmp_path, gen, n=n_shards * 2, per_shard=2, V=1, H=4, W=4)
    seen = []
    for rank in range(readers):
        keys = [g["key"] for g in MultiViewDataset(str(tmp_path), views=1, resolution=4, rank=rank,
                                                   world_size=readers)]
        assert keys, f"rank {rank} got nothing"
        seen += keys
    assert sorted(seen) == sorted(s.key for s in samples)  # disjoint and complete


def test_dataloader_workers_are_disjoint(tmp_path, gen):
    samples, _ = write_dataset(tmp_path, gen, n=6, per_shard=2, V=1, H=4, W=4)
    ds = MultiViewDataset(str(tmp_path), views=1, resolution=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert sorted(g["key"] for g in loader) == sorted(s.key for s in samples)


def test_writer_abort_leaves_only_complete_shards(tmp_path, gen):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(str(tmp_path), samples_per_shard=2) as w:
            for i in range(3):
                w.write(make_sample(gen, f"k{i}", V=1, H=4, W=4))
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.tar"]


@pytest.mark.parametrize("bad, match", [
    (dict(key="has.dot"), "key must be"),
    (dict(source="video"), "source must be one of"),
    (dict(images=torch.rand(2, 4, 4, 4)), r"images must have shape \[V, 3, H, W\]"),
    (dict(viewmats=torch.full((3, 4, 4), float("nan"))), "viewmats must be finite"),
    (dict(Ks=torch.rand(3, 4, 4)), r"Ks must have shape \(3, 3, 3\)"),
])
def test_writer_rejects_bad_samples(tmp_path, gen, bad, match):
    s = make_sample(gen, "ok")
    for k, v in bad.items():
        setattr(s, k, v)
    with pytest.raises(ValueError, match=match):
        ShardWriter(str(tmp_path)).write(s)


def test_duplicate_keys_are_rejected(tmp_path, gen):
    w = ShardWriter(str(tmp_path))
    w.write(make_sample(gen, "same", V=1, H=4, W=4))
    with pytest.raises(ValueError, match="duplicate sample key 'same'"):
        w.write(make_sample(gen, "same", V=1, H=4, W=4))
    w.abort()


def _tar_bytes(members):  # [(name, bytes, type)] -> tar bytes
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_hostile_members_are_ignored_or_rejected(tmp_path, gen):
    good = encode_sample(make_sample(gen, "good", V=1, H=4, W=4))
    members = [(f"good.{k}", v, "file") for k, v in good.items()]
    hostile = [("../evil.caption.txt", b"x", "file"), ("dir/evil.caption.txt", b"x", "file"),
               ("link.rgb_00.png", b"", "sym")]
    path = tmp_path / "hostile.tar"
    path.write_bytes(_tar_bytes(hostile + members))
    keys = [g["key"] for g in MultiViewDataset(str(path), views=1, resolution=4)]
    assert keys == ["good"]
    assert not (tmp_path.parent / "evil.caption.txt").exists()


@pytest.mark.parametrize("field, value, match", [
    ("cameras.json", b"{not json", "unreadable metadata"),
    ("cameras.json", json.dumps({"viewmats": [[[1]]], "Ks": [], "width": 4, "height": 4}).encode(),
     r"viewmats must be \[1\]\[4\]\[4\]"),
    ("meta.json", json.dumps({"source": "video"}).encode(), "source must be one of"),
    ("meta.json", json.dumps({"source": "synthetic", "quality": "NaN"}).encode(), "quality must be a finite"),
    ("rgb_00.png", b"\x89PNG\r\n\x1a\n garbage", "not a readable PNG"),
    ("alpha_00.png", None, "missing rgb_00.png or alpha_00.png"),
    ("caption.txt", b"\xff\xfe\xfa", "unreadable metadata"),
])
def test_malformed_samples_are_skipped_with_a_named_warning(tmp_path, gen, field, value, match):
    members = encode_sample(make_sample(gen, "bad", V=1, H=4, W=4))
    if value is None:
        del members[field]
    else:
        members[field] = value
    ok = encode_sample(make_sample(gen, "fine", V=1, H=4, W=4))
    path = tmp_path / "s.tar"
    path.write_bytes(_tar_bytes([(f"bad.{k}", v, "file") for k, v in members.items()] +
                                [(f"fine.{k}", v, "file") for k, v in ok.items()]))
    with pytest.warns(RuntimeWarning, match=rf"skipping sample 'bad' in .*s\.tar: .*{match}"):
        keys = [g["key"] for g in MultiViewDataset(str(path), views=1, resolution=4)]
    assert keys == ["fine"]


def test_fuzzed_shards_never_crash_the_reader(tmp_path, gen, seed):
    """Random byte flips, truncations and splices of a valid shard: the reader yields well-formed
    samples or skips with warnings; it never raises."""
    _, shards = write_dataset(tmp_path / "src", gen, n=3, per_shard=3, V=2, H=6, W=5)
    data = open(shards[0], "rb").read()
    rng = random.Random(seed)
    for trial in range(60):
        b = bytearray(data)
        op = trial % 3
        if op == 0:
            for _ in range(rng.randint(1, 20)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1:
            b = b[: rng.randrange(len(b))]
        else:
            i, j = sorted(rng.sample(range(len(b)), 2))
            b = b[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(0, 600))) + b[j:]
        path = tmp_path / f"fuzz{trial}.tar"
        path.write_bytes(bytes(b))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for g in MultiViewDataset(str(path), views=2, resolution=6):
                assert g["images"].shape == (2, 3, 6, 6) and torch.isfinite(g["images"]).all()
                assert torch.isfinite(g["viewmats"]).all() and g["source"] in ("synthetic", "rendered3d", "image2d")


@pytest.mark.parametrize("kwargs, match", [
    (dict(views=0), "views must be positive; got 0"),
    (dict(resolution=-1), "resolution must be positive; got -1"),
    (dict(rank=2, world_size=2), "rank and world_size must be given together"),
    (dict(rank=0), "rank and world_size must be given together"),
])
def test_dataset_bad_arguments(tmp_path, gen, kwargs, match):
    write_dataset(tmp_path, gen, n=1, per_shard=1, V=1, H=4, W=4)
    with pytest.raises(ValueError, match=match):
        MultiViewDataset(str(tmp_path), **kwargs)


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(ValueError, match="neither a shard nor a directory"):
        MultiViewDataset(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"no \.tar shards under"):
        MultiViewDataset(str(tmp_path))


def test_background_color_is_what_the_views_were_composited_over(gen):
    colour = torch.rand(2, 3, generator=gen)
    alphas = torch.rand(2, 3, 1, 8, 8, generator=gen).clamp_min(0.5)
    alphas[0, :, :, :2] = 0                                            # sample 0 has empty pixels; sample 1 none
    images = torch.rand(2, 3, 3, 8, 8, generator=gen) * alphas + colour[:, None, :, None, None] * (1 - alphas)
    got = background_color(images, alphas)
    assert_close(got[0], colour[0], atol=1e-6, rtol=0, name="estimated background")
    assert_close(got[1], torch.ones(3), atol=0, rtol=0, name="no empty pixel: white")
