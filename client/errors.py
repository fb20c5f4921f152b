"""The client's exception hierarchy: one class per gRPC status code a caller handles, with the server's message.

Each is a `latentd.v1.errors.LatentdError`, and INVALID_ARGUMENT / NOT_FOUND answers are the library's
`InvalidInputError` / `NotFoundError` too, so one `except` handles a local codec and a server alike."""

from __future__ import annotations

import grpc

from latentd.v1 import errors as shared


class LatentdClientError(shared.LatentdError):
    """A call to a latentd server failed; `code` is the gRPC status, `details` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class InvalidInputError(LatentdClientError, shared.InvalidInputError):
    """The request was refused as malformed; the message names the field (INVALID_ARGUMENT)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(LatentdClientError, shared.NotFoundError):
    code = grpc.StatusCode.NOT_FOUND


class UnauthenticatedError(LatentdClientError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(LatentdClientError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(LatentdClientError):
    """The server's queue is full or it ran out of memory; retried with backoff (RESOURCE_EXHAUSTED)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(LatentdClientError, ConnectionError):
    """The server is unreachable, starting or draining; retried with backoff (UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(LatentdClientError, TimeoutError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(LatentdClientError):
    code = grpc.StatusCode.CANCELLED


class InternalError(LatentdClientError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE = {cls.code: cls for cls in (InvalidInputError, NotFoundError, UnauthenticatedError, PermissionDeniedError,
                                      ResourceExhaustedError, UnavailableError, DeadlineExceededError,
                                      CancelledError, InternalError)}
# Only these mean "try again later"; everything else would fail the same way again.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# The request itself is at fault (the CLI exits 2 on these): the same call fails the same way anywhere.
CALLER_ERRORS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
                           grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


def error_for(code: grpc.StatusCode, details: str) -> LatentdClientError:
    return _BY_CODE.get(code, LatentdClientError)(details or code.name, code)


def from_rpc_error(exc: grpc.RpcError) -> LatentdClientError:
    """The typed error for a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    return error_for(code or grpc.StatusCode.UNKNOWN, details or "")


def gave_up(error: grpc.RpcError | None) -> LatentdClientError:
    """What a call raises after its last attempt; None: its deadline left no time for any attempt."""
    if error is None:
        return DeadlineExceededError("the call's deadline passed before it could be sent")
    return from_rpc_error(error)


def from_stream_error(error) -> LatentdClientError:
    """The typed error of a failed stream item (`latentd.v1.Error`: a status code name and a message)."""
    code = getattr(grpc.StatusCode, error.code, grpc.StatusCode.UNKNOWN)
    return error_for(code, error.message)
