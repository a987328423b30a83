"""evaluate_generated with stand-in generators whose answers are known: a generator that returns
its input image scores CLIP image similarity 1; one that returns the reference images themselves
scores FID 0 through the whole file pipeline; unreadable reference images are skipped and counted;
a generator that fails part-way resumes; the report's pieces (Markdown, compare, the row log)."""

import json
import os

import pytest
import torch

from fast3d.evaluation.generative import evaluate_generated, images_dir
from fast3d.evaluation.report import SampleLog, compare_reports, markdown_table
from fast3d.inference.common import save_image

CLIP_ATOL = 1e-5  # one image embedded twice by one float32 model
FID_SELF = 1e-6   # a set against itself, through PNG files: the same 8-bit pixels on both sides


def _pngs(folder, gen, n, size=16):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(os.path.join(folder, f"{i:02d}.png"))
        save_image(torch.rand(3, size, size, generator=gen), paths[-1])
    return paths


def test_identity_generator_scores_clip_image_1_and_fid_0(tmp_path, gen):
    ref = _pngs(str(tmp_path / "ref"), gen, 18)
    (tmp_path / "ref" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    inputs = ref[:6]

    def identity(i, prompt, image, stem):  # each sample: its input image, then 2 more reference images
        paths = [f"{stem}_{j}.png" for j in range(3)]
        for p, src in zip(paths, [image, ref[6 + 2 * i], ref[7 + 2 * i]]):
            with open(src, "rb") as a, open(p, "wb") as b:
                b.write(a.read())
        return paths

    out = str(tmp_path / "r.json")
    r = evaluate_generated(identity, None, out, model="identity", data="inputs", kind="test", clips=["random-tiny"],
                           fid_backbone="random-tiny", reference=str(tmp_path / "ref"), images=inputs)
    assert r["samples"] == 6 and r["input_images"] == 6
    assert r["skipped"] == [{"path": str(tmp_path / "ref" / "zz_broken.png"),
                             "reason": r["skipped"][0]["reason"]}] and "not a readable image" in r["skipped"][0]["reason"]
    # views: the input (similarity 1) and two other images; the mean over views is (1 + s1 + s2) / 3
    from fast3d.evaluation.clip_metrics import load_clip
    from fast3d.evaluation.generative import _load

    clip = load_clip("random-tiny")
    for row in r["per_sample"]:
        views = _load([os.path.join(images_dir(out), p) for p in row["images"]], "views")
        e = clip.embed_images(views)
        assert abs(float(e[0] @ e[0]) - 1) < CLIP_ATOL
        expected = float((e @ e[0]).mean())
        assert abs(row["clip_image:clip-random-tiny"] - expected) < CLIP_ATOL
    # the 18 generated images are the 18 readable reference images: FID 0
    assert abs(r["set_metrics"]["fid:random-tiny-conv"]) < FID_SELF
    assert "clip_r:clip-random-tiny" not in r["mean"], "no prompts, no CLIP-R"


def test_a_generator_that_fails_part_way_resumes(tmp_path, gen):
    prompts = ["a", "b", "c"]
    src = _pngs(str(tmp_path / "src"), gen, 3)
    calls = []

    def flaky(i, prompt, image, stem):
        calls.append(i)
        if i == 2 and len(calls) == 3:
            raise RuntimeError("killed")
        return [src[i]]

    out = str(tmp_path / "r.json")
    kw = dict(model="m", data="p", kind="test", clips=["random-tiny"])
    with pytest.raises(RuntimeError, match="killed"):
        evaluate_generated(flaky, prompts, out, **kw)
    r = evaluate_generated(flaky, prompts, out, **kw)
    assert calls == [0, 1, 2, 2] and [row["key"] for row in r["per_sample"]] == ["p00000", "p00001", "p00002"]
    with pytest.raises(ValueError, match="needs at least 2 prompts"):
        evaluate_generated(flaky, ["a"], out, **kw)
    with pytest.raises(ValueError, match="FID needs both a backbone"):
        evaluate_generated(flaky, prompts, out, fid_backbone="random-tiny", **kw)


def test_sample_log_keeps_whole_rows_of_the_same_settings(tmp_path):
    out = str(tmp_path / "r.json")
    log = SampleLog(out, {"model": "m", "n": 1})
    log.add({"key": "a", "psnr": 1.0})
    log.add({"key": "b", "psnr": 2.0})
    with open(log.path, "a") as f:
        f.write('{"key": "c", "ps')  # a kill mid-row
    again = SampleLog(out, {"model": "m", "n": 1})
    assert again.resumed == 2 and again.done("b") and not again.done("c")
    again.add({"key": "c", "psnr": 3.0})
    assert [json.loads(ln)["key"] for ln in open(log.path).read().splitlines()[1:]] == ["a", "b", "c"]
    other = SampleLog(out, {"model": "m", "n": 2})
    assert other.resumed == 0 and not other.done("a")


def test_compare_flags_other_backbones_and_markdown_names_them(tmp_path):
    a = {"model": "/m/a", "data": "/d/gso", "samples": 2, "commit": "abc", "backbones": {"fid:x": "x", "lpips": "lpips-vgg"},
         "set_metrics": {"fid:x": 10.0}, "mean": {"psnr": 20.0, "lpips": 0.2, "precision": 0.5}}
    b = dict(a, model="/m/b", backbones={"fid:x": "x", "lpips": "lpips-vgg-random"}, set_metrics={"fid:x": 8.0},
             mean={"psnr": 19.5, "lpips": 0.1, "ssim": 0.9})
    text = compare_reports(a, b)
    lines = {ln.split("  ")[0]: ln for ln in text.splitlines()[3:]}
    assert "-0.5" in lines["PSNR"] and lines["PSNR"].endswith("A better")
    assert lines["FID (x)"].endswith("B better") and "-2" in lines["FID (x)"]
    assert "backbones differ: lpips-vgg vs lpips-vgg-random" in lines["LPIPS"]
    assert lines["SSIM"].split()[1] == "-"
    md = markdown_table(a)
    assert md.splitlines()[0] == "| Model | Data | PSNR ↑ | LPIPS ↓ | FID (x) ↓ |", "precision/recall stay in the JSON"
    assert md.splitlines()[2] == "| a | gso (2) | 20.00 | 0.2000 | 10.00 |"
    assert "- lpips: lpips-vgg" in md and "- commit: abc" in md
