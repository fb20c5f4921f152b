"""Prometheus metrics of one server: requests, queue and compute time, batches, items, queue depth, load, device use."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from .batcher import INTERACTIVE, PRIORITIES, BatchStats
from .device_stats import ComputeCollector, ComputeMonitor

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """One registry per server, so that several servers in one process (tests) keep separate counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("latentd_requests", "RPCs answered, by method and status code",
                                ["rpc", "code"], registry=r)
        self.request_seconds = Histogram("latentd_request_seconds", "RPC wall time (priority: the request's; "
                                         "interactive for RPCs without one)", ["rpc", "priority"],
                                         buckets=_SECONDS, registry=r)
        self.items = Counter("latentd_items", "Images or latents processed, by model and operation",
                             ["model", "op"], registry=r)
        self.queue_seconds = Histogram("latentd_queue_seconds", "Time an item waited for its batch",
                                       ["model", "priority"],
                                       buckets=_SECONDS, registry=r)
        self.compute_seconds = Histogram("latentd_compute_seconds", "Model time per batch", ["model", "op"],
                                         buckets=_SECONDS, registry=r)
        self.batch_size = Histogram("latentd_batch_size", "Items per model call", ["model", "op"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.queue_depth = Gauge("latentd_queue_depth", "Items waiting for a batch", ["model", "priority"],
                                 registry=r)
        self.model_load_seconds = Gauge("latentd_model_load_seconds", "Time to load and warm up a model",
                                        ["model"], registry=r)
        self.held_bytes = Gauge("latentd_memory_held_bytes", "Bytes of the memory budget held by requests",
                                registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes & co: memory growth under soak

    def observe_batch(self, model: str, stats: BatchStats) -> None:
        op = getattr(stats.key, "op", "unknown")
        self.batch_size.labels(model, op).observe(stats.size)
        self.compute_seconds.labels(model, op).observe(stats.compute_seconds)
        self.items.labels(model, op).inc(stats.size - stats.failed)
        priorities = stats.priorities or (INTERACTIVE,) * len(stats.queue_seconds)
        for seconds, priority in zip(stats.queue_seconds, priorities):
            self.queue_seconds.labels(model, priority).observe(seconds)

    def track_depth(self, model: str, depth_of: Callable[[str], int]) -> None:
        """`depth_of(priority)`: items of that priority waiting for a batch."""
        for priority in PRIORITIES:
            self.queue_depth.labels(model, priority).set_function(lambda priority=priority: depth_of(priority))

    def track_compute(self, monitors: Callable[[], list[ComputeMonitor]]) -> None:
        """Busy time per model and device memory, read from `monitors()` at each scrape (device_stats.py)."""
        self.registry.register(ComputeCollector(monitors))

    def track_held_bytes(self, held: Callable[[], int]) -> None:
        self.held_bytes.set_function(held)

    def request_done(self, rpc: str, code: str, seconds: float, priority: str = INTERACTIVE) -> None:
        self.requests.labels(rpc, code).inc()
        self.request_seconds.labels(rpc, priority).observe(seconds)


def start_metrics_http(metrics: ServerMetrics, host: str, port: int):
    """Serve /metrics; returns (http server, thread) so shutdown can close it, and the bound port."""
    from prometheus_client import start_http_server

    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server, thread, server.server_port
