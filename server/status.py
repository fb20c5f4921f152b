"""The one mapping from exceptions to gRPC status codes, used by the error interceptor and by streams."""

from __future__ import annotations

import logging

import grpc

from latentd.vae.errors import InvalidInputError, LatentdError, ModelNotFoundError, NumericalError

from .admission import OverloadedError
from .batcher import BatcherClosedError, BatchSizeMismatchError, DeadlineExpiredError, QueueFullError
from .cancel import WorkCancelledError
from .costs import ResponseTooLargeError
from .echo import bounded
from .models import NotReadyError

logger = logging.getLogger(__name__)

# Most specific first: the first matching row wins.
STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (ResponseTooLargeError, grpc.StatusCode.OUT_OF_RANGE),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (WorkCancelledError, grpc.StatusCode.CANCELLED),
    (BatcherClosedError, grpc.StatusCode.UNAVAILABLE),
    (NotReadyError, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExpiredError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (NumericalError, grpc.StatusCode.INTERNAL),
    (BatchSizeMismatchError, grpc.StatusCode.INTERNAL),
    (LatentdError, grpc.StatusCode.INTERNAL),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) for an exception; unexpected ones are logged with their traceback and answered
    INTERNAL with a generic message, so no internals (paths, tensors, secrets) reach the client. Messages
    are bounded (see echo.STATUS_CHARS): a status larger than the client accepts reaches it as another."""
    for kind, code in STATUS_TABLE:
        if isinstance(exc, kind):
            return code, bounded(str(exc))
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the server ran out of memory for this request"
    logger.error("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"
