"""What `latentd bench serve` measures: server counters, one phase of calls, one row per workload."""

from __future__ import annotations

import statistics
from dataclasses import astuple, dataclass, field
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class ServerCounters:
    """What a server's metrics endpoint counts: items, model calls and their seconds of one operation,
    and the CPU seconds of the whole server process (every thread: compute, gRPC, handlers)."""

    batch_items: float = 0.0
    batch_calls: float = 0.0
    cpu_seconds: float = 0.0
    compute_seconds: float = 0.0  # wall time inside model calls (latentd_compute_seconds)

    def __add__(self, other: "ServerCounters") -> "ServerCounters":
        return ServerCounters(*(mine + theirs for mine, theirs in zip(astuple(self), astuple(other))))

    def __sub__(self, other: "ServerCounters") -> "ServerCounters":
        return ServerCounters(*(mine - theirs for mine, theirs in zip(astuple(self), astuple(other))))


Counters = Callable[[], ServerCounters]


@dataclass
class Phase:
    """One measured workload: `requests` single-image calls spread over `clients` threads."""

    name: str
    op: str
    size: int
    clients: int
    requests: int
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    server: ServerCounters | None = None  # the server's counts during the phase (None: no metrics)
    client_cpu_seconds: float = 0.0  # of the load generator's process
    # The machine's cores over the phase (core-seconds; 0 where unknown): idle, and in all.
    cores_idle_seconds: float = 0.0
    cores_seconds: float = 0.0

    @property
    def mean_batch(self) -> float | None:
        return self.server.batch_items / self.server.batch_calls if self.server and self.server.batch_calls else None

    def cpu_ms_per_request(self, seconds: float | None) -> float | None:
        done = self.requests - self.errors
        return seconds * 1e3 / done if seconds is not None and done else None

    @property
    def server_cpu_ms(self) -> float | None:
        return self.cpu_ms_per_request(self.server.cpu_seconds if self.server else None)

    @property
    def client_cpu_ms(self) -> float | None:
        return self.cpu_ms_per_request(self.client_cpu_seconds)

    @property
    def calls_running(self) -> float | None:
        """Model calls running at once in the server, on average over the phase: near 1 when one
        compute lane was always busy, up to the lane count when batches ran side by side; below
        that, the lanes waited for requests."""
        if not self.server or not self.seconds:
            return None
        return self.server.compute_seconds / self.seconds

    @property
    def cores_idle(self) -> float | None:
        """The share of the machine's core time that no process used during the phase (Linux only):
        near 0 when serving is CPU-bound; above that, server and clients waited on each other."""
        return self.cores_idle_seconds / self.cores_seconds if self.cores_seconds else None

    def merge(self, other: "Phase") -> None:
        """Add another round of the same workload."""
        self.requests += other.requests
        self.seconds += other.seconds
        self.latencies_ms += other.latencies_ms
        self.errors += other.errors
        self.client_cpu_seconds += other.client_cpu_seconds
        self.cores_idle_seconds += other.cores_idle_seconds
        self.cores_seconds += other.cores_seconds
        if other.server is not None:
            self.server = other.server if self.server is None else self.server + other.server

    @property
    def images_per_s(self) -> float:
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def to_dict(self) -> dict:
        return {"name": self.name, "op": self.op, "size": self.size, "clients": self.clients,
                "requests": self.requests, "errors": self.errors, "images_per_s": self.images_per_s,
                "p50_ms": self.percentile(50), "p95_ms": self.percentile(95), "p99_ms": self.percentile(99),
                "mean_batch": self.mean_batch, "server_cpu_ms": self.server_cpu_ms,
                "client_cpu_ms": self.client_cpu_ms, "calls_running": self.calls_running,
                "cores_idle": self.cores_idle}


# The service's targets, printed next to the figures (never asserted).
TARGET_CONCURRENT_SHARE = 0.90  # server at 16 clients vs in-process batched throughput
TARGET_SINGLE_OVERHEAD = 0.10  # one client's round trip over the in-process call, at 512x512


@dataclass
class Row:
    """Everything measured for one operation and image size, summed over the rounds."""

    op: str
    size: int
    in_process_rates: dict[int, float] = field(default_factory=dict)  # images/s by batch size, from the sweep
    in_process_images: int = 0
    in_process_seconds: float = 0.0
    in_process_cpu_seconds: float = 0.0
    in_process_single: list[float] = field(default_factory=list)  # ms of the calls paired with `single`
    batched: Phase | None = None
    unbatched: Phase | None = None
    single: Phase | None = None
    floor: Phase | None = None  # the floor server (gRPC alone, no model): what serving costs at the least
    round_shares: list[float] = field(default_factory=list)  # concurrent_share of each round alone

    @property
    def in_process_batch(self) -> int:
        """The batch size at which the codec was fastest in the sweep (1 before it ran)."""
        return max(self.in_process_rates, key=self.in_process_rates.get) if self.in_process_rates else 1

    @property
    def in_process_images_per_s(self) -> float:
        return self.in_process_images / self.in_process_seconds if self.in_process_seconds else 0.0

    @property
    def in_process_cpu_ms(self) -> float | None:
        """CPU per image in process (all cores' time), to set beside the server's and clients'."""
        return self.in_process_cpu_seconds * 1e3 / self.in_process_images if self.in_process_images else None

    @property
    def in_process_single_ms(self) -> float:
        return statistics.median(self.in_process_single) if self.in_process_single else 0.0

    @property
    def concurrent_share(self) -> float | None:
        if not self.batched or not self.in_process_images_per_s:
            return None
        return self.batched.images_per_s / self.in_process_images_per_s

    @property
    def batching_gain(self) -> float | None:
        if not self.batched or not self.unbatched or not self.unbatched.images_per_s:
            return None
        return self.batched.images_per_s / self.unbatched.images_per_s

    @property
    def single_overhead(self) -> float | None:
        if not self.single or not self.single.latencies_ms or not self.in_process_single_ms:
            return None
        return statistics.median(self.single.latencies_ms) / self.in_process_single_ms - 1.0

    def add(self, label: str, phase: Phase) -> None:
        """Merge one round's phase into the row's phase of that label ("batched", "unbatched", "single", "floor")."""
        if getattr(self, label) is None:
            setattr(self, label, phase)
        else:
            getattr(self, label).merge(phase)

    def to_dict(self) -> dict:
        return {"op": self.op, "size": self.size, "in_process_batch": self.in_process_batch,
                "in_process_rates": self.in_process_rates,
                "in_process_images_per_s": self.in_process_images_per_s,
                "in_process_single_ms": self.in_process_single_ms, "in_process_cpu_ms": self.in_process_cpu_ms,
                "batched": self.batched.to_dict() if self.batched else None,
                "unbatched": self.unbatched.to_dict() if self.unbatched else None,
                "single": self.single.to_dict() if self.single else None,
                "floor": self.floor.to_dict() if self.floor else None,
                "concurrent_share": self.concurrent_share, "round_shares": self.round_shares,
                "batching_gain": self.batching_gain, "single_overhead": self.single_overhead}
