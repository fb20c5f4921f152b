"""What the metrics say of each model's compute and each CUDA device's memory (`ComputeMonitor`, `ComputeCollector`)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .busy import BUSY_WINDOW_S, BusyMeter

logger = logging.getLogger(__name__)


class ComputeMonitor:
    """One model's compute stage, watched: how long it was busy (`busy`, a BusyMeter) and, on CUDA,
    the most device memory allocated during one of its calls (weights, activations and whatever else
    the device held then). Every call of the model's torch work goes through `run`.

    Why a peak per call is the model's own: on a GPU the server runs one call at a time (the wide
    compute lane, models.ModelPool), so resetting the device's peak counter when a call starts leaves
    that call's peak when it ends."""

    def __init__(self, model: str, device: str | torch.device, *, weights_bytes: int = 0, cuda: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.device = torch.device(device)
        self.weights_bytes = weights_bytes
        self.busy = BusyMeter(clock=clock)
        self._cuda = cuda if cuda is not None else torch.cuda
        self._lock = threading.Lock()
        self._peak = 0

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def peak_bytes(self) -> int | None:
        """The largest device memory allocated during one call so far; None off CUDA."""
        return self._peak if self.on_cuda else None

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args), counted as busy (and its memory peak taken on CUDA)."""
        if self.on_cuda:
            self._cuda.reset_peak_memory_stats(self.device)
        try:
            with self.busy.busy():
                return fn(*args)
        finally:
            if self.on_cuda:
                peak = int(self._cuda.max_memory_allocated(self.device))
                with self._lock:
                    self._peak = max(self._peak, peak)


class ComputeCollector:
    """Prometheus collector, read at scrape time: per model and device the busy seconds (a counter:
    rate() is the busy fraction over any window), the busy fraction of the last BUSY_WINDOW_S, the
    weights' bytes and, on CUDA, the peak memory of its calls; per CUDA device the memory in use,
    reserved by the caching allocator, its peak, free and total. On a CPU the device gauges are absent:
    process_resident_memory_bytes is the server's memory there."""

    def __init__(self, monitors: Callable[[], Iterable[ComputeMonitor]], cuda: Any = None) -> None:
        self._monitors = monitors
        self._cuda = cuda if cuda is not None else torch.cuda
        self._device_peaks: dict[str, int] = {}
        self._lock = threading.Lock()  # scrapes may come on several threads

    def describe(self) -> list[Metric]:
        return []  # registering must not read the devices; names are checked at scrape

    def collect(self) -> Iterator[Metric]:
        monitors = list(self._monitors())
        labels = ["model", "device"]
        busy_seconds = CounterMetricFamily("latentd_compute_busy_seconds", "Wall time the model's compute stage "
                                           "was busy (rate(): its busy fraction)", labels=labels)
        busy_fraction = GaugeMetricFamily("latentd_compute_busy_fraction", f"Share of the last {BUSY_WINDOW_S:g} s "
                                          "the model's compute stage was busy", labels=labels)
        weights = GaugeMetricFamily("latentd_model_weights_bytes", "Bytes of the model's weights on its device",
                                    labels=labels)
        peaks = GaugeMetricFamily("latentd_model_memory_peak_bytes", "Most device memory allocated during one "
                                  "of the model's calls (CUDA only)", labels=labels)
        for monitor in monitors:
            values = [monitor.model, str(monitor.device)]
            busy_seconds.add_metric(values, monitor.busy.seconds())
            busy_fraction.add_metric(values, monitor.busy.fraction())
            weights.add_metric(values, monitor.weights_bytes)
            if monitor.peak_bytes is not None:
                peaks.add_metric(values, monitor.peak_bytes)
        yield from (family for family in (busy_seconds, busy_fraction, weights, peaks) if family.samples)
        yield from self._devices([monitor for monitor in monitors if monitor.on_cuda])

    def _devices(self, monitors: list[ComputeMonitor]) -> Iterator[Metric]:
        families = {name: GaugeMetricFamily(f"latentd_device_memory_{name}_bytes", help, labels=["device"])
                    for name, help in (("used", "Device memory allocated to tensors"),
                                       ("reserved", "Device memory held by torch's caching allocator"),
                                       ("peak", "Most device memory allocated to tensors since the server started"),
                                       ("free", "Free device memory, as the driver reports it"),
                                       ("total", "Device memory in all"))}
        devices: dict[str, torch.device] = {str(monitor.device): monitor.device for monitor in monitors}
        for name, device in devices.items():
            try:
                values = self._read(device, [m.peak_bytes or 0 for m in monitors if str(m.device) == name], name)
            except Exception as exc:  # noqa: BLE001 - a failing driver query must not fail the scrape
                logger.warning("metrics: cannot read the memory of %s: %s", name, exc)
                continue
            for key, value in values.items():
                families[key].add_metric([name], value)
        yield from (family for family in families.values() if family.samples)  # none off CUDA

    def _read(self, device: torch.device, model_peaks: list[int], name: str) -> dict[str, float]:
        cuda = self._cuda
        free, total = cuda.mem_get_info(device)
        # Monitors reset the device's peak counter per call: its peak since start is the largest of
        # theirs, of the counter now, and of what was seen before.
        with self._lock:
            peak = max([self._device_peaks.get(name, 0), int(cuda.max_memory_allocated(device)), *model_peaks])
            self._device_peaks[name] = peak
        return {"used": cuda.memory_allocated(device), "reserved": cuda.memory_reserved(device), "peak": peak,
                "free": free, "total": total}
