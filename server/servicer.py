"""The Latentd gRPC servicer: validate requests, submit their items to the model's batcher, answer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import secrets
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np

from latentd.v1 import latentd_pb2 as pb
from latentd.v1 import latentd_pb2_grpc as pb_grpc
from latentd.v1.results import ServedModelInfo
from latentd.vae.errors import InvalidInputError
from latentd.vae.stopping import stoppable

from . import costs, wire
from .admission import MemoryBudget
from .batcher import INTERACTIVE
from .cancel import Watch
from .echo import log_value
from .metrics import ServerMetrics
from .jobs import DECODE, ENCODE, BatchKey, DecodeFinish, EncodeFinish, Job
from .models import ModelPool, ServedModel
from .settings import ServerSettings
from .status import status_for

logger = logging.getLogger("latentd.server.requests")


@dataclasses.dataclass
class RequestLog:
    """What the one log line per request says."""

    rpc: str
    id: str
    model: str = ""
    items: int = 0
    sizes: str = ""
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    priority: str = INTERACTIVE

    def note_jobs(self, jobs: list[Job], submitted: float) -> None:
        if jobs:
            self.queue_ms = max(job.started - submitted for job in jobs) * 1e3
            windows = {(job.started, job.finished) for job in jobs}  # jobs of one batch share a window
            self.compute_ms = sum(finished - started for started, finished in windows) * 1e3


def _deadline(context) -> float | None:
    remaining = context.time_remaining() if context is not None else None
    return None if remaining is None else time.monotonic() + remaining


def _has_files(images) -> bool:
    """Whether any Image message holds file bytes (which need decoding) rather than raw pixels."""
    return any(image.WhichOneof("content") == "encoded" for image in images)


def _sizes(shapes: list[tuple[int, int]]) -> str:
    unique = sorted(set(shapes))
    return ",".join(f"{h}x{w}" for h, w in unique[:4]) + ("..." if len(unique) > 4 else "")


class LatentdServicer(pb_grpc.LatentdServicer):
    def __init__(self, pool: ModelPool, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.budget = MemoryBudget(settings.memory_budget_mb * costs.MIB, settings.admission_wait_ms / 1e3)
        metrics.track_held_bytes(lambda: self.budget.held)

    # ---- shared machinery ----------------------------------------------------------------------

    async def _run(self, served: ServedModel, key_of: Callable[[Any], BatchKey], data: list[Any],
                   deadline: float | None, log: RequestLog, finishes: list[Any]) -> list[Any]:
        """Submit one job per item and wait for all; on failure or cancellation the rest are cancelled.
        `finishes[i]` converts item i's output where its batch runs (see jobs.Job). Each job waits in
        the batcher queue of the request's priority (log.priority, checked on arrival)."""
        jobs = [Job(item, finish, Watch(deadline), log.priority)
                for item, finish in zip(data, finishes, strict=True)]
        futures: list[concurrent.futures.Future] = []
        submitted = time.monotonic()
        try:
            for job in jobs:
                futures.append(served.batcher.submit(key_of(job.data), job, deadline=deadline,
                                                     priority=job.priority))
            return await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        finally:
            for future in futures:
                future.cancel()  # no-op for finished ones; frees the batch of work nobody waits for
            for job in jobs:
                job.watch.abandoned = True  # a batch already computing stops at its next chunk
            log.note_jobs([job for job in jobs if job.finished], submitted)

    async def _compute(self, fn: Callable[[], Any], deadline: float | None, served: ServedModel) -> Any:
        """fn() on the pool's wide compute lane, where torch work outside batches runs (see ModelPool),
        counted as `served`'s compute. It stops between its chunks (model calls, tiles) once the caller
        leaves, its deadline passes or the server stops."""
        watch = Watch(deadline)

        def check() -> None:
            self.pool.running()
            watch.check()

        def work() -> Any:
            with stoppable(check):
                check()
                return fn()
        try:
            return await asyncio.wrap_future(self.pool.submit(work, model=served.name))
        finally:
            watch.abandoned = True

    def _fits(self, response: Any, field: str) -> Any:
        """The response, if it fits the message limit. Costs bound every answer beforehand; this
        catches an encoded image larger than its bound (a lossy format at its worst), so that the
        client gets OUT_OF_RANGE, not a send failure, and the log tells the truth."""
        limit = self.settings.max_message_mb * costs.MIB
        size = response.ByteSize()
        if size > limit:
            raise costs.ResponseTooLargeError(f"{field}: the answer takes {size} bytes, over the message limit "
                                              f"max_message_mb {self.settings.max_message_mb}; ask for fewer images "
                                              "per request or a smaller format", field=field)
        return response

    @staticmethod
    async def _off_loop(fn: Callable[[], Any], needed: bool) -> Any:
        """fn() on a worker thread when `needed` (image files to decode or encode), else right here:
        raw pixels cost less to handle than a thread hop."""
        return await asyncio.to_thread(fn) if needed else fn()

    def _read_images(self, images) -> list[Any]:
        return [wire.read_image(image, f"images[{i}]", self.settings.max_pixels) for i, image in enumerate(images)]

    async def _observed(self, rpc: str, request_id: str, handle: Callable[[RequestLog], Awaitable[Any]]) -> Any:
        """Run a handler with its metrics and its one log line, whatever the outcome."""
        log = RequestLog(rpc, request_id or uuid.uuid4().hex[:12])
        started = time.perf_counter()
        code = "OK"
        try:
            return await handle(log)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException as exc:
            code = status_for(exc)[0].name
            raise
        finally:
            seconds = time.perf_counter() - started
            self.metrics.request_done(rpc, code, seconds, log.priority)
            if self.settings.log_requests:
                logger.info("id=%s rpc=%s model=%s items=%d sizes=%s code=%s queue_ms=%.1f compute_ms=%.1f "
                            "total_ms=%.1f", log_value(log.id), rpc, log_value(log.model), log.items,
                            log.sizes or "-", code, log.queue_ms, log.compute_ms, seconds * 1e3)

    # ---- encode / decode -----------------------------------------------------------------------

    async def _encode(self, request: pb.EncodeRequest, deadline: float | None, log: RequestLog) -> pb.EncodeResponse:
        log.priority = wire.priority(request.priority)
        served = self.pool.get(request.model)
        log.model = served.name
        options = request.options
        tiling = wire.tiling(options.tiling, "options.tiling")
        dtype = wire.latent_dtype(options.latent_dtype, "options.latent_dtype")
        wire.nonempty(request.images, "images")
        if options.indices:
            wire.index_options(options, served.codec.info)
            dtype = "int32"
        for flag in ("sample", "posterior"):
            if getattr(options, flag) and not served.codec.info.has_posterior:
                raise InvalidInputError(f"options.{flag}: model {served.name!r} is deterministic",
                                        field=f"options.{flag}")
        refine = wire.refine_steps(options)
        cost = costs.encode_cost(request, served.codec, self.settings, tiling, dtype)
        async with self.budget.hold(cost.held_bytes):
            return self._fits(await self._encode_admitted(request, served, tiling, dtype, refine, deadline, log),
                              "images")

    async def _encode_admitted(self, request: pb.EncodeRequest, served: ServedModel, tiling: str, dtype: str,
                               refine: int, deadline: float | None, log: RequestLog) -> pb.EncodeResponse:
        options = request.options
        images = await self._off_loop(lambda: self._read_images(request.images), _has_files(request.images))
        sizes = [wire.image_size(image) for image in images]
        log.items, log.sizes = len(images), _sizes(sizes)
        if options.packed:
            wire.check_packable(sizes, served.codec.factor)
        seed = options.seed if options.HasField("seed") else secrets.randbits(63)
        finishes = [EncodeFinish(posterior=options.posterior, sample=options.sample, seed=seed, index=index,
                                 scaled=not options.raw, packed=options.packed, indices=options.indices)
                    for index in range(len(images))]
        # uint8 and float inputs go through the codec separately (its conversion differs per kind).
        def key(image) -> BatchKey:
            return BatchKey(ENCODE, *wire.image_size(image), tiling, kind=isinstance(image, np.ndarray), refine=refine)

        results = await self._run(served, key, images, deadline, log, finishes)
        items = [pb.EncodedImage(latents=wire.latents_message(latents, dtype), height=height, width=width,
                                 logvar=None if logvar is None else wire.latents_message(logvar, dtype))
                 for (latents, logvar), (height, width) in zip(results, sizes)]
        return pb.EncodeResponse(id=request.id, model=served.name, items=items)

    async def _decode(self, request: pb.DecodeRequest, deadline: float | None, log: RequestLog) -> pb.DecodeResponse:
        log.priority = wire.priority(request.priority)
        served = self.pool.get(request.model)
        log.model = served.name
        options = request.options
        tiling = wire.tiling(options.tiling, "options.tiling")
        output = wire.OutputFormat.parse(options.format, options.quality)
        wire.nonempty(request.items, "items")
        cost = costs.decode_cost(request, served.codec, self.settings, tiling, output)
        async with self.budget.hold(cost.held_bytes):
            return self._fits(await self._decode_admitted(request, served, tiling, output, deadline, log), "items")

    async def _decode_admitted(self, request: pb.DecodeRequest, served: ServedModel, tiling: str,
                               output: wire.OutputFormat, deadline: float | None, log: RequestLog) -> pb.DecodeResponse:
        options = request.options
        codec = served.codec
        read = [wire.read_latents(item, f"items[{i}]", codec.info, self.settings.max_pixels, packed=options.packed,
                                  codebook=codec.codebook) for i, item in enumerate(request.items)]
        # Codebook indices arrive as raw codebook vectors: options.raw has nothing to change on them.
        items = [dataclasses.replace(item, scaled=item.scaled and not options.raw) for item in read]
        log.items, log.sizes = len(items), _sizes([item.size for item in items])
        def key(item: wire.DecodeItem) -> BatchKey:
            channels, height, width = item.latents.shape
            return BatchKey(DECODE, height, width, tiling, kind=channels)

        arrays = await self._run(served, key, items, deadline, log, [DecodeFinish(output)] * len(items))
        return pb.DecodeResponse(id=request.id, model=served.name, images=await self._image_messages(arrays, output))

    async def _image_messages(self, arrays: list[np.ndarray], output: wire.OutputFormat) -> list[pb.Image]:
        return await self._off_loop(lambda: [wire.image_message(array, output) for array in arrays], output.encoded)

    async def encode(self, request: pb.EncodeRequest, deadline: float | None = None,
                     rpc: str = "Encode") -> pb.EncodeResponse:
        """One Encode request through costs, admission and the batcher, with its metrics and log line
        (`rpc` names it there): the path every protocol's encode takes."""
        return await self._observed(rpc, request.id, lambda log: self._encode(request, deadline, log))

    async def decode(self, request: pb.DecodeRequest, deadline: float | None = None,
                     rpc: str = "Decode") -> pb.DecodeResponse:
        """One Decode request, as `encode` runs one."""
        return await self._observed(rpc, request.id, lambda log: self._decode(request, deadline, log))

    async def Encode(self, request, context):
        return await self.encode(request, _deadline(context))

    async def Decode(self, request, context):
        return await self.decode(request, _deadline(context))

    async def EncodeStream(self, request_iterator, context):
        async for response in self._stream("EncodeStream", request_iterator, context, self._encode,
                                           pb.EncodeResponse):
            yield response

    async def DecodeStream(self, request_iterator, context):
        async for response in self._stream("DecodeStream", request_iterator, context, self._decode,
                                           pb.DecodeResponse):
            yield response

    async def _stream(self, rpc: str, requests: AsyncIterator, context, handle, response_type) -> AsyncIterator:
        """Up to `stream_window` requests of one stream in flight; each answers with its own id as soon
        as it is done (possibly out of order), a failed one with `error` set, and the stream goes on."""
        window = asyncio.Semaphore(self.settings.stream_window)
        results: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        deadline = _deadline(context)

        async def one(request) -> None:
            try:
                response = await self._observed(rpc, request.id, lambda log: handle(request, deadline, log))
            except Exception as exc:  # noqa: BLE001 - reported in the response; the stream goes on
                code, message = status_for(exc)
                response = response_type(id=request.id, model=request.model,
                                         error=pb.Error(code=code.name, message=message))
            await results.put(response)

        async def feed() -> None:
            try:
                async for request in requests:
                    await window.acquire()  # flow control: stop reading while the window is full
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*list(tasks))
                await results.put(None)
            except Exception as exc:  # noqa: BLE001 - the reader re-raises it
                await results.put(exc)

        feeder = asyncio.create_task(feed())
        try:
            while True:
                response = await results.get()
                if response is None:
                    return
                if isinstance(response, Exception):
                    raise response
                window.release()
                yield response
        finally:
            feeder.cancel()
            for task in list(tasks):
                task.cancel()

    # ---- models --------------------------------------------------------------------------------

    def served_info(self, served: ServedModel) -> ServedModelInfo:
        """A served model's description under its served name, with where it runs and the limits."""
        info = dataclasses.replace(served.codec.info, name=served.name)
        return wire.served_info(info, device=str(served.codec.placement.device),
                                max_pixels=self.settings.max_pixels, max_batch_size=self.settings.max_batch_size)

    def _model_info(self, served: ServedModel) -> pb.ModelInfo:
        return self.served_info(served).to_message()

    async def ListModels(self, request, context):
        async def handle(log: RequestLog):
            return pb.ListModelsResponse(models=[self._model_info(self.pool.get(name)) for name in self.pool.names],
                                         default_model=self.settings.default_model)
        return await self._observed("ListModels", "", handle)

    async def GetModel(self, request, context):
        async def handle(log: RequestLog):
            log.model = request.name
            return self._model_info(self.pool.get(request.name))
        return await self._observed("GetModel", "", handle)

    # ---- latent-space operations (not batched: one call each, on the wide compute lane) -------

    async def Interpolate(self, request, context):
        deadline = _deadline(context)

        async def handle(log: RequestLog):
            served = self.pool.get(request.model)
            log.model = served.name
            output = wire.OutputFormat.parse(request.format, request.quality, prefix="")
            steps, method = wire.interpolation(request)
            log.items = steps
            cost = costs.interpolate_cost(request, served.codec, self.settings, steps, output)
            async with self.budget.hold(cost.held_bytes):
                return self._fits(await interpolate(served, output, steps, method), "steps")

        async def interpolate(served: ServedModel, output: wire.OutputFormat, steps: int, method: str):
            pair = (request.image_a, request.image_b)
            a, b = await self._off_loop(
                lambda: [wire.read_image(image, name, self.settings.max_pixels)
                         for image, name in zip(pair, ("image_a", "image_b"))], _has_files(pair))

            def work():
                frames = served.codec.interpolate(a, b, steps=steps, method=method, output="tensor")
                return [wire.image_array(frame, output) for frame in frames]
            arrays = await self._compute(work, deadline, served)
            return pb.ImagesResponse(model=served.name, images=await self._image_messages(arrays, output))
        return await self._observed("Interpolate", "", handle)

    async def SamplePrior(self, request, context):
        deadline = _deadline(context)

        async def handle(log: RequestLog):
            served = self.pool.get(request.model)
            log.model, log.items = served.name, request.count
            output = wire.OutputFormat.parse(request.format, request.quality, prefix="")
            wire.prior_sample(request, self.settings.max_pixels)

            cost = costs.sample_prior_cost(request, served.codec, self.settings, output)

            def work():
                images = served.codec.sample_prior(request.count, request.height, request.width, request.seed,
                                                   output="tensor")
                return [wire.image_array(image, output) for image in images]
            async with self.budget.hold(cost.held_bytes):
                arrays = await self._compute(work, deadline, served)
                return self._fits(pb.ImagesResponse(model=served.name,
                                                    images=await self._image_messages(arrays, output)), "count")
        return await self._observed("SamplePrior", "", handle)

    async def AnomalyScore(self, request, context):
        deadline = _deadline(context)

        async def handle(log: RequestLog):
            served = self.pool.get(request.model)
            log.model, log.items = served.name, len(request.images)
            wire.nonempty(request.images, "images")

            cost = costs.anomaly_cost(request, served.codec, self.settings)
            async with self.budget.hold(cost.held_bytes):
                images = await self._off_loop(lambda: self._read_images(request.images), _has_files(request.images))
                scores = await self._compute(lambda: served.codec.anomaly_score(images), deadline, served)
            return pb.AnomalyScoreResponse(model=served.name,
                                           scores=[pb.Score(mse=s.mse, psnr=s.psnr) for s in scores])
        return await self._observed("AnomalyScore", "", handle)

