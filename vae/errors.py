"""The exception types of `latentd.vae`; the server maps each to one gRPC status code."""

from __future__ import annotations


class LatentdError(Exception):
    """Base class of every error latentd raises on purpose."""


class InvalidInputError(LatentdError, ValueError):
    """An argument (image, latent tensor, option) is unusable; `field` names what was wrong."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class InvalidImageError(InvalidInputError):
    """Corrupt, truncated, empty or non-image data; the message names the input."""

    def __init__(self, source: str, reason: str, *, field: str | None = None):
        super().__init__(f"{source}: {reason}", field=field)
        self.source = source
        self.reason = reason


class ImageTooLargeError(InvalidImageError):
    """An image above the configured pixel limit (decompression-bomb guard)."""


class ModelNotFoundError(LatentdError, LookupError):
    """A model name, path or hub id that cannot be resolved to loadable weights."""


class ModelLoadError(LatentdError, RuntimeError):
    """A model that was found but could not be built from its files."""


class NumericalError(LatentdError, ArithmeticError):
    """The model produced NaN or infinite values even in float32."""
