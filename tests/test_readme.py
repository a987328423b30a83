"""Every command in README.md runs somewhere, and does what the README says.

CI runs the commands after a `<!-- ci:NAME -->` marker (`.ci/run` reads them from the README).
This file runs every other command of the README's ```bash blocks, in README order, as a user on
this machine would, and checks its exit code:

* `fast3d ...` runs in a fresh folder holding a copy of `train/` (the configs' relative data
  paths), so it reads and writes `data/`, `runs/`, `out/` there; commands that act on the checkout
  itself (`python -m pytest`, `profiling/*.sh`) run in the repository root.
* A user's own files are not here: STAND_INS makes each one before the first command that names it.
* A command naming pretrained weights no test machine has (NEEDS_WEIGHTS) must stop at once with
  exit code 2 and a one-line error naming the missing path.
* SHRINK lists the only other changes made to a command, each with its reason.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FAST3D = shutil.which("fast3d")

# argv prefix -> (arguments appended, why). The longest matching prefix applies.
SHRINK = {
    ("fast3d", "train", "lgm"): (["--max-steps", "2"], "300 steps are `fast3d demo`'s job, which CI runs; "
                                                       "2 run every part of the loop and write a checkpoint"),
    ("fast3d", "train", "ttr"): (["--max-steps", "2"], "as for lgm"),
    ("fast3d", "train", "mvdiff"): (["--max-steps", "2"], "as for lgm"),
    ("fast3d", "train", "mvllm"): (["--max-steps", "2"], "as for lgm"),
    ("fast3d", "train", "magicboost"): (["--max-steps", "2"], "as for lgm"),
    ("fast3d", "magicboost", "demo"): (["--steps", "2"], "2 steps of each refinement run every stage; 100 are "
                                                         "the measurement"),
    ("fast3d", "boost", "demo", "--out", "out/boost_demo", "--preset", "smoke", "--mv-model", "runs/mvdiff", "--base",
     "runs/lgm", "--strengths"): (["--strengths", "0.95"], "the four-strength sweep is four more pseudo-GT sets and "
                                  "boosts (~12 min on 2 cores); here it resumes the first command's 0.95 and prints "
                                  "the table; tests/datagen/test_boost_demo.py runs a two-strength sweep"),
    ("fast3d", "refine"): (["--steps", "4", "--aiu-every", "2"], "4 steps run SDS, two anchor updates and the "
                                                               "outputs; 40 are the user's example"),
    ("fast3d", "bench"): (["--out", "{tmp}/results"], "rows go to the test's folder, not the committed results"),
    ("fast3d", "profile"): (["--out", "{tmp}/traces"], "traces go to the test's folder, not the checkout"),
    ("fast3d", "loadtest"): (["--requests", "4", "--infer-requests", "1", "--concurrency", "1", "4", "--out",
                              "{tmp}/serve"], "4 requests a cell run every mode; rows go to the test's folder"),
    ("profiling/gpu_prepare.sh",): (["--dry-run"], "its gsplat build takes hours on 2 cores: the dry run reads the "
                                                   "plan and the cache without a registry"),
    (".ci/latest",): (["--dry-run"], "a fresh venv with the newest torch is GBs and ~15 minutes of installing, "
                                     "then the whole suite: the dry run checks the unconstrained set-up it runs"),
    (".ci/oldest",): (["--dry-run"], "as for .ci/latest, at the oldest lock: the dry run checks the set-up it runs "
                                     "and that the lock pins torch 2.11.0, Triton 3.6.0 and numpy 2.3.5"),
}

# A placeholder for pretrained weights -> what the error must name (the first path the run misses).
NEEDS_WEIGHTS = {
    "/path/to/dinov2": "/path/to/dinov2",
    "/path/to/model_fp16_fixrot.safetensors": "/path/to/model_fp16_fixrot.safetensors",
    "/path/to/openlrm-mix-large-1.1": "/path/to/openlrm-mix-large-1.1",
    "/path/to/vfusion3d.pth": "/path/to/vfusion3d.pth",
    "/path/to/imagedream-ipmv-diffusers": "/path/to/imagedream-ipmv-diffusers",
    "/path/to/llm": "/path/to/llm",
    "/path/to/blip": "/path/to/blip",
    "train/configs/datagen_pipeline.yaml": "/data/prompts.txt",
}

# Commands that are a GPU machine's job: where there is no NVIDIA GPU they run, and must say so.
# exit code and what the output must hold, without a GPU
GPU_ONLY = {
    ("python", "-m", "pytest", "-m", "gpu"): (0, "skipped"),
    ("profiling/gpu_session.sh",): (2, "no NVIDIA GPU here"),
}


def _input_views(tmp: Path) -> None:
    """a.png .. d.png: views 0, 4, 8, 12 of the first held-out object (the LGM's input rig), and
    their cameras as cams.json."""
    import numpy as np
    from PIL import Image

    from fast3d.data import MultiViewDataset

    sample = next(iter(MultiViewDataset(str(tmp / "data/heldout"), views=16, resolution=64)))
    idx = [0, 4, 8, 12]
    for name, v in zip("abcd", idx):
        rgb = (sample["images"][v].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(rgb).save(tmp / f"{name}.png")
    cams = {"viewmats": sample["viewmats"][idx].tolist(), "Ks": sample["Ks"][idx].tolist()}
    (tmp / "cams.json").write_text(json.dumps(cams))


def _labelled(tmp: Path) -> None:
    """data/labelled and labels.csv: 8 procedural objects, every other one labelled good."""
    _run(["fast3d", "datagen", "procedural", "--out", "data/labelled", "--num-objects", "8", "--views", "4",
          "--resolution", "32", "--seed", "2"], tmp, expect=0)
    (tmp / "labels.csv").write_text("".join(f"obj{i:08d},{i % 2}\n" for i in range(8)))


STAND_INS = {name: _input_views for name in ("a.png", "b.png", "c.png", "d.png", "cams.json")}
STAND_INS.update({"data/labelled": _labelled, "labels.csv": _labelled})


def readme_blocks(text: str | None = None) -> list[tuple[str | None, list[list[str]]]]:
    """(ci marker or None, [argv, ...]) for each ```bash block, in order. Continuation lines are
    joined; comments and blank lines dropped."""
    lines = (README.read_text() if text is None else text).splitlines()
    blocks, marker, i = [], None, 0
    while i < len(lines):
        line = lines[i]
        m = re.fullmatch(r"<!-- ci:(\w+) -->", line.strip())
        if m:
            marker = m.group(1)
        elif line.strip() == "```bash":
            body = []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            joined = "\n".join(body).replace("\\\n", " ")
            cmds = [argv for argv in (shlex.split(c, comments=True) for c in joined.splitlines()) if argv]
            blocks.append((marker, cmds))
            marker = None
        elif line.strip():
            marker = None  # a marker names the block right after it
        i += 1
    return blocks


def _prefix_match(table: dict, argv: list[str]):
    keys = [k for k in table if tuple(argv[:len(k)]) == k]
    return table[max(keys, key=len)] if keys else None


def _run(argv: list[str], tmp: Path, expect: int | None = None) -> subprocess.CompletedProcess:
    cwd = tmp if argv[0] in ("fast3d", "curl") else ROOT
    # the CPU walkthrough everywhere, in a user's environment (not the test session's Triton interpreter)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    if argv[0].startswith("profiling/"):
        argv = [str(ROOT / argv[0]), *argv[1:]]
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if expect is not None and r.returncode != expect:
        raise AssertionError(f"`{shlex.join(argv)}` (in {cwd}) exited {r.returncode}, expected {expect}:\n"
                             f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and \
        subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def test_readme_blocks_parse_markers_continuations_and_comments():
    text = ("<!-- ci:setup -->\n```bash\npip install a \\\n  b   # two\n```\n\ntext\n"
            "```bash\n# only a comment\nfast3d x --p 'a b'\n\nfast3d y\n```\n<!-- ci:x -->\nprose\n```bash\nz\n```\n")
    assert readme_blocks(text) == [("setup", [["pip", "install", "a", "b"]]),
                                   (None, [["fast3d", "x", "--p", "a b"], ["fast3d", "y"]]),
                                   (None, [["z"]])]


def test_ci_runs_every_marked_command():
    """The markers in the README are exactly the commands .ci/run reads and runs."""
    marked = {m for m, _ in readme_blocks() if m}
    ci = (ROOT / ".ci/run").read_text()
    m = re.search(r"^for name in ([\w ]+); do", ci, re.M)
    assert m, ".ci/run no longer lists the README commands it runs"
    assert marked == set(m.group(1).split())
    for name in marked:
        assert f'"$cmd_{name}"' in ci, f".ci/run reads ci:{name} but never runs it"


def test_latest_and_oldest_install_what_they_say():
    """.ci/latest runs the README's set-up without a lock, .ci/oldest with constraints-oldest.txt in
    place of constraints.txt; that lock holds the oldest supported set (numpy < 2.4 for Triton 3.6's
    interpreter) and pins the same packages as constraints.txt, so no dependency floats in it."""
    out = {}
    for script in ("latest", "oldest"):
        r = subprocess.run([str(ROOT / ".ci" / script), "--dry-run", "tests/ops"], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        out[script] = dict(line.split(":", 1) for line in r.stdout.splitlines())
        assert out[script]["test"].strip() == "python -m pytest -q tests/ops"
    setup = README.read_text().split("<!-- ci:setup -->\n```bash\n", 1)[1].splitlines()[0]
    assert setup.count("-c constraints.txt ") == 2, setup
    assert out["latest"]["set-up"].strip() == setup.replace("-c constraints.txt ", "")
    assert out["oldest"]["set-up"].strip() == setup.replace("-c constraints.txt ", "-c constraints-oldest.txt ")

    def pins(name):
        lines = (ROOT / name).read_text().splitlines()
        return dict(line.split("==") for line in lines if line and not line.startswith("#"))

    oldest, newest = pins("constraints-oldest.txt"), pins("constraints.txt")
    assert (oldest["torch"], oldest["triton"]) == ("2.11.0", "3.6.0")
    assert tuple(int(x) for x in oldest["numpy"].split(".")[:2]) < (2, 4)
    assert set(oldest) == set(newest)


# Servers: started in the background, the rest of their block runs once they print this line; then
# SIGTERM, and they must drain and exit 0.
SERVERS = {("fast3d", "serve"): "ready on"}


def _start_server(argv: list[str], tmp: Path, ready: str, timeout: float = 300.0) -> subprocess.Popen:
    """Start ``argv`` with its output in a log file beside the run (a pipe nobody reads could fill
    and block the server) and wait, at most ``timeout`` seconds, for ``ready`` in it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    log = tmp / f"server-{len(list(tmp.glob('server-*.log')))}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, cwd=tmp, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while ready not in log.read_text(errors="replace"):
        if proc.poll() is not None:
            raise AssertionError(f"`{shlex.join(argv)}` exited {proc.returncode} before printing {ready!r}:\n"
                                 f"{log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"`{shlex.join(argv)}` did not print {ready!r} within {timeout:.0f} s:\n"
                                 f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    return proc


def _stop_server(proc: subprocess.Popen, argv: list[str]) -> None:
    proc.terminate()
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"`{shlex.join(argv)}` did not stop within 120 s of SIGTERM") from None
    assert code == 0, f"`{shlex.join(argv)}` exited {code} on SIGTERM"


# Words that make an inline span the shape of a command (`--ranks N`), not a command to run.
PLACEHOLDERS = {"N", "DIR", "CFG", "H", "OP", "WORKLOAD", "BACKEND", "NAME", "OUT", "PATH", "FILE", "..."}


def test_inline_commands_are_in_blocks():
    """A command with options written inline in prose is not run by anything: it belongs in a block."""
    run = {shlex.join(argv) for _, cmds in readme_blocks() for argv in cmds}
    for span in re.findall(r"`([^`\n]+)`", README.read_text()):
        if re.match(r"(fast3d|python -m|deepspeed|profiling/\S+\.sh)\b.* -", span) \
                and not PLACEHOLDERS & set(span.split()):
            assert shlex.join(shlex.split(span)) in run, f"README command `{span}` is inline only: put it in a block"


def _run_block(cmds, tmp_path: Path, gpu: bool, servers: list, ran: list) -> None:
    """Run one README block's commands; servers started go into ``servers``."""
    for argv in cmds:
        for token in argv:
            if token in STAND_INS and not (tmp_path / token).exists():
                STAND_INS[token](tmp_path)
        weights = [NEEDS_WEIGHTS[t] for t in argv if t in NEEDS_WEIGHTS]
        gpu_only = _prefix_match(GPU_ONLY, argv)
        if gpu_only and gpu:
            continue  # on a GPU machine these are the GPU session itself
        shrink = _prefix_match(SHRINK, argv)
        full = argv + [a.format(tmp=tmp_path) for a in shrink[0]] if shrink else argv
        t0 = time.monotonic()
        if _prefix_match(SERVERS, argv):
            servers.append((_start_server(full, tmp_path, _prefix_match(SERVERS, argv)), full))
        elif weights:
            r = _run(full, tmp_path, expect=2)
            err = r.stderr.strip().splitlines()
            assert len(err) == 1 and weights[0] in err[0], f"`{shlex.join(full)}`:\n{r.stderr[-3000:]}"
        elif gpu_only:
            r = _run(full, tmp_path, expect=gpu_only[0])
            assert gpu_only[1] in r.stdout + r.stderr, f"`{shlex.join(full)}`:\n{r.stdout[-2000:]}{r.stderr}"
        else:
            _run(full, tmp_path, expect=0)
        ran.append(f"{time.monotonic() - t0:6.1f} s  {shlex.join(full)}")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # every README command in turn (trainings, generate, serve, load test): ~10 min on 2 cores
@pytest.mark.skipif(FAST3D is None, reason="the fast3d console script is not installed (pip install -e .)")
def test_every_readme_command_runs(tmp_path):
    shutil.copytree(ROOT / "train", tmp_path / "train")
    gpu = _has_gpu()
    ran = []
    for marker, cmds in readme_blocks():
        if marker:
            continue  # .ci/run's
        servers = []
        try:
            _run_block(cmds, tmp_path, gpu, servers, ran)
        finally:  # a failing command still stops the block's servers (and their local Ray)
            for proc, full in servers:
                if proc.poll() is None:
                    _stop_server(proc, full)
    print("\n".join(ran))

    # what the README says the commands leave behind
    from fast3d.io import load_mesh_ply, load_ply

    assert load_ply(str(tmp_path / "out/lgm/gaussians.ply"))["means"].shape[0] > 0
    assert (tmp_path / "out/lgm_posed/gaussians.ply").is_file()
    for f in ("points.ply", "mesh.ply", "turntable.gif"):
        assert (tmp_path / "out/lrm" / f).is_file(), f
    load_mesh_ply(str(tmp_path / "out/lrm/mesh.ply"))
    assert json.loads((tmp_path / "report.json").read_text())["mean"]["psnr"] > 0
    assert (tmp_path / "grid.png").is_file()
    assert json.loads((tmp_path / "runs/boost/config.json").read_text())["model"]["lora_rank"] == 8
    assert list((tmp_path / "results").glob("*/composite.jsonl"))
    assert list((tmp_path / "traces").rglob("*.json"))
    assert load_ply(str(tmp_path / "served.ply"))["means"].shape[0] > 0
    assert (tmp_path / "served.splat").stat().st_size % 32 == 0
    assert list((tmp_path / "serve").glob("*/serve.jsonl"))
