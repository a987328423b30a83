"""Tests of the backend registry (fast3d/backends.py) on a throwaway op with fake backends:
auto selection by priority, availability and dtype/device/feature/check reasons, typed capability
queries (Query.shape), error messages for unknown ops and backends, availability(), and
register()'s name check."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import fast3d
from fast3d import backends
from fast3d.backends import Query

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # constructing a cuda device needs no GPU


@pytest.fixture
def op(seed):
    """A unique op name, removed from the registry after the test."""
    name = f"test_op_{seed}"
    assert name not in backends._REGISTRY
    yield name
    backends._REGISTRY.pop(name, None)


def fake(name):
    """A backend function that says who it is."""
    def fn(*args):
        return name
    return fn


def register_all(op, priorities, **over):
    """Register every name in BACKEND_NAMES on both devices and all float dtypes, with the given
    priorities; `over[name]` replaces keyword arguments of that backend."""
    for name, prio in priorities.items():
        kw = dict(devices=("cpu", "cuda"), dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
                  priority=prio)
        kw.update(over.get(name, {}))
        backends.register(op, name, fake(name), **kw)


def random_priorities(gen) -> dict:
    prios = torch.randperm(100, generator=gen)[:len(backends.BACKEND_NAMES)].tolist()
    return dict(zip(backends.BACKEND_NAMES, prios))


def by_priority(prios: dict) -> list:
    return sorted(prios, key=lambda n: -prios[n])


def test_auto_picks_highest_priority(op, gen):
    prios = random_priorities(gen)
    register_all(op, prios)
    best = by_priority(prios)[0]
    # CUDA queries: on CPU tensors `auto` never picks triton (see the interpreter test below).
    for q in (Query(CUDA, torch.float32), Query(CUDA, torch.float16)):
        b = backends.select(op, "auto", q)
        assert b.name == best and b.fn() == best and b.op == op
    # Every backend can be named explicitly.
    for name in prios:
        assert backends.select(op, name, Query(CPU, torch.float64)).name == name


def test_unavailable_backend_is_skipped_by_auto_and_explains_itself(op, gen):
    prios = random_priorities(gen)
    best, second = by_priority(prios)[:2]
    reason = f"fake extension missing ({gen.initial_seed()})"
    register_all(op, prios, **{best: dict(available=lambda: reason)})
    q = Query(CUDA, torch.float32)
    assert backends.select(op, "auto", q).name == second
    assert backends.backends(op)[best].not_supported_reasons(q) == [reason]
    with pytest.raises(ValueError, match=rf"{op}: no backend can serve these inputs \(backend='{best}'\)") as e:
        backends.select(op, best, q)
    assert f"{best}: {reason}" in str(e.value)


def test_available_reason_comes_alone(op):
    """An unavailable backend reports only why it cannot run, not the per-query mismatches."""
    calls = []
    backends.register(op, "cuda", fake("cuda"), devices=("cuda",), dtypes=(torch.float32,), priority=1,
                      available=lambda: "no GPU here", check=lambda q: calls.append(q) or ["never"])
    assert backends.backends(op)["cuda"].not_supported_reasons(Query(CPU, torch.float64)) == ["no GPU here"]
    assert calls == []


def test_dtype_mismatch(op):
    backends.register(op, "torch", fake("torch"), devices=("cpu",), dtypes=(torch.float16, torch.float32), priority=0)
    backends.register(op, "cpu", fake("cpu"), devices=("cpu",), dtypes=(torch.float32, torch.float64), priority=10)
    q = Query(CPU, torch.float16)
    assert backends.select(op, "auto", q).name == "torch"
    assert backends.backends(op)["cpu"].not_supported_reasons(q) == ["dtype float16 not in ['float32', 'float64']"]
    with pytest.raises(ValueError, match=r"cpu: dtype float16 not in \['float32', 'float64'\]"):
        backends.select(op, "cpu", q)
    # Neither serves bfloat16: auto lists both, highest priority first.
    with pytest.raises(ValueError) as e:
        backends.select(op, "auto", Query(CPU, torch.bfloat16))
    msg = str(e.value)
    assert f"{op}: no backend can serve these inputs (backend='auto')" in msg
    assert "cpu: dtype bfloat16 not in ['float32', 'float64']; torch: dtype bfloat16 not in ['float16', 'float32']" in msg


def test_device_mismatch(op):
    backends.register(op, "cpu", fake("cpu"), devices=("cpu",), dtypes=(torch.float32,), priority=10)
    backends.register(op, "cuda", fake("cuda"), devices=("cuda",), dtypes=(torch.float32,), priority=20)
    assert backends.select(op, "auto", Query(CPU, torch.float32)).name == "cpu"
    assert backends.select(op, "auto", Query(CUDA, torch.float32)).name == "cuda"
    with pytest.raises(ValueError, match=r"cuda: device 'cpu' not in \['cuda'\]"):
        backends.select(op, "cuda", Query(CPU, torch.float32))
    with pytest.raises(ValueError, match=r"cpu: device 'cuda' not in \['cpu'\]"):
        backends.select(op, "cpu", Query(CUDA, torch.float32))


def test_device_and_dtype_mismatch_both_reported(op):
    backends.register(op, "cuda", fake("cuda"), devices=("cuda",), dtypes=(torch.float32,), priority=20)
    assert backends.backends(op)["cuda"].not_supported_reasons(Query(CPU, torch.float64)) == [
        "device 'cpu' not in ['cuda']", "dtype float64 not in ['float32']"]


def test_feature_mismatch(op):
    backends.register(op, "torch", fake("torch"), devices=("cpu",), dtypes=(torch.float32,), priority=0,
                      features=("packed", "banded", "extra"))
    backends.register(op, "cuda", fake("cuda"), devices=("cpu",), dtypes=(torch.float32,), priority=30,
                      features=("packed",))
    assert backends.select(op, "auto", Query(CPU, torch.float32, frozenset({"packed"}))).name == "cuda"
    q = Query(CPU, torch.float32, frozenset({"packed", "banded", "extra"}))
    assert backends.select(op, "auto", q).name == "torch"
    assert backends.backends(op)["cuda"].not_supported_reasons(q) == ["features ['banded', 'extra'] not supported"]
    with pytest.raises(ValueError, match=r"cuda: features \['banded', 'extra'\] not supported"):
        backends.select(op, "cuda", q)


@dataclass(frozen=True)
class Samples:
    """A throwaway op's typed capability query."""

    samples: int


