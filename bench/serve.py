"""`latentd bench serve`: drive a real server with concurrent clients and compare with the in-process codec."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np

from latentd.v1.tensors import to_tensor
from latentd.v1 import latentd_pb2 as pb
from latentd.v1 import latentd_pb2_grpc as pb_grpc

from .results import Counters, Phase, Row
from .server_process import ServerProcess

OPERATIONS = ("encode", "decode")
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 << 20)]  # decoded 512x512 floats exceed the 4 MB default


@dataclass
class Workload:
    """The request messages of one operation and image size, and the same inputs for the codec."""

    op: str
    size: int
    request: object
    codec_input: object


def make_workload(codec, op: str, size: int, model: str) -> Workload:
    """A synthetic photo-like image (raw pixels in, raw pixels out: this measures serving, not PNG)."""
    rng = np.random.default_rng(size)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    image = np.clip(ramp[None, :, None] * 0.6 + ramp[:, None, None] * 0.3 + rng.normal(0, 12, (size, size, 3)),
                    0, 255).astype(np.uint8)
    if op == "encode":
        request = pb.EncodeRequest(model=model, images=[pb.Image(pixels=to_tensor(image))])
        return Workload(op, size, request, image)
    latents = codec.encode(image)
    request = pb.DecodeRequest(model=model, items=[pb.Latents(latents=to_tensor(latents.numpy()))],
                               options=pb.DecodeOptions(format=pb.RAW_UINT8))
    return Workload(op, size, request, latents)


def _codec_call(codec, workload: Workload) -> Callable:
    return codec.encode if workload.op == "encode" else codec.decode


def in_process_run(codec, workload: Workload, batch: int, images: int) -> tuple[int, float, float]:
    """(images, seconds, CPU seconds of this process) of the codec called directly on batches of
    `batch` copies of the workload's input (already warmed up at that shape), about `images` in all."""
    call = _codec_call(codec, workload)
    inputs = [workload.codec_input] * batch
    calls = max(1, images // batch)
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(calls):
        call(inputs)
    return calls * batch, time.perf_counter() - started, time.process_time() - cpu_started


def batch_sweep(codec, workload: Workload, batch_sizes: tuple[int, ...], images: int) -> dict[int, float]:
    """The codec's images/s on this workload at each batch size (each warmed up first)."""
    rates = {}
    for batch in batch_sizes:
        in_process_run(codec, workload, batch, batch)  # warm-up: one call at this shape
        done, seconds, _ = in_process_run(codec, workload, batch, images)
        rates[batch] = done / seconds
    return rates


def _rpc(workload: Workload) -> str:
    return "Encode" if workload.op == "encode" else "Decode"


def single_client(target: str, codec, workload: Workload, rounds: int,
                  counters: Counters | None = None, timeout: float = 600) -> tuple[Phase, list[float]]:
    """One client's round trips alternating with the same call in process, so both see the same state of
    the machine (a few percent matter here): (the server phase, the in-process call times in ms)."""
    phase = Phase("single", workload.op, workload.size, 1, rounds)
    call = _codec_call(codec, workload)
    channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    stub = getattr(pb_grpc.LatentdStub(channel), _rpc(workload))
    local_ms = []
    try:
        stub(workload.request, timeout=timeout)
        call(workload.codec_input)
        before = counters() if counters else None
        for _ in range(rounds):
            began = time.perf_counter()
            try:
                stub(workload.request, timeout=timeout)
                phase.latencies_ms.append((time.perf_counter() - began) * 1e3)
            except grpc.RpcError:
                phase.errors += 1
            began = time.perf_counter()
            call(workload.codec_input)
            local_ms.append((time.perf_counter() - began) * 1e3)
        if counters:
            phase.server = counters() - before  # includes the in-process calls' idle time: CPU only
    finally:
        channel.close()
    phase.seconds = sum(phase.latencies_ms) / 1e3
    return phase, local_ms


def drive(target: str, workload: Workload, clients: int, requests: int, name: str,
          counters: Counters | None = None, timeout: float = 600, warm_up: bool = True) -> Phase:
    """`requests` calls from `clients` concurrent clients, each with its own channel and one call in
    flight, after one warm-up call each (`warm_up`; else after connecting). The clients are tasks of
    one asyncio loop (grpc.aio) rather than threads: the load generator shares the machine with the
    server, and 16 threads contending for the GIL would cost the server more CPU than the calls themselves."""
    return asyncio.run(_drive(target, workload, clients, requests, name, counters, timeout, warm_up))


async def _drive(target: str, workload: Workload, clients: int, requests: int, name: str,
                 counters: Counters | None, timeout: float, warm_up: bool) -> Phase:
    phase = Phase(name, workload.op, workload.size, clients, requests)
    channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(clients)]
    try:
        stubs = [getattr(pb_grpc.LatentdStub(channel), _rpc(workload)) for channel in channels]
        if warm_up:
            await asyncio.gather(*(stub(workload.request, timeout=timeout) for stub in stubs))
        else:
            await asyncio.wait_for(asyncio.gather(*(channel.channel_ready() for channel in channels)), timeout)
        remaining = requests

        async def client(stub) -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1  # one loop thread: no lock needed
                began = time.perf_counter()
                try:
                    await stub(workload.request, timeout=timeout)
                    phase.latencies_ms.append((time.perf_counter() - began) * 1e3)
                except grpc.RpcError:
                    phase.errors += 1

        before = await asyncio.to_thread(counters) if counters else None
        began, cpu_began, cores_began = time.perf_counter(), time.process_time(), cores_time()
        await asyncio.gather(*(client(stub) for stub in stubs))
        phase.seconds = time.perf_counter() - began
        phase.client_cpu_seconds = time.process_time() - cpu_began
        cores_ended = cores_time()
        if cores_began and cores_ended:
            phase.cores_idle_seconds = cores_ended[0] - cores_began[0]
            phase.cores_seconds = cores_ended[1] - cores_began[1]
        if counters:
            phase.server = await asyncio.to_thread(counters) - before
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    return phase


