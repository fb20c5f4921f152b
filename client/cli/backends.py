"""Where images become latents and back: the in-process codec (`LocalBackend`) or a server (`RemoteBackend`).

Both speak numpy: images are uint8 HWC arrays, latents float32 [C, h, w] arrays (diffusers-scaled).
"""

from __future__ import annotations

import time
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    """What the CLI, the archive tool and the evaluations need of a codec, wherever it runs."""

    name: str  # the model's name
    where: str  # the device, or the server's address
    max_pixels: int  # the largest image (height x width) it accepts
    factor: int  # the downsampling factor: latents are ceil(h / factor) x ceil(w / factor)
    scaling_factor: float
    shift_factor: float | None
    codebook_size: int  # a VQ model's codes (0 for other models)
    codebook_dim: int
    codebook: np.ndarray | None  # float32 [codebook_size, codebook_dim] where the model is here, else None
    latents_mean: tuple[float, ...]  # per-channel statistics the latents are scaled by (empty: none)
    latents_std: tuple[float, ...]

    def encode(self, images: Sequence[np.ndarray], tiling: str = "auto") -> list[np.ndarray]:
        """uint8 HWC images -> float32 [C, h, w] latents, diffusers-scaled."""

    def posterior(self, images: Sequence[np.ndarray], tiling: str = "auto") -> list[tuple[np.ndarray, np.ndarray]]:
        """uint8 HWC images -> the raw (unscaled) posterior (mean, log-variance) of each, float32 [C, h, w]."""

    def decode(self, latents: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]],
               tiling: str = "auto") -> list[np.ndarray]:
        """Latents -> uint8 HWC images of the given (height, width) sizes."""

    def roundtrip(self, original: np.ndarray, latent_dtype: str, tiling: str
                  ) -> tuple[int, np.ndarray, float, float]:
        """(latent values, reconstruction, encode seconds, decode seconds); the latents pass through
        `latent_dtype` between encode and decode, as they would in storage."""


class LocalBackend:
    """The model loaded in this process (needs torch)."""

    def __init__(self, codec, refine: int = 0) -> None:
        self.codec = codec
        self.refine = refine  # optimisation steps per latent against the decoder (vae/refine.py)
        self.name = codec.info.name
        self.where = str(codec.placement.device)
        self.max_pixels = codec.options.max_pixels
        self.factor = codec.info.downsampling_factor
        self.scaling_factor = codec.info.scaling_factor
        self.shift_factor = codec.info.shift_factor
        self.codebook_size, self.codebook_dim = codec.info.codebook_size, codec.info.codebook_dim
        self.codebook = None if codec.codebook is None else codec.codebook.numpy()
        self.latents_mean, self.latents_std = tuple(codec.info.latents_mean), tuple(codec.info.latents_std)

    def encode(self, images: Sequence[np.ndarray], tiling: str = "auto") -> list[np.ndarray]:
        # C-contiguous: the codec's tensors may be channels_last underneath.
        return [np.ascontiguousarray(latents.numpy())
                for latents in self.codec.encode(list(images), tiling=tiling, refine=self.refine)]

    def posterior(self, images: Sequence[np.ndarray], tiling: str = "auto") -> list[tuple[np.ndarray, np.ndarray]]:
        if not self.codec.info.has_posterior:
            raise ValueError(f"model {self.name!r} has no posterior (no log-variance)")
        return [(np.ascontiguousarray(mean.numpy()), np.ascontiguousarray(logvar.numpy()))
                for mean, logvar in self.codec.posterior(list(images), tiling=tiling)]

    def decode(self, latents: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]],
               tiling: str = "auto") -> list[np.ndarray]:
        import torch

        return self.codec.decode([torch.from_numpy(np.ascontiguousarray(z, np.float32)) for z in latents],
                                 sizes=list(sizes), tiling=tiling)

    def roundtrip(self, original: np.ndarray, latent_dtype: str, tiling: str
                  ) -> tuple[int, np.ndarray, float, float]:
        from latentd.vae.devices import parse_dtype

        started = time.perf_counter()
        latents = self.codec.encode(original, tiling=tiling, refine=self.refine)
        encoded = time.perf_counter()
        stored = latents.to(parse_dtype(latent_dtype)).float()
        reconstruction = self.codec.decode(stored, sizes=original.shape[:2], tiling=tiling)
        return latents.numel(), reconstruction, encoded - started, time.perf_counter() - encoded


class RemoteBackend:
    """A latentd server through `LatentClient` (no torch needed)."""

    def __init__(self, client, model: str | None, refine: int = 0) -> None:
        info = client.model(model)
        self.client = client
        self.refine = refine  # steps the server refines each latent (options.refine_steps)
        self.name = info.name
        self.where = f"server {client.target}"
        self.max_pixels = info.max_pixels
        self.factor = info.downsampling_factor
        self.scaling_factor = info.scaling_factor
        self.shift_factor = info.shift_factor
        self.codebook_size, self.codebook_dim = info.codebook_size, info.codebook_dim
        self.codebook = None  # a server does not send its codebook
        self.latents_mean, self.latents_std = tuple(info.latents_mean), tuple(info.latents_std)

    # Archive encoding and decoding are bulk work: they yield to interactive callers on a shared server.
    def encode(self, images: Sequence[np.ndarray], tiling: str = "auto") -> list[np.ndarray]:
        return self.client.encode(list(images), model=self.name, dtype="float32", tiling=tiling, priority="bulk",
                                  refine=self.refine)

    def posterior(self, images: Sequence[np.ndarray], tiling: str = "auto") -> list[tuple[np.ndarray, np.ndarray]]:
        means, logvars = self.client.posterior(list(images), model=self.name, dtype="float32", tiling=tiling)
        return list(zip(means, logvars))

    def decode(self, latents: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]],
               tiling: str = "auto") -> list[np.ndarray]:
        return self.client.decode([np.asarray(z, np.float32) for z in latents], model=self.name, sizes=list(sizes),
                                  tiling=tiling, priority="bulk")

    def roundtrip(self, original: np.ndarray, latent_dtype: str, tiling: str
                  ) -> tuple[int, np.ndarray, float, float]:
        started = time.perf_counter()
        latents = self.client.encode(original, model=self.name, dtype=latent_dtype, tiling=tiling, refine=self.refine)
        encoded = time.perf_counter()
        reconstruction = self.client.decode(latents, model=self.name, sizes=original.shape[:2], tiling=tiling)
        return latents.size, reconstruction, encoded - started, time.perf_counter() - encoded


def backend_for(server: str | None, model: str, *, client_options: dict[str, Any] | None = None,
                load_local=None, refine: int = 0) -> Backend:
    """A RemoteBackend for `server`, else a LocalBackend from `load_local()` (a codec factory); either
    refines each latent `refine` steps."""
    if server:
        from latentd.client.sync import LatentClient

        return RemoteBackend(LatentClient(server, **(client_options or {})), None if model == "default" else model,
                             refine=refine)
    return LocalBackend(load_local(), refine=refine)
