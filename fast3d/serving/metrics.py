"""The server's Prometheus metrics: one registry per replica, every series labelled with its
``replica``, and ``GET /metrics`` shows every replica's. Each replica pushes its exposition every
``PUSH_S`` seconds to the application's :class:`MetricsBoard` (a named Ray actor, reachable from
every node of the cluster); the replica that takes a scrape merges the board's copies with its
own fresh one (:func:`merge`: each metric family once, the samples of all replicas). Another
replica's numbers are thus at most ``PUSH_S`` old, and a replica gone for ``MAX_AGE_S`` drops out.
Ray Serve exports its own metrics beside these (``ray_serve_*``: per-deployment request counts
and latencies, batch queue length and sizes) through Ray's metrics agent."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
ERROR_KINDS = ("invalid", "content_type", "too_large", "auth", "deadline", "internal")
PUSH_S = 2.0       # how often a replica sends its exposition to the board
MAX_AGE_S = 10.0   # a replica silent this long (stopped, killed) is left out of the merged metrics


class Metrics:
    def __init__(self, replica: str, model: str):
        self.registry = CollectorRegistry()
        labels = {"replica": replica, "model": model}
        names = list(labels)
        self.latency = Histogram("fast3d_request_latency_seconds", "Reconstruct requests, arrival to response",
                                 names + ["status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stage = Histogram("fast3d_stage_seconds", "Per-stage latency (decode, queue, model, render, encode)",
                               names + ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("fast3d_batch_size", "Requests per model batch", names, buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.queue_depth = Gauge("fast3d_queue_depth", "Requests waiting for a batch in this replica", names,
                                 registry=self.registry)
        self.in_flight = Gauge("fast3d_in_flight", "Reconstruct requests in this replica", names,
                               registry=self.registry)
        self.errors = Counter("fast3d_errors_total", "Failed requests by kind", names + ["kind"],
                              registry=self.registry)
        self.labels = labels
        for kind in ERROR_KINDS:  # every kind is exported from the start, at 0
            self.errors.labels(**labels, kind=kind)

    def observe_request(self, seconds: float, status: int) -> None:
        self.latency.labels(**self.labels, status=str(status)).observe(seconds)

    def observe_stage(self, stage: str, ms: float) -> None:
        self.stage.labels(**self.labels, stage=stage).observe(ms / 1e3)

    def observe_batch(self, n: int) -> None:
        self.batch_size.labels(**self.labels).observe(n)

    def error(self, kind: str) -> None:
        self.errors.labels(**self.labels, kind=kind).inc()

    def track_queue(self, depth) -> None:
        """``depth()`` is read at each scrape."""
        self.queue_depth.labels(**self.labels).set_function(depth)

    def flight(self, delta: int) -> None:
        self.in_flight.labels(**self.labels).inc(delta)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def merge(texts: list[bytes]) -> bytes:
    """Several replicas' expositions (their series told apart by the ``replica`` label) as one:
    each metric family once, with the samples of all."""
    families: dict = {}
    for text in texts:
        for fam in text_string_to_metric_families(text.decode()):
            if fam.name in families:
                families[fam.name].samples.extend(fam.samples)
            else:
                families[fam.name] = fam

    class _Merged:
        def collect(self):
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


class MetricsBoard:
    """The latest exposition of each replica of an application (a Ray actor: :func:`board`)."""

    def __init__(self):
        self.texts: dict[str, tuple[float, bytes]] = {}

    def put(self, replica: str, text: bytes) -> None:
        self.texts[replica] = (time.monotonic(), text)

    def collect(self, max_age_s: float = MAX_AGE_S) -> dict[str, bytes]:
        """The replicas heard from within ``max_age_s``: replica -> exposition."""
        now = time.monotonic()
        self.texts = {r: (t, x) for r, (t, x) in self.texts.items() if now - t <= max_age_s}
        return {r: x for r, (_, x) in self.texts.items()}


def board(app_name: str):
    """The application's :class:`MetricsBoard` actor, created by the first replica that asks
    (named, so every replica on every node finds the same one; it needs no CPU)."""
    import ray

    return ray.remote(num_cpus=0)(MetricsBoard).options(
        name=f"fast3d-metrics-{app_name}", namespace="fast3d", get_if_exists=True).remote()
