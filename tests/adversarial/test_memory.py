"""Memory admission against a real `latentd serve`: requests are refused or served without the server's
resident memory growing by more than its memory budget, and RPCs beyond max_concurrent_rpcs are refused."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from latentd.bench.server_process import ServerProcess
from latentd.v1 import latentd_pb2 as pb
from latentd.v1 import latentd_pb2_grpc as pb_grpc
from tests.adversarial.test_cost_limits import assert_still_serving, blank_png, refused
from tests.conftest import smooth_image
from tests.integration.test_service import encode_request

MIB = 1024 * 1024
# What the budget does not count: gRPC's buffers of requests received but not yet admitted, and the
# allocator's and interpreter's own noise.
SLACK = 64 * MIB
EIGHTY_PNGS = pb.EncodeRequest(images=[pb.Image(encoded=blank_png(4096, 4096))] * 80)


def _status_bytes(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


class PeakRss:
    """The growth of a process's peak resident memory over a block (Linux: /proc/PID/clear_refs resets it)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> "PeakRss":
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # peak := current
        self.before = _status_bytes(self.pid, "VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.peak = _status_bytes(self.pid, "VmHWM")
        self.growth = self.peak - self.before

    def __str__(self) -> str:
        return f"RSS {self.before / MIB:.0f} MiB before, peak {self.peak / MIB:.0f} MiB (+{self.growth / MIB:.0f})"


class Served:
    """A `latentd serve` subprocess and a channel to it."""

    def __init__(self, process: ServerProcess, channel: grpc.Channel) -> None:
        self.process, self.channel = process, channel
        self.stub = pb_grpc.LatentdStub(channel)

    def assert_still_serving(self) -> None:
        assert_still_serving(self)


@pytest.fixture
def serve(model_dirs):
    started = []

    def start(*flags: str) -> Served:
        process = ServerProcess.latentd("tiny", model_dirs["tiny"], 8, flags).__enter__()
        served = Served(process, grpc.insecure_channel(process.target))
        started.append(served)
        return served
    yield start
    for served in started:
        served.channel.close()
        served.process.__exit__(None, None, None)


@pytest.mark.slow
def test_eighty_4096_pngs_are_refused_without_decoding_them(serve):
    budget_mb = 256
    server = serve("--memory-budget-mb", str(budget_mb))
    with PeakRss(server.process.process.pid) as rss:
        refused(server.stub.Encode, EIGHTY_PNGS, grpc.StatusCode.INVALID_ARGUMENT, "images", "max_request_pixels")
    print(f"80 x 4096x4096 PNG, default limits: {rss}")
    assert rss.growth <= budget_mb * MIB + SLACK
    server.assert_still_serving()


@pytest.mark.slow
def test_the_memory_budget_bounds_resident_memory(serve):
    budget_mb = 64
    server = serve("--memory-budget-mb", str(budget_mb), "--max-request-pixels", str(10**12),
                   "--max-message-mb", "1024", "--admission-wait-ms", "200")
    # Alone, a request larger than the whole budget can never be served (here only the budget stops it).
    with PeakRss(server.process.process.pid) as rss:
        refused(server.stub.Encode, pb.EncodeRequest(images=EIGHTY_PNGS.images[:8]), grpc.StatusCode.INVALID_ARGUMENT,
                "images", "memory_budget_mb 64")
    print(f"8 x 4096x4096 PNG, max_request_pixels and max_message_mb lifted: {rss}")
    assert rss.growth <= budget_mb * MIB + SLACK

    # Together, requests that fit one by one (~17 MB each) wait for room, then are refused as retryable.
    request = encode_request([smooth_image(256, 256, seed=i) for i in range(8)])

    def load() -> list:
        with ThreadPoolExecutor(12) as pool:
            calls = [pool.submit(server.stub.Encode, request, timeout=120) for _ in range(12)]
            outcomes = []
            for call in calls:
                try:
                    outcomes.append(len(call.result().items))
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
                    assert "memory budget" in exc.details()
                    outcomes.append(exc.code())
        return outcomes
    load()  # once first: the model's activation working set (bounded by max_batch_pixels) is a fixed cost
    with PeakRss(server.process.process.pid) as rss:
        outcomes = load()
    print(f"12 concurrent requests of 8 x 256x256 PNG, budget {budget_mb} MiB: {rss}; "
          f"{outcomes.count(8)} served, {outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)} refused")
    assert 8 in outcomes and grpc.StatusCode.RESOURCE_EXHAUSTED in outcomes
    assert rss.growth <= budget_mb * MIB + SLACK
    server.assert_still_serving()


def test_rpcs_beyond_the_concurrency_limit_are_refused_before_they_are_read(start_server):
    harness = start_server(max_concurrent_rpcs=2, max_request_pixels=10**12)
    registry = harness.server.metrics.registry

    def held() -> float:
        return registry.get_sample_value("latentd_memory_held_bytes") or 0

    def wait_until(condition) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline and not any(call.done() for call in calls)
            time.sleep(0.01)
    long = pb.SamplePriorRequest(count=1, height=1, width=16777216)  # minutes of tiles, stopped by cancel
    calls = []
    try:
        calls.append(harness.stub.SamplePrior.future(long, timeout=600))
        wait_until(lambda: held() > 0)  # in its handler: the first RPC counts
        one = held()
        calls.append(harness.stub.SamplePrior.future(long, timeout=600))
        wait_until(lambda: held() >= 2 * one)  # the second too (admitted, waiting for the compute lane)
        refused(harness.stub.ListModels, pb.ListModelsRequest(), grpc.StatusCode.RESOURCE_EXHAUSTED,
                "Concurrent RPC limit")
    finally:
        for call in calls:
            call.cancel()
    deadline = time.monotonic() + 30
    while True:  # the cancelled calls end at their next tile
        try:
            harness.stub.ListModels(pb.ListModelsRequest(), timeout=10)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.05)
    assert_still_serving(harness)
