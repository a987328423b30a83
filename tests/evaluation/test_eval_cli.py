"""``fast3d eval`` end to end on tiny random models: LGM on a GSO-style folder (resumed after a
kill), LRM on shards, the multi-view DiT on prompts (CLIP-R, CLIP text similarity, FID against a
reference folder), multi-view diffusion on images, ``--compare``, and the errors on bad input."""

import json
import os

import pytest
import torch

from fast3d.cli import main as cli_main
from fast3d.data.dataset import MultiViewDataset
from fast3d.datagen import procedural
from fast3d.inference.common import save_image
from fast3d.io import load_ply, save_points_ply
from fast3d.models import mvdit
from fast3d.models.lgm import LGM, LGMConfig
from fast3d.models.lrm import LRM, LRMConfig
from fast3d.models.mvdiff import MVDiffConfig, MVDiffusion

PROMPTS = ["a red wooden chair", "a blue ceramic mug", "a green toy car"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny random models, procedural shards, the same objects as a GSO-style folder, prompts,
    input images and a reference image folder of 17 images (the random FID stand-in's minimum)."""
    root = tmp_path_factory.mktemp("eval_cli")
    torch.manual_seed(0)
    d = {k: str(root / k) for k in ("lgm", "lrm", "ttr", "mvdiff", "shards", "gso", "ref", "inputs")}
    LGM(LGMConfig.preset("tiny")).save_pretrained(d["lgm"])
    LRM(LRMConfig.preset("tiny")).save_pretrained(d["lrm"])
    cfg = mvdit.MVDiTConfig.preset("tiny")
    mvdit.save_transformer(d["ttr"], cfg, mvdit.build_transformer(cfg))
    MVDiffusion(MVDiffConfig.preset("tiny")).save_pretrained(d["mvdiff"])
    procedural.run(d["shards"], procedural.ProceduralConfig(num_objects=2, views=16, rig="orbit16", resolution=32,
                                                            gaussians_per_object=200, samples_per_shard=3))
    for s in MultiViewDataset(d["shards"], views=16, resolution=32):
        obj = os.path.join(d["gso"], s["key"])
        os.makedirs(obj)
        frames = []
        for v in range(16):
            save_image(s["images"][v], os.path.join(obj, f"{v:03d}.png"))
            frames.append({"file": f"{v:03d}.png", "viewmat": s["viewmats"][v].tolist(), "K": s["Ks"][v].tolist()})
        with open(os.path.join(obj, "views.json"), "w") as f:
            json.dump({"frames": frames, "prompt": s["caption"]}, f)
        means = load_ply(os.path.join(d["shards"], "assets", f"{s['key']}.ply"))["means"]
        save_points_ply(os.path.join(obj, "points.ply"), means, torch.zeros_like(means))
    g = torch.Generator().manual_seed(1)
    os.makedirs(d["ref"])
    for i in range(17):
        save_image(torch.rand(3, 16, 16, generator=g), os.path.join(d["ref"], f"{i:02d}.png"))
    os.makedirs(d["inputs"])
    for i in range(2):
        save_image(torch.rand(3, 24, 24, generator=g), os.path.join(d["inputs"], f"{i}.png"))
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    d["prompts"] = str(root / "prompts.txt")
    return d


def run(*args):
    return cli_main([str(a) for a in args])


@pytest.mark.slow
def test_lgm_on_a_gso_folder_reports_and_resumes_after_a_kill(setup, tmp_path, capsys):
    out = tmp_path / "lgm.json"
    assert run("eval", "--checkpoint", setup["lgm"], "--data", setup["gso"], "--out", out,
               "--lpips-backbone", "random", "--device", "cpu") == 0
    r = json.loads(out.read_text())
    assert r["kind"] == "lgm" and r["samples"] == 2 and len(r["held_out_views"]) == 12
    for row in r["per_sample"]:
        assert {"psnr", "ssim", "lpips_random", "chamfer", "fscore"} <= set(row), row
    assert r["backbones"] == {"ssim": "torchmetrics-gaussian11-sigma1.5", "lpips_random": "lpips-vgg-random"}
    md = (tmp_path / "lgm.md").read_text()
    assert md.splitlines()[0].startswith("| Model | Data | PSNR ↑ | SSIM ↑ | LPIPS (random VGG) ↓ | CD ↓ | F-Score ↑")
    assert f"commit: {r['commit']}" in md and "lpips_random: lpips-vgg-random" in md
    err = capsys.readouterr().err
    assert "[2] " in err and "psnr" in err, "progress, one line a sample"
    # A kill after the first sample, mid-way through writing the second row: the rerun keeps the
    # first, recomputes the others and reports what the uninterrupted run reported.
    rows = tmp_path / "lgm.json.rows.jsonl"
    lines = rows.read_text().splitlines(keepends=True)
    rows.write_text(lines[0] + lines[1] + lines[2][:20])
    out.unlink()
    assert run("eval", "--checkpoint", setup["lgm"], "--data", setup["gso"], "--out", out,
               "--lpips-backbone", "random", "--device", "cpu") == 0
    assert "resuming: 1 samples already done" in capsys.readouterr().err
    again = json.loads(out.read_text())
    assert again["per_sample"] == r["per_sample"] and again["mean"] == r["mean"]
    # other settings do not resume from these rows
    assert run("eval", "--checkpoint", setup["lgm"], "--data", setup["gso"], "--out", out,
               "--lpips-backbone", "random", "--device", "cpu", "--max-samples", "1", "--resolution", "24") == 0
    assert "resuming" not in capsys.readouterr().err and json.loads(out.read_text())["samples"] == 1


@pytest.mark.slow
def test_lrm_on_shards_and_compare(setup, tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for out, n, data in ((a, 1, setup["shards"]), (b, 2, setup["gso"])):
        assert run("eval", "--checkpoint", setup["lrm"], "--data", data, "--out", out, "--lpips-backbone", "random",
                   "--device", "cpu", "--max-samples", n, "--resolution", "16", "--clip", "random-tiny", "--views", 3) == 0
    r = json.loads(b.read_text())
    assert r["kind"] == "lrm" and r["samples"] == 2 and r["held_out_views"] == [1, 2]
    for row in r["per_sample"]:  # the GSO folder's objects have captions: image and text similarity
        assert -1 <= row["clip_image:clip-random-tiny"] <= 1 and -1 <= row["clip_text:clip-random-tiny"] <= 1
    assert r["backbones"]["clip_image:clip-random-tiny"] == "clip-random-tiny"
    capsys.readouterr()
    assert run("eval", "--compare", a, b) == 0
    text = capsys.readouterr().out
    ra = json.loads(a.read_text())
    psnr = next(ln for ln in text.splitlines() if ln.startswith("PSNR"))
    d = r["mean"]["psnr"] - ra["mean"]["psnr"]
    assert f"{d:+.4g}" in psnr and ("B better" if d > 0 else "A better") in psnr
    assert text.startswith(f"A: {ra['model']}")


def test_mvdit_on_prompts_clip_r_clip_text_and_fid(setup, tmp_path, capsys):
    out = tmp_path / "ttr.json"
    assert run("eval", "--checkpoint", setup["ttr"], "--prompts", setup["prompts"], "--out", out, "--clip",
               "random-tiny", "--fid-backbone", "random-tiny", "--reference", setup["ref"], "--steps", "2",
               "--device", "cpu") == 0
    r = json.loads(out.read_text())
    assert r["kind"] == "mvdit" and r["samples"] == 3 and r["prompts"] == 3
    for i, row in enumerate(r["per_sample"]):
        assert row["prompt"] == PROMPTS[i] and len(row["images"]) == 4
        assert row["clip_r:clip-random-tiny"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert -1 <= row["clip_text:clip-random-tiny"] <= 1
    assert r["backbones"] == {"clip_r:clip-random-tiny": "clip-random-tiny",
                              "clip_text:clip-random-tiny": "clip-random-tiny", "fid:random-tiny-conv": "random-tiny-conv"}
    assert r["set_metrics"]["fid:random-tiny-conv"] > 0
    md = (tmp_path / "ttr.md").read_text()
    assert "CLIP-R@1 (clip-random-tiny) ↑" in md and "FID (random-tiny-conv) ↓" in md
    assert "inception" not in md and "clip-vit" not in md, "a random stand-in is never named as the real metric"
    assert sorted(os.listdir(tmp_path / "ttr_images"))[:4] == [f"p00000_view{v}.png" for v in range(4)]
    assert len(os.listdir(tmp_path / "ttr_images")) == 3 * 4  # the grid's 4 views a prompt


@pytest.mark.slow
def test_mvdiff_on_images_with_prompts(setup, tmp_path):
    out = tmp_path / "mv.json"
    prompts = tmp_path / "two.txt"
    prompts.write_text("a red mug\na blue car\n")
    assert run("eval", "--checkpoint", setup["mvdiff"], "--images", setup["inputs"], "--prompts", prompts,
               "--out", out, "--clip", "random-tiny", "--steps", "2", "--device", "cpu") == 0
    r = json.loads(out.read_text())
    assert r["kind"] == "mvdiff" and r["samples"] == 2 and r["input_images"] == 2
    for row in r["per_sample"]:
        assert {"clip_image:clip-random-tiny", "clip_r:clip-random-tiny", "clip_text:clip-random-tiny"} <= set(row)
        assert -1 <= row["clip_image:clip-random-tiny"] <= 1
    assert r["set_metrics"] == {}


def test_bad_input_is_named(setup, tmp_path, capsys):
    few = tmp_path / "few"
    few.mkdir()
    for i in range(16):
        save_image(torch.rand(3, 8, 8), str(few / f"{i}.png"))
    cases = [
        (["--checkpoint", setup["ttr"], "--prompts", setup["prompts"], "--clip", "random-tiny", "--fid-backbone",
          "random-tiny", "--reference", few], "has 16 images; FID with random-tiny-conv needs at least 17"),
        (["--checkpoint", setup["ttr"], "--prompts", setup["prompts"], "--clip", "/nonexistent/clip-l14"],
         "clip backbone '/nonexistent/clip-l14' is not a directory"),
        (["--checkpoint", setup["ttr"], "--prompts", setup["prompts"], "--clip", "random-tiny", "--fid-backbone",
          "/nonexistent/inception.pth", "--reference", setup["ref"]], "'/nonexistent/inception.pth' is not a file"),
        (["--checkpoint", setup["mvdiff"], "--images", setup["inputs"], "--prompts", setup["prompts"], "--clip",
          "random-tiny"], "images and prompts do not pair up: 2 images for 3 prompts"),
        (["--checkpoint", setup["ttr"], "--prompts", setup["prompts"]], "--clip: name at least one CLIP backbone"),
        (["--checkpoint", setup["lgm"]], "is evaluated on --data"),
        (["--mv-model", setup["ttr"], "--prompts", setup["prompts"], "--clip", "random-tiny"],
         "a pipeline is --mv-model and --recon together"),
        (["--checkpoint", setup["lgm"], "--data", setup["gso"], "--views", "12"],
         "views must hold the input views [0, 4, 8, 12] and a held-out view; got 12"),
        (["--checkpoint", setup["lgm"], "--data", setup["gso"], "--reference", setup["ref"]], "are for generators"),
    ]
    for args, match in cases:
        assert run("eval", "--out", tmp_path / "x.json", *args) == 2, args
        assert match in capsys.readouterr().err, (args, match)
    assert not os.path.exists(tmp_path / "x_images") or not os.listdir(tmp_path / "x_images"), "refused before generating"
    (tmp_path / "not_report.json").write_text("[1, 2]")
    assert run("eval", "--compare", tmp_path / "not_report.json", tmp_path / "not_report.json") == 2
    assert "is not a fast3d eval report" in capsys.readouterr().err


@pytest.mark.slow
def test_a_text_to_3d_pipeline_is_scored_on_its_renders(setup, tmp_path):
    """fast3d generate (the multi-view DiT, then the LGM) on each prompt; the turntable's frames are
    the renders CLIP-R, CLIP text similarity and FID score; a rerun finds every sample done."""
    out = tmp_path / "pipe.json"
    args = ["eval", "--mv-model", setup["ttr"], "--recon", setup["lgm"], "--prompts", setup["prompts"], "--out", out,
            "--clip", "random-tiny", "--fid-backbone", "random-tiny", "--reference", setup["ref"], "--steps", "2",
            "--frames", "3", "--device", "cpu"]
    assert run(*args) == 0
    r = json.loads(out.read_text())
    assert r["kind"] == "generate (mvdit -> lgm)" and r["samples"] == 3
    for row in r["per_sample"]:
        assert row["images"] == [f"{row['key']}_render{j:03d}.png" for j in range(3)]
        hits = row["clip_r:clip-random-tiny"] * 3  # the fraction of 3 renders that retrieve their prompt
        assert abs(hits - round(hits)) < 1e-6 and 0 <= round(hits) <= 3
    assert os.path.isfile(tmp_path / "pipe_images" / "p00000_3d" / "gaussians.ply")
    assert r["set_metrics"]["fid:random-tiny-conv"] > 0
    assert run(*args) == 0
    assert json.loads(out.read_text())["per_sample"] == r["per_sample"]


@pytest.mark.slow
def test_baseline_and_checkpoint_side_by_side_on_gso_and_shards(setup, tmp_path, capsys):
    """`fast3d eval --baseline BASE --checkpoint BOOSTED`: both LGMs scored on one held-out set (a
    GSO-style folder, then fast3d shards) in one report; each model's numbers are those of its own
    `fast3d eval`, the difference is theirs, and MVBoost's GSO numbers are the labelled paper row."""
    torch.manual_seed(3)
    other = str(tmp_path / "lgm_other")
    LGM(LGMConfig.preset("tiny")).save_pretrained(other)  # another draw of the tiny LGM: the "boosted" one
    common = ["--lpips-backbone", "random", "--device", "cpu", "--resolution", "32"]
    for data in (setup["gso"], setup["shards"]):
        name = os.path.basename(data)
        out = tmp_path / f"{name}.json"
        assert run("eval", "--baseline", setup["lgm"], "--checkpoint", other, "--data", data, "--out", out,
                   "--paper", "mvboost", *common) == 0
        printed = capsys.readouterr().out
        r = json.loads(out.read_text())
        assert r["kind"] == "side_by_side" and r["samples"] == 2 and r["data"] == os.path.abspath(data)
        kept = {}
        for model, tag in ((setup["lgm"], "baseline"), (other, "checkpoint")):
            kept[tag] = json.loads((tmp_path / f"{name}.{tag}.json").read_text())
            assert kept[tag]["model"] == os.path.abspath(model) and kept[tag]["data"] == os.path.abspath(data)
        if data == setup["gso"]:  # the checkpoint's numbers are those of its own `fast3d eval`
            own = tmp_path / "alone.json"
            assert run("eval", "--checkpoint", other, "--data", data, "--out", own, *common) == 0
            assert json.loads(own.read_text())["per_sample"] == kept["checkpoint"]["per_sample"]
        capsys.readouterr()
        means = {m["name"]: m["mean"] for m in r["models"]}
        for k in ("psnr", "ssim", "lpips_random", "chamfer", "fscore"):
            a, b = kept["baseline"]["mean"][k], kept["checkpoint"]["mean"][k]
            assert means["baseline"][k] == a and means["checkpoint"][k] == b
            assert r["difference"]["checkpoint"][k] == b - a
        md = (tmp_path / f"{name}.md").read_text()
        assert md == printed.split(f"wrote {out}")[0]
        assert md.splitlines()[0] == "| Model | Data | PSNR ↑ | SSIM ↑ | LPIPS (random VGG) ↓ | CD ↓ | F-Score ↑ |"
        assert "| MVBoost (paper, GSO) † | Google Scanned Objects | 18.561 | 0.859 | - | 0.1011 | 0.7977 |" in md
    # two written reports side by side, with the paper's row, from --compare
    a, b = tmp_path / "gso.baseline.json", tmp_path / "gso.checkpoint.json"
    both = tmp_path / "compared.json"
    assert run("eval", "--compare", a, b, "--out", both, "--paper", "mvboost") == 0
    c = json.loads(both.read_text())
    assert [m["name"] for m in c["models"]] == ["gso.baseline", "gso.checkpoint"]
    assert c["difference"]["gso.checkpoint"] == json.loads((tmp_path / "gso.json").read_text())["difference"]["checkpoint"]


def test_side_by_side_bad_input_is_named(setup, tmp_path, capsys):
    cases = [
        (["--checkpoint", setup["lgm"], "--baseline", setup["lrm"], "--data", setup["gso"]],
         "holds a 'lrm' model; --checkpoint holds a 'lgm' one"),
        (["--checkpoint", setup["lgm"], "--baseline", setup["lgm"], "--data", setup["gso"], "--paper", "lgm-paper"],
         "--paper must be one of ['mvboost']; got 'lgm-paper'"),
        (["--checkpoint", setup["lgm"], "--data", setup["gso"], "--paper", "mvboost"], "give --baseline"),
        (["--checkpoint", setup["ttr"], "--prompts", setup["prompts"], "--baseline", setup["ttr"]],
         "--baseline/--paper are for reconstructors"),
    ]
    for args, match in cases:
        assert run("eval", "--out", tmp_path / "x.json", *args) == 2, args
        assert match in capsys.readouterr().err, (args, match)
    assert not os.path.exists(tmp_path / "x.baseline.json"), "refused before any model is scored"
