"""The backend registry: which implementation of each op can serve which inputs, and why not.

Every op (``rasterization``, ``composite``, ...) registers its backends here. A backend declares

* ``devices``: device types it runs on (``"cpu"``, ``"cuda"``),
* ``dtypes``: floating dtypes it accepts,
* ``features``: optional feature flags it implements (e.g. composite's ``"packed_native"``): a query
  that needs one passes only backends that declare it, and an op may read a declared one to choose
  a code path,
* ``available()``: why it cannot run on this machine at all (extension not built, no GPU, triton
  missing), or None,
* ``check(query)``: extra reasons it cannot serve these particular inputs (sizes, layouts), read
  from ``query.shape``: a small frozen dataclass the op defines (its ``shape_type``) holding what its
  checks read, typed, instead of string keys,
* ``priority``: higher is faster; ``backend="auto"`` picks the highest that can serve,
* ``doc``: one line on how it works, shown by ``fast3d info``.

``select(op, "auto" | name, query)`` returns the backend to run, or raises ``ValueError`` listing,
for every candidate, the reasons it cannot serve (in the style of xformers' not_supported_reasons).
``fast3d info`` prints :func:`availability` for every op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

BACKEND_NAMES = ("torch", "cpu", "cuda", "triton")


@dataclass(frozen=True)
class Query:
    """What an op call needs from a backend.

    Attributes:
        device, dtype: the inputs' device and (compute) dtype.
        features: feature flags the call needs (see the module docstring).
        shape: the op's typed capability query, read by its backends' ``check`` (e.g.
            :class:`fast3d.ops.rasterization.api.RasterShape`); None for an op whose backends
            check nothing beyond device, dtype and features.
    """

    device: torch.device
    dtype: torch.dtype
    features: frozenset = frozenset()
    shape: object = None


@dataclass(frozen=True)
class Backend:
    """One implementation of an op; fields as :func:`register` describes them."""

    op: str
    name: str
    fn: Callable
    devices: tuple
    dtypes: tuple
    priority: int
    features: frozenset = frozenset()
    available: Callable[[], str | None] = lambda: None
    check: Callable[[Query], list] | None = None
    shape_type: type | None = None
    doc: str = ""

    def not_supported_reasons(self, q: Query) -> list[str]:
        """Why this backend cannot serve ``q`` (empty if it can): its unavailability alone, else
        every device / dtype / feature mismatch, else what ``check`` says."""
        reason = self.available()
        if reason:
            return [reason]
        if self.shape_type is not None and not isinstance(q.shape, self.shape_type):
            raise ValueError(f"{self.op}/{self.name}: Query.shape must be a {self.shape_type.__name__}; "
                             f"got {q.shape!r}")
        reasons = []
        if q.device.type not in self.devices:
            reasons.append(f"device {q.device.type!r} not in {list(self.devices)}")
        if q.dtype not in self.dtypes:
            reasons.append(f"dtype {str(q.dtype).replace('torch.', '')} not in "
                           f"{[str(d).replace('torch.', '') for d in self.dtypes]}")
        missing = sorted(q.features - self.features)
        if missing:
            reasons.append(f"features {missing} not supported")
        if self.check is not None and not reasons:
            reasons.extend(self.check(q))
        return reasons


_REGISTRY: dict[str, dict[str, Backend]] = {}


def register(op: str, name: str, fn: Callable, *, devices: Iterable[str], dtypes: Iterable[torch.dtype],
             priority: int, features: Iterable[str] = (), available: Callable[[], str | None] | None = None,
             check: Callable[[Query], list] | None = None, shape_type: type | None = None,
             doc: str = "") -> Backend:
    """Register (or replace) backend ``name`` of ``op``.

    Args:
        op: the op's name (``"composite"``, ...).
        name: one of :data:`BACKEND_NAMES`.
        fn: the implementation, called with the op's positional arguments.
        devices: device types it runs on; dtypes: floating dtypes it accepts.
        priority: higher is faster; ``auto`` tries the highest first.
        features: feature flags it implements.
        available: returns why it cannot run on this machine at all, or None.
        check: returns why it cannot serve a query's ``shape`` (empty list if it can).
        shape_type: the class ``Query.shape`` must be an instance of when this backend is asked
            (None: not checked).
        doc: one line on how it works (``fast3d info`` shows it).

    Returns:
        The registered :class:`Backend`.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend name must be one of {BACKEND_NAMES}; got {name!r}")
    b = Backend(op=op, name=name, fn=fn, devices=tuple(devices), dtypes=tuple(dtypes), priority=priority,
                features=frozenset(features), available=available or (lambda: None), check=check,
                shape_type=shape_type, doc=doc)
    _REGISTRY.setdefault(op, {})[name] = b
    return b


def ops() -> list[str]:
    return sorted(_REGISTRY)


