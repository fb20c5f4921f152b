"""Server interceptors: bearer-token auth, request parsing, and exceptions -> gRPC status codes (one place)."""

from __future__ import annotations

import hmac
import inspect
from typing import AsyncIterator, Awaitable, Callable, Sequence

import grpc

from latentd.vae.errors import InvalidInputError

from .status import status_for

# Health probes (load balancers, kubelets) carry no token.
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


KINDS = (  # (attribute, builder, requests stream, responses stream)
    ("unary_unary", grpc.unary_unary_rpc_method_handler, False, False),
    ("unary_stream", grpc.unary_stream_rpc_method_handler, False, True),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, True, False),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, True, True),
)


class MalformedRequestError(InvalidInputError):
    """Request bytes that are not a valid protobuf message of the method's request type."""


def _kind(handler: grpc.RpcMethodHandler) -> tuple[Callable, bool, bool]:
    """(behaviour, streaming requests, streaming responses) of a handler."""
    for attribute, _, requests, responses in KINDS:
        behaviour = getattr(handler, attribute)
        if behaviour is not None:
            return behaviour, requests, responses
    raise ValueError("a method handler without a behaviour")


def _build(behaviour: Callable, requests: bool, responses: bool,
           response_serializer: Callable | None) -> grpc.RpcMethodHandler:
    """A handler that receives the raw request bytes (no request deserializer: see `_parser`)."""
    build = next(builder for _, builder, r, s in KINDS if (r, s) == (requests, responses))
    return build(behaviour, request_deserializer=None, response_serializer=response_serializer)


def _parser(deserialize: Callable | None) -> Callable[[bytes, int | None], object]:
    """The handler's request deserializer, raising MalformedRequestError instead of whatever it raises.

    grpc answers an exception from a deserializer itself, as UNKNOWN with the Python class name (or a
    stream's INTERNAL), and before any interceptor's behaviour runs, that is before auth is decided;
    parsing inside the behaviour gives INVALID_ARGUMENT, after auth."""
    if deserialize is None:
        return lambda raw, index: raw
    type_name = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    type_name = getattr(type_name, "full_name", "request")

    def parse(raw: bytes, index: int | None) -> object:
        try:
            return deserialize(raw)
        except Exception:  # noqa: BLE001 - protobuf raises DecodeError, but also others on odd input
            where = "request" if index is None else f"request {index} of the stream"
            raise MalformedRequestError(f"{where} is not a valid {type_name} message ({len(raw)} bytes)",
                                        field="request") from None
    return parse


async def _parsed(raw_requests: AsyncIterator[bytes], parse: Callable) -> AsyncIterator[object]:
    index = 0
    async for raw in raw_requests:
        yield parse(raw, index)
        index += 1


def _serving(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The handler parsing its requests itself, with every exception it raises answered as a status."""
    behaviour, streaming_requests, streaming_responses = _kind(handler)
    parse = _parser(handler.request_deserializer)

    def request_of(raw):
        return _parsed(raw, parse) if streaming_requests else parse(raw, None)

    if inspect.isasyncgenfunction(behaviour):
        async def stream(raw, context):
            try:
                async for response in behaviour(request_of(raw), context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - every error becomes a status, never a dropped stream
                await context.abort(*status_for(exc))
        wrapped = stream
    else:
        # A coroutine: a unary answer, or responses written with `context.write` (grpc_health's Watch).
        async def unary(raw, context):
            try:
                return await behaviour(request_of(raw), context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001
                await context.abort(*status_for(exc))
        wrapped = unary
    return _build(wrapped, streaming_requests, streaming_responses, handler.response_serializer)


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
            cached = self._wrapped[details.method] = (handler, _serving(handler))
        return cached[1]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """`authorization: Bearer <token>` must match one of the tokens, compared in constant time.

    Decided from the headers alone: a refused call's body is never read, let alone parsed."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self._tokens = [token.encode() for token in tokens]

    def _allowed(self, metadata) -> bool:
        return self.allows([value for key, value in metadata or () if key == "authorization"])

    def allows(self, authorization: Sequence[str | bytes]) -> bool:
        """Whether the `authorization` header values (gRPC metadata or HTTP) carry a valid bearer token."""
        presented = b""
        for value in authorization:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, credentials = text.strip().partition(" ")
            if scheme.lower() == "bearer":  # auth schemes are case-insensitive (RFC 7235)
                presented = credentials.strip().encode()
        # Compare against every token (no early exit), so timing says nothing about which matched.
        matches = [hmac.compare_digest(presented, token) for token in self._tokens]
        return bool(presented) and any(matches)

    async def intercept_service(self, continuation: Callable[..., Awaitable], details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(PUBLIC_METHOD_PREFIXES):
            return handler
        if self._allowed(details.invocation_metadata):
            return handler
        _, _, streaming_responses = _kind(handler)
        # A streaming-request handler whatever the method: grpc reads a unary request before calling
        # the behaviour, a stream only when the behaviour asks, and this one never asks.
        return _build(_refuse, True, streaming_responses, handler.response_serializer)


async def _refuse(requests, context) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
