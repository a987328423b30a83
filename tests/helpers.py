"""Shared test helpers: a verbose allclose, gradient comparison with random upstream gradients.
Tolerance tables live in each op's test module, one table per op, each entry with its reason;
outputs are poisoned for every op test by tests/ops/conftest.py."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

import fast3d.backends


def byte_flips(raw: bytes, gen: torch.Generator, count: int):
    """``count`` copies of ``raw`` with 1 to 3 random bytes overwritten (drawn from ``gen``): fuzz
    inputs for the file readers, which must load them or raise ValueError."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
    for _ in range(count):
        b = bytearray(raw)
        for pos in rng.integers(0, len(b), size=rng.integers(1, 4)):
            b[pos] = int(rng.integers(0, 256))
        yield bytes(b)


def assert_close(actual: Tensor, expected: Tensor, *, atol: float, rtol: float, name: str = "tensor",
                 worst: int = 5) -> None:
    """allclose that never passes NaN and prints the worst elements (index, actual, expected)."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nonfinite = ~torch.isfinite(a) & torch.isfinite(e)
    err = (a - e).abs()
    err = torch.where(nonfinite, torch.full_like(err, float("inf")), err)
    bound = atol + rtol * e.abs()
    bad = (err > bound) | nonfinite
    if not bad.any():
        return
    excess = (err - bound).flatten()
    k = min(worst, int(bad.sum()))
    idx = torch.topk(torch.nan_to_num(excess, nan=float("inf")), k).indices
    rows = []
    for flat in idx.tolist():
        pos = tuple(torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
        pos = tuple(int(p) for p in pos)
        rows.append(f"  {pos}: actual={a.flatten()[flat].item():.9g} expected={e.flatten()[flat].item():.9g} "
                    f"|diff|={err.flatten()[flat].item():.3g}")
    raise AssertionError(
        f"{name}: {int(bad.sum())}/{a.numel()} elements outside atol={atol:g} rtol={rtol:g} "
        f"(max |diff| {err.max().item():.3g}); worst:\n" + "\n".join(rows))


def random_like(t: Tensor, gen: torch.Generator) -> Tensor:
    return torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)


def grads(fn: Callable[..., Sequence[Tensor]], inputs: Sequence[Tensor], upstream: Sequence[Tensor | None]):
    """Gradients of sum_k <upstream_k, fn(*inputs)_k> with respect to `inputs`."""
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    outs = fn(*inputs)
    pairs = [(o, g) for o, g in zip(outs, upstream) if g is not None]
    return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)


def triton_launches_inside_guard(monkeypatch, run: Callable[[], object]) -> list[tuple[str, object]]:
    """The devices of the guards every Triton launch made by run() ran inside (a fake guard that
    records its device, and a launch hook that fails a launch made outside any guard)."""
    from triton.runtime.interpreter import InterpretedFunction

    active, guarded = [], []

    @contextlib.contextmanager
    def guard(device):
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    original = InterpretedFunction.run

    def launch(self, *args, **kwargs):
        assert active, f"{self.fn.__name__} launched outside torch.cuda.device(...)"
        guarded.append((self.fn.__name__, active[-1]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(fast3d.backends, "cuda_device_guard", guard)
    monkeypatch.setattr(InterpretedFunction, "run", launch)
    run()
    return guarded


def object_png(gen: torch.Generator, size: tuple[int, int] = (50, 40)) -> bytes:
    """An RGBA PNG (width, height = ``size``): random colours, opaque on a rectangle, transparent
    around it -- an object cut-out as the image-to-3D paths take it."""
    import io

    from PIL import Image

    from fast3d.io.images import to_uint8

    W, H = size
    rgba = torch.zeros(4, H, W)
    rgba[:3] = torch.rand(3, H, W, generator=gen)
    rgba[3, H // 4:3 * H // 4, W // 5:4 * W // 5] = 1
    buf = io.BytesIO()
    Image.fromarray(to_uint8(rgba)).save(buf, format="PNG")
    return buf.getvalue()



def train_killed_after_checkpoint(cmd: Sequence[str], out, step: int, timeout: float = 900.0) -> None:
    """Run the ``fast3d train`` command ``cmd`` (output directory ``out``) and SIGKILL its whole
    process group as soon as ``out/checkpoints/latest`` names ``step``: a run killed mid-way with that
    checkpoint complete. AssertionError if it exits on its own first (then nothing was killed) or
    does not get there within ``timeout`` seconds."""
    import os
    import signal
    import subprocess
    import tempfile
    import time

    latest, want = os.path.join(str(out), "checkpoints", "latest"), f"step{step:08d}"
    with tempfile.TemporaryFile() as log:
        p = subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while not (os.path.exists(latest) and open(latest).read().strip() == want):
                if p.poll() is not None:
                    log.seek(0)
                    raise AssertionError(f"the run exited ({p.returncode}) before checkpoint {want} was seen:\n"
                                         f"{log.read().decode(errors='replace')[-3000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"no checkpoint {want} within {timeout} s")
                time.sleep(0.05)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def randomize_(module: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Random weights from the test's generator (no parameter trivially zero), matrices scaled by
    1/sqrt(fan-in) to keep activations O(1)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (p[0].numel() ** -0.5 if p.dim() > 1 else 0.1))
    return module
