"""fast3d convert: bad input (another model's file, truncated / corrupted safetensors, pickles that
are not plain state dicts, an --out in the way) fails with a clear error and writes nothing; the
command end to end, with fast3d infer on what it wrote."""

from __future__ import annotations

import collections
import os
import shutil
import subprocess

import pytest
import torch
from test_convert_lgm import SIZE, SMALL, lgm_state, save

from fast3d.models.convert import common, convert
from fast3d.models.lgm import LGM, LGMConfig

FAST3D = shutil.which("fast3d")


def good_file(tmp_path, gen) -> str:
    return save(lgm_state(gen, SMALL), str(tmp_path / "model_fp16_fixrot.safetensors"))


def no_leftovers(tmp_path) -> None:
    assert not (tmp_path / "out").exists()
    assert not [f for f in os.listdir(tmp_path) if ".convert-" in f]


def test_another_models_file(tmp_path):
    """A fast3d LGM's own weights (another layout of the same model) are not LGM's release."""
    LGM(LGMConfig.preset("tiny")).save_pretrained(str(tmp_path / "fast3d_lgm"))
    with pytest.raises(ValueError, match="already a fast3d model directory"):
        convert("lgm", str(tmp_path / "fast3d_lgm"), str(tmp_path / "out"), variant="fixrot")
    with pytest.raises(ValueError, match=r"--weights .* is not an LGM checkpoint .*unet\.conv_in"):
        convert("lgm", str(tmp_path / "fast3d_lgm" / "model.safetensors"), str(tmp_path / "out"), variant="fixrot")
    no_leftovers(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_damaged_safetensors(tmp_path, gen, damage):
    path = good_file(tmp_path, gen)
    data = open(path, "rb").read()
    if damage == "truncated":
        data = data[:len(data) // 2]
    else:                                  # the JSON header's opening brace and first key scrambled
        data = data[:8] + b"\x00\xff" * 8 + data[24:]
    open(path, "wb").write(data)
    with pytest.raises(ValueError, match="--weights .*not a readable safetensors file"):
        convert("lgm", path, str(tmp_path / "out"))
    no_leftovers(tmp_path)


class NotATensor:
    pass


@pytest.mark.parametrize("payload", ["object", "module", "list", "non_tensor_value"])
def test_pickles_that_are_not_plain_state_dicts(tmp_path, payload):
    """torch.load(weights_only=True) refuses objects (nothing is unpickled); a list, or a dict
    with a non-tensor entry, reads but is not a state dict."""
    obj = {"object": {"w": torch.zeros(2), "x": NotATensor()}, "module": torch.nn.Linear(2, 2),
           "list": [torch.zeros(2)], "non_tensor_value": {"w": torch.zeros(2), "epoch": 3}}[payload]
    path = str(tmp_path / "weights.pth")
    torch.save(obj, path)
    msg = {"object": "torch.load\\(weights_only=True\\) cannot read it", "module": "cannot read it",
           "list": "holds a list, not a state dict", "non_tensor_value": "not a plain state dict.*'epoch': int"}[payload]
    with pytest.raises(ValueError, match=f"--weights .*{msg}"):
        convert("lgm", path, str(tmp_path / "out"), variant="fixrot")
    no_leftovers(tmp_path)


def test_wrapped_state_dict_unwraps(tmp_path, gen):
    """A training checkpoint's {"model_state_dict": ..., "epoch": n} (VFusion3D's .pth form)
    loads through weights_only; what surrounds the state dict is recorded as dropped."""
    sd = lgm_state(gen, SMALL)
    path = str(tmp_path / "ckpt.pth")
    torch.save({"model_state_dict": collections.OrderedDict(sd), "epoch": 7}, path)
    state, record = common.load_state_dict(path)
    assert set(state) == set(sd) and record["unwrapped"] == "model_state_dict"
    assert record["dropped_around_state_dict"] == ["epoch"]


def test_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="KIND must be one of .*'lgm', 'openlrm', 'vfusion3d'.*got 'mvdream'"):
        convert("mvdream", str(tmp_path), str(tmp_path / "out"))


def test_out_in_the_way(tmp_path, gen):
    path = good_file(tmp_path, gen)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="--out .* exists and is not empty"):
        convert("lgm", path, str(tmp_path / "full"), input_size=SIZE)
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--out .* exists and is not a directory"):
        convert("lgm", path, str(tmp_path / "file"), input_size=SIZE)
    (tmp_path / "empty").mkdir()                           # an empty directory is fine
    convert("lgm", path, str(tmp_path / "empty"), input_size=SIZE)
    assert sorted(os.listdir(tmp_path / "empty")) == ["config.yaml", "conversion.json", "model.safetensors"]


def test_failure_while_writing_leaves_nothing(tmp_path, gen, monkeypatch):
    path = good_file(tmp_path, gen)

    def fail(self, where):
        open(os.path.join(where, "config.yaml"), "w").write("half")
        raise OSError("disk full")

    monkeypatch.setattr(LGM, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        convert("lgm", path, str(tmp_path / "out"), input_size=SIZE)
    no_leftovers(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(FAST3D is None, reason="the fast3d console script is not installed (pip install -e .)")
def test_cli_convert_then_infer(tmp_path, gen):
    """fast3d convert lgm, then fast3d infer on the result with no cameras file (LGM's rig)."""
    from PIL import Image

    path = save(lgm_state(gen, SMALL), str(tmp_path / "weights.safetensors"))
    run = lambda *a: subprocess.run([FAST3D, *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    r = run("convert", "lgm", "--weights", path, "--out", str(tmp_path / "model"), "--variant", "fixrot",
            "--input-size", str(SIZE))
    assert r.returncode == 0, r.stderr
    images = []
    for v in range(4):
        images.append(str(tmp_path / f"view{v}.png"))
        pixels = (torch.rand(SIZE, SIZE, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images[-1])
    r = run("infer", "--checkpoint", str(tmp_path / "model"), "--images", *images, "--out", str(tmp_path / "infer"),
            "--frames", "2", "--resolution", "16", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(tmp_path / "infer" / "gaussians.ply") > 4 * SIZE * SIZE * 14 * 4
