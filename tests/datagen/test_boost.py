"""``fast3d datagen boost`` on tiny random models: the chain (mvdiff -> LGM -> renders -> SDEdit
refinement) into ``boost`` shards that MultiViewDataset reads, the preview, bad images skipped and
counted, resume after a kill (finished shards and finished items kept), the split over readers and
seeded reproducibility, and the errors on bad arguments."""

import json
import os
import tarfile

import numpy as np
import pytest
import torch
from helpers import object_png
from PIL import Image

from fast3d.cli import main as cli_main
from fast3d.data import MultiViewDataset
from fast3d.data.shards import ShardWriter
from fast3d.datagen import boost
from fast3d.inference.generate import object_fraction
from fast3d.inference.preprocess import preprocess
from fast3d.io.images import read_image
from fast3d.models.lgm import LGM, LGMConfig
from fast3d.models.mvdiff import MVDiffConfig, MVDiffusion

# 2 sampler steps, strength 0.5: the refinement runs int(2 * 0.5) = 1 step; no guidance (one batch)
FAST = dict(steps=2, strength=0.5, guidance=1.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random models: mvdiff on the lgm4 rig (the LGM's input rig), mvdiff on era3d6 (another
    rig) and an LGM."""
    root = tmp_path_factory.mktemp("boost_models")
    torch.manual_seed(0)
    d = {k: str(root / k) for k in ("mv4", "mv6", "lgm")}
    MVDiffusion(MVDiffConfig.preset("tiny")).save_pretrained(d["mv4"])
    MVDiffusion(MVDiffConfig.preset("tiny", rig="era3d6")).save_pretrained(d["mv6"])
    LGM(LGMConfig.preset("tiny")).save_pretrained(d["lgm"])
    return d


def _object_png(path, gen, size=(50, 40)):
    """helpers.object_png written to ``path``."""
    with open(path, "wb") as f:
        f.write(object_png(gen, size))
    return str(path)


def _tar_members(path):
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def _png(data):
    import io

    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1).float() / 255


@pytest.mark.slow
def test_cli_end_to_end_shards_preview_and_bad_image(models, tmp_path, gen, capsys):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    a = _object_png(imgs / "a.png", gen)
    (imgs / "a.txt").write_text("a striped box\n")
    _object_png(imgs / "c.png", gen, size=(30, 44))
    (imgs / "b.png").write_bytes(b"this is not a PNG")
    out = str(tmp_path / "ds")
    rc = cli_main(["datagen", "boost", "--images", str(imgs), "--mv-model", models["mv4"], "--recon", models["lgm"],
                   "--out", out, "--steps", "2", "--strength", "0.5", "--guidance", "1", "--seed", "5",
                   "--samples-per-shard", "2", "--preview", "2"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards_written"] == 2 and summary["samples"] == 2
    assert list(summary["bad_images"]) == [str(imgs / "b.png")] and "not a readable image" in \
        summary["bad_images"][str(imgs / "b.png")]
    assert sorted(os.listdir(out)) == ["boost-000000.tar", "boost-000001.tar", "dataset.json", "partial", "preview"]
    assert os.listdir(os.path.join(out, "partial")) == []  # items leave it once their shard is written

    mv = MVDiffusion.from_pretrained(models["mv4"])
    R, V = mv.config.resolution, mv.num_views
    rig_vm, rig_K = mv.rig_cameras(R)
    samples = {s["key"]: s for s in MultiViewDataset(out, views=V, resolution=R)}
    assert sorted(samples) == ["boost00000000", "boost00000002"]  # a, c; b (item 1) skipped
    for s in samples.values():
        assert s["source"] == "boost" and s["images"].shape == (V, 3, R, R)
        torch.testing.assert_close(s["viewmats"], rig_vm.float(), atol=1e-5, rtol=0)
        torch.testing.assert_close(s["Ks"], rig_K.float(), atol=1e-4, rtol=0)
    assert samples["boost00000000"]["caption"] == "a striped box" and samples["boost00000002"]["caption"] == ""

    # the stored views are the chain's: the same item recomputed through the pipeline's stages
    pipe = boost.Pipeline(models["mv4"], models["lgm"], boost.BoostConfig(seed=5, **FAST), "cpu")
    st = pipe.item(a, 0)
    assert (samples["boost00000000"]["images"] - st["refined"]).abs().max() <= 0.5 / 255 + 1e-6
    assert (samples["boost00000000"]["alphas"] - st["alphas"]).abs().max() <= 0.5 / 255 + 1e-6
    # refinement changed the renders, and the renders are not the diffusion views
    assert (st["refined"] - st["renders"]).abs().mean() > 1e-3
    assert (st["renders"] - st["views"]).abs().mean() > 1e-3
    # the input image rides along, as generate preprocesses it
    members = _tar_members(os.path.join(out, "boost-000000.tar"))
    want, _ = preprocess(read_image(a), R, object_fraction(pipe.mv), mv.config.background)
    assert (_png(members["boost00000000.input.png"]) - want).abs().max() <= 0.5 / 255 + 1e-6

    # previews for items < 2 that are images: item 0 only; 4 rows of V tiles, row 2 the diffusion views
    assert os.listdir(os.path.join(out, "preview")) == ["boost00000000.png"]
    prev = np.array(Image.open(os.path.join(out, "preview", "boost00000000.png")))
    assert prev.shape == (4 * R, V * R, 3)
    row1 = torch.from_numpy(prev[R:2 * R]).permute(2, 0, 1).float() / 255
    assert (row1 - torch.cat(list(st["views"]), dim=-1)).abs().max() <= 0.5 / 255 + 1e-6


@pytest.mark.slow
def test_resume_after_kill_split_over_readers_and_seeded(models, tmp_path, gen, monkeypatch):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for n in ("x", "y"):
        _object_png(imgs / f"{n}.png", gen)
    paths = boost.collect_images(str(imgs))
    cfg = boost.BoostConfig(seed=2, samples_per_shard=1, preview=0, **FAST)
    out = str(tmp_path / "ds")

    real_write = ShardWriter.write

    def killed_write(self, sample, key=None):  # the kill: while shard 1 is being written
        if self.index == 1:
            raise KeyboardInterrupt
        return real_write(self, sample, key)

    monkeypatch.setattr(ShardWriter, "write", killed_write)
    with pytest.raises(KeyboardInterrupt):
        boost.generate(out, paths, models["mv4"], models["lgm"], cfg, progress=False)
    monkeypatch.setattr(ShardWriter, "write", real_write)
    assert os.path.isfile(os.path.join(out, "boost-000000.tar"))
    assert not os.path.exists(os.path.join(out, "boost-000001.tar"))
    assert os.listdir(os.path.join(out, "partial")) == ["boost00000001.tar"]  # the finished item is kept
    shard0 = open(os.path.join(out, "boost-000000.tar"), "rb").read()
    stale = os.path.join(out, ".boost-000001.tar.tmp99999")  # what a real kill leaves
    open(stale, "wb").write(b"partial tar")

    calls = []
    real_item = boost.Pipeline.item
    monkeypatch.setattr(boost.Pipeline, "item", lambda self, p, i: calls.append(i) or real_item(self, p, i))
    r = boost.generate(out, paths, models["mv4"], models["lgm"], cfg, progress=False)
    assert calls == [] and not os.path.exists(stale)
    assert (r["shards_written"], r["shards_skipped"], r["resumed_items"], r["samples"]) == (1, 1, 1, 1)
    assert open(os.path.join(out, "boost-000000.tar"), "rb").read() == shard0

    # an uninterrupted run split over two readers writes the same bytes
    other = str(tmp_path / "ds2")
    r0 = boost.generate(other, paths, models["mv4"], models["lgm"], cfg, reader=0, readers=2, progress=False)
    assert calls == [0] and r0["shards_written"] == 1
    boost.generate(other, paths, models["mv4"], models["lgm"], cfg, reader=1, readers=2, progress=False)
    assert calls == [0, 1]
    for j in (0, 1):
        n = f"boost-{j:06d}.tar"
        assert open(os.path.join(out, n), "rb").read() == open(os.path.join(other, n), "rb").read()

    # another configuration in the same directory is refused
    with pytest.raises(ValueError, match="holds another dataset"):
        boost.generate(out, paths, models["mv4"], models["lgm"], boost.BoostConfig(seed=3, samples_per_shard=1,
                                                                                   **FAST), progress=False)


def test_item_seeds_depend_on_seed_and_index_only():
    a = boost.BoostConfig(seed=1)
    assert boost.item_seeds(a, 4) == boost.item_seeds(boost.BoostConfig(seed=1, samples_per_shard=3), 4)
    seeds = {boost.item_seeds(a, i) for i in range(20)} | {boost.item_seeds(boost.BoostConfig(seed=2), i)
                                                           for i in range(20)}
    assert len(seeds) == 40 and all(s0 != s1 for s0, s1 in seeds)


@pytest.mark.parametrize("kw, match", [
    (dict(strength=0.0), "--strength"), (dict(strength=1.5), "--strength"), (dict(strength=float("nan")), "--strength"),
    (dict(steps=0), "--steps"), (dict(scheduler="pndm"), "--scheduler"), (dict(samples_per_shard=0),
                                                                         "--samples-per-shard"),
    (dict(steps=1, strength=0.5), "one sampler step"),
])
def test_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        boost.BoostConfig(**kw).validate()


def test_bad_inputs_fail_before_any_item(models, tmp_path, gen, monkeypatch):
    img = _object_png(tmp_path / "a.png", gen)
    monkeypatch.setattr(boost.Pipeline, "item", lambda *a: pytest.fail("an item ran"))
    with pytest.raises(ValueError, match=r"--recon .* does not take the views of --mv-model .*era3d6"):
        boost.run([img], models["mv6"], models["lgm"], str(tmp_path / "o1"), boost.BoostConfig(**FAST))
    with pytest.raises(ValueError, match=r"--views must be distinct indices in \[0, 4\)"):
        boost.run([img], models["mv4"], models["lgm"], str(tmp_path / "o2"), boost.BoostConfig(views=(0, 7), **FAST))
    with pytest.raises(ValueError, match="--mv-model .* holds a 'lgm' model"):
        boost.run([img], models["lgm"], models["lgm"], str(tmp_path / "o3"), boost.BoostConfig(**FAST))
    with pytest.raises(ValueError, match="--images .* is not a file"):
        boost.run([str(tmp_path / "missing.png")], models["mv4"], models["lgm"], str(tmp_path / "o4"),
                  boost.BoostConfig(**FAST))
    lst = tmp_path / "list.txt"
    lst.write_text("# inputs\n\na.png\n")
    assert boost.collect_images(str(lst)) == [img]
    rc = cli_main(["datagen", "boost", "--images", img, "--mv-model", models["mv4"], "--recon", models["lgm"],
                   "--out", str(tmp_path / "o5"), "--strength", "1.2"])
    assert rc == 2
