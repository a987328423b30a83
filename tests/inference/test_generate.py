"""``fast3d generate`` on tiny random models: the image path (mvdiff -> LGM / LRM) and the prompt path
(TTR's multi-view DiT -> LGM) end to end, the files they write and what those hold, seeds, the rig
check, batch mode with resume, image preprocessing, and the errors on bad input."""

import json
import math
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from helpers import object_png
from PIL import Image

from fast3d.cli import main as cli_main
from fast3d.inference import generate, preprocess
from fast3d.inference.lgm import default_input_cameras
from fast3d.io import load_mesh_ply, load_ply
from fast3d.io.images import read_image
from fast3d.models import mvdit
from fast3d.models.lgm import LGM, LGMConfig
from fast3d.models.lrm import LRM, LRMConfig
from fast3d.models.mvdiff import MVDiffConfig, MVDiffusion

FAST = dict(steps=2, turntable_frames=3, point_grid=8, mesh_grid=8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random models: mvdiff on the lgm4 rig, on era3d6 (Era3D's optics, and with LGM's), an
    LGM, an LRM whose density is above the surface threshold everywhere (a non-empty mesh), and a
    TTR multi-view DiT."""
    root = tmp_path_factory.mktemp("generate_models")
    torch.manual_seed(0)
    d = {k: str(root / k) for k in ("mv4", "mv6", "mv6_lgm", "lgm", "lrm", "ttr")}
    MVDiffusion(MVDiffConfig.preset("tiny")).save_pretrained(d["mv4"])
    MVDiffusion(MVDiffConfig.preset("tiny", rig="era3d6")).save_pretrained(d["mv6"])
    MVDiffusion(MVDiffConfig.preset("tiny", rig="era3d6", fov_y_deg=LGMConfig().fov_y_deg,
                                    camera_distance=LGMConfig().camera_distance)).save_pretrained(d["mv6_lgm"])
    LGM(LGMConfig.preset("tiny")).save_pretrained(d["lgm"])
    lrm = LRM(LRMConfig.preset("tiny"))
    with torch.no_grad():
        lrm.renderer.decoder.layers[-1].bias[0] = 8.0
    lrm.save_pretrained(d["lrm"])
    cfg = mvdit.MVDiTConfig.preset("tiny")
    mvdit.save_transformer(d["ttr"], cfg, mvdit.build_transformer(cfg))
    return d


def _object_png(path, gen, size=(50, 40)):
    """helpers.object_png written to ``path``."""
    with open(path, "wb") as f:
        f.write(object_png(gen, size))
    return str(path)


def _read_ply_numpy(path):
    """A PLY read as any reader does: the ASCII header (format, elements, their properties), then
    numpy records of exactly the declared size."""
    raw = open(path, "rb").read()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    header = raw[:end].decode("ascii").splitlines()
    assert header[0] == "ply" and header[1] == "format binary_little_endian 1.0"
    types = {"float": "<f4", "uchar": "u1", "int": "<i4"}
    elements = []
    for ln in header[2:-1]:
        t = ln.split()
        if t[0] == "element":
            elements.append((t[1], int(t[2]), []))
        elif t[0] == "property" and t[1] != "list":
            elements[-1][2].append((t[2], types[t[1]]))
        elif t[0] == "property":
            elements[-1][2].append(("n", "u1"))
            elements[-1][2].append(("idx", "<i4", (3,)))
    out, off = {}, end
    for name, count, props in elements:
        dt = np.dtype(props)
        out[name] = np.frombuffer(raw, dtype=dt, count=count, offset=off)
        off += count * dt.itemsize
    assert off == len(raw), "the file holds exactly what its header declares"
    return header, out


def _files(root):
    """{relative path: bytes} of every file under root but report.json (it holds latencies)."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(d, n), root)
            if rel != generate.REPORT:
                out[rel] = open(os.path.join(d, n), "rb").read()
    return out


def _quiet(*_):
    pass


@pytest.mark.slow
def test_image_to_gaussians_end_to_end_and_seeded(models, tmp_path, gen):
    img = _object_png(tmp_path / "a.png", gen)
    out = str(tmp_path / "out")
    r = generate.run(models["mv4"], models["lgm"], out, images=[img], settings=generate.Settings(seed=3, **FAST),
                     log=_quiet)
    assert r["done"] == ["a"]
    for f in ("views/view0.png", "views/view3.png", "cameras.json", "gaussians.ply", "turntable.gif", "report.json",
              "input.png"):
        assert os.path.isfile(os.path.join(out, f)), f
    header, data = _read_ply_numpy(os.path.join(out, "gaussians.ply"))
    assert "element vertex 4096" in header and "property float f_dc_0" in header and "property float rot_3" in header
    g = load_ply(os.path.join(out, "gaussians.ply"))
    assert g["means"].shape == (4 * 32 * 32, 3) and len(data["vertex"]) == 4096
    assert np.allclose(data["vertex"]["x"], g["means"][:, 0].numpy())
    # the cameras: the model's rig, which is the LGM's input rig
    cams = json.load(open(os.path.join(out, "cameras.json")))
    model = MVDiffusion.from_pretrained(models["mv4"])
    vm, K = model.rig_cameras(32)
    assert cams["width"] == cams["height"] == 32 and cams["rig"] == "lgm4" and cams["recon_views"] == [0, 1, 2, 3]
    assert torch.allclose(torch.tensor(cams["viewmats"]), vm, atol=1e-6)
    assert torch.allclose(torch.tensor(cams["Ks"]), K, atol=1e-6)
    lvm, lK = default_input_cameras(LGMConfig.preset("tiny"), 32)
    assert torch.allclose(vm, lvm, atol=1e-5) and torch.allclose(K, lK, atol=1e-4)
    assert [Image.open(os.path.join(out, "views", f"view{i}.png")).size for i in range(4)] == [(32, 32)] * 4
    assert Image.open(os.path.join(out, "turntable.gif")).n_frames == 3
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["seed"] == 3 and rep["steps"] == 2 and rep["scheduler"] == "ddim" and rep["input"]["mask"] == "alpha"
    assert set(rep["latency_ms"]) == {"preprocess", "multiview", "reconstruct", "export", "turntable", "write"}
    assert rep["models"]["mv"]["dir"] == models["mv4"] and rep["models"]["recon"]["type"] == "lgm"
    # the same seed: the same files, byte for byte; another seed: other views
    out2, out3 = str(tmp_path / "again"), str(tmp_path / "other")
    generate.run(models["mv4"], models["lgm"], out2, images=[img], settings=generate.Settings(seed=3, **FAST),
                 log=_quiet)
    assert _files(out) == _files(out2)
    generate.run(models["mv4"], models["lgm"], out3, images=[img], settings=generate.Settings(seed=4, **FAST),
                 log=_quiet)
    assert _files(out3)["views/view1.png"] != _files(out)["views/view1.png"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "no temporary directory is left"


@pytest.mark.slow
def test_prompt_to_gaussians_through_the_cli(models, tmp_path, capsys):
    out, out2 = str(tmp_path / "p"), str(tmp_path / "p2")
    args = ["generate", "--prompt", "a red chair", "--mv-model", models["ttr"], "--recon", models["lgm"],
            "--steps", "2", "--frames", "3", "--seed", "5"]
    assert cli_main(args + ["--out", out]) == 0
    printed = capsys.readouterr().out
    assert "multiview" in printed and "reconstruct" in printed and "total" in printed  # stage latencies
    for f in ("views/view0.png", "views/view3.png", "cameras.json", "gaussians.ply", "turntable.gif"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert load_ply(os.path.join(out, "gaussians.ply"))["means"].shape[0] == 4096
    cams = json.load(open(os.path.join(out, "cameras.json")))
    view = mvdit.MVDiTConfig.preset("tiny").view_size
    assert cams["rig"] == generate.TTR_RIG_NAME and cams["width"] == view
    lvm, lK = default_input_cameras(LGMConfig.preset("tiny"), view)
    assert torch.allclose(torch.tensor(cams["viewmats"]), lvm, atol=1e-5)
    assert torch.allclose(torch.tensor(cams["Ks"]), lK, atol=1e-4)
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["input"] == {"prompt": "a red chair"} and rep["scheduler"] == "dpm" and rep["seed"] == 5
    assert cli_main(args + ["--out", out2]) == 0
    assert _files(out) == _files(out2)


@pytest.mark.slow
def test_image_to_lrm_mesh_with_a_view_subset(models, tmp_path, gen):
    img = _object_png(tmp_path / "b.png", gen)
    with pytest.raises(ValueError, match=r"--recon .*LRM.*--mv-model .*'lgm4'.*4 views for 1 inputs.*--views"):
        generate.run(models["mv4"], models["lrm"], str(tmp_path / "x"), images=[img],
                     settings=generate.Settings(**FAST), log=_quiet)
    assert not os.path.exists(tmp_path / "x")
    out = str(tmp_path / "lrm")
    generate.run(models["mv4"], models["lrm"], out, images=[img], settings=generate.Settings(views="1", **FAST),
                 log=_quiet)
    header, data = _read_ply_numpy(os.path.join(out, "mesh.ply"))
    assert "property list uchar int vertex_indices" in header and len(data["face"]) > 0
    mesh = load_mesh_ply(os.path.join(out, "mesh.ply"))
    assert len(mesh["faces"]) == len(data["face"]) and mesh["colors"] is not None
    assert os.path.isfile(os.path.join(out, "points.ply")) and os.path.isfile(os.path.join(out, "turntable.gif"))
    cams = json.load(open(os.path.join(out, "cameras.json")))
    assert cams["recon_views"] == [1] and len(cams["viewmats"]) == 4
    assert set(json.load(open(os.path.join(out, "report.json")))["latency_ms"]) >= {"reconstruct", "export"}


def test_rig_check_names_both_models_and_accepts_a_matching_subset(models):
    lgm = generate.load_reconstructor(models["lgm"], "cpu")
    mv6 = generate.load_multiview(models["mv6"], "image", "cpu")
    with pytest.raises(ValueError) as e:
        generate.check_rig(mv6, lgm, None)
    msg = str(e.value)
    assert models["lgm"] in msg and models["mv6"] in msg and "'era3d6'" in msg and "6 views for 4 inputs" in msg
    assert "--views" in msg
    # Era3D's own optics (10 deg, far away) are not the LGM's, whichever views are taken
    with pytest.raises(ValueError, match=r"--views 0,2,3,4.*field of view 10 vs 49.1 deg"):
        generate.check_rig(mv6, lgm, [0, 2, 3, 4])
    # with the LGM's optics, views 0 (front), 2 (right), 3 (back), 4 (left) are its rig; 0, 1, 2, 3 are not
    mv6_lgm = generate.load_multiview(models["mv6_lgm"], "image", "cpu")
    assert generate.check_rig(mv6_lgm, lgm, generate.parse_views("0,2,3,4", 6)) == [0, 2, 3, 4]
    with pytest.raises(ValueError, match=r"view 1 of the selection is 45 deg"):
        generate.check_rig(mv6_lgm, lgm, [0, 1, 2, 3])
    for bad in ("0,2,x", "0,0,2,3", "0,2,3,6", ""):
        with pytest.raises(ValueError, match="--views"):
            generate.parse_views(bad, 6)


@pytest.mark.slow
def test_batch_progress_failure_and_resume(models, tmp_path, gen):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for n in ("a", "b", "c"):
        _object_png(folder / f"{n}.png", gen)
    (folder / "bad.png").write_bytes(b"not an image at all")
    (folder / "notes.txt").write_text("not an input")
    out = tmp_path / "out"
    lines = []
    r = generate.run(models["mv4"], models["lgm"], str(out), images=[str(folder)],
                     settings=generate.Settings(**FAST), log=lines.append)
    assert r["done"] == ["a", "b", "c"] and list(r["failed"]) == ["bad"] and "not a readable image" in r["failed"]["bad"]
    assert any(ln.startswith("[2/4] b: ") for ln in lines) and "3 done, 0 skipped" in lines[-1]
    assert sorted(os.listdir(out)) == ["a", "b", "c"], "nothing of the failed item, no temporary directory"
    # a kill during b: its directory and report gone, a half-written temporary directory left behind
    kept = {n: os.path.getmtime(out / n / "report.json") for n in ("a", "c")}
    import shutil

    shutil.rmtree(out / "b")
    (out / ".b.tmp99999").mkdir()
    (out / ".b.tmp99999" / "gaussians.ply").write_bytes(b"ply\n")
    (folder / "bad.png").unlink()
    lines.clear()
    r = generate.run(models["mv4"], models["lgm"], str(out), images=[str(folder)],
                     settings=generate.Settings(**FAST), log=lines.append)
    assert r["skipped"] == ["a", "c"] and r["done"] == ["b"] and not r["failed"]
    assert {n: os.path.getmtime(out / n / "report.json") for n in ("a", "c")} == kept
    assert sorted(os.listdir(out)) == ["a", "b", "c"]
    assert load_ply(str(out / "b" / "gaussians.ply"))["means"].shape[0] == 4096


def test_prompts_file_and_image_lists_name_their_items(tmp_path, gen):
    f = tmp_path / "prompts.txt"
    f.write_text("# a comment\na red chair\n\n  A Blue Car!  \n")
    items, batch = generate.collect_items(prompts_file=str(f))
    assert batch and items == [{"name": "0000-a-red-chair", "prompt": "a red chair"},
                               {"name": "0001-a-blue-car", "prompt": "A Blue Car!"}]
    a, b = _object_png(tmp_path / "a.png", gen), _object_png(tmp_path / "b.png", gen)
    assert generate.collect_items(images=[a]) == ([{"name": "a", "image": a}], False)
    assert generate.collect_items(images=[a, b])[1]
    (tmp_path / "sub").mkdir()
    dup = _object_png(tmp_path / "sub" / "a.png", gen)
    with pytest.raises(ValueError, match=r"--image: several images are named \['a'\]"):
        generate.collect_items(images=[a, dup])
    with pytest.raises(ValueError, match="exactly one of --image, --prompt, --prompts"):
        generate.collect_items(images=[a], prompt="x")
    with pytest.raises(ValueError, match="--prompts .* holds no prompt"):
        (tmp_path / "empty.txt").write_text("# nothing\n")
        generate.collect_items(prompts_file=str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match=r"--image '.*nope.png' is not a file"):
        generate.collect_items(images=[str(tmp_path / "nope.png")])


def _png_header_only(w, h):
    """A PNG whose header claims w x h (a decompression bomb's header) and holds no pixel data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_bad_inputs_are_named_and_leave_nothing(models, tmp_path, gen):
    out = tmp_path / "out"
    run = lambda img, **kw: generate.run(models["mv4"], models["lgm"], str(out), images=[img],  # noqa: E731
                                         settings=generate.Settings(**FAST), log=_quiet, **kw)
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "bomb.png").write_bytes(_png_header_only(9000, 9000))
    (tmp_path / "zero.png").write_bytes(_png_header_only(0, 10))
    Image.fromarray(np.zeros((20, 20, 4), np.uint8)).save(tmp_path / "clear.png")  # fully transparent
    for name, match in (("text.png", "not a readable image"), ("empty.png", "empty"),
                        ("bomb.png", "over the limit"), ("zero.png", "zero size|not a readable image"),
                        ("clear.png", "no object")):
        with pytest.raises(ValueError, match=match) as e:
            run(str(tmp_path / name))
        assert "--image" in str(e.value) and name in str(e.value)
        assert not out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".")], name
    # model directories of another kind, each named by its argument
    img = _object_png(tmp_path / "ok.png", gen)
    with pytest.raises(ValueError, match=r"--mv-model .* holds a 'lgm' model; --image needs .*'mvdiff'"):
        generate.run(models["lgm"], models["lgm"], str(out), images=[img], log=_quiet)
    with pytest.raises(ValueError, match=r"--mv-model .* holds a 'mvdiff' model; --prompt needs .*'mvdit'"):
        generate.run(models["mv4"], models["lgm"], str(out), prompt="a chair", log=_quiet)
    with pytest.raises(ValueError, match=r"--recon .* holds a 'mvdit' model; expected a reconstructor"):
        generate.run(models["mv4"], models["ttr"], str(out), images=[img], log=_quiet)
    with pytest.raises(ValueError, match="--mv-model .* is not a directory"):
        generate.run(str(tmp_path / "missing"), models["lgm"], str(out), images=[img], log=_quiet)
    with pytest.raises(ValueError, match="--scheduler 'ddim': the prompt path"):
        generate.run(models["ttr"], models["lgm"], str(out), prompt="a chair", log=_quiet,
                     settings=generate.Settings(scheduler="ddim"))
    for bad, match in ((dict(mesh_grid=1), "--mesh-grid"), (dict(point_grid=1), "--point-grid"),
                       (dict(turntable_frames=0), "--frames"), (dict(turntable_resolution=0), "--resolution")):
        with pytest.raises(ValueError, match=match):
            generate.run(models["mv4"], models["lgm"], str(out), images=[img], log=_quiet,
                         settings=generate.Settings(**bad))
    with pytest.raises(ValueError, match="--steps"):
        generate.run(models["mv4"], models["lgm"], str(out), images=[img], log=_quiet,
                     settings=generate.Settings(steps=0))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("a user's file")
    with pytest.raises(ValueError, match="--out .* is not a finished generate output"):
        generate.run(models["mv4"], models["lgm"], str(tmp_path / "busy"), images=[img], log=_quiet)
    assert not out.exists()
    # through the CLI: exit code 2 and the message on stderr
    assert cli_main(["generate", "--image", str(tmp_path / "text.png"), "--mv-model", models["mv4"], "--recon",
                     models["lgm"], "--out", str(out)]) == 2


@pytest.mark.parametrize("mode", ["L", "P", "I;16", "LA"])
def test_grey_palette_and_16_bit_pngs_are_converted(tmp_path, mode, gen):
    a = (torch.rand(24, 30, generator=gen) * 255).to(torch.uint8).numpy()
    if mode == "I;16":
        img = Image.fromarray(a.astype("<u2") * 257)
        assert img.mode == "I;16"
    elif mode == "LA":
        img = Image.fromarray(np.stack([a, np.full_like(a, 255)], -1), mode="LA")
    elif mode == "P":
        img = Image.fromarray(a).convert("P")
        img.putpalette([v for i in range(256) for v in (i, i, i)])  # index i is grey i
        img.putdata(a.ravel().tolist())
    else:
        img = Image.fromarray(a)
    img.save(tmp_path / "x.png")
    rgba = read_image(str(tmp_path / "x.png"))
    x, how = preprocess.preprocess(rgba, 32, 0.5, 1.0)
    assert x.shape == (3, 32, 32) and how == "none"
    assert torch.allclose(x[0], x[1]) and torch.allclose(x[1], x[2])  # grey stays grey
    expected = torch.from_numpy(a.astype(np.float32) / 255)
    assert torch.allclose(rgba[0], expected, atol=1 / 255 + 1e-6)


def test_centre_object_frames_the_alpha_box(gen):
    H, W, size, fraction = 60, 80, 40, 0.5
    rgba = torch.zeros(4, H, W)
    rgba[:3] = torch.rand(3, H, W, generator=gen)
    rgba[3, 5:25, 50:70] = 1                                                       # a 20 x 20 object off centre
    x = preprocess.centre_object(rgba, size, fraction, background=(0.0, 0.0, 0.0))
    obj = x.abs().sum(0) > 0
    rows, cols = obj.any(1).nonzero()[:, 0], obj.any(0).nonzero()[:, 0]
    assert (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1) == (10, 30, 10, 30)
    # the object's pixels, resized 20 -> 20: unchanged
    assert torch.allclose(x[:, 10:30, 10:30], rgba[:3, 5:25, 50:70], atol=1e-5)
    # a wide object: its longer side is the fraction, centred vertically
    rgba[3] = 0
    rgba[3, 30:42, 0:80] = 1                                                      # 80 x 12 -> 20 x 3
    x = preprocess.centre_object(rgba, size, fraction, background=(0.0, 0.0, 0.0))
    obj = x.abs().sum(0) > 0
    rows, cols = obj.any(1).nonzero()[:, 0], obj.any(0).nonzero()[:, 0]
    assert (int(cols[0]), int(cols[-1]) + 1) == (10, 30) and (int(rows[0]), int(rows[-1]) + 1) == (18, 21)
    with pytest.raises(ValueError, match="fraction"):
        preprocess.centre_object(rgba, size, 0.0)
    with pytest.raises(ValueError, match="background"):
        preprocess.preprocess(rgba, size, 0.5, background=(2.0, 0, 0))


def _segmenter_dir(path, background_bias, labels=("background", "object")):
    """A tiny random SegFormer whose classifier ignores the image: its bias alone picks the class."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    cfg = SegformerConfig(num_channels=3, num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8],
                          patch_sizes=[7], strides=[4], num_attention_heads=[1], mlp_ratios=[2], decoder_hidden_size=8,
                          num_labels=len(labels), id2label=dict(enumerate(labels)),
                          label2id={v: i for i, v in enumerate(labels)})
    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(cfg)
    with torch.no_grad():
        model.decode_head.classifier.weight.zero_()
        model.decode_head.classifier.bias.copy_(torch.tensor([background_bias] + [0.0] * (len(labels) - 1)))
    model.save_pretrained(str(path))
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(path))
    return str(path)


def test_background_removal_model_from_a_local_directory(tmp_path, gen):
    rgb = torch.rand(3, 30, 40, generator=gen)
    rgba = torch.cat([rgb, torch.ones(1, 30, 40)])
    seg = preprocess.Segmenter(_segmenter_dir(tmp_path / "fg", -5.0))              # foreground everywhere
    alpha = seg(rgb)
    assert alpha.shape == (1, 30, 40) and bool((alpha > 0.99).all())
    x, how = preprocess.preprocess(rgba, 32, 0.5, 1.0, segmenter=seg)
    assert how == "segmenter"
    # the whole image is the object: 40 px wide -> 16 px, centred, on white
    assert bool((x[:, :, :8] == 1).all()) and bool((x[:, :, 24:] == 1).all()) and bool((x[:, 10:22, 8:24] < 1).any())
    # an image with its own alpha keeps it; keep_background keeps the whole image
    cut = torch.cat([rgb, torch.zeros(1, 30, 40)])
    cut[3, 10:20, 10:20] = 1
    assert preprocess.preprocess(cut, 32, 0.5, 1.0, segmenter=seg)[1] == "alpha"
    assert preprocess.preprocess(rgba, 32, 0.5, 1.0, segmenter=seg, keep_background=True)[1] == "none"
    nothing = preprocess.Segmenter(_segmenter_dir(tmp_path / "bg", 5.0))            # background everywhere
    with pytest.raises(ValueError, match="--image: no object"):
        preprocess.preprocess(rgba, 32, 0.5, 1.0, segmenter=nothing)
    with pytest.raises(ValueError, match="--remove-background .* no single 'background' class"):
        preprocess.Segmenter(_segmenter_dir(tmp_path / "nolabel", 0.0, labels=("cat", "dog")))
    with pytest.raises(ValueError, match="--remove-background .* expected a local transformers model"):
        preprocess.Segmenter(str(tmp_path / "missing"))


def test_object_fraction_is_the_unit_box_framing(models):
    mv = generate.load_multiview(models["mv4"], "image", "cpu")
    # a unit length at the origin, 2.2 away, under a 49.1 degree field of view
    assert generate.object_fraction(mv) == pytest.approx(0.5 / 2.2 / math.tan(math.radians(49.1 / 2)), rel=1e-5)


def test_ttr_rig_is_the_feature_cache_grid():
    """The prompt path's cameras are the views TTR's feature cache puts in the grid, in grid order."""
    from fast3d.training.feature_cache import GRID_AZIMUTHS

    assert generate.TTR_RIG["azimuths_deg"] == GRID_AZIMUTHS
    mv = generate.MultiView("mvdit", "-", generate.TTR_RIG_NAME, 4, 32, None)
    vm, K = mv.cameras()
    c = torch.linalg.inv(vm.double())[:, :3, 3]                                   # camera centres
    az = torch.rad2deg(torch.atan2(c[:, 1], c[:, 0]))
    gap = (az - torch.tensor(GRID_AZIMUTHS, dtype=torch.float64) + 180) % 360 - 180   # circular difference
    assert bool((gap.abs() < 1e-4).all()), az
