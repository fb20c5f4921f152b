"""Assemble the gRPC server (servicer, health, reflection, interceptors, TLS, metrics), and the HTTP
Remote VAE endpoint beside it on the same event loop, and run them until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from latentd.v1 import latentd_pb2 as pb
from latentd.v1 import latentd_pb2_grpc as pb_grpc
from latentd.vae.errors import InvalidInputError

from .http_api import HttpServer
from .interceptors import AuthInterceptor, ErrorInterceptor
from .metrics import ServerMetrics, start_metrics_http
from .models import ModelPool
from .reflection import enable_server_reflection
from .servicer import LatentdServicer
from .settings import ServerSettings

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Latentd"].full_name


@dataclass
class LatentdServer:
    """A started server: its gRPC server, health, models, metrics and HTTP endpoint, stopped together by `stop`."""

    server: grpc.aio.Server
    port: int
    settings: ServerSettings
    health: Any
    pool: ModelPool
    metrics: ServerMetrics
    metrics_port: int | None = None
    _http: Any = field(default=None, repr=False)  # the Prometheus metrics endpoint
    remote_vae: HttpServer | None = field(default=None, repr=False)  # the HTTP Remote VAE endpoint (http_port)
    serving: bool = False

    @property
    def http_port(self) -> int | None:
        """The bound port of the HTTP Remote VAE endpoint; None without one."""
        return None if self.remote_vae is None else self.remote_vae.port

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def load_models(self) -> None:
        """Load and warm up every model off the event loop, then turn health SERVING."""
        await asyncio.to_thread(self.pool.load)
        for model in self.pool.names:
            served = self.pool.get(model)
            self.metrics.model_load_seconds.labels(model).set(served.load_seconds)
            self.metrics.track_depth(model, served.batcher.depth_of)
        await self.set_serving(True)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: health NOT_SERVING, no new RPCs, in-flight ones get `grace` seconds, then stop the batchers."""
        grace = self.settings.grace_s if grace is None else grace
        self.serving = False
        await self.health.enter_graceful_shutdown()
        if self.remote_vae is not None:
            await asyncio.gather(self.server.stop(grace), self.remote_vae.stop(grace))
        else:
            await self.server.stop(grace)
        await asyncio.to_thread(self.pool.stop, grace)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


def _credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None:
        return None
    try:
        key, cert = Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes()
        ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    except OSError as exc:
        raise InvalidInputError(f"TLS file: {exc}", field="tls_cert") from exc
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


async def create_server(settings: ServerSettings, *, load: bool = True) -> tuple[LatentdServer, int]:
    """Build, bind and start the server; with `load`, also load the models (health SERVING after).

    Returns (server, bound port); port 0 in the settings binds any free port (tests).
    """
    metrics = ServerMetrics()
    pool = ModelPool(settings, on_batch=metrics.observe_batch)
    metrics.track_compute(pool.monitors)
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if settings.auth_tokens:
        interceptors.append(AuthInterceptor(settings.auth_tokens))
    interceptors.append(ErrorInterceptor())
    limit = settings.max_message_mb * 1024 * 1024
    # Beyond max_concurrent_rpcs gRPC answers RESOURCE_EXHAUSTED before reading the request's message.
    server = grpc.aio.server(interceptors=interceptors, maximum_concurrent_rpcs=settings.max_concurrent_rpcs, options=[
        ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
        # On by default in grpc: a second server on a port in use would start and share it silently.
        ("grpc.so_reuseport", 0)])
    servicer = LatentdServicer(pool, settings, metrics)
    pb_grpc.add_LatentdServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_server_reflection((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    credentials = _credentials(settings)
    try:
        port = (server.add_secure_port(settings.address, credentials) if credentials
                else server.add_insecure_port(settings.address))
    except RuntimeError as exc:
        raise InvalidInputError(f"cannot listen on {settings.address}: the port is in use, or the host is not an "
                                "address of this machine", field="port") from exc
    http, metrics_port = None, None
    if settings.metrics_port is not None:
        try:
            http, _, metrics_port = start_metrics_http(metrics, settings.metrics_host, settings.metrics_port)
        except OSError as exc:
            raise InvalidInputError(f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: "
                                    f"{exc.strerror or exc}", field="metrics_port") from exc
    running = LatentdServer(server, port, settings, health_servicer, pool, metrics, metrics_port, http)
    await running.set_serving(False)
    await server.start()
    if settings.http_port is not None:
        try:
            running.remote_vae = await HttpServer.start(servicer, settings, lambda: running.serving)
        except BaseException:
            await running.stop(0)
            raise
    if load:
        try:
            await running.load_models()
        except BaseException:
            await running.stop(0)
            raise
    return running, port


async def serve(settings: ServerSettings, *, ready: asyncio.Event | None = None) -> int:
    """Run until SIGTERM or SIGINT, then drain within `grace_s` and return 0."""
    from latentd.vae.allocator import retain_freed_memory

    retain_freed_memory()  # a server runs the codec for its whole life (see the allocator module)
    logger.info("settings: %s", settings.redacted())
    running, port = await create_server(settings, load=False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        logger.info("listening on %s:%d%s%s; loading models", settings.host, port,
                    f", HTTP (Remote VAE) on :{running.http_port}" if running.remote_vae else "",
                    f", metrics on :{running.metrics_port}" if running.metrics_port else "")
        loader = asyncio.create_task(running.load_models())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if loader.done():
            loader.result()  # a model that fails to load stops the server with its error
            logger.info("serving %s on %s:%d", ", ".join(running.pool.names), settings.host, port)
            if ready is not None:
                ready.set()
            await stopper
        else:
            loader.cancel()
        logger.info("stopping: draining in-flight requests for up to %.1f s", settings.grace_s)
    finally:
        await running.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    logger.info("stopped")
    return 0
