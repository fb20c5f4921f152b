"""Start real latentd servers on 127.0.0.1 port 0, each on its own event loop thread, and stop them after."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, replace
from typing import Any

import grpc
import pytest

from latentd.server.app import LatentdServer, create_server
from latentd.server.settings import ServerSettings
from latentd.v1 import latentd_pb2_grpc as pb_grpc


@dataclass
class Harness:
    """A running server plus a blocking channel to it; `call` runs a coroutine on the server's loop."""

    server: LatentdServer
    port: int
    loop: asyncio.AbstractEventLoop
    channel: grpc.Channel
    stub: pb_grpc.LatentdStub

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coroutine, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def codec(self, model: str = ""):
        return self.server.pool.get(model).codec


class ServerFactory:
    def __init__(self, models: dict[str, str]) -> None:
        self.models = models
        self.started: list[tuple[Harness, threading.Thread]] = []

    def __call__(self, *, channel_credentials: grpc.ChannelCredentials | None = None, **settings) -> Harness:
        base = ServerSettings(host="127.0.0.1", port=0, models=self.models, log_requests=False)
        config = replace(base, **settings)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="test-server-loop", daemon=True)
        thread.start()
        server, port = asyncio.run_coroutine_threadsafe(create_server(config), loop).result(120)
        target = f"127.0.0.1:{port}"
        channel = (grpc.secure_channel(target, channel_credentials, options=[("grpc.ssl_target_name_override",
                                                                               "localhost")])
                   if channel_credentials else grpc.insecure_channel(target))
        harness = Harness(server, port, loop, channel, pb_grpc.LatentdStub(channel))
        self.started.append((harness, thread))
        return harness

    def __enter__(self) -> "ServerFactory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for harness, thread in self.started:
            harness.channel.close()
            try:
                harness.call(harness.server.stop(0))
            finally:
                harness.loop.call_soon_threadsafe(harness.loop.stop)
                thread.join(10)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Two tiny models on disk: `tiny` (factor 2, 4 channels) and `taesd` style deterministic."""
    from latentd.vae import save_model
    from tests.conftest import make_tiny_kl, make_tiny_taesd

    root = tmp_path_factory.mktemp("models")
    return {"tiny": str(save_model(make_tiny_kl(), root / "tiny")),
            "fast": str(save_model(make_tiny_taesd(), root / "fast"))}


@pytest.fixture
def start_server(model_dirs):
    with ServerFactory(model_dirs) as factory:
        yield factory


@pytest.fixture
def harness(start_server) -> Harness:
    return start_server()
