"""The served models: one codec and one batcher per model, and the compute lanes that run all their torch work."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from latentd.vae.codec import Codec, CodecOptions, load_codec
from latentd.vae.errors import ModelNotFoundError

from .batcher import Batcher, BatchStats
from .cancel import ServerStoppingError
from .compute import ComputeLanes
from .device_stats import ComputeMonitor
from .echo import quoted
from .jobs import BatchKey, compute, finish, prepare, warm_up
from .settings import ServerSettings

logger = logging.getLogger(__name__)

# max_batch_pixels on a CPU when not set: the codec's own budget per model call, which bounds a call's
# memory while leaving small images room to batch (docs/benchmarks.md, the batch sweep).
CPU_BATCH_PIXELS = CodecOptions().max_batch_pixels


# How long stop() waits for the chunk (one model call or tile) each lane is running.
CHUNK_WAIT_S = 60.0


class NotReadyError(Exception):
    """A request arrived before the models finished loading (health is NOT_SERVING until then)."""


def batch_pixel_limit(settings: ServerSettings, device_type: str) -> int:
    """Pixels per model call; 0 means no limit."""
    if settings.max_batch_pixels is not None:
        return settings.max_batch_pixels
    return CPU_BATCH_PIXELS if device_type == "cpu" else 0


# The largest image (pixels) whose batches may run side by side on narrow compute lanes on a CPU:
# one model call uses a CPU's threads badly on small images, so two one-thread lanes get more done;
# from about 256x256 up one call uses them well and parallel lanes only compete for memory
# bandwidth. `latentd bench serve` measures both sides (docs/benchmarks.md).
CPU_SHARED_PIXELS = 128 * 128


# Batcher workers of a model whose host work overlaps its compute: one batch holds the compute lane
# while the other worker finishes the batch before it and gathers and prepares the batch after it.
PIPELINE_WORKERS = 2


def overlaps(setting: str, device_type: str) -> bool:
    """Whether batches' host work runs beside other batches' compute: `overlap` auto means off a CPU,
    where host work and compute share the cores (see docs/service.md, "Overlap")."""
    return setting == "on" or (setting == "auto" and device_type != "cpu")


def weights_bytes(model: Any) -> int:
    """Bytes of a model's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def items_per_call(key: BatchKey, pixel_limit: int, factor: int) -> int:
    """How many items of one batch key fit in a call of `pixel_limit` image pixels (at least 1)."""
    return max(1, pixel_limit // key.image_pixels(factor)) if pixel_limit else 1 << 30


@dataclass
class ServedModel:
    name: str
    source: str
    codec: Codec
    batcher: Batcher
    load_seconds: float


class ModelPool:
    """Loads every configured model, owns their batchers, and hands them to the servicer by name.

    All torch work of the server (loading, warm-up, batches, the latent-space RPCs) runs on the
    compute lanes (with `overlap`, a batch's host stages run on its batcher's workers instead),
    reached through `submit` and `run`: one batch at a time with every intra-op thread, or on a CPU,
    when batches of small images meet, `cpu_compute_lanes` of them side by side with a share of the
    threads each (see compute.ComputeLanes and _hold). Why not a thread pool: on CPU,
    libgomp gives each thread that starts parallel work its own OpenMP team, and once a process holds
    more team threads than cores, every team stops spin-waiting, so each parallel region pays a
    wake-up: encoding a 64x64 image took twice as long on a second thread as on the first (2 cores).
    The lanes never ask for more threads than one call with every thread has.
    """

    def __init__(self, settings: ServerSettings, on_batch: Callable[[str, BatchStats], None] | None = None) -> None:
        self.settings = settings
        self._on_batch = on_batch
        self._models: dict[str, ServedModel] = {}
        self._monitors: dict[str, ComputeMonitor] = {}
        self._lanes = ComputeLanes(settings.cpu_compute_lanes)
        self._stopping = False

    def running(self) -> None:
        """Raise ServerStoppingError once stop() began: long work checks it between its chunks."""
        if self._stopping:
            raise ServerStoppingError("the server is stopping")

    def submit(self, fn: Callable[..., Any], *args: Any, model: str | None = None) -> concurrent.futures.Future:
        """fn(*args) on the wide compute lane; the future of its result. `model`: whose compute it is
        (its busy time and memory peak, see monitors)."""
        monitor = self._monitors.get(model) if model is not None else None
        return self._lanes.submit(monitor.run, fn, *args) if monitor else self._lanes.submit(fn, *args)

    def monitors(self) -> list[ComputeMonitor]:
        """Each loaded model's ComputeMonitor (the metrics read them at each scrape)."""
        return list(self._monitors.values())

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the wide compute lane, waiting for its result (or exception)."""
        return self._lanes.run(fn, *args)

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def load(self) -> None:
        """Load, start and warm up every model; raises LatentdError naming the model that failed."""
        options = CodecOptions(max_pixels=self.settings.max_pixels, tile_norms=self.settings.tile_norms,
                               compile=self.settings.compile)
        for name, source in self.settings.models.items():
            started = time.perf_counter()
            codec = self.run(functools.partial(load_codec, source, device=self.settings.device,
                                               dtype=self.settings.dtype, options=options))
            device_type = codec.placement.device.type
            pixel_limit = batch_pixel_limit(self.settings, device_type)
            on_cpu = device_type == "cpu"
            overlap = overlaps(self.settings.overlap, device_type)
            monitor = ComputeMonitor(name, codec.placement.device, weights_bytes=weights_bytes(codec.model))
            self._monitors[name] = monitor
            workers = max(1, self._lanes.narrow_lanes) if on_cpu else 1
            batcher = Batcher(
                name, functools.partial(compute, codec, running=self.running),
                prepare=functools.partial(prepare, codec), finish=functools.partial(finish, codec), overlap=overlap,
                max_batch_size=self.settings.max_batch_size,
                max_delay_s=self.settings.max_batch_delay_ms / 1e3,
                queue_limit=self.settings.queue_limit,
                on_batch=(lambda stats, name=name: self._on_batch(name, stats)) if self._on_batch else None,
                items_per_call=functools.partial(items_per_call, pixel_limit=pixel_limit, factor=codec.factor),
                workers=max(workers, PIPELINE_WORKERS) if overlap else workers,
                # Off a CPU a batch leaves after max_batch_delay_ms even while another computes: the
                # device would wait for it otherwise.
                busy_delay_s=self.settings.busy_batch_delay_ms / 1e3 if on_cpu else None,
                bulk_batch_size=self.settings.bulk_max_batch_size,
                hold=functools.partial(self._hold, factor=codec.factor, on_cpu=on_cpu, monitor=monitor),
            )
            batcher.start()
            if self.settings.warmup:
                self.run(monitor.run, warm_up, codec)
            seconds = time.perf_counter() - started
            self._models[name] = ServedModel(name, source, codec, batcher, seconds)
            logger.info("model %s loaded from %s in %.2f s (%s on %s)", name, source, seconds,
                        codec.info.model_class, codec.placement.device)

    @contextlib.contextmanager
    def _hold(self, key: BatchKey, factor: int, on_cpu: bool, monitor: ComputeMonitor) -> Iterator[Callable[..., Any]]:
        """The compute lane a batch of `key` waits for, its calls watched by the model's monitor. Side
        by side only on a CPU (on a GPU batches would share its memory, not its speed) and for small
        images (see CPU_SHARED_PIXELS)."""
        with self._lanes.hold(shareable=on_cpu and key.image_pixels(factor) <= CPU_SHARED_PIXELS) as call:
            yield functools.partial(_watched, call, monitor)

    @property
    def ready(self) -> bool:
        return len(self._models) == len(self.settings.models)

    def get(self, name: str) -> ServedModel:
        if not self.ready:
            raise NotReadyError("the server is still loading its models; retry shortly")
        model = self._models.get(name or self.settings.default_model)
        if model is None:
            raise ModelNotFoundError(f"model {quoted(name)} is not served here (served: {', '.join(self._models)})")
        return model

    def stop(self, timeout: float | None = None) -> None:
        """Stop every model's work at its next chunk (the grace period is over when this runs), join
        the batchers for up to `timeout`, and close the lanes."""
        self._stopping = True
        for model in self._models.values():
            model.batcher.stop(timeout)
        # Work still running stops at its next chunk; wait for that chunk, for a process that exits
        # while torch is inside a model call aborts (SIGABRT) instead of exiting 0.
        if not self._lanes.close(wait_s=CHUNK_WAIT_S):
            logger.warning("a compute lane was still running %.0f s after the stop; exiting anyway", CHUNK_WAIT_S)


def _watched(call: Callable[..., Any], monitor: ComputeMonitor, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) through a held lane's `call`, watched by `monitor` there."""
    return call(monitor.run, fn, *args)
