"""One batch of one key through a codec: the jobs it carries, what each wants of its output, and `predict`."""

from __future__ import annotations

import time
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from latentd.vae.codec import Codec
from latentd.vae.latent_ops import pack_latents
from latentd.vae.stopping import stoppable

from . import wire
from .batcher import INTERACTIVE
from .cancel import Watch, WorkCancelledError

ENCODE, DECODE = "encode", "decode"


@dataclass(frozen=True)
class BatchKey:
    """What items must share to go through the model in one forward pass: the operation, the input's
    kind and shape, the tiling. The codec splits a batch further to bound memory."""

    op: str  # ENCODE or DECODE
    height: int  # of the input: image pixels (encode) or latent rows (decode)
    width: int
    tiling: str
    kind: bool | int = 0  # encode: whether the pixels are uint8 (else float); decode: latent channels
    refine: int = 0  # encode: steps of refinement against the decoder (vae/refine.py)

    def image_pixels(self, factor: int) -> int:
        """Pixels of one image of the batch (a decode's output image)."""
        return self.height * self.width * (factor * factor if self.op == DECODE else 1)


@dataclass(frozen=True)
class EncodeFinish:
    """What an encode request wants of its image's posterior: latents (the mean or a seeded draw,
    scaled or raw) or the posterior itself. Plain data, so a compute process can receive it."""

    posterior: bool = False
    sample: bool = False
    seed: int = 0
    index: int = 0  # the image's place in its request: its stream of the seed (Codec.latents_from_posterior)
    scaled: bool = True
    packed: bool = False  # FLUX.1's packed layout (latent_ops.pack_latents) instead of [C, h, w]
    indices: bool = False  # a VQ model's codebook indices [h, w] (int32) instead of latents

    def __call__(self, codec: Codec, output: tuple) -> tuple[np.ndarray, np.ndarray | None]:
        mean, logvar = output
        if self.indices:
            return codec.nearest_indices(mean).numpy().astype(np.int32), None
        if self.posterior:
            return self._array(mean), self._array(logvar)
        latents = codec.latents_from_posterior(mean, logvar, sample=self.sample, seed=self.seed, index=self.index,
                                               scaled=self.scaled)
        return self._array(latents), None

    def _array(self, latents: Any) -> np.ndarray:
        return wire.latents_array(pack_latents(latents) if self.packed else latents)


@dataclass(frozen=True)
class DecodeFinish:
    """A decoded image as the array its response message needs (see wire.image_array)."""

    output: wire.OutputFormat

    def __call__(self, codec: Codec, image: Any) -> np.ndarray:
        return wire.image_array(image, self.output)


@dataclass
class Job:
    """One image (encode: uint8 [H, W, 3]) or latent (decode: wire.DecodeItem) on its way through a
    batch; `finish(codec, output)` turns its model output into plain arrays where the batch runs; the
    batch stamps its compute window on it for the request's log line. `watch` says when nobody
    wants it any more (see predict); `priority` is its request's, the batcher queue it waits in."""

    data: Any
    finish: Callable[[Codec, Any], Any] | None = None
    watch: Watch = dataclasses.field(default_factory=Watch)
    priority: str = INTERACTIVE
    started: float = 0.0
    finished: float = 0.0


def predict(codec: Codec, key: BatchKey, jobs: list[Job], running: Callable[[], None] | None = None) -> list[Any]:
    """One batch of one key through the codec: posteriors for encode, float images for decode, each
    passed through its job's `finish`. Between model calls and tiles the batch stops when none of its
    jobs is wanted any more, or when `running()` raises (the server is stopping)."""
    def check() -> None:
        if running is not None:
            running()
        if not any(job.watch.live for job in jobs):
            jobs[0].watch.check()  # the first job's reason (cancelled or expired)
            raise WorkCancelledError("no request waits for this batch")

    with stoppable(check):
        check()  # before the batch's images are even converted
        return _predict(codec, key, jobs)


def _predict(codec: Codec, key: BatchKey, jobs: list[Job]) -> list[Any]:
    op, tiling = key.op, key.tiling
    started = time.monotonic()
    if op == ENCODE:
        outputs = codec.posterior([job.data for job in jobs], tiling=tiling, refine=key.refine)
    elif op == DECODE:
        latents = [codec.unscale(job.data.latents) if job.data.scaled else job.data.latents for job in jobs]
        outputs = codec.decode(latents, scaled=False, output="tensor", tiling=tiling,
                               sizes=[job.data.size for job in jobs])
    else:
        raise ValueError(f"unknown operation {op!r}")
    outputs = [job.finish(codec, output) if job.finish else output for job, output in zip(jobs, outputs)]
    finished = time.monotonic()
    for job in jobs:
        job.started, job.finished = started, finished
    return outputs


def warm_up(codec: Codec) -> None:
    """One small encode and decode: the first calls pay for allocator growth and kernel choice; clients should not."""
    side = 8 * codec.factor
    latents = codec.encode(np.zeros((side, side, 3), np.uint8))
    codec.decode(latents)
