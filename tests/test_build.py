"""The native build: toolkit discovery (a wrapper `nvcc` on PATH included), FAST3D_CUDA switches,
and what the installed extension says it was built with."""

import importlib.util
import json
import os
import stat
import subprocess
import sys

import pytest

from fast3d import _native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def setup_module():
    spec = importlib.util.spec_from_file_location("fast3d_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # main() only runs as __main__
    return mod


def _fake_toolkit(root):
    os.makedirs(os.path.join(root, "bin"))
    os.makedirs(os.path.join(root, "include"))
    open(os.path.join(root, "include", "cuda_runtime.h"), "w").close()
    nvcc = os.path.join(root, "bin", "nvcc")
    open(nvcc, "w").write(f"#!/bin/sh\nif [ \"$1\" = -dryrun ]; then echo '#$ TOP={root}/bin/..' >&2; exit 0; fi\n"
                          "echo 'Cuda compilation tools, release 99.1, V99.1'\n")
    os.chmod(nvcc, os.stat(nvcc).st_mode | stat.S_IEXEC)
    return root


@pytest.mark.parametrize("body, how", [
    ('exec {toolkit}/bin/nvcc "$@"', " -> "),                         # the path is in its text
    ('X={toolkit}\nexec "$X/bin/nvcc" "$@"', "dry run"),              # built at run time: nvcc says
])
def test_toolkit_found_through_a_wrapper_script(setup_module, tmp_path, monkeypatch, body, how):
    """An `nvcc` on PATH that is a script exec'ing the toolkit's, not the toolkit's own."""
    toolkit = _fake_toolkit(str(tmp_path / "cuda-99.1"))
    wrap = tmp_path / "wrapbin"
    wrap.mkdir()
    (wrap / "nvcc").write_text("#!/bin/sh\n" + body.format(toolkit=toolkit) + "\n")
    (wrap / "nvcc").chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrap}:/usr/bin:/bin")
    root, found = setup_module.find_cuda_home()
    assert root == toolkit and how in found, found
    assert setup_module.nvcc_version(root) == "99.1"


def test_cuda_home_that_is_not_a_toolkit_is_reported(setup_module, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    root, how = setup_module.find_cuda_home()
    assert root is None and str(tmp_path) in how and "not a CUDA toolkit" in how


def test_fast3d_cuda_1_without_toolkit_fails_loudly(tmp_path):
    env = dict(os.environ, FAST3D_CUDA="1", CUDA_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "t"),
                        "--build-lib", str(tmp_path / "l")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "FAST3D_CUDA=1 but CUDA cannot be built" in r.stderr + r.stdout


def test_fast3d_cuda_rejects_other_values(tmp_path):
    env = dict(os.environ, FAST3D_CUDA="yes")
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "FAST3D_CUDA must be 0, 1 or unset; got 'yes'" in r.stderr


@pytest.mark.slow
def test_fast3d_cuda_0_builds_cpu_only(tmp_path):
    env = dict(os.environ, FAST3D_CUDA="0")
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "t"),
                        "--build-lib", str(tmp_path / "l")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tmp_path / "l" / "fast3d" / "_build_info.json").read_text())
    assert info["cuda"] is False and info["cuda_sources"] == [] and "FAST3D_CUDA=0" in info["cuda_how"]
    assert list((tmp_path / "l" / "fast3d").glob("_C*.so"))


def test_installed_extension_matches_its_build_info():
    assert _native.unavailable_reason() is None, _native.unavailable_reason()
    info = _native.build_info()
    assert info, "fast3d/_build_info.json missing: was the package built with setup.py?"
    assert _native.built_with_cuda() == info["cuda"]
    if info["cuda"]:
        assert set(info["cuda_objects_bytes"]) == set(info["cuda_sources"])
        assert all(v > 0 for v in info["cuda_objects_bytes"].values())


