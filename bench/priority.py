"""`latentd bench priority`: interactive latency on an idle server, then under a flood of bulk streams."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
import numpy as np

from latentd.v1 import latentd_pb2 as pb
from latentd.v1 import latentd_pb2_grpc as pb_grpc

from .serve import CHANNEL_OPTIONS, Workload, make_workload
from .server_process import ServerProcess

TARGET_RATIO = 2.0  # interactive p99 under a bulk flood over idle p99; printed, never asserted


@dataclass
class PriorityResult:
    model: str
    op: str
    size: int
    bulk_streams: int
    requests: int
    idle_ms: list[float] = field(default_factory=list)  # interactive, nothing else running
    loaded_ms: list[float] = field(default_factory=list)  # interactive, during the bulk flood
    unprioritized_ms: list[float] = field(default_factory=list)  # the same calls sent as bulk, same flood
    bulk_images: int = 0  # bulk answers during the loaded phases
    bulk_seconds: float = 0.0
    errors: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)  # the failed interactive calls by status code

    @staticmethod
    def percentile(values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q)) if values else None

    @property
    def ratio(self) -> float | None:
        """p99 under the flood over p99 idle: what interactive callers feel of the bulk work."""
        idle, loaded = self.percentile(self.idle_ms, 99), self.percentile(self.loaded_ms, 99)
        return None if not idle or loaded is None else loaded / idle

    @property
    def unprioritized_ratio(self) -> float | None:
        idle, loaded = self.percentile(self.idle_ms, 99), self.percentile(self.unprioritized_ms, 99)
        return None if not idle or loaded is None else loaded / idle

    @property
    def bulk_images_per_s(self) -> float:
        return self.bulk_images / self.bulk_seconds if self.bulk_seconds else 0.0

    def to_dict(self) -> dict:
        p = self.percentile
        return {"model": self.model, "op": self.op, "size": self.size, "bulk_streams": self.bulk_streams,
                "requests": self.requests, "idle_p50_ms": p(self.idle_ms, 50), "idle_p99_ms": p(self.idle_ms, 99),
                "loaded_p50_ms": p(self.loaded_ms, 50), "loaded_p99_ms": p(self.loaded_ms, 99),
                "unprioritized_p50_ms": p(self.unprioritized_ms, 50),
                "unprioritized_p99_ms": p(self.unprioritized_ms, 99), "ratio": self.ratio,
                "unprioritized_ratio": self.unprioritized_ratio, "bulk_images_per_s": self.bulk_images_per_s,
                "errors": self.errors, "error_codes": dict(self.error_codes)}


def _with_priority(request, priority: int):
    copy = type(request)()
    copy.CopyFrom(request)
    copy.priority = priority
    return copy


async def _interactive(stub, request, count: int, result: PriorityResult, timeout: float) -> list[float]:
    """`count` calls one after another (one caller waiting on each answer): their latencies in ms."""
    latencies = []
    for _ in range(count):
        began = time.perf_counter()
        try:
            await stub(request, timeout=timeout)
            latencies.append((time.perf_counter() - began) * 1e3)
        except grpc.RpcError as exc:
            result.errors += 1
            code = exc.code().name if callable(getattr(exc, "code", None)) else "UNKNOWN"
            result.error_codes[code] = result.error_codes.get(code, 0) + 1
    return latencies


async def _bulk_stream(stub, request, stop: asyncio.Event, answered: list[int], timeout: float) -> None:
    """One bulk stream (as encode_many sends): requests as fast as the server takes them until `stop`."""
    async def requests():
        index = 0
        while not stop.is_set():
            message = _with_priority(request, pb.BULK)
            message.id = str(index)
            index += 1
            yield message
            await asyncio.sleep(0)

    call = stub(requests(), timeout=timeout)
    try:
        async for response in call:
            if not response.error.code:
                answered[0] += 1
            if stop.is_set():
                break
    except grpc.RpcError:
        pass
    finally:
        call.cancel()


async def _measure(target: str, workload: Workload, bulk_streams: int, requests: int, result: PriorityResult,
                   progress: Callable[[str], None], timeout: float) -> None:
    rpc, stream_rpc = ("Encode", "EncodeStream") if workload.op == "encode" else ("Decode", "DecodeStream")
    channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(bulk_streams + 1)]
    try:
        stubs = [pb_grpc.LatentdStub(channel) for channel in channels]
        interactive = getattr(stubs[0], rpc)
        request = _with_priority(workload.request, pb.INTERACTIVE)
        await _interactive(interactive, request, 4, result, timeout)  # warm-up: first calls at a shape pay more
        progress(f"idle: {requests} interactive {workload.op} calls")
        result.idle_ms = await _interactive(interactive, request, requests, result, timeout)
        # Calls sent as bulk wait behind the whole backlog: a third as many show it.
        for label, priority, count in (("loaded", pb.INTERACTIVE, requests),
                                       ("unprioritized", pb.BULK, max(2, requests // 3))):
            progress(f"{label}: {count} calls sent as {pb.Priority.Name(priority)} during "
                     f"{bulk_streams} bulk streams")
            stop, answered = asyncio.Event(), [0]
            flood = [asyncio.create_task(_bulk_stream(getattr(stub, stream_rpc), workload.request, stop, answered,
                                                      timeout)) for stub in stubs[1:]]
            await asyncio.sleep(0.5)  # the streams fill the server's queue first
            began, before = time.perf_counter(), answered[0]
            latencies = await _interactive(interactive, _with_priority(workload.request, priority), count,
                                           result, timeout)
            result.bulk_seconds += time.perf_counter() - began
            result.bulk_images += answered[0] - before
            setattr(result, f"{label}_ms", latencies)
            stop.set()
            for task in flood:
                task.cancel()
            await asyncio.gather(*flood, return_exceptions=True)
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def bench_priority(model: str = "default", *, op: str = "encode", size: int = 256, bulk_streams: int = 4,
                   requests: int = 30, max_batch_size: int = 8, bulk_max_batch_size: int | None = None,
                   device: str | None = None,
                   target: str | None = None, timeout: float = 600,
                   progress: Callable[[str], None] = lambda message: None) -> PriorityResult:
    """Interactive calls (one at a time) on an idle server, then during `bulk_streams` streams of bulk
    requests of the same kind; and (a third as many of) the same calls sent as bulk during the flood,
    to show what the priority buys. Starts `latentd serve` (with `bulk_max_batch_size`, if given)
    unless `target` is given."""
    codec = None
    if op == "decode":  # the latents to send come from the model
        from latentd.vae.codec import load_codec

        codec = load_codec(model, device=device)
    workload = make_workload(codec, op, size, "" if target is None else model)
    result = PriorityResult(model, op, size, bulk_streams, requests)
    extra = (*(("--device", device) if device else ()),
             *(("--bulk-max-batch-size", str(bulk_max_batch_size)) if bulk_max_batch_size else ()))
    with contextlib.ExitStack() as stack:
        if target is None:
            progress("starting the server")
            target = stack.enter_context(ServerProcess.latentd("bench", model, max_batch_size, extra)).target
        asyncio.run(_measure(target, workload, bulk_streams, requests, result, progress, timeout))
    return result
