"""What a result was measured on: versions, device name and slug, commit, and the device's
measured peaks (memory bandwidth and matmul rate), so every row can be read against its floor."""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
import time

import torch


def versions() -> dict:
    from fast3d import _native

    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # not installed, or broken
        triton_version = f"unavailable ({type(e).__name__})"
    info = _native.build_info()
    gpu = "no GPU"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
    return {
        "fast3d": __import__("fast3d").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cuda_toolkit": info.get("nvcc"),
        "cuda_archs": info.get("cuda_archs"),
        "triton": triton_version,
        "gpu": gpu,
        "cpu": cpu_name(),
        "commit": git_commit(),
    }


@functools.cache
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_name()}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    """Results folder name: e.g. `nvidia-h100-80gb-hbm3`, `cpu-amd-epyc-9554-64-core-processor-2-threads`."""
    return slug(device_name(device))


@functools.cache
def git_commit() -> str | None:
    """Short commit of the source tree, with -dirty when fast3d/ or csrc/ differ from it."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "fast3d", "csrc", "setup.py"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_peaks(device: torch.device) -> dict:
    """Measured ceilings of the device: a large copy (bytes read + written) and a large matmul
    (bf16 on GPU, float32 on CPU). Best of a few repetitions: the ceiling, not the typical."""
    if device.type == "cuda":
        n_copy, n_mm, mm_dtype, reps = 2**28, 8192, torch.bfloat16, 10   # 1 GiB float32 copy
    else:
        n_copy, n_mm, mm_dtype, reps = 2**27, 2048, torch.float32, 3     # 512 MiB: past the L3
    src = torch.rand(n_copy, device=device)
    dst = torch.empty_like(src)
    copy_s = _best_seconds(lambda: dst.copy_(src), device, reps)  # noqa: F821 -- called before the del
    del src, dst
    a = torch.randn(n_mm, n_mm, device=device, dtype=mm_dtype)
    b = torch.randn(n_mm, n_mm, device=device, dtype=mm_dtype)
    mm_s = _best_seconds(lambda: a @ b, device, reps)
    return {
        "peak_gbps": 2 * n_copy * 4 / copy_s / 1e9,
        "peak_tflops": 2 * n_mm**3 / mm_s / 1e12,
        "peak_how": f"copy of {n_copy * 4 / 2**20:.0f} MiB; {n_mm}^3 {str(mm_dtype).replace('torch.', '')} matmul",
    }
