"""Builds fast3d's native extension, ``fast3d._C``.

* C++ CPU kernels (``csrc/**/cpu/*.cpp``) are always built, with OpenMP.
* CUDA kernels (``csrc/**/cuda/*.cu``) are built whenever a CUDA toolkit is found, for every
  architecture in ``CUDA_ARCHS`` (sm_80, 86, 89, 90; ``FAST3D_CUDA_ARCHS`` overrides).
  ``FAST3D_CUDA=0`` skips them; ``FAST3D_CUDA=1`` makes a missing toolkit an error. When a
  toolkit is found, an nvcc error fails the build: CUDA is never dropped silently.
* ``fast3d/_build_info.json`` records what was built (sources, archs, toolkit, or why CUDA was not
  built); ``fast3d info`` shows it and CI checks that every ``.cu`` file is in it.

Only ``csrc/bindings.cpp`` includes torch headers; kernels take raw pointers, sizes and strides, so a
``.cu`` file compiles in seconds per architecture.

Install with ``pip install --no-build-isolation -e .`` after torch is installed (see README).
"""

import glob
import json
import os
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The one list of GPU architectures fast3d is built for (A100, A10/3090, L4/4090, H100/H200).
# FAST3D_CUDA_ARCHS="90" narrows it, e.g. to build only for the GPU at hand.
CUDA_ARCHS = os.environ.get("FAST3D_CUDA_ARCHS", "80,86,89,90").replace(" ", "").split(",")
# C++20: torch >= 2.10 headers require it (only csrc/bindings.cpp includes them).
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]


def _real_toolkit(root):
    """A directory is a CUDA toolkit if it has bin/nvcc and include/cuda_runtime.h."""
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
        os.path.join(root, "include", "cuda_runtime.h"))


def find_cuda_home():
    """Locate the CUDA toolkit without trusting that `nvcc` on PATH sits inside it.

    An `nvcc` on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc exec'ing the real one), so
    its grandparent is not necessarily the toolkit: each candidate is checked for bin/nvcc and
    include/cuda_runtime.h. Returns (path or None, how it was found or why nothing was).
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if _real_toolkit(root):
                return root, f"${var}"
            return None, f"${var}={root} is not a CUDA toolkit (no bin/nvcc or include/cuda_runtime.h)"
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        root = os.path.dirname(os.path.dirname(real))
        if _real_toolkit(root):
            return root, f"nvcc on PATH ({nvcc})"
        # A wrapper script: read the path it execs.
        try:
            with open(real, "rb") as f:
                text = f.read(4096).decode("utf-8", "replace")
            for token in text.split():
                token = token.strip("'\"")
                if token.endswith("/bin/nvcc"):
                    root = os.path.dirname(os.path.dirname(token))
                    if _real_toolkit(root):
                        return root, f"wrapper {nvcc} -> {token}"
        except OSError:
            pass
        # A wrapper that builds the path (a variable, a module system): ask nvcc itself, whose
        # dry run names its toolkit ("#$ TOP=<root>/bin/..").
        try:
            r = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                               capture_output=True, text=True, timeout=60)
            for line in (r.stdout + r.stderr).splitlines():
                if line.startswith("#$ TOP="):
                    root = os.path.normpath(line.split("=", 1)[1].strip().strip('"'))
                    if _real_toolkit(root):
                        return root, f"wrapper {nvcc} (its dry run: TOP={root})"
        except (OSError, subprocess.SubprocessError):
            pass
    candidates = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/opt/cuda"]
    for root in candidates:
        if _real_toolkit(root):
            return root, f"standard location {root}"
    return None, "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)"


def nvcc_version(cuda_home):
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if "release" in line:
            return line.split("release")[-1].split(",")[0].strip()
    return "unknown"


def main():
    want = os.environ.get("FAST3D_CUDA", "").strip()
    if want not in ("", "0", "1"):
        sys.exit(f"FAST3D_CUDA must be 0, 1 or unset; got {want!r}")
    cuda_home, how = (None, "skipped: FAST3D_CUDA=0") if want == "0" else find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if cuda_home and torch.version.cuda is None:
        cuda_home, how = None, f"torch {torch.__version__} is a CPU-only build; CUDA kernels need a CUDA build of torch"
    if want == "1" and not cuda_home:
        sys.exit(f"FAST3D_CUDA=1 but CUDA cannot be built: {how}")

    cpp_sources = sorted(glob.glob("csrc/**/cpu/*.cpp", recursive=True)) + ["csrc/bindings.cpp"]
    cu_sources = sorted(glob.glob("csrc/**/cuda/*.cu", recursive=True)) if cuda_home else []
    include_dirs = [os.path.join(ROOT, "csrc")]
    info = {
        "torch": torch.__version__,
        "cpu_sources": cpp_sources,
        "cuda": bool(cuda_home),
        "cuda_home": cuda_home,
        "cuda_how": how,
        "nvcc": nvcc_version(cuda_home) if cuda_home else None,
        "cuda_archs": CUDA_ARCHS if cuda_home else [],
        "cuda_sources": cu_sources,
    }
    if cuda_home:
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
        # PTX for the newest arch too, so later GPUs can JIT it.
        gencode.append(f"-gencode=arch=compute_{CUDA_ARCHS[-1]},code=compute_{CUDA_ARCHS[-1]}")
        ext = CUDAExtension(
            "fast3d._C", cpp_sources + cu_sources, include_dirs=include_dirs,
            define_macros=[("FAST3D_WITH_CUDA", "1")],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS + gencode},
            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension(
            "fast3d._C", cpp_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"])

    print(f"fast3d: CUDA {'ON' if cuda_home else 'OFF'} ({how}); {len(cu_sources)} .cu files", file=sys.stderr)

    class Build(BuildExtension):
        """Builds, then records in _build_info.json (next to _C) the object each .cu became."""

        def run(self):
            # setuptools clears `inplace` while it builds (and copies _C into the tree afterwards):
            # remember whether the record belongs in the source tree too.
            self.to_source = bool(self.inplace or getattr(self, "editable_mode", False))
            super().run()

        def build_extensions(self):
            super().build_extensions()
            objects = {}
            for src in cu_sources:
                obj = os.path.join(self.build_temp, os.path.splitext(src)[0] + ".o")
                if not os.path.isfile(obj):
                    sys.exit(f"fast3d: {src} produced no object ({obj}); the CUDA build is incomplete")
                objects[src] = os.path.getsize(obj)
            info["cuda_objects_bytes"] = objects
            # Next to the built _C, and in the source tree when _C is copied there (editable installs).
            dirs = {os.path.dirname(self.get_ext_fullpath("fast3d._C"))}
            if getattr(self, "to_source", False):
                dirs.add(os.path.join(ROOT, "fast3d"))
            for pkg_dir in dirs:
                with open(os.path.join(pkg_dir, "_build_info.json"), "w") as f:
                    json.dump(info, f, indent=1)

    setup(ext_modules=[ext], cmdclass={"build_ext": Build})


if __name__ == "__main__":
    main()
