"""One batch of one key through a codec: its jobs and its stages (prepare, compute, finish; `predict`: all three)."""

from __future__ import annotations

import time
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from latentd.v1 import latentd_pb2 as pb
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
        if isinstance(image, np.ndarray) and image.dtype == np.uint8:
            return image  # rounded to 8 bits on the device already (see _model_call)
        return wire.image_array(image, self.output)

    @property
    def eight_bit(self) -> bool:
        return self.output.format != pb.RAW_FLOAT


@dataclass
class Job:
    """One image (encode: uint8 [H, W, 3]) or latent (decode: wire.DecodeItem) on its way through a
    batch; `finish(codec, output)` turns its model output into plain arrays where the batch runs; the
    batch stamps its compute window on it for the request's log line. `watch` says when nobody
    wants it any more (see compute); `priority` is its request's, the batcher queue it waits in."""

    data: Any
    finish: Callable[[Codec, Any], Any] | None = None
    watch: Watch = dataclasses.field(default_factory=Watch)
    priority: str = INTERACTIVE
    started: float = 0.0
    finished: float = 0.0


@dataclass
class Prepared:
    """A job with its data as the model call takes it (see `prepare`)."""

    job: Job
    data: Any


def prepare(codec: Codec, key: BatchKey, jobs: list[Job]) -> list[Prepared]:
    """The host work before a batch's model call, which may run while another batch computes: latents
    unscaled; on a GPU, uint8 [H, W, 3] images made contiguous uint8 [3, H, W] tensors, the layout the
    model takes, so that only that copy's bytes cross to the device (the codec converts them there
    when it can). On a CPU images stay as they are: the codec converts them in one pass."""
    on_gpu = codec.placement.device.type != "cpu"
    return [Prepared(job, _model_input(codec, key, job.data, on_gpu)) for job in jobs]


def _model_input(codec: Codec, key: BatchKey, data: Any, on_gpu: bool) -> Any:
    if key.op == DECODE:
        return codec.unscale(data.latents) if data.scaled else data.latents
    if on_gpu and isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3 and data.shape[2] == 3:
        return torch.from_numpy(np.ascontiguousarray(data)).permute(2, 0, 1).contiguous()
    return data


def compute(codec: Codec, key: BatchKey, batch: list[Prepared], running: Callable[[], None] | None = None) -> list[Any]:
    """A prepared batch through the model: posteriors for encode, float images for decode. Between
    model calls and tiles the batch stops when none of its jobs is wanted any more, or when
    `running()` raises (the server is stopping)."""
    jobs = [item.job for item in batch]

    def check() -> None:
        if running is not None:
            running()
        if not any(job.watch.live for job in jobs):
            jobs[0].watch.check()  # the first job's reason (cancelled or expired)
            raise WorkCancelledError("no request waits for this batch")

    with stoppable(check):
        check()  # before the batch's images are even converted
        started = time.monotonic()
        outputs = _model_call(codec, key, batch)
        finished = time.monotonic()
    for job in jobs:
        job.started, job.finished = started, finished
    return outputs


def _model_call(codec: Codec, key: BatchKey, batch: list[Prepared]) -> list[Any]:
    if key.op == ENCODE:
        return codec.posterior([item.data for item in batch], tiling=key.tiling, refine=key.refine)
    if key.op == DECODE:
        # On a GPU a batch whose answers are all 8-bit comes back as uint8, rounded on the device (a
        # quarter of float32's bytes over the bus); on a CPU the float images go to each job's finish.
        eight_bit = codec.placement.device.type != "cpu" and all(
            isinstance(item.job.finish, DecodeFinish) and item.job.finish.eight_bit for item in batch)
        return codec.decode([item.data for item in batch], scaled=False, output="numpy" if eight_bit else "tensor",
                            tiling=key.tiling, sizes=[item.job.data.size for item in batch])
    raise ValueError(f"unknown operation {key.op!r}")


def finish(codec: Codec, key: BatchKey, jobs: list[Job], outputs: list[Any]) -> list[Any]:
    """The host work after a batch's model call: each output through its job's `finish` (an error
    fails that job alone)."""
    results: list[Any] = []
    for job, output in zip(jobs, outputs, strict=True):
        try:
            results.append(job.finish(codec, output) if job.finish else output)
        except Exception as exc:  # noqa: BLE001 - that job's answer; its neighbours go on
            results.append(exc)
    return results


def predict(codec: Codec, key: BatchKey, jobs: list[Job], running: Callable[[], None] | None = None) -> list[Any]:
    """A batch's three stages in one call: `prepare`, `compute`, `finish`."""
    return finish(codec, key, jobs, compute(codec, key, prepare(codec, key, jobs), running=running))


def warm_up(codec: Codec) -> None:
    """One small encode and decode: the first calls pay for allocator growth and kernel choice; clients should not."""
    side = 8 * codec.factor
    latents = codec.encode(np.zeros((side, side, 3), np.uint8))
    codec.decode(latents)
