"""What the model-level workloads of ``fast3d bench`` share: the one cached model, orbit
cameras, flop counting and the out-of-memory guard.

Nothing here imports a model at import time: the bench registers these workloads when it runs, and
the models (diffusers, transformers) load only when a workload runs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import Tensor

from fast3d.backends import device_memory  # noqa: F401  (the workloads read it through this module; tests shrink it)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# One model at a time: a workload's input sets and backends share it; the next op's model
# replaces it (big models of three ops would not fit a GPU together with their gradients).
_CACHE: dict = {}


def dtype_of(p: dict) -> torch.dtype:
    return DTYPES[p["dtype"]]


def cached_model(key: tuple, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The model for ``key`` (built by ``build`` with torch's global seed fixed at 0, the caller's
    random state untouched), replacing any other cached model."""
    if key not in _CACHE:
        clear_cache()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _CACHE[key] = build()
    return _CACHE[key]


def clear_cache() -> None:
    _CACHE.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # a no-op unless CUDA was initialised


def orbit_cameras(B: int, V: int, resolution: int, gen: torch.Generator, *, distance: float, fov_y_deg: float,
                  orthogonal: int = 0) -> tuple[Tensor, Tensor]:
    """V cameras per sample around the unit box (fast3d's world, +Z up) looking at the origin, at
    ``distance``, elevations in [-11, 34] degrees; the first ``orthogonal`` views at evenly spaced
    azimuths (LGM's 4 orthogonal inputs), the others at random azimuths.
    Returns viewmats [B, V, 4, 4], Ks [B, V, 3, 3] (pixels of a resolution^2 image), float32."""
    from fast3d import cameras

    az = torch.rand(B, V, generator=gen, dtype=torch.float64) * (2 * math.pi)
    if orthogonal:
        az[:, :orthogonal] = az[:, :1] + torch.arange(orthogonal, dtype=torch.float64) * (2 * math.pi / orthogonal)
    el = torch.rand(B, V, generator=gen, dtype=torch.float64) * 0.8 - 0.2
    return cameras.orbit_cameras(az, el, distance, fov_y_deg, resolution)


def count_flops(fn: Callable[[], object]) -> int:
    """Flops of ``fn()`` as torch.utils.flop_counter counts them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def split_passes(pass_: str, fwd: tuple[int, int], bwd: tuple[int, int]) -> tuple[int, int]:
    """(bytes, flops) of a pass from those of the forward and of the backward."""
    if pass_ == "forward":
        return fwd
    if pass_ == "backward":
        return bwd
    return fwd[0] + bwd[0], fwd[1] + bwd[1]


@contextlib.contextmanager
def oom_as_value_error(what: str):
    """An out-of-memory error inside becomes a ValueError naming the workload: the harness then
    skips the backend with that reason (first call) or reports the measurement as failed."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise ValueError(f"{what}: out of memory ({str(e).splitlines()[0][:200]})") from None
