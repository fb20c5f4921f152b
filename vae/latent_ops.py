"""Latent-space math from the design documents: interpolation paths, prior noise, per-item seeds."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from .errors import InvalidInputError

InterpolationMethod = Literal["lerp", "slerp"]
INTERPOLATION_METHODS: tuple[str, ...] = ("lerp", "slerp")


def item_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for item `index` of a call seeded with `seed`.

    Each item gets its own stream, so an item's noise does not depend on how a batch was split
    or grouped, and the same (seed, index) gives the same noise on every device.
    """
    state = np.random.SeedSequence([int(seed) & (2**64 - 1), index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state) & (2**63 - 1))


def gaussian_like(shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    return torch.randn(shape, generator=item_generator(seed, index))


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return a + (b - a) * t


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-7) -> torch.Tensor:
    """Spherical interpolation of the whole latent as one vector; lerp when a and b are parallel."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp_min(eps)
    omega = math.acos(float(cos.clamp(-1.0, 1.0)))
    if math.sin(omega) < eps:
        return lerp(a, b, t)
    wa = math.sin((1.0 - t) * omega) / math.sin(omega)
    wb = math.sin(t * omega) / math.sin(omega)
    return (a.double() * wa + b.double() * wb).to(a.dtype)


def interpolation_path(a: torch.Tensor, b: torch.Tensor, steps: int, method: str) -> torch.Tensor:
    """`steps` latents from a to b inclusive, stacked along a new first dimension."""
    if method not in INTERPOLATION_METHODS:
        raise InvalidInputError(f"method must be one of {', '.join(INTERPOLATION_METHODS)}, got {method!r}",
                                field="method")
    if steps < 2:
        raise InvalidInputError(f"steps must be at least 2, got {steps}", field="steps")
    if a.shape != b.shape:
        raise InvalidInputError(f"the two latents differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}; "
                                "interpolate images of the same size", field="images")
    step_fn = slerp if method == "slerp" else lerp
    return torch.stack([step_fn(a, b, i / (steps - 1)) for i in range(steps)])


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX.1's packed layout: latents [C, h, w] -> tokens [(h/2) * (w/2), C * 4], one 2x2 patch per token.

    The same element order as `FluxPipeline._pack_latents`, so a packed answer feeds a FLUX
    transformer as it is. `h` and `w` must be even (images whose sides are multiples of 2 * factor).
    """
    if latents.ndim != 3:
        raise InvalidInputError(f"latents to pack must be [C, h, w], got shape {tuple(latents.shape)}",
                                field="latents")
    channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise InvalidInputError(f"packed latents need an even latent height and width, got {height}x{width}: "
                                "use images whose sides are multiples of twice the model's factor",
                                field="packed")
    patches = latents.reshape(channels, height // 2, 2, width // 2, 2).permute(1, 3, 0, 2, 4)
    return patches.reshape((height // 2) * (width // 2), channels * 4)


def packed_latent_size(image_height: int, image_width: int, factor: int) -> tuple[int, int]:
    """The latent [h, w] that FLUX.1's `_unpack_latents` derives from an image size: even, rounded down."""
    return 2 * (int(image_height) // (factor * 2)), 2 * (int(image_width) // (factor * 2))


def unpack_latents(tokens: torch.Tensor, image_height: int, image_width: int, factor: int) -> torch.Tensor:
    """The inverse of `pack_latents`: tokens [(h/2) * (w/2), C * 4] of an image_height x image_width image
    -> latents [C, h, w], with h and w derived as FLUX.1's `_unpack_latents` does."""
    if tokens.ndim != 2:
        raise InvalidInputError(f"packed latents must be [tokens, channels * 4], got shape {tuple(tokens.shape)}",
                                field="latents")
    if image_height <= 0 or image_width <= 0:
        raise InvalidInputError("packed latents need the image's height and width", field="height")
    height, width = packed_latent_size(image_height, image_width, factor)
    count, packed_channels = tokens.shape
    if packed_channels % 4 or count != (height // 2) * (width // 2):
        raise InvalidInputError(
            f"packed latents of shape {tuple(tokens.shape)} do not fit a {image_height}x{image_width} image: "
            f"expected [{(height // 2) * (width // 2)}, 4 * channels]", field="latents")
    channels = packed_channels // 4
    patches = tokens.reshape(height // 2, width // 2, channels, 2, 2).permute(2, 0, 3, 1, 4)
    return patches.reshape(channels, height, width)


def patchify(z: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, C, h, w] -> [N, C * p * p, h / p, w / p], channel c * p * p + dy * p + dx holding z[c] at
    offset (dy, dx) of each patch: `Flux2Pipeline._patchify_latents` for p = 2."""
    if patch == 1:
        return z
    n, channels, height, width = z.shape
    patches = z.reshape(n, channels, height // patch, patch, width // patch, patch).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(n, channels * patch * patch, height // patch, width // patch)


def unpatchify(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """The inverse of `patchify` (`Flux2Pipeline._unpatchify_latents` for p = 2)."""
    if patch == 1:
        return latents
    n, channels, height, width = latents.shape
    patches = latents.reshape(n, channels // (patch * patch), patch, patch, height, width).permute(0, 1, 4, 2, 5, 3)
    return patches.reshape(n, channels // (patch * patch), height * patch, width * patch)
