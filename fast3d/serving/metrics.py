"""The server's Prometheus metrics, one registry per replica (``GET /metrics`` answers the
replica that took the request; every series carries its ``replica`` label). Ray Serve exports its
own metrics beside these (``ray_serve_*``: per-deployment request counts and latencies, batch
queue length and sizes) through Ray's metrics agent."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
ERROR_KINDS = ("invalid", "content_type", "too_large", "auth", "deadline", "internal")


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
