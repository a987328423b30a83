"""Compile fast3d's Triton kernels for NVIDIA GPUs on a machine that has none.

CI has no GPU. The interpreter (TRITON_INTERPRET=1) checks what a kernel computes, not that it
compiles: it runs the kernel as Python, so a global that is not a constexpr, an unsupported
construct or a shape the backend rejects passes there and fails on the first GPU. This module
records the launches a run makes under the interpreter (kernel, argument types, constexprs, warps),
then compiles each, in a fresh process without the interpreter, for the listed compute
capabilities: Triton's front end, LLVM and ptxas, no driver needed. It reports each kernel's
registers and spill stack (cuobjdump) and shared memory, the static half of a tuning pass.

    with backends.gpu_launch_configs(), record_launches() as launches:
        ...   # run ops on CPU tensors under TRITON_INTERPRET=1, choosing a GPU's configurations
    results = compile_launches(launches, archs=(80, 90))
    failures = check_results(results)        # compile errors and shared memory past an arch's limit

``compile_launches(..., triton_path=ensure_triton("3.6.0"))`` compiles with another Triton (installed
once into a cache folder), so an API an older Triton lacks fails here rather than on a GPU.
``python -m fast3d.triton_aot SPECS.json`` is the compiling half (run by compile_launches).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch

from fast3d import backends

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64",
        torch.int32: "*i32", torch.int64: "*i64", torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return _PTR[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type a Triton argument of type {type(value).__name__}")


def _constexpr_value(value):
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if isinstance(value, tl.constexpr):
        value = value.value
    return value


@contextlib.contextmanager
def record_launches(execute: bool = True):
    """Collect one spec per distinct launch made inside the block under TRITON_INTERPRET=1:
    dict(module, kernel, signature {arg: type | "constexpr"}, constants {arg: value}, options).

    Args:
        execute: run each kernel in the interpreter as usual. False records the launch and skips
            the kernel body: its outputs stay as allocated, while the ops' Python (forward and
            backward) runs on; for GPU-sized tiles, which the interpreter runs slowly."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[dict] = []
    seen = set()
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs[k] for k in _LAUNCH_OPTIONS if k in kwargs}
        call = {k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS}
        bound = inspect.signature(self.fn).bind(*args, **call)
        params = inspect.signature(self.fn).parameters
        signature, constants = {}, {}
        for name, value in bound.arguments.items():
            if "constexpr" in str(params[name].annotation):
                signature[name] = "constexpr"
                constants[name] = _constexpr_value(value)
            else:
                signature[name] = _arg_type(value)
        spec = dict(module=self.fn.__module__, kernel=self.fn.__name__, signature=signature, constants=constants,
                    options=options)
        key = json.dumps(spec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            launches.append(spec)
        if not execute:
            return None
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def _resource_usage(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = dict(re.findall(r"(REG|STACK):(\d+)", out))
    return {k.lower(): int(v) for k, v in usage.items()}


def _compile_one(spec: dict, arch: int) -> dict:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = dict(kernel=f"{spec['module']}.{spec['kernel']}", arch=f"sm_{arch}", triton=triton.__version__,
                  constants={k: str(v.get("tl_dtype") if isinstance(v, dict) else v)
                             for k, v in spec["constants"].items()}, **spec["options"])
    try:
        fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        constants = {k: tl.dtype(v["tl_dtype"]) if isinstance(v, dict) else v for k, v in spec["constants"].items()}
        src = ASTSource(fn, spec["signature"], constants)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec["options"])
    except Exception as e:  # noqa: BLE001 -- every failure is reported with its kernel and message
        return dict(result, ok=False, error=f"{type(e).__name__}: {e}")
    # Triton's shared memory is dynamic: the launch size is in the metadata, not the cubin.
    return dict(result, ok=True, shared=compiled.metadata.shared, **_resource_usage(compiled.asm["cubin"]))


def _compile_job(job: tuple) -> dict:
    return _compile_one(*job)


def compile_launches(launches: list[dict], archs=(80, 90), triton_path: str | None = None, jobs: int = 2,
                     timeout: float = 3600) -> list[dict]:
    """Compile every recorded launch for every arch in a process without the interpreter.

    Args:
        launches: specs from :func:`record_launches`.
        archs: compute capabilities to compile for (80 = sm_80 ...).
        triton_path: a folder holding another Triton package (:func:`ensure_triton`), put first on
            the compiling process's PYTHONPATH; None compiles with the installed Triton.
        jobs: compiling processes (each kernel and arch is one job).

    Returns:
        One dict per (launch, arch), in that order: kernel, arch, triton (its version), constants,
        options, ok, and error or reg/stack/shared (bytes of dynamic shared memory per block).
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.json")
        with open(path, "w") as f:
            json.dump(dict(launches=launches, archs=list(archs), jobs=jobs), f)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if triton_path is not None:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_path, env.get("PYTHONPATH")) if p)
        proc = subprocess.run([sys.executable, "-m", "fast3d.triton_aot", path], capture_output=True, text=True,
                              env=env, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"fast3d.triton_aot exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def limits_checked(archs, targets=None) -> dict[int, int]:
    """Target arch -> the compiled arch whose build stands for it: itself where compiled, else the
    highest compiled arch of the same major below it. Triton's NVIDIA backend lowers sm_80, sm_86
    and sm_89 alike (mma v2, cp.async; only fp8 conversions differ), so an sm_80 build's shared
    memory is that of sm_86/89 (tests/test_triton_compile.py checks this on a sample)."""
    out = {}
    for target in backends.SHARED_MEMORY_OPTIN if targets is None else targets:
        same = [a for a in archs if a // 10 == target // 10 and a <= target]
        if not same:
            raise ValueError(f"archs must cover every target arch {sorted(backends.SHARED_MEMORY_OPTIN)} "
                             f"(sm_{target} needs a compiled sm_{target // 10}x <= it); got {sorted(archs)}")
        out[target] = max(same)
    return out


def check_results(results: list[dict], limits: dict[int, int] | None = None) -> list[str]:
    """Every failure in compiled results: a kernel that did not compile, or one whose shared memory
    exceeds the per-block opt-in limit of a target arch it stands for (:func:`limits_checked`).

    Args:
        results: from :func:`compile_launches`.
        limits: arch -> bytes of the target archs to judge; default backends.SHARED_MEMORY_OPTIN
            (every arch the build targets). Each needs a compiled arch to stand for it.

    Returns:
        One line per failure (empty when every launch compiled and fits).
    """
    limits = backends.SHARED_MEMORY_OPTIN if limits is None else limits
    compiled_archs = sorted({int(r["arch"][3:]) for r in results})
    stands_for = limits_checked(compiled_archs, limits)
    failures = []
    for r in results:
        opts = dict(num_warps=r.get("num_warps"), num_stages=r.get("num_stages"))
        where = f"{r['arch']} {r['kernel']} (triton {r.get('triton')}) {r['constants']} {opts}"
        if not r["ok"]:
            failures.append(f"{where}: {r['error']}")
            continue
        for target, arch in sorted(stands_for.items()):
            if f"sm_{arch}" == r["arch"] and r["shared"] > limits[target]:
                failures.append(f"{where}: shared memory {r['shared']:,} B > sm_{target}'s limit "
                                f"{limits[target]:,} B")
    return failures


def ensure_triton(version: str, cache: str | None = None) -> str:
    """A folder holding Triton ``version`` for ``compile_launches(triton_path=...)``: installed once
    with pip (``--target``, no dependencies) into ``cache`` (default ~/.cache/fast3d/triton-VERSION,
    outside the checkout), reused afterwards.

    Returns:
        The folder. Raises RuntimeError (with pip's output) when it cannot be installed.
    """
    cache = cache or os.path.join(os.path.expanduser("~"), ".cache", "fast3d", f"triton-{version}")
    marker = os.path.join(cache, f"triton-{version}.dist-info")
    if os.path.isdir(marker):
        return cache
    parent = os.path.dirname(cache) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".triton-{version}-", dir=parent)
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                               "--target", tmp, f"triton=={version}"], capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isdir(os.path.join(tmp, f"triton-{version}.dist-info")):
            raise RuntimeError(f"pip could not install triton=={version} into {cache}:\n{proc.stderr[-2000:]}")
        if not os.path.isdir(marker):   # another process may have finished first
            shutil.rmtree(cache, ignore_errors=True)
            os.replace(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m fast3d.triton_aot LAUNCHES.json", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("fast3d.triton_aot: unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        job = json.load(f)
    work = [(spec, arch) for spec in job["launches"] for arch in job["archs"]]
    if job.get("jobs", 1) > 1 and len(work) > 1:
        with ProcessPoolExecutor(max_workers=job["jobs"]) as pool:
            results = list(pool.map(_compile_job, work))
    else:
        results = [_compile_job(w) for w in work]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