def test_only_the_bindings_include_torch():
    """Kernels take raw pointers (docs/design.md#anatomy-of-an-op): no torch, ATen, c10 or pybind11 header outside
    csrc/bindings.cpp, so a .cu file compiles in seconds and the kernels stay reusable."""
    import glob
    import re

    found = []
    for path in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True):
        if os.path.isfile(path) and not path.endswith("bindings.cpp"):
            for n, line in enumerate(open(path, encoding="utf-8"), 1):
                if re.match(r'\s*#\s*include\s*[<"](torch|ATen|c10|pybind11)/', line):
                    found.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)
    assert glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True)


def test_gpu_session_script_refuses_what_it_cannot_run(tmp_path):
    """profiling/gpu_session.sh checks its STAGES before anything else, and stops at once where
    there is no GPU (its GPU work is run on a lent machine: see the closing notes)."""
    script = os.path.join(ROOT, "profiling", "gpu_session.sh")
    env = dict(os.environ, STAGES="tests nope", OUT=str(tmp_path / "out"))
    r = subprocess.run([script], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown stage 'nope' in STAGES" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


# Registers per thread the blend kernels of csrc/gaussians/cuda may use on sm_90 (65,536 registers
# per SM, blocks of 256 threads): the D <= 64 bucket of the backward held 231 (one block per SM,
# 12.5% occupancy) for every D in 17..64 before the 32-channel bucket and the register-free feature
# gradients; now at most 128 (two blocks, 25%) for D 33..64 and 64 (four blocks, 50%) for D 17..32.
MAX_REGISTERS_SM90 = {
    "rasterize_backward_kernel<64>": 128,
    "rasterize_backward_kernel<32>": 64,
    "rasterize_forward_kernel<64>": 128,
    "rasterize_forward_kernel<32>": 64,
}


def test_blend_kernels_fit_their_register_budget(setup_module, tmp_path):
    """ptxas's register counts of the blend kernels for sm_90, compiled as setup.py compiles them."""
    import re

    root, how = setup_module.find_cuda_home()
    if root is None:
        pytest.skip(f"no CUDA toolkit: {how}")
    nvcc = os.path.join(root, "bin", "nvcc")
    src = os.path.join(ROOT, "csrc", "gaussians", "cuda", "gaussians_cuda.cu")
    cmd = [nvcc, *setup_module.NVCC_FLAGS, "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v",
           f"-I{os.path.join(ROOT, 'csrc')}", "-c", src, "-o", str(tmp_path / "g.o")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    used, entry = {}, None
    for line in r.stderr.splitlines():
        m = re.search(r"Compiling entry function '\S*?(rasterize_(?:backward|forward)_kernel)ILi(\d+)E", line)
        if m:
            entry = f"{m.group(1)}<{m.group(2)}>"
        elif entry and (m := re.search(r"Used (\d+) registers", line)):
            used[entry], entry = int(m.group(1)), None
    assert set(MAX_REGISTERS_SM90) <= set(used), used
    over = {k: (used[k], limit) for k, limit in MAX_REGISTERS_SM90.items() if used[k] > limit}
    assert not over, f"registers (used, budget): {over}"


def test_format_check_passes_here_and_fails_on_a_misformatted_file(tmp_path):
    """.ci/check_format.py (run by .ci/run) accepts csrc/ as committed and rejects a file that
    .clang-format would change."""
    import re
    import shutil

    pin = re.search(r'"clang-format==([0-9.]+)"', open(os.path.join(ROOT, "pyproject.toml")).read()).group(1)
    exe = shutil.which("clang-format")
    if exe is None or f"version {pin}" not in subprocess.run([exe, "--version"], capture_output=True,
                                                             text=True).stdout:
        pytest.skip(f"clang-format {pin} (pyproject's dev extra) is not installed")
    script = os.path.join(ROOT, ".ci", "check_format.py")
    r = subprocess.run([sys.executable, script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("pyproject.toml", ".clang-format"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "bad.cpp").write_text("int  f(int x){return x+1;}\n")
    r = subprocess.run([sys.executable, script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "csrc/bad.cpp" in r.stderr and "not formatted" in r.stderr, r.stderr
