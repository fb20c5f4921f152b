"""latentd.vae: the VAE codec library (models, image I/O, encode/decode, latent-space operations, metrics)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> submodule. Resolved on first use (PEP 562) so that `latentd.vae.errors` and the
# CLI's `--help` do not pay for importing torch and diffusers.
_EXPORTS: dict[str, str] = {
    "AnomalyScore": "codec",
    "Codec": "codec",
    "CodecOptions": "options",
    "load_codec": "codec",
    "ImageTooLargeError": "errors",
    "InvalidImageError": "errors",
    "InvalidInputError": "errors",
    "LatentdError": "errors",
    "ModelLoadError": "errors",
    "ModelNotFoundError": "errors",
    "NumericalError": "errors",
    "open_image": "imageio",
    "LoadedModel": "loading",
    "build_random": "loading",
    "load_model": "loading",
    "save_model": "loading",
    "ModelInfo": "model_info",
    "MODELS": "registry",
    "ModelSpec": "registry",
    "get_spec": "registry",
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


if TYPE_CHECKING:  # static type checkers see the real names
    from .codec import AnomalyScore, Codec, load_codec
    from .options import CodecOptions
    from .errors import (
        ImageTooLargeError,
        InvalidImageError,
        InvalidInputError,
        LatentdError,
        ModelLoadError,
        ModelNotFoundError,
        NumericalError,
    )
    from .imageio import open_image
    from .loading import LoadedModel, build_random, load_model, save_model
    from .model_info import ModelInfo
    from .registry import MODELS, ModelSpec, get_spec
