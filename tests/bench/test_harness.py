"""The timing, memory and peak measurements under `fast3d bench`."""

import time

import pytest
import torch

from fast3d.bench import environment as env
from fast3d.bench import runner, timing

CPU = torch.device("cpu")


def test_cpu_timing_brackets_a_known_duration():
    # A sleep has a hard lower bound; the upper bound is loose for a loaded CI machine.
    def run(x):
        time.sleep(0.02)
        return (x["a"] * 2,)

    sets = [{"a": torch.ones(3)}]
    t = timing.time_pass("forward", run, sets, [[]], CPU, warmup=1, min_iters=5, budget_s=0.15)
    assert 5 <= t.iters <= 10  # 5 at least, then more while under the 150 ms budget
    assert 20.0 <= t.p20_ms <= t.median_ms <= t.p80_ms < 200.0


def test_iterations_longer_than_the_budget_are_measured_three_times():
    calls = []
    run = lambda x: calls.append(1) or time.sleep(0.03) or (torch.zeros(1),)  # noqa: E731
    t = timing.time_pass("forward", run, [{}], [[]], CPU, warmup=2, min_iters=5, budget_s=0.01)
    assert t.iters == 3
    assert len(calls) == 1 + 3 + 1  # one warm-up, three timed, one for peak memory


def test_backward_pass_times_only_the_backward(gen):
    # Forward sleeps 50 ms, backward is cheap: the backward pass must not include the forward.
    class SlowForward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            time.sleep(0.05)
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    run = lambda x: (SlowForward.apply(x["a"]),)  # noqa: E731
    sets = [{"a": torch.rand(8, generator=gen).requires_grad_()}]
    grads = [timing.upstream_grads(run, sets[0], gen)]
    bwd = timing.time_pass("backward", run, sets, grads, CPU, warmup=1, min_iters=3, budget_s=0.2)
    both = timing.time_pass("forward+backward", run, sets, grads, CPU, warmup=1, min_iters=3, budget_s=0.2)
    assert bwd.median_ms < 25.0 <= 50.0 <= both.median_ms
    assert sets[0]["a"].grad is None  # gradients are cleared between iterations


def test_inputs_rotate_among_sets():
    seen = []
    run = lambda x: seen.append(x["id"]) or (torch.zeros(1),)  # noqa: E731
    sets = [{"id": i} for i in range(3)]
    timing.time_pass("forward", run, sets, [[]] * 3, CPU, warmup=0, min_iters=6, budget_s=0.0)
    assert seen[:6] == [0, 1, 2, 0, 1, 2]


def test_cpu_peak_memory_sees_a_temporary_allocation():
    n = 16 * 2**20  # 64 MiB of float32, allocated and freed inside the op
    run = lambda x: (torch.ones(n).sum() + x["a"],)  # noqa: E731
    peak = timing.peak_memory("forward", run, {"a": torch.ones(1)}, [], CPU)
    assert 4 * n <= peak < 2 * 4 * n


def test_unknown_pass_is_rejected():
    with pytest.raises(ValueError, match="pass must be one of"):
        timing.time_pass("sideways", lambda x: (), [{}], [[]], CPU)


@pytest.mark.parametrize("set_mib, expected", [(1, 4), (200, 4), (300, 1), (2048, 1)])
def test_rotation_rule(set_mib, expected):
    assert runner.n_input_sets(set_mib * 2**20) == expected


def test_cpu_peaks_are_measured():
    p = env.measure_peaks(CPU)
    assert p["peak_gbps"] > 0.1 and p["peak_tflops"] > 1e-3 and "matmul" in p["peak_how"]


def test_device_slug_is_a_folder_name():
    s = env.device_slug(CPU)
    assert s.startswith("cpu-") and all(c.isalnum() or c == "-" for c in s)


def test_a_failing_workload_is_reported_and_the_run_goes_on(tmp_path, monkeypatch):
    """A workload whose inputs cannot be made (a missing package, out of memory) or whose backend
    fails on its first call is logged and counted; the other workloads and ops are still timed."""
    from fast3d.bench.workloads import specs

    monkeypatch.setattr(env, "measure_peaks", lambda device: dict(peak_gbps=10.0, peak_tflops=0.5, peak_how="stub"))
    composite, sample = specs()["composite"], specs()["triplane_sample"]

    def no_inputs(params, device, gen):
        raise ImportError("No module named 'transformers'")

    def fails(backend, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 128.00 GiB")

    monkeypatch.setattr(composite, "make_inputs", no_inputs)
    monkeypatch.setattr(sample, "run", fails)
    logs = []
    cfg = runner.BenchConfig(ops=["composite", "render_triplane", "triplane_sample"], backends=["torch"],
                             passes=["forward"], quick=True, out=str(tmp_path), budget_s=0.01)
    rows, failures = runner.run(cfg, log=logs.append)
    log = "\n".join(logs)
    assert "composite/nerf: FAILED making the inputs: ImportError: No module named 'transformers'" in log
    assert "triplane_sample/lrm/torch: FAILED: OutOfMemoryError" in log
    assert {r["op"] for r in rows} == {"render_triplane"}
    assert failures == len(composite.workloads) + len(sample.workloads)