def test_check_reasons_are_reported(op, gen):
    limit = int(torch.randint(10, 1000, (1,), generator=gen))
    seen = []

    def check(q: Query) -> list:
        seen.append(q)
        n = q.shape.samples
        return [f"samples {n} > {limit}", "layout not packed"] if n > limit else []

    backends.register(op, "torch", fake("torch"), devices=("cpu",), dtypes=(torch.float32,), priority=0)
    backends.register(op, "cuda", fake("cuda"), devices=("cpu",), dtypes=(torch.float32,), priority=20, check=check,
                      shape_type=Samples)
    small = Query(CPU, torch.float32, shape=Samples(limit))
    big = Query(CPU, torch.float32, shape=Samples(limit + 1))
    assert backends.select(op, "auto", small).name == "cuda"
    assert seen[-1] is small
    assert backends.select(op, "auto", big).name == "torch"
    with pytest.raises(ValueError) as e:
        backends.select(op, "cuda", big)
    assert f"cuda: samples {limit + 1} > {limit}, layout not packed" in str(e.value)
    # check() only runs once the declared capabilities match.
    n = len(seen)
    assert backends.backends(op)["cuda"].not_supported_reasons(Query(CPU, torch.float64, shape=Samples(10**6))) == [
        "dtype float64 not in ['float32']"]
    assert len(seen) == n


def test_a_query_without_the_ops_shape_is_refused(op, gen):
    """A backend with a shape_type refuses a Query whose shape is missing or of another type (a
    caller's bug: a ValueError naming the expected class), before its check reads attributes."""
    seen = []
    backends.register(op, "cuda", fake("cuda"), devices=("cpu",), dtypes=(torch.float32,), priority=20,
                      check=lambda q: seen.append(q) or [], shape_type=Samples)
    n = int(torch.randint(1, 100, (), generator=gen))
    for shape in (None, {"samples": n}, (n,)):
        with pytest.raises(ValueError, match=rf"{op}/cuda: Query.shape must be a Samples; got "):
            backends.select(op, "auto", Query(CPU, torch.float32, shape=shape))
    assert seen == []
    assert backends.select(op, "auto", Query(CPU, torch.float32, shape=Samples(n))).name == "cuda" and len(seen) == 1


@pytest.mark.parametrize("name", sorted(backends.ops()))
def test_every_registered_backend_has_a_one_line_doc(name):
    for b in backends.backends(name).values():
        assert b.doc.strip() and "\n" not in b.doc, (name, b.name, b.doc)


