"""Compile fast3d's Triton kernels for NVIDIA GPUs on a machine that has none.

CI has no GPU. The interpreter (TRITON_INTERPRET=1) checks what a kernel computes, not that it
compiles: it runs the kernel as Python, so a global that is not a constexpr, an unsupported
construct or a shape the backend rejects passes there and fails on the first GPU. This module
records the launches a run makes under the interpreter (kernel, argument types, constexprs, warps),
then compiles each, in a fresh process without the interpreter, for the listed compute
capabilities: Triton's front end, LLVM and ptxas, no driver needed. It reports each kernel's
registers and spill stack (cuobjdump) and shared memory, the static half of a tuning pass.

    with record_launches() as launches:
        ...   # run ops on CPU tensors under TRITON_INTERPRET=1
    results = compile_launches(launches, archs=(80, 90))

``python -m fast3d.triton_aot SPECS.json`` is the compiling half (run by compile_launches).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

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
def record_launches():
    """Collect one spec per distinct launch made inside the block under TRITON_INTERPRET=1:
    dict(module, kernel, signature {arg: type | "constexpr"}, constants {arg: value}, options)."""
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

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    constants = {k: tl.dtype(v["tl_dtype"]) if isinstance(v, dict) else v for k, v in spec["constants"].items()}
    src = ASTSource(fn, spec["signature"], constants)
    result = dict(kernel=f"{spec['module']}.{spec['kernel']}", arch=f"sm_{arch}",
                  constants={k: str(v) for k, v in constants.items()}, **spec["options"])
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec["options"])
    except Exception as e:  # noqa: BLE001 -- every failure is reported with its kernel and message
        return dict(result, ok=False, error=f"{type(e).__name__}: {e}")
    # Triton's shared memory is dynamic: the launch size is in the metadata, not the cubin.
    return dict(result, ok=True, shared=compiled.metadata.shared, **_resource_usage(compiled.asm["cubin"]))


def compile_launches(launches: list[dict], archs=(80, 90), timeout: float = 1200) -> list[dict]:
    """Compile every recorded launch for every arch in a process without the interpreter.
    Returns one dict per (launch, arch): kernel, arch, ok, error or reg/stack/shared."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.json")
        with open(path, "w") as f:
            json.dump(dict(launches=launches, archs=list(archs)), f)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-m", "fast3d.triton_aot", path], capture_output=True, text=True,
                              env=env, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"fast3d.triton_aot exited with {proc.returncode}:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m fast3d.triton_aot LAUNCHES.json", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("fast3d.triton_aot: unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        job = json.load(f)
    results = [_compile_one(spec, arch) for spec in job["launches"] for arch in job["archs"]]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
