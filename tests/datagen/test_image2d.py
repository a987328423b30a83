"""`fast3d datagen images`: a folder of images (every PIL mode read_image converts, nested folders,
files of other kinds ignored) becomes image2d shards of 4 identical views with the caption stage's
captions; unreadable files are skipped, counted and named while the run goes on; reruns write
nothing, a deleted shard comes back byte-identical, another configuration is refused."""

import json
import os

import pytest
import torch
from helpers import assert_close
from PIL import Image

from fast3d.cli import main
from fast3d.data import MultiViewDataset
from fast3d.datagen.image2d import images_to_shards, square
from fast3d.datagen.pipeline.stages import Recaptioner
from fast3d.io.images import read_image

# Tolerances of this module, each with its reason.
TOL = {
    # views and alpha are stored as 8-bit PNG: half a level off the float image
    "png": dict(atol=0.5 / 255 + 1e-6, rtol=0),
}
R = 16


def make_folder(root, gen):
    """5 readable images (RGB, RGBA, grey, palette, wide and tall, one in a sub-folder), 2 unreadable
    ones (random bytes named .jpg, a truncated PNG) and a text file; returns the readable paths."""
    def pixels(h, w, c):
        return (torch.rand(h, w, c, generator=gen) * 255).to(torch.uint8).numpy()

    os.makedirs(root / "sub")
    Image.fromarray(pixels(20, 30, 3)).save(root / "a_rgb.png")
    Image.fromarray(pixels(40, 24, 4), "RGBA").save(root / "b_rgba.png")
    Image.fromarray(pixels(16, 16, 1)[..., 0], "L").save(root / "c_grey.png")
    Image.fromarray(pixels(18, 18, 3)).convert("P").save(root / "d_palette.png")
    Image.fromarray(pixels(24, 24, 3)).save(root / "sub" / "e_nested.jpg", quality=95)
    (root / "f_noise.jpg").write_bytes(bytes(torch.randint(0, 256, (300,), generator=gen).tolist()))
    good = (root / "a_rgb.png").read_bytes()
    (root / "g_truncated.png").write_bytes(good[: len(good) // 2])
    (root / "notes.txt").write_text("not an image")
    return [root / n for n in ("a_rgb.png", "b_rgba.png", "c_grey.png", "d_palette.png", "sub/e_nested.jpg")]


def test_images_become_tiled_captioned_shards(tmp_path, gen):
    files = make_folder(tmp_path / "imgs", gen)
    out = str(tmp_path / "out")
    r = images_to_shards(str(tmp_path / "imgs"), out, "random-tiny", resolution=R, samples_per_shard=3,
                         max_tokens=5, progress=False)
    assert r["written"] == 5 and r["unreadable"] == 2 and r["shards_written"] == 3
    assert sorted(os.path.basename(p) for p in r["unreadable_files"]) == ["f_noise.jpg", "g_truncated.png"]
    assert r["total_samples"] == 5 and r["total_unreadable"] == 2
    # sorted order: a b c d f g sub/e -> indices 0 1 2 3 (4, 5 unreadable) 6
    samples = {s["key"]: s for s in MultiViewDataset(out, views=4, resolution=R)}
    keys = ["img2d00000000", "img2d00000001", "img2d00000002", "img2d00000003", "img2d00000006"]
    assert sorted(samples) == keys
    captioner = Recaptioner("random-tiny", 5, torch.device("cpu"))
    for key, path in zip(keys, files):
        s = samples[key]
        rgb, alpha = square(read_image(str(path)), R)
        assert s["source"] == "image2d" and s["images"].shape == (4, 3, R, R)
        assert all(torch.equal(s["images"][0], s["images"][v]) for v in range(1, 4)), "4 identical tiles"
        assert_close(s["images"][0], rgb, **TOL["png"], name=f"{key} image")
        assert_close(s["alphas"][0], alpha, **TOL["png"], name=f"{key} alpha")
        assert s["caption"] == captioner(rgb[None])[0]
        assert torch.equal(s["viewmats"][0], s["viewmats"][3])
    assert float(samples["img2d00000001"]["alphas"].min()) < 1  # the RGBA file keeps its alpha
    assert bool((samples["img2d00000000"]["alphas"] == 1).all())
    # a rerun writes nothing; a deleted shard comes back byte-identical
    shards = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    before = {n: open(os.path.join(out, n), "rb").read() for n in shards}
    again = images_to_shards(str(tmp_path / "imgs"), out, "random-tiny", resolution=R, samples_per_shard=3,
                             max_tokens=5, progress=False)
    assert again["shards_written"] == 0 and again["total_unreadable"] == 2 and again["total_samples"] == 5
    os.unlink(os.path.join(out, shards[1]))
    again = images_to_shards(str(tmp_path / "imgs"), out, "random-tiny", resolution=R, samples_per_shard=3,
                             max_tokens=5, progress=False)
    assert again["shards_written"] == 1 and again["unreadable"] == 2
    assert {n: open(os.path.join(out, n), "rb").read() for n in shards} == before
    with pytest.raises(ValueError, match="holds another dataset"):
        images_to_shards(str(tmp_path / "imgs"), out, "random-tiny", resolution=2 * R, samples_per_shard=3,
                         progress=False)


def test_square_crops_the_centre():
    x = torch.zeros(4, 4, 8)
    x[3] = 1
    x[0, :, 2:6] = 1                           # a red centre square on black
    rgb, alpha = square(x, 4)
    assert torch.equal(rgb[0], torch.ones(4, 4)) and torch.equal(alpha, torch.ones(1, 4, 4))
    x[3, :, 2:6] = 0                           # transparent centre: white shows through
    rgb, _ = square(x, 4)
    assert torch.equal(rgb, torch.ones(3, 4, 4))


def test_cli_and_bad_input(tmp_path, gen, capsys):
    make_folder(tmp_path / "imgs", gen)
    out = tmp_path / "out"
    assert main(["datagen", "images", "--images", str(tmp_path / "imgs"), "--out", str(out), "--caption-model",
                 "random-tiny", "--resolution", "8", "--samples-per-shard", "10", "--max-tokens", "3"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["written"] == 5 and r["unreadable"] == 2
    (tmp_path / "empty").mkdir()
    for argv, match in [(["--images", str(tmp_path / "none")], "images must be a directory"),
                        (["--images", str(tmp_path / "empty")], "holds no image files"),
                        (["--images", str(tmp_path / "imgs"), "--caption-model", "/nonexistent/blip"],
                         "caption_model must be 'random-tiny' or a local model directory"),
                        (["--images", str(tmp_path / "imgs"), "--resolution", "0"], "resolution must be a positive")]:
        full = ["datagen", "images", "--out", str(tmp_path / "o2"), "--caption-model", "random-tiny", *argv]
        assert main(full) == 2
        assert match in capsys.readouterr().err
