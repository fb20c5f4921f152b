"""`LatentClient`: the blocking Python client of a latentd server (no torch needed)."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import grpc

from latentd.v1 import latentd_pb2 as pb
from latentd.v1 import latentd_pb2_grpc as pb_grpc
from latentd.v1.results import AnomalyScore, ServedModelInfo

from . import calls
from .channel import TLS, auth_metadata, open_channel
from .errors import RETRYABLE, from_rpc_error, from_stream_error, gave_up
from .health import CHECK_METHOD, health_messages
from .retry import RetryPolicy

OnError = Literal["raise", "return"]


class LatentClient:
    """Encode images to latents and decode latents to images on a latentd server.

    >>> with LatentClient("localhost:50051") as client:            # doctest: +SKIP
    ...     latents = client.encode("photo.png")                     # float16 [4, H/8, W/8]
    ...     image = client.decode(latents, output="pil")

    One channel per client, reused by every call (thread-safe). `timeout` is the default deadline of
    unary calls in seconds; `retries` (a count or a RetryPolicy) retries UNAVAILABLE and
    RESOURCE_EXHAUSTED with exponential backoff and jitter. Errors are `latentd.client.errors` types.
    """

    def __init__(self, target: str | Sequence[str], *, token: str | None = None, tls: TLS = None,
                 timeout: float | None = 60.0, retries: int | RetryPolicy = 4,
                 options: Iterable[tuple[str, Any]] = ()) -> None:
        self.target = target if isinstance(target, str) else ",".join(target)
        self.timeout = timeout
        self.retry = retries if isinstance(retries, RetryPolicy) else RetryPolicy(attempts=max(1, int(retries)))
        self._metadata = auth_metadata(token)
        self._channel = open_channel(target, tls, tuple(options), aio=False)
        self._stub = pb_grpc.LatentdStub(self._channel)

    # ---- plumbing ------------------------------------------------------------------------------

    def _unary(self, method: Callable, request: Any, timeout: float | None) -> Any:
        """One idempotent call with retries; the deadline covers every attempt and the waits between."""
        error = None
        for attempt in self.retry.schedule(self.timeout if timeout is None else timeout):
            time.sleep(attempt.wait)
            try:
                return method(request, timeout=attempt.timeout(), metadata=self._metadata)
            except grpc.RpcError as exc:
                error = exc
                if exc.code() not in RETRYABLE:
                    break
        raise gave_up(error) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "LatentClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- encode / decode -----------------------------------------------------------------------

    def encode(self, images: Any, *, model: str | None = None, sample: bool = False, seed: int | None = None,
               scaled: bool = True, dtype: str = "float16", tiling: str = "auto", output: str = "numpy",
               timeout: float | None = None, packed: bool = False, priority: str = "interactive",
               refine: int = 0) -> Any:
        """Images -> latents [C, H/f, W/f] (diffusers-scaled unless `scaled=False`; the posterior mean
        unless `sample=True`, reproducible with `seed`), in the form given: one image -> one array, a
        list -> a list, an NHWC/NCHW batch -> a stacked array; numpy, or torch with `output="tensor"`
        ("torch" is understood too).

        Images: file paths, encoded bytes, PIL images, uint8 arrays (HWC, NHWC, NCHW), float arrays or
        tensors (CHW/NCHW in [-1, 1]). `priority="bulk"` queues it behind interactive work on the server.

        `packed=True`: FLUX.1's packed layout [(h/2) * (w/2), C * 4] per image (FluxPipeline's
        `_pack_latents`; image sides must be multiples of twice the model's factor).

        `refine=N`: the server optimises each mean N steps (0-200) against its decoder before answering
        (better latents for offline use, each step about three decodes; untiled images, no `sample`)."""
        call = calls.encode_call(images, model=model, sample=sample, seed=seed, scaled=scaled, dtype=dtype,
                                 tiling=tiling, output=output, packed=packed, refine=refine)
        calls.prioritized(call, priority)
        return calls.encode_result(self._unary(self._stub.Encode, call.request, timeout), call)

    def encode_indices(self, images: Any, *, model: str | None = None, tiling: str = "auto",
                       output: str = "numpy", timeout: float | None = None, priority: str = "interactive") -> Any:
        """Images -> a VQ model's codebook indices: int32 [ceil(H/f), ceil(W/f)] per image, in the form given
        (`decode` takes them back). Other models answer InvalidInputError."""
        call = calls.prioritized(calls.indices_call(images, model=model, tiling=tiling, output=output), priority)
        return calls.encode_result(self._unary(self._stub.Encode, call.request, timeout), call)

    def posterior(self, images: Any, *, model: str | None = None, dtype: str = "float32",
                  tiling: str = "auto", output: str = "numpy", timeout: float | None = None,
                  priority: str = "interactive") -> tuple[Any, Any]:
        """The raw posterior of each image: (mean, logvar), unscaled, in the caller's form (KL models)."""
        call = calls.prioritized(calls.posterior_call(images, model=model, dtype=dtype, tiling=tiling, output=output),
                                 priority)
        return calls.posterior_result(self._unary(self._stub.Encode, call.request, timeout), call)

    def decode(self, latents: Any, *, model: str | None = None, format: str = "raw", quality: int | None = None,
               sizes: Any = None, scaled: bool = True, tiling: str = "auto", output: str = "numpy",
               timeout: float | None = None, packed: bool = False, priority: str = "interactive") -> Any:
        """Latents -> images: with `format="raw"` uint8 HWC arrays (or PIL, or torch float CHW in
        [-1, 1]); with png/jpeg/webp the encoded file bytes. `sizes` crops to (height, width).

        `packed=True`: the latents are FLUX.1's packed [(h/2) * (w/2), C * 4] (a batch: [N, tokens, C * 4]);
        `sizes` is then required, the image sizes they unpack to, as FluxPipeline's `_unpack_latents`
        takes them (each side rounded down to a multiple of twice the factor)."""
        call = calls.decode_call(latents, model=model, format=format, quality=quality, sizes=sizes, scaled=scaled,
                                 tiling=tiling, output=output, packed=packed)
        calls.prioritized(call, priority)
        return calls.decode_result(self._unary(self._stub.Decode, call.request, timeout), call)

    def encode_many(self, images: Iterable[Any], *, model: str | None = None, sample: bool = False,
                    seed: int | None = None, scaled: bool = True, dtype: str = "float16", tiling: str = "auto",
                    output: str = "numpy", window: int = 16, progress: Callable[[int], None] | None = None,
                    on_error: OnError = "raise", priority: str = "bulk") -> Iterator[Any]:
        """Stream any number of images (one per request) with at most `window` in flight or waiting to
        be yielded; latents come back in input order. `progress(n)` after each; with
        `on_error="return"` a failed item yields its exception instead of stopping the iteration.
        Bulk work unless `priority="interactive"`: it yields to interactive calls on the server."""
        calls.priority_value(priority)  # a bad name fails here, not inside the stream
        def build(item: Any) -> calls.Call:
            return calls.prioritized(calls.encode_call(item, model=model, sample=sample, seed=seed, scaled=scaled,
                                                       dtype=dtype, tiling=tiling, output=output), priority)
        return self._many(self._stub.EncodeStream, images, build, calls.encode_result, window, progress, on_error)

    def decode_many(self, latents: Iterable[Any], *, model: str | None = None, format: str = "raw",
                    quality: int | None = None, scaled: bool = True, tiling: str = "auto", output: str = "numpy",
                    window: int = 16, progress: Callable[[int], None] | None = None,
                    on_error: OnError = "raise", priority: str = "bulk") -> Iterator[Any]:
        """`decode` over a stream of latents (each item: latents, or a (latents, (height, width)) pair);
        bulk work unless `priority="interactive"`."""
        calls.priority_value(priority)  # a bad name fails here, not inside the stream
        def build(item: Any) -> calls.Call:
            latents, sizes = item if isinstance(item, tuple) and len(item) == 2 else (item, None)
            return calls.prioritized(calls.decode_call(latents, model=model, format=format, quality=quality,
                                                       sizes=sizes, scaled=scaled, tiling=tiling, output=output),
                                     priority)
        return self._many(self._stub.DecodeStream, latents, build, calls.decode_result, window, progress, on_error)

    def _many(self, rpc: Callable, items: Iterable[Any], build: Callable, parse: Callable, window: int,
              progress: Callable[[int], None] | None, on_error: OnError) -> Iterator[Any]:
        if window < 1:
            raise ValueError("window must be at least 1")
        if on_error not in ("raise", "return"):
            raise ValueError("on_error must be 'raise' or 'return'")
        return self._stream(rpc, items, build, parse, threading.Semaphore(window), progress, on_error)

    def _stream(self, rpc: Callable, items: Iterable[Any], build: Callable, parse: Callable,
                slots: threading.Semaphore, progress: Callable[[int], None] | None, on_error: OnError) -> Iterator[Any]:
        closed = threading.Event()
        lock = threading.Lock()
        built: dict[int, calls.Call] = {}
        ready: dict[int, Any] = {}  # results waiting for their turn (input order)

        def requests() -> Iterator[Any]:
            for index, item in enumerate(items):
                while not slots.acquire(timeout=0.1):  # a slot frees when a result is handed over in order
                    if closed.is_set():
                        return
                try:
                    call = build(item)
                except Exception as exc:  # noqa: BLE001 - a bad item fails alone, locally
                    with lock:
                        ready[index] = exc
                    continue
                call.request.id = str(index)
                with lock:
                    built[index] = call
                yield call.request

        stream = rpc(requests(), metadata=self._metadata)
        next_index = 0
        try:
            responses = iter(stream)
            while True:
                response = next(responses, None)
                with lock:
                    if response is not None:
                        index = int(response.id)
                        call = built.pop(index)
                        ready[index] = (from_stream_error(response.error) if response.error.code
                                        else parse(response, call))
                    turn = []
                    while next_index in ready:
                        turn.append(ready.pop(next_index))
                        next_index += 1
                first = next_index - len(turn)
                for offset, result in enumerate(turn):
                    slots.release()
                    if progress:
                        progress(first + offset + 1)
                    if isinstance(result, Exception) and on_error == "raise":
                        raise result
                    yield result
                if response is None:
                    return
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            closed.set()
            stream.cancel()

    # ---- models and health ---------------------------------------------------------------------

    def models(self, timeout: float | None = None) -> list[ServedModelInfo]:
        """Every served model: name, latent channels, downsampling factor, scaling/shift, dtype, limits."""
        reply = self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [ServedModelInfo.from_message(info) for info in reply.models]

    def model(self, name: str | None = None, timeout: float | None = None) -> ServedModelInfo:
        return ServedModelInfo.from_message(self._unary(self._stub.GetModel, pb.GetModelRequest(name=name or ""),
                                                        timeout))

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """SERVING, NOT_SERVING (loading or draining), or SERVICE_UNKNOWN."""
        request_class, response_class, names = health_messages()
        check = self._channel.unary_unary(CHECK_METHOD, request_serializer=request_class.SerializeToString,
                                          response_deserializer=response_class.FromString)
        return names[self._unary(check, request_class(service=service), timeout).status]

    # ---- latent-space operations ---------------------------------------------------------------

    def interpolate(self, image_a: Any, image_b: Any, *, steps: int = 8, method: str = "slerp",
                    model: str | None = None, format: str = "raw", output: str = "numpy",
                    timeout: float | None = None) -> list[Any]:
        """`steps` images on the slerp/lerp path between the latents of two images of one size."""
        request = pb.InterpolateRequest(model=model or "", image_a=calls.single_image(image_a, "image_a"),
                                        image_b=calls.single_image(image_b, "image_b"), steps=steps, method=method,
                                        format=calls.image_format(format, output))
        return calls.images_result(self._unary(self._stub.Interpolate, request, timeout), output)

    def sample(self, count: int, height: int, width: int, *, seed: int = 0, model: str | None = None,
               format: str = "raw", output: str = "numpy", timeout: float | None = None) -> list[Any]:
        """Decode `count` draws from the prior N(0, I) (same seed, same images)."""
        request = pb.SamplePriorRequest(model=model or "", count=count, height=height, width=width, seed=seed,
                                        format=calls.image_format(format, output))
        return calls.images_result(self._unary(self._stub.SamplePrior, request, timeout), output)

    def anomaly_score(self, images: Any, *, model: str | None = None,
                      timeout: float | None = None) -> list[AnomalyScore]:
        """Per-image reconstruction error (`mse`, `psnr`): high error flags images unlike the training data."""
        prepared = calls.prepare_images(images)
        request = pb.AnomalyScoreRequest(model=model or "", images=prepared.messages)
        return [AnomalyScore.from_message(score) for score in self._unary(self._stub.AnomalyScore, request,
                                                                          timeout).scores]
