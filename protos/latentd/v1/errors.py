"""The error tree every layer shares: the library raises these, the server maps them to status codes,
and the SDK's errors subclass them, so one `except` serves an in-process codec and a remote one."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none), for reports, logs and
    archive manifests."""
    return " ".join(str(exc).split()) or type(exc).__name__


class LatentdError(Exception):
    """Base class of every error latentd raises on purpose, in process or from a server."""


class InvalidInputError(LatentdError, ValueError):
    """An argument or request field (image, tensor, option) is unusable; `field` names it when known."""

    field: str | None = None

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class NotFoundError(LatentdError, LookupError):
    """A named thing (a model) that is not there."""
