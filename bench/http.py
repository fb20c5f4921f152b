"""`latentd bench http`: a decode through the HTTP Remote VAE endpoint against the same decode over gRPC,
on one server in the same run."""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from dataclasses import dataclass
from typing import Callable

import numpy as np

from latentd.client import LatentClient

from .server_process import ServerProcess


@dataclass
class HttpBenchResult:
    model: str
    size: int
    requests: int
    grpc_ms: float  # median wall time of one decode over gRPC (SDK, float32 latents, raw RGB uint8 back)
    http_ms: float  # the same decode over HTTP as diffusers' remote_decode sends it (output_type=pt)

    @property
    def ratio(self) -> float:
        return self.http_ms / self.grpc_ms


def bench_http(model: str = "default", *, size: int = 512, requests: int = 20, warmup: int = 2,
               seed: int = 0, progress: Callable[[str], None] = lambda message: None) -> HttpBenchResult:
    """Start `latentd serve --http-port 0` with MODEL, then alternate gRPC and HTTP decodes of the same
    seeded latents, one request at a time, and report each path's median."""
    with ServerProcess.latentd("bench", model, 1, ("--http-port", "0")) as server, \
            LatentClient(server.target) as client:
        info = client.model("bench")
        side = size // info.downsampling_factor
        latents = np.random.default_rng(seed).standard_normal((info.latent_channels, side, side), np.float32)
        url = f"http://127.0.0.1:{server.http_port}/bench/decode?" + "&".join([
            f"shape={json.dumps([1, *latents.shape]).replace(' ', '')}", "dtype=float32", "output_type=pt",
            "partial_postprocess=true", "do_scaling=true"])
        body = latents.tobytes()

        def over_grpc() -> None:
            client.decode(latents)

        def over_http() -> None:
            request = urllib.request.Request(url, data=body, method="POST",
                                             headers={"Content-Type": "tensor/binary", "Accept": "tensor/binary"})
            with urllib.request.urlopen(request, timeout=120) as answer:
                answer.read()

        times: dict[str, list[float]] = {"grpc": [], "http": []}
        for index in range(warmup + requests):
            progress(f"request {index + 1}/{warmup + requests}")
            for name, call in (("grpc", over_grpc), ("http", over_http)):
                start = time.perf_counter()
                call()
                if index >= warmup:
                    times[name].append(time.perf_counter() - start)
    return HttpBenchResult(model, size, requests, statistics.median(times["grpc"]) * 1e3,
                           statistics.median(times["http"]) * 1e3)
