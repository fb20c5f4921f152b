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
