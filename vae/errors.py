"""The exception types of `latentd.vae`, in the shared tree of `latentd.v1.errors`; the server maps each
to one gRPC status code."""

from __future__ import annotations

from latentd.v1.errors import InvalidInputError, LatentdError, NotFoundError

__all__ = ["LatentdError", "InvalidInputError", "InvalidImageError", "ImageTooLargeError", "ModelNotFoundError",
           "ModelLoadError", "NumericalError"]


class InvalidImageError(InvalidInputError):
    """Corrupt, truncated, empty or non-image data; the message names the input."""

    def __init__(self, source: str, reason: str, *, field: str | None = None):
        super().__init__(f"{source}: {reason}", field=field)
        self.source = source
        self.reason = reason


class ImageTooLargeError(InvalidImageError):
    """An image above the configured pixel limit (decompression-bomb guard)."""


class ModelNotFoundError(NotFoundError):
    """A model name, path or hub id that cannot be resolved to loadable weights."""


class ModelLoadError(LatentdError, RuntimeError):
    """A model that was found but could not be built from its files."""


class NumericalError(LatentdError, ArithmeticError):
    """The model produced NaN or infinite values even in float32."""
