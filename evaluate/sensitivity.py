"""How much a VAE's decoded image changes per unit of noise in each latent channel (for entropy step units)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

NOISE = 0.2  # uniform noise of +- this many channel standard deviations: the entropy format's step sizes


def channel_sensitivity(backend, latents: Sequence[np.ndarray], std: np.ndarray, seed: int = 0) -> np.ndarray:
    """float64 [C]: mean squared pixel change (0-255 scale) of the decoded image per unit variance of
    uniform noise added to one channel at a time, averaged over `latents`."""
    rng = np.random.default_rng(seed)
    channels = len(std)
    total = np.zeros(channels)
    for array in latents:
        array = np.asarray(array, np.float32)
        size = (array.shape[1] * backend.factor, array.shape[2] * backend.factor)
        noisy = []
        for channel in range(channels):
            amplitude = NOISE * float(std[channel])
            changed = array.copy()
            changed[channel] += rng.uniform(-amplitude, amplitude, array.shape[1:]).astype(np.float32)
            noisy.append(changed)
        base, *outputs = backend.decode([array, *noisy], [size] * (channels + 1))
        for channel, output in enumerate(outputs):
            variance = (NOISE * float(std[channel])) ** 2 / 3
            change = np.mean((output.astype(np.float64) - base.astype(np.float64)) ** 2)
            total[channel] += max(change, 1e-9) / variance
    return total / len(latents)
