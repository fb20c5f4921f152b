"""`latentd bench serve --duration S`: a soak run: steady concurrent load, errors by code, p99 and memory over time."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np

from latentd.v1 import latentd_pb2_grpc as pb_grpc

from .serve import Workload


@dataclass
class Interval:
    """One slice of the run: calls that finished in it, their p99, and the server's memory at its end."""

    start_s: float
    requests: int = 0
    errors: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    rss_mb: float | None = None

    @property
    def p99_ms(self) -> float | None:
        return float(np.percentile(self.latencies_ms, 99)) if self.latencies_ms else None


@dataclass
class SoakReport:
    seconds: float
    clients: int
    intervals: list[Interval]

    @property
    def requests(self) -> int:
        return sum(i.requests for i in self.intervals)

    @property
    def errors(self) -> Counter:
        total: Counter = Counter()
        for interval in self.intervals:
            total.update(interval.errors)
        return total

    @property
    def peak_rss_mb(self) -> float | None:
        values = [i.rss_mb for i in self.intervals if i.rss_mb is not None]
        return max(values) if values else None

    @property
    def rss_growth_mb(self) -> float | None:
        """Memory at the end minus after the first interval (the warm-up): a leak shows here."""
        values = [i.rss_mb for i in self.intervals if i.rss_mb is not None]
        return values[-1] - values[0] if len(values) >= 2 else None


def server_rss_mb(metrics_url: str | None) -> float | None:
    if not metrics_url:
        return None
    try:
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    except OSError:
        return None
    found = re.search(r"^process_resident_memory_bytes ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) / 2**20 if found else None


def soak(target: str, workloads: list[Workload], *, clients: int, duration_s: float, interval_s: float = 60.0,
         metrics_url: str | None = None, timeout: float = 120.0) -> SoakReport:
    """`clients` threads call the server back to back for `duration_s`, cycling through the workloads."""
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 256 << 20)])
    stub = pb_grpc.LatentdStub(channel)
    calls = [(getattr(stub, "Encode" if w.op == "encode" else "Decode"), w.request) for w in workloads]
    intervals = [Interval(0.0)]
    lock = threading.Lock()
    started = time.perf_counter()
    stop = started + duration_s

    def client(offset: int) -> None:
        count = offset
        while time.perf_counter() < stop:
            method, request = calls[count % len(calls)]
            count += 1
            began = time.perf_counter()
            try:
                method(request, timeout=timeout)
                code = None
            except grpc.RpcError as exc:
                code = exc.code().name
            with lock:
                current = intervals[-1]
                current.requests += 1
                if code:
                    current.errors[code] += 1
                else:
                    current.latencies_ms.append((time.perf_counter() - began) * 1e3)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    while time.perf_counter() < stop:
        time.sleep(min(interval_s, max(0.0, stop - time.perf_counter())))
        rss = server_rss_mb(metrics_url)
        with lock:
            intervals[-1].rss_mb = rss
            if time.perf_counter() < stop:
                intervals.append(Interval(time.perf_counter() - started))
    for thread in threads:
        thread.join(timeout + 5)
    channel.close()
    return SoakReport(time.perf_counter() - started, clients, intervals)
