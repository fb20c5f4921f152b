"""Server interceptors: bearer-token auth, and exceptions -> gRPC status codes (one place for both)."""

from __future__ import annotations

import hmac
from typing import Awaitable, Callable, Sequence

import grpc

from .status import status_for

# Health probes (load balancers, kubelets) carry no token.
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


def _rewrap(handler: grpc.RpcMethodHandler, wrap: Callable) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour passed through `wrap(behaviour, streaming_response)`."""
    kinds = (
        ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
        ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
        ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
        ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
    )
    for attribute, build, streaming in kinds:
        behaviour = getattr(handler, attribute)
        if behaviour is not None:
            return build(wrap(behaviour, streaming), request_deserializer=handler.request_deserializer,
                         response_serializer=handler.response_serializer)
    return handler


def _map_errors(behaviour: Callable, streaming: bool) -> Callable:
    if streaming:
        async def stream(request, context):
            try:
                async for response in behaviour(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - every error becomes a status, never a dropped stream
                await context.abort(*status_for(exc))
        return stream

    async def unary(request, context):
        try:
            return await behaviour(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await context.abort(*status_for(exc))
    return unary


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Every exception a handler raises leaves as a gRPC status (see `status.STATUS_TABLE`)."""

    def __init__(self) -> None:
        # method -> (its handler, the wrapped one): the wrapping is done once per method, not per call
        # (for 64x64 images the per-request work is a large part of a request's cost).
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation: Callable[..., Awaitable], details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        cached = self._wrapped.get(details.method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[details.method] = (handler, _rewrap(handler, _map_errors))
        return cached[1]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """`authorization: Bearer <token>` must match one of the tokens, compared in constant time."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self._tokens = [token.encode() for token in tokens]

    def _allowed(self, metadata) -> bool:
        presented = b""
        for key, value in metadata or ():
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                if text.startswith("Bearer "):
                    presented = text[len("Bearer "):].strip().encode()
        # Compare against every token (no early exit), so timing says nothing about which matched.
        matches = [hmac.compare_digest(presented, token) for token in self._tokens]
        return bool(presented) and any(matches)

    async def intercept_service(self, continuation: Callable[..., Awaitable], details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(PUBLIC_METHOD_PREFIXES):
            return handler
        if self._allowed(details.invocation_metadata):
            return handler

        def deny(behaviour: Callable, streaming: bool) -> Callable:
            if streaming:
                async def refuse_stream(request, context):
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
                    yield  # pragma: no cover - makes this an async generator
                return refuse_stream

            async def refuse(request, context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
            return refuse

        return _rewrap(handler, deny)
