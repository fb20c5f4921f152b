"""latentd.client: the Python SDK of a latentd server and the `latentd` command line; never imports torch.

    from latentd.client import LatentClient
    with LatentClient("localhost:50051") as client:
        latents = client.encode("photo.png")
        image = client.decode(latents, output="pil")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> submodule, resolved on first use so that `latentd --help` stays quick.
_EXPORTS: dict[str, str] = {
    "LatentClient": "sync",
    "AsyncLatentClient": "aio",
    "RetryPolicy": "retry",
    "LatentdClientError": "errors",
    "InvalidInputError": "errors",
    "NotFoundError": "errors",
    "UnauthenticatedError": "errors",
    "PermissionDeniedError": "errors",
    "ResourceExhaustedError": "errors",
    "UnavailableError": "errors",
    "DeadlineExceededError": "errors",
    "CancelledError": "errors",
    "InternalError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .aio import AsyncLatentClient
    from .errors import (
        CancelledError,
        DeadlineExceededError,
        InternalError,
        InvalidInputError,
        LatentdClientError,
        NotFoundError,
        PermissionDeniedError,
        ResourceExhaustedError,
        UnauthenticatedError,
        UnavailableError,
    )
    from .retry import RetryPolicy
    from .sync import LatentClient
