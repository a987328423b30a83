"""The benchmark and profiling harness behind ``fast3d bench``, ``fast3d report`` and ``fast3d profile``."""

import os

# The harness starts torch.profiler once per measurement (peak CPU memory); keep the profiler's
# per-session log lines (read when it first starts) out of the output unless the user asks.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

from fast3d.bench.spec import PASSES, BenchSpec, Workload, register_bench

__all__ = ["PASSES", "BenchSpec", "Workload", "register_bench"]
