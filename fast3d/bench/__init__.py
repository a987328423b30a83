"""The benchmark and profiling harness behind ``fast3d bench``, ``fast3d report`` and ``fast3d profile``."""

from fast3d.bench.spec import PASSES, BenchSpec, Workload, register_bench, specs

__all__ = ["PASSES", "BenchSpec", "Workload", "register_bench", "specs"]