def cores_time(stat: str = "/proc/stat") -> tuple[float, float] | None:
    """(idle, all) core-seconds of this machine since boot, from Linux's /proc/stat; None elsewhere."""
    try:
        with open(stat) as file:
            fields = [int(value) for value in file.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    if len(fields) < 8:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal (guest time is already inside user and nice)
    return (fields[3] + fields[4]) / ticks, sum(fields) / ticks


def requests_for(size: int, base: int, clients: int, rounds: int = 1) -> int:
    """Requests per round: `base` per phase at 256x256, scaled by pixel count so every size takes
    comparable time and split over the rounds, and at least one per client so that every client is
    busy at the start of every round."""
    return max(clients, math.ceil(base * (256 / size) ** 2 / rounds))


def bench_serve(model: str = "default", *, sizes: tuple[int, ...] = (64, 256, 512), ops: tuple[str, ...] = OPERATIONS,
                clients: int = 16, requests: int = 64, max_batch_size: int = 8, rounds: int = 3,
                target: str | None = None, device: str | None = None,
                progress: Callable[[str], None] = lambda message: None) -> list[Row]:
    """Measure every (op, size): the in-process codec's best batch size, then `rounds` rounds of the
    in-process codec at that batch, the server batched (C clients, and 1 client alternating with
    single in-process calls), the server with batching off (C clients) and the floor server (C
    clients: gRPC alone, no model; see floor_server.py). All servers run throughout; interleaving the
    rounds gives every comparison the same drift of the machine's speed (10% from minute to minute
    here), and the rounds' own shares show the spread."""
    from latentd.vae.codec import load_codec

    codec = load_codec(model, device=device)
    workloads = {(op, size): make_workload(codec, op, size, "" if target is None else model)
                 for op in ops for size in sizes}
    rows = {key: Row(*key) for key in workloads}
    extra = ("--device", device) if device else ()
    batches = tuple(sorted({size for size in (1, 2, 4, 8, 16, 32) if size < max_batch_size} | {max_batch_size}))
    with contextlib.ExitStack() as stack:
        servers = ({"batched": None} if target is not None else
                   {label: stack.enter_context(ServerProcess.latentd("bench", model, batch, extra))
                    for label, batch in (("batched", max_batch_size), ("unbatched", 1))}
                   | {"floor": stack.enter_context(ServerProcess.floor(codec.factor, codec.info.latent_channels))})
        for key, workload in workloads.items():
            row, n = rows[key], requests_for(workload.size, requests, clients, rounds)
            progress(f"in-process batch sweep: {workload.op} {workload.size}px")
            row.in_process_rates = batch_sweep(codec, workload, batches, n)
            for index in range(rounds):
                progress(f"round {index + 1}/{rounds}: {workload.op} {workload.size}px, {clients} clients, "
                         f"{n} requests per server")
                _round(row, codec, workload, servers, target, clients, n, first=index == 0)
    return list(rows.values())


def _round(row: Row, codec, workload: Workload, servers: dict, target: str | None, clients: int, requests: int,
           first: bool) -> None:
    """One round of a workload: in process, then each server (the batched one also with one client)."""
    images, seconds, cpu_seconds = in_process_run(codec, workload, row.in_process_batch, requests)
    row.in_process_images += images
    row.in_process_seconds += seconds
    row.in_process_cpu_seconds += cpu_seconds
    for label, server in servers.items():
        address = target or server.target
        counters = server.counters(workload.op) if server else None
        phase = drive(address, workload, clients, requests, label, counters, warm_up=first)
        row.add(label, phase)
        if label == "batched":
            row.round_shares.append(phase.images_per_s / (images / seconds))
            single, local_ms = single_client(address, codec, workload, max(2, requests // 4), counters)
            row.add("single", single)
            row.in_process_single += local_ms
