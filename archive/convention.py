"""How an archive's latents are scaled (the model's scaling, shift and per-channel statistics when written), and
converting them to another model's scaling through the raw latent space."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Scaling:
    """`(z - shift) * scaling`, or with per-channel statistics `(z - mean) * scaling / std` (Codec.scale)."""

    scaling_factor: float
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()

    @classmethod
    def of_meta(cls, meta: dict[str, Any]) -> "Scaling | None":
        """An archive's recorded scaling; None when its settings do not hold a usable one."""
        try:
            scaling = float(meta["scaling_factor"])
            shift = float(meta.get("shift_factor") or 0.0)
            mean = tuple(float(v) for v in meta.get("latents_mean") or ())
            std = tuple(float(v) for v in meta.get("latents_std") or ())
        except (KeyError, TypeError, ValueError):
            return None
        values = (scaling, shift, *mean, *std)
        if not all(math.isfinite(v) for v in values) or scaling == 0 or len(mean) != len(std) \
                or any(v <= 0 for v in std):
            return None
        return cls(scaling, shift, mean, std)

    @classmethod
    def of_backend(cls, backend: Any) -> "Scaling":
        return cls(float(backend.scaling_factor), float(backend.shift_factor or 0.0),
                   tuple(map(float, getattr(backend, "latents_mean", ()) or ())),
                   tuple(map(float, getattr(backend, "latents_std", ()) or ())))

    def describe(self) -> str:
        text = f"scaling {self.scaling_factor:.6g}, shift {self.shift_factor:.6g}"
        if self.latents_mean:
            text += f", per-channel mean {[round(v, 5) for v in self.latents_mean]} std " \
                    f"{[round(v, 5) for v in self.latents_std]}"
        return text

    def _statistics(self, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.latents_mean:
            return None
        if len(self.latents_mean) != channels:
            raise ValueError(f"per-channel statistics of {len(self.latents_mean)} channels for latents of {channels}")
        return (np.asarray(self.latents_mean, np.float64)[:, None, None],
                np.asarray(self.latents_std, np.float64)[:, None, None])

    def to_raw(self, latents: np.ndarray) -> np.ndarray:
        stats = self._statistics(latents.shape[0])
        if stats is None:
            return latents / self.scaling_factor + self.shift_factor
        return latents * stats[1] / self.scaling_factor + stats[0]

    def from_raw(self, raw: np.ndarray) -> np.ndarray:
        stats = self._statistics(raw.shape[0])
        if stats is None:
            return (raw - self.shift_factor) * self.scaling_factor
        return (raw - stats[0]) * self.scaling_factor / stats[1]


def rescaled(latents: np.ndarray, source: Scaling, target: Scaling) -> np.ndarray:
    """Latents [C, h, w] scaled by `source` as `target` scales the same raw latents (float32)."""
    if source == target:
        return latents
    return target.from_raw(source.to_raw(np.asarray(latents, np.float64))).astype(np.float32)