def test_unknown_op(op):
    backends.register(op, "torch", fake("torch"), devices=("cpu",), dtypes=(torch.float32,), priority=0)
    bogus = op + "_nope"
    for call in (lambda: backends.select(bogus, "auto", Query(CPU, torch.float32)),
                 lambda: backends.backends(bogus), lambda: backends.availability(bogus)):
        with pytest.raises(ValueError, match=rf"unknown op '{bogus}'; valid: ") as e:
            call()
        valid = str(e.value).split("valid: ")[1].split(", ")
        assert op in valid and "composite" in valid and valid == sorted(valid) == backends.ops()


def test_unknown_backend_name(op):
    backends.register(op, "torch", fake("torch"), devices=("cpu",), dtypes=(torch.float32,), priority=0)
    backends.register(op, "cpu", fake("cpu"), devices=("cpu",), dtypes=(torch.float32,), priority=1)
    for name in ("triton", "nope", "Auto", ""):  # triton is a valid name, just not registered for this op
        with pytest.raises(ValueError, match=rf"{op}: backend must be 'auto' or one of \['cpu', 'torch'\]; got '{name}'"):
            backends.select(op, name, Query(CPU, torch.float32))


def test_availability(op, gen):
    prios = random_priorities(gen)
    register_all(op, prios, cuda=dict(available=lambda: "no CUDA GPU (fake)"),
                 triton=dict(available=lambda: "triton not importable (fake)"))
    avail = backends.availability(op)
    assert avail == {"torch": None, "cpu": None, "cuda": "no CUDA GPU (fake)", "triton": "triton not importable (fake)"}
    assert list(avail) == by_priority(prios)  # fastest first, as `fast3d info` prints them
    # An order that is neither registration nor alphabetical order (nor their reverses).
    register_all(op, {"torch": 3, "cpu": 1, "cuda": 4, "triton": 2})
    assert list(backends.availability(op)) == ["cuda", "torch", "triton", "cpu"]
    # availability ignores queries: a backend that serves no dtype at all is still "available".
    backends.register(op, "cpu", fake("cpu"), devices=(), dtypes=(), priority=prios["cpu"])
    assert backends.availability(op)["cpu"] is None


@pytest.mark.parametrize("name", ["auto", "CPU", "numpy", "", "cuda "])
def test_register_rejects_unknown_backend_names(op, name):
    with pytest.raises(ValueError, match=r"backend name must be one of \('torch', 'cpu', 'cuda', 'triton'\); got "):
        backends.register(op, name, fake(name), devices=("cpu",), dtypes=(torch.float32,), priority=0)
    assert op not in backends.ops()


def test_register_returns_backend_and_replaces(op):
    b = backends.register(op, "cpu", fake("first"), devices=["cpu"], dtypes=[torch.float32], priority=1,
                          features=["packed"], doc="first")
    assert isinstance(b, backends.Backend) and b.devices == ("cpu",) and b.dtypes == (torch.float32,)
    assert b.features == frozenset({"packed"}) and b.available() is None and b.check is None
    assert op in backends.ops() and backends.backends(op) == {"cpu": b}
    b2 = backends.register(op, "cpu", fake("second"), devices=["cpu"], dtypes=[torch.float32], priority=1)
    assert backends.select(op, "auto", Query(CPU, torch.float32)) is b2 and b2.fn() == "second"
    # backends() hands out a copy: mutating it does not touch the registry.
    backends.backends(op).clear()
    assert backends.backends(op) == {"cpu": b2}


def test_auto_leaves_the_triton_interpreter_to_explicit_requests(op):
    backends.register(op, "torch", fake("torch"), devices=("cpu", "cuda"), dtypes=(torch.float32,), priority=0)
    backends.register(op, "triton", fake("triton"), devices=("cpu", "cuda"), dtypes=(torch.float32,), priority=30)
    assert backends.select(op, "auto", Query(CPU, torch.float32)).name == "torch"
    assert backends.select(op, "triton", Query(CPU, torch.float32)).name == "triton"
    assert backends.select(op, "auto", Query(torch.device("cuda"), torch.float32)).name == "triton"


# --- Triton launch helpers ---------------------------------------------------------------------


