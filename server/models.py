"""The served models: one codec and one batcher per model, loaded and warmed up before health turns SERVING."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import numpy as np

from latentd.vae.codec import Codec, CodecOptions, load_codec
from latentd.vae.errors import InvalidInputError

from .batcher import Batcher, BatchStats
from .settings import ServerSettings

logger = logging.getLogger(__name__)

# Batch keys: ("encode", is_uint8, height, width, tiling) and ("decode", channels, h, w, tiling). Items of one
# key have one shape, so a batch is one forward pass; the codec splits it further to bound memory.
ENCODE, DECODE = "encode", "decode"


class NotReadyError(Exception):
    """A request arrived before the models finished loading (health is NOT_SERVING until then)."""


@dataclass(frozen=True)
class DecodeItem:
    latents: Any  # raw z, a float32 torch tensor [C, h, w]
    size: tuple[int, int]  # crop to (height, width)


@dataclass
class Job:
    """One image (encode: uint8 [H, W, 3]) or latent (decode: DecodeItem) on its way through a batch;
    the batch stamps its compute window on it for the request's log line."""

    data: Any
    started: float = 0.0
    finished: float = 0.0


def predict(codec: Codec, key: Hashable, jobs: list[Job]) -> list[Any]:
    """One batch of one key through the codec: posteriors for encode, float images for decode."""
    op, *_, tiling = key
    started = time.monotonic()
    if op == ENCODE:
        outputs = codec.posterior([job.data for job in jobs], tiling=tiling)
    elif op == DECODE:
        outputs = codec.decode([job.data.latents for job in jobs], scaled=False, output="tensor", tiling=tiling,
                               sizes=[job.data.size for job in jobs])
    else:
        raise ValueError(f"unknown operation {op!r}")
    finished = time.monotonic()
    for job in jobs:
        job.started, job.finished = started, finished
    return outputs


@dataclass
class ServedModel:
    name: str
    source: str
    codec: Codec
    batcher: Batcher
    load_seconds: float


class ModelPool:
    """Loads every configured model, owns their batchers, and hands them to the servicer by name."""

    def __init__(self, settings: ServerSettings, on_batch: Callable[[str, BatchStats], None] | None = None) -> None:
        self.settings = settings
        self._on_batch = on_batch
        self._models: dict[str, ServedModel] = {}

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def load(self) -> None:
        """Load, start and warm up every model; raises LatentdError naming the model that failed."""
        options = CodecOptions(max_pixels=self.settings.max_pixels)
        for name, source in self.settings.models.items():
            started = time.perf_counter()
            codec = load_codec(source, device=self.settings.device, dtype=self.settings.dtype, options=options)
            batcher = Batcher(
                name, lambda key, payloads, codec=codec: predict(codec, key, payloads),
                max_batch_size=self.settings.max_batch_size,
                max_delay_s=self.settings.max_batch_delay_ms / 1e3,
                queue_limit=self.settings.queue_limit,
                on_batch=(lambda stats, name=name: self._on_batch(name, stats)) if self._on_batch else None,
            )
            batcher.start()
            if self.settings.warmup:
                self._warm_up(codec)
            seconds = time.perf_counter() - started
            self._models[name] = ServedModel(name, source, codec, batcher, seconds)
            logger.info("model %s loaded from %s in %.2f s (%s on %s)", name, source, seconds,
                        codec.info.model_class, codec.placement.device)

    @staticmethod
    def _warm_up(codec: Codec) -> None:
        # The first calls pay for allocator growth and kernel selection; clients should not.
        side = 8 * codec.factor
        latents = codec.encode(np.zeros((side, side, 3), np.uint8))
        codec.decode(latents)

    @property
    def ready(self) -> bool:
        return len(self._models) == len(self.settings.models)

    def get(self, name: str) -> ServedModel:
        if not self.ready:
            raise NotReadyError("the server is still loading its models; retry shortly")
        model = self._models.get(name or self.settings.default_model)
        if model is None:
            raise InvalidInputError(f"model {name!r} is not served here (served: {', '.join(self._models)})",
                                    field="model")
        return model

    def stop(self, timeout: float | None = None) -> None:
        for model in self._models.values():
            model.batcher.stop(timeout)
