"""Busy time and device memory metrics: BusyMeter, ComputeMonitor and the collector, with a mocked torch.cuda."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from latentd.server.busy import BusyMeter
from latentd.server.device_stats import ComputeCollector, ComputeMonitor
from latentd.server.metrics import ServerMetrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_busy_meter_counts_overlapping_work_once():
    clock = FakeClock()
    meter = BusyMeter(window_s=10.0, clock=clock)
    clock.now += 2.0  # idle 100-102
    meter.begin()  # busy from 102
    clock.now += 1.0
    meter.begin()  # a second call beside the first
    clock.now += 1.0
    meter.end()
    clock.now += 1.0
    meter.end()  # busy 102-105: 3 s, not 4
    assert meter.seconds() == pytest.approx(3.0)
    clock.now = 110.0
    assert meter.fraction() == pytest.approx(0.3)  # 3 busy of the 10 s of the meter's life
    meter.begin()
    clock.now = 112.0  # window 102-112: 3 s closed + 2 s running
    assert meter.seconds() == pytest.approx(5.0)
    assert meter.fraction() == pytest.approx(0.5)
    meter.end()
    clock.now = 200.0
    assert meter.fraction() == 0.0 and meter.seconds() == pytest.approx(5.0)


def test_busy_meter_window_cuts_spans_at_its_start():
    clock = FakeClock()
    meter = BusyMeter(window_s=10.0, clock=clock)
    with meter.busy():
        clock.now += 20.0  # 100-120
    clock.now = 125.0  # window 115-125: 5 s of the span inside it
    assert meter.fraction() == pytest.approx(0.5)


def test_busy_meter_refuses_an_end_without_a_begin_and_a_bad_window():
    with pytest.raises(RuntimeError):
        BusyMeter().end()
    with pytest.raises(ValueError, match="window_s"):
        BusyMeter(window_s=0)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's memory functions, monkeypatched: a device whose allocations the test sets."""
    state = {"allocated": 1000, "peak": 1000, "reserved": 4096, "free": 7 << 30, "total": 8 << 30, "resets": []}
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], state["total"]))

    def reset(device=None):
        state["resets"].append(str(device))
        state["peak"] = state["allocated"]
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    return state


def samples(registry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_a_cuda_model_reports_its_peak_busy_time_and_its_device_memory(fake_cuda):
    clock = FakeClock()
    monitor = ComputeMonitor("sd", "cuda:0", weights_bytes=500, clock=clock)

    def batch(grow):
        fake_cuda["peak"] = fake_cuda["allocated"] + grow  # the activations of this call
        clock.now += 2.0
        return grow
    assert monitor.run(batch, 3000) == 3000
    assert monitor.run(batch, 1000) == 1000  # a smaller batch: the peak stays the larger one
    assert fake_cuda["resets"] == ["cuda:0", "cuda:0"]  # one reset per call: each peak is that call's
    assert monitor.peak_bytes == 4000
    registry = CollectorRegistry()
    registry.register(ComputeCollector(lambda: [monitor]))
    got = samples(registry)
    model = (("device", "cuda:0"), ("model", "sd"))
    assert got[("latentd_compute_busy_seconds_total", model)] == pytest.approx(4.0)
    assert got[("latentd_compute_busy_fraction", model)] == pytest.approx(1.0)  # busy all of its 4 s
    assert got[("latentd_model_weights_bytes", model)] == 500
    assert got[("latentd_model_memory_peak_bytes", model)] == 4000
    device = (("device", "cuda:0"),)
    assert got[("latentd_device_memory_used_bytes", device)] == 1000
    assert got[("latentd_device_memory_reserved_bytes", device)] == 4096
    assert got[("latentd_device_memory_free_bytes", device)] == 7 << 30
    assert got[("latentd_device_memory_total_bytes", device)] == 8 << 30
    # The device's peak since start is the largest call's, though the counter was reset since.
    assert got[("latentd_device_memory_peak_bytes", device)] == 4000
    fake_cuda["peak"] = 9000  # an allocation outside the model's calls, seen at the next scrape
    assert samples(registry)[("latentd_device_memory_peak_bytes", device)] == 9000


def test_models_on_two_devices_each_get_their_own_labels(fake_cuda):
    monitors = [ComputeMonitor("a", "cuda:0"), ComputeMonitor("b", "cuda:1"), ComputeMonitor("c", "cuda:1")]
    registry = CollectorRegistry()
    registry.register(ComputeCollector(lambda: monitors))
    got = samples(registry)
    assert {labels for name, labels in got if name == "latentd_device_memory_used_bytes"} == {
        (("device", "cuda:0"),), (("device", "cuda:1"),)}
    assert {labels for name, labels in got if name == "latentd_compute_busy_fraction"} == {
        (("device", "cuda:0"), ("model", "a")), (("device", "cuda:1"), ("model", "b")),
        (("device", "cuda:1"), ("model", "c"))}


def test_a_failing_device_query_leaves_the_other_metrics(fake_cuda, monkeypatch, caplog):
    def broken(device=None):
        raise RuntimeError("CUDA error: unspecified launch failure")
    monkeypatch.setattr(torch.cuda, "mem_get_info", broken)
    registry = CollectorRegistry()
    registry.register(ComputeCollector(lambda: [ComputeMonitor("sd", "cuda:0")]))
    got = samples(registry)
    assert ("latentd_compute_busy_seconds_total", (("device", "cuda:0"), ("model", "sd"))) in got
    assert not [name for name, _ in got if name.startswith("latentd_device_memory")]
    assert "cannot read the memory of cuda:0" in caplog.text


def test_on_a_cpu_the_device_memory_metrics_are_absent_and_cuda_is_never_asked(monkeypatch):
    def asked(*args, **kwargs):
        raise AssertionError("torch.cuda asked on a CPU")
    for name in ("memory_allocated", "max_memory_allocated", "reset_peak_memory_stats", "mem_get_info"):
        monkeypatch.setattr(torch.cuda, name, asked)
    monitor = ComputeMonitor("sd", "cpu", weights_bytes=12)
    assert monitor.run(lambda: 7) == 7 and monitor.peak_bytes is None
    metrics = ServerMetrics()
    metrics.track_compute(lambda: [monitor])
    got = samples(metrics.registry)
    model = (("device", "cpu"), ("model", "sd"))
    assert ("latentd_compute_busy_seconds_total", model) in got
    assert got[("latentd_model_weights_bytes", model)] == 12
    assert ("latentd_model_memory_peak_bytes", model) not in got
    assert not [name for name, _ in got if name.startswith("latentd_device_memory")]
    assert any(name == "process_resident_memory_bytes" for name, _ in got)  # the CPU's memory figure


def test_a_call_that_raises_still_counts_as_busy_and_closes_its_span(fake_cuda):
    clock = FakeClock()
    monitor = ComputeMonitor("sd", "cuda:0", clock=clock)

    def failing():
        clock.now += 1.0
        fake_cuda["peak"] = 5000
        raise ValueError("bad batch")
    with pytest.raises(ValueError):
        monitor.run(failing)
    clock.now += 9.0
    assert monitor.busy.seconds() == pytest.approx(1.0)  # not still running
    assert monitor.busy.fraction() == pytest.approx(0.1)
    assert monitor.peak_bytes == 5000
