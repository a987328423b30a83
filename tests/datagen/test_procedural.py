"""`fast3d datagen procedural`: shards that read back, renders that the saved PLY reproduces,
output independent of the work split, and resumption after a kill that writes exactly what is
missing."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import assert_close

import fast3d
from fast3d.data import MultiViewDataset
from fast3d.data.shards import decode_sample, iter_tar_groups
from fast3d.datagen import procedural

SMALL = dict(num_objects=5, views=4, rig="orbit16", resolution=24, gaussians_per_object=600, samples_per_shard=2,
             batch_size=2)


def shard_bytes(out):
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out)) if f.endswith(".tar")}


def test_shards_read_back(tmp_path, seed):
    cfg = procedural.ProceduralConfig(seed=seed, **SMALL)
    (r,) = procedural.run(str(tmp_path), cfg)
    assert r == dict(r, shards_written=3, shards_skipped=0, samples=5)
    got = list(MultiViewDataset(str(tmp_path), views=4, resolution=24))
    assert [g["key"] for g in got] == [f"obj{i:08d}" for i in range(5)]
    for g in got:
        assert g["images"].shape == (4, 3, 24, 24) and g["source"] == "rendered3d"
        assert 0 <= g["elevation"] <= 0.786 and g["caption"].startswith(("a ", "an "))
        assert g["alphas"].amax() > 0.5 and g["alphas"].amin() < 0.01  # an object on a background


def test_saved_ply_and_cameras_reproduce_the_saved_images(tmp_path, seed):
    cfg = procedural.ProceduralConfig(seed=seed, **SMALL)
    procedural.run(str(tmp_path), cfg)
    for key, group in iter_tar_groups(os.path.join(tmp_path, "procedural-000001.tar")):
        s = decode_sample(key, group)
        g = fast3d.io.load_ply(os.path.join(tmp_path, "assets", f"{key}.ply"))
        rgb, alpha, _ = fast3d.rasterization(g["means"], g["quats"], g["scales"], g["opacities"], g["sh"],
                                             s.viewmats, s.Ks, s.images.shape[-1], s.images.shape[-2], sh_degree=0,
                                             backgrounds=torch.ones(4, 3))
        # 8-bit storage: half a quantisation step, plus float32 noise of the PLY's log/logit round trip.
        assert_close(rgb.permute(0, 3, 1, 2), s.images, atol=0.5 / 255 + 2e-4, rtol=0, name=f"{key} rgb")
        assert_close(alpha.permute(0, 3, 1, 2), s.alphas, atol=0.5 / 255 + 2e-4, rtol=0, name=f"{key} alpha")


def test_output_does_not_depend_on_the_split(tmp_path, seed):
    cfg = procedural.ProceduralConfig(seed=seed, **SMALL)
    procedural.generate(str(tmp_path / "one"), cfg, progress=False)
    for reader in (1, 0, 2):  # any order
        procedural.generate(str(tmp_path / "three"), cfg, reader, 3, progress=False)
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "three")


def test_rerun_writes_exactly_the_missing_shards(tmp_path, seed):
    cfg = procedural.ProceduralConfig(seed=seed, **SMALL)
    out = str(tmp_path)
    procedural.run(out, cfg)
    before = shard_bytes(out)
    kept = os.stat(os.path.join(out, "procedural-000000.tar")).st_mtime_ns
    os.unlink(os.path.join(out, "procedural-000001.tar"))
    open(os.path.join(out, ".procedural-000001.tar.tmp999"), "wb").write(b"half a shard")  # a killed writer's
    open(os.path.join(out, "assets", ".obj00000002.ply.tmp999"), "wb").write(b"half a PLY")
    (r,) = procedural.run(out, cfg)
    assert (r["shards_written"], r["shards_skipped"], r["samples"]) == (1, 2, 2)
    assert shard_bytes(out) == before
    assert os.stat(os.path.join(out, "procedural-000000.tar")).st_mtime_ns == kept
    assert not [f for f in os.listdir(out) + os.listdir(os.path.join(out, "assets")) if ".tmp" in f]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_dataset(tmp_path, seed):
    args = ["--num-objects", "24", "--views", "4", "--resolution", "96", "--gaussians", "20000",
            "--samples-per-shard", "2", "--batch-size", "1", "--seed", str(seed)]
    cmd = [sys.executable, "-m", "fast3d.cli", "datagen", "procedural"]
    killed = str(tmp_path / "killed")
    p = subprocess.Popen(cmd + ["--out", killed] + args, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.isdir(killed) and any(f.endswith(".tar") for f in os.listdir(killed))):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    partial = shard_bytes(killed)
    assert 0 < len(partial) < 12, "the kill should land mid-run"
    subprocess.run(cmd + ["--out", killed] + args, check=True, stderr=subprocess.DEVNULL)
    whole = str(tmp_path / "whole")
    subprocess.run(cmd + ["--out", whole] + args, check=True, stderr=subprocess.DEVNULL)
    assert shard_bytes(killed) == shard_bytes(whole)
    assert sorted(os.listdir(os.path.join(killed, "assets"))) == sorted(os.listdir(os.path.join(whole, "assets")))


def test_another_dataset_in_the_directory_is_refused(tmp_path):
    procedural.run(str(tmp_path), procedural.ProceduralConfig(**SMALL))
    with pytest.raises(ValueError, match="holds another dataset"):
        procedural.run(str(tmp_path), procedural.ProceduralConfig(**dict(SMALL, seed=1)))
    procedural.run(str(tmp_path), procedural.ProceduralConfig(**dict(SMALL, batch_size=3)))  # same samples: fine
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.tar").write_bytes(b"someone else's")
    with pytest.raises(ValueError, match=r"not empty and holds no dataset.json \(found \['train.tar'\]\)"):
        procedural.run(str(other), procedural.ProceduralConfig(**SMALL))
    assert (other / "train.tar").read_bytes() == b"someone else's"


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_objects=0), "num_objects must be a positive integer; got 0"),
    (dict(rig="spiral"), "rig must be one of orbit16, zero123pp, mvdream, random; got 'spiral'"),
    (dict(rig="mvdream", views=6), "rig 'mvdream' has 4 views; got views=6"),
    (dict(background="black"), "background must be 'white' or 'random'; got 'black'"),
    (dict(gaussians_per_object=8), "gaussians_per_object must be >= 16; got 8"),
])
def test_bad_configuration(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        procedural.run(str(tmp_path), procedural.ProceduralConfig(**dict(SMALL, **kwargs)))
    assert not os.listdir(tmp_path)


def test_cli_bad_arguments_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fast3d.cli", "datagen", "procedural", "--out", str(tmp_path),
                        "--rig", "spiral"], capture_output=True, text=True)
    assert r.returncode == 2 and "rig must be one of" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_rank_from_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert procedural.reader_from_env(1, 3) == (4, 6)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK must be in"):
        procedural.reader_from_env(0, 1)