def backends(op: str) -> dict[str, Backend]:
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; valid: {', '.join(ops())}")
    return dict(_REGISTRY[op])


def select(op: str, backend: str, q: Query) -> Backend:
    """The backend to run ``op`` on: the named one, or for ``"auto"`` the fastest that can serve."""
    table = backends(op)
    if backend == "auto":
        candidates = sorted(table.values(), key=lambda b: -b.priority)
    elif backend in table:
        candidates = [table[backend]]
    else:
        raise ValueError(f"{op}: backend must be 'auto' or one of {sorted(table)}; got {backend!r}")
    why = {}
    for b in candidates:
        if backend == "auto" and b.name == "triton" and q.device.type == "cpu":
            # CPU tensors reach Triton only through its interpreter (TRITON_INTERPRET=1): right,
            # but slower than any other backend, so `auto` leaves it to an explicit request.
            why[b.name] = ["Triton on CPU tensors runs in the interpreter: used only when named (backend='triton')"]
            continue
        reasons = b.not_supported_reasons(q)
        if not reasons:
            return b
        why[b.name] = reasons
    detail = "; ".join(f"{name}: {', '.join(r)}" for name, r in why.items())
    raise ValueError(f"{op}: no backend can serve these inputs (backend={backend!r}) -- {detail}")


def availability(op: str) -> dict[str, str | None]:
    """Backend name -> None if it can run on this machine, else the reason it cannot."""
    return {name: b.available() for name, b in sorted(backends(op).items(), key=lambda kv: -kv[1].priority)}


# --- availability probes shared by the ops -----------------------------------------------------
# Each is a constant of the process: torch.compile evaluates it once while tracing instead of
# tracing into the import machinery behind it.


@torch.compiler.assume_constant_result
def native_cpu_reason() -> str | None:
    from fast3d import _native

    return _native.unavailable_reason()


@torch.compiler.assume_constant_result
def native_cuda_reason() -> str | None:
    from fast3d import _native

    reason = _native.unavailable_reason()
    if reason:
        return reason
    if not _native.built_with_cuda():
        return f"extension built without CUDA ({_native.build_info().get('cuda_how', 'unknown')})"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    return None


def triton_interpreted() -> bool:
    """Triton kernels run in its interpreter (TRITON_INTERPRET=1): as Python, on CPU tensors too."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Per-block shared memory a kernel may opt into, by compute capability (CUDA programming guide,
# "Technical Specifications per Compute Capability"); the build targets every arch listed here.
SHARED_MEMORY_OPTIN = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}

_gpu_launch_configs = False


@contextlib.contextmanager
def gpu_launch_configs():
    """Inside this block, the Triton ops choose the tile / warp / stage configurations and the dot
    operand types a GPU launch would, even under the interpreter. The compile test
    (fast3d.triton_aot) records launches this way, so what it compiles is what a GPU runs."""
    global _gpu_launch_configs
    previous, _gpu_launch_configs = _gpu_launch_configs, True
    try:
        yield
    finally:
        _gpu_launch_configs = previous


def triton_interpreter_configs() -> bool:
    """Choose the interpreter's configurations (small tiles, one stage, bf16 dots upcast): true under
    TRITON_INTERPRET=1 unless :func:`gpu_launch_configs` asks for a GPU's."""
    return triton_interpreted() and not _gpu_launch_configs


def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one block may use on ``device`` (the opt-in maximum). Under the
    interpreter, or while recording GPU configurations without a GPU, the smallest limit of the
    architectures the build targets, so a configuration chosen here launches on all of them."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    return min(SHARED_MEMORY_OPTIN.values())


def triton_tf32(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a Triton op multiplies float32 operands in tf32: where torch's own matmuls would
    (``torch.backends.cuda.matmul.allow_tf32``), on CUDA tensors, and while recording a GPU's
    configurations (:func:`gpu_launch_configs`) on CPU ones, so the compile test sees tf32 launches."""
    if dtype != torch.float32 or not torch.backends.cuda.matmul.allow_tf32:
        return False
    return device.type == "cuda" or not triton_interpreter_configs()


def cuda_device_guard(device: torch.device):
    """The context every Triton launch runs in: Triton launches on the *current* CUDA device, so the
    tensors' device is made current for the launch (``torch.library.custom_op`` adds no guard).
    A no-op context for CPU tensors (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@torch.compiler.assume_constant_result
def triton_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton not importable ({type(e).__name__}: {e})"
    if not torch.cuda.is_available() and not triton_interpreted():
        return "no CUDA GPU (set TRITON_INTERPRET=1 to run Triton kernels on the CPU, slowly)"
    return None


def triton_devices() -> tuple:
    """Triton kernels run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1."""
    return ("cuda", "cpu") if triton_interpreted() else ("cuda",)


def device_memory(device: torch.device) -> int:
    """The bytes of memory of ``device``: the GPU's total memory, or the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