@pytest.mark.parametrize("interpreted", [False, True])
def test_triton_tf32_follows_torchs_matmul_switch(monkeypatch, interpreted):
    """fp32 dots in tf32 exactly where torch's matmuls would be (allow_tf32 on, CUDA tensors), and on
    CPU tensors only while recording a GPU's configurations; never for 16-bit inputs."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpreted else "0")
    for allow in (False, True):
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow)
        assert backends.triton_tf32(torch.float32, CUDA) is allow
        assert backends.triton_tf32(torch.float32, CPU) is (allow and not interpreted)
        with backends.gpu_launch_configs():
            assert backends.triton_tf32(torch.float32, CPU) is allow
        for dtype in (torch.bfloat16, torch.float16):
            assert backends.triton_tf32(dtype, CUDA) is False


def test_gpu_launch_configs_nests_and_restores(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.triton_interpreter_configs()
    with backends.gpu_launch_configs():
        assert not backends.triton_interpreter_configs()
        with backends.gpu_launch_configs():
            assert not backends.triton_interpreter_configs()
        assert not backends.triton_interpreter_configs()
    assert backends.triton_interpreter_configs()


def test_shared_memory_limit_without_a_gpu_is_the_smallest_target():
    if torch.cuda.is_available():
        pytest.skip("judges the CPU answer (no GPU)")
    assert backends.shared_memory_limit(CPU) == min(backends.SHARED_MEMORY_OPTIN.values()) == 101_376


def _result(arch, shared, kernel="k", ok=True):
    return dict(kernel=kernel, arch=f"sm_{arch}", triton="x", constants={}, num_warps=4, num_stages=2, ok=ok,
                shared=shared, reg=1, stack=0, **({} if ok else dict(error="boom")))


def test_check_results_judges_every_target_arch(gen):
    """An sm_80 build stands for sm_86/89 (their smaller limit applies to it), sm_90 for itself;
    compile errors are failures too; a set of builds without an sm_9x cannot judge sm_90."""
    from fast3d.triton_aot import check_results, limits_checked

    lim = backends.SHARED_MEMORY_OPTIN
    assert limits_checked([80, 90]) == {80: 80, 86: 80, 89: 80, 90: 90}
    assert limits_checked([80, 86, 89, 90]) == {80: 80, 86: 86, 89: 89, 90: 90}
    with pytest.raises(ValueError, match="sm_90 needs a compiled sm_9x"):
        limits_checked([80, 86])
    fits = int(torch.randint(1, lim[86] + 1, (), generator=gen))
    assert check_results([_result(80, fits), _result(90, fits)]) == []
    between = int(torch.randint(lim[86] + 1, lim[80] + 1, (), generator=gen))   # over sm_86/89, under sm_80
    failed = check_results([_result(80, between), _result(90, between)])
    assert len(failed) == 2 and all(f"shared memory {between:,} B" in f for f in failed)
    assert "sm_86's limit 101,376 B" in failed[0] and "sm_89's limit 101,376 B" in failed[1]
    over90 = lim[90] + 1
    failed = check_results([_result(80, 0), _result(90, over90)])
    assert len(failed) == 1 and "sm_90's limit 232,448 B" in failed[0]
    failed = check_results([_result(80, 0), _result(90, 0, ok=False)])
    assert failed == ["sm_90 k (triton x) {} {'num_warps': 4, 'num_stages': 2}: boom"]


# --- what the ops read from the registry ---------------------------------------------------------


def test_packed_composite_dispatches_on_the_declared_feature(monkeypatch, gen):
    """composite's packed path hands the packed samples to a backend that declares PACKED_NATIVE
    (whatever its name) and pads to a dense block for one that does not."""
    from dataclasses import replace

    from fast3d.ops.composite.api import PACKED_NATIVE

    table = backends._REGISTRY["composite"]
    assert {name for name, b in table.items() if PACKED_NATIVE in b.features} == {"triton"}
    calls, dense = [], table["torch"].fn

    def native(*args, packed_info=None):
        calls.append(packed_info)
        return dense(*args) if packed_info is None else ("packed", packed_info)

    counts = torch.randint(1, 6, (int(torch.randint(2, 9, (), generator=gen)),), generator=gen)
    M, R = int(counts.sum()), len(counts)
    sig, t0 = torch.rand(M, generator=gen), torch.rand(M, generator=gen)
    rgb = torch.rand(M, 3, generator=gen)
    ri = torch.repeat_interleave(torch.arange(R), counts)
    # the torch backend, declaring the feature: it gets packed_info and the packed samples as they came
    monkeypatch.setitem(table, "torch", replace(table["torch"], fn=native, features=frozenset({PACKED_NATIVE})))
    tag, info = fast3d.composite(sig, rgb, t0, t0 + 0.1, ray_indices=ri, backend="torch")
    assert tag == "packed" and info.tolist() == [[int(counts[:r].sum()), int(counts[r])] for r in range(R)]
    # without it: padded to [R, S], S = the longest ray, and composited densely
    monkeypatch.setitem(table, "torch", replace(table["torch"], fn=native, features=frozenset()))
    color, opacity, depth, weights = fast3d.composite(sig, rgb, t0, t0 + 0.1, ray_indices=ri, backend="torch")
    assert len(calls) == 2 and calls[1] is None and color.shape == (R, 3) and weights.shape == (M,)
