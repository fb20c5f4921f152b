"""`AsyncLatentClient`: the asyncio twin of `LatentClient`, with the same methods as coroutines."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterable, AsyncIterator, Callable, Iterable, Sequence

import grpc

from latentd.v1 import latentd_pb2 as pb
from latentd.v1 import latentd_pb2_grpc as pb_grpc
from latentd.v1.results import AnomalyScore, ServedModelInfo

from . import calls
from .channel import TLS, auth_metadata, open_channel
from .errors import RETRYABLE, from_rpc_error, from_stream_error, gave_up
from .health import CHECK_METHOD, health_messages
from .retry import RetryPolicy
from .sync import OnError


class AsyncLatentClient:
    """`LatentClient` for asyncio code: `await client.encode(...)`, `async for x in client.encode_many(...)`.

    >>> async with AsyncLatentClient("localhost:50051") as client:   # doctest: +SKIP
    ...     latents = await client.encode("photo.png")
    """

    def __init__(self, target: str | Sequence[str], *, token: str | None = None, tls: TLS = None,
                 timeout: float | None = 60.0, retries: int | RetryPolicy = 4,
                 options: Iterable[tuple[str, Any]] = ()) -> None:
        self.target = target if isinstance(target, str) else ",".join(target)
        self.timeout = timeout
        self.retry = retries if isinstance(retries, RetryPolicy) else RetryPolicy(attempts=max(1, int(retries)))
        self._metadata = auth_metadata(token)
        self._channel = open_channel(target, tls, tuple(options), aio=True)
        self._stub = pb_grpc.LatentdStub(self._channel)

    async def _unary(self, method: Callable, request: Any, timeout: float | None) -> Any:
        error = None
        for attempt in self.retry.schedule(self.timeout if timeout is None else timeout):
            await asyncio.sleep(attempt.wait)
            try:
                return await method(request, timeout=attempt.timeout(), metadata=self._metadata)
            except grpc.RpcError as exc:
                error = exc
                if exc.code() not in RETRYABLE:
                    break
        raise gave_up(error) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncLatentClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def encode(self, images: Any, *, model: str | None = None, sample: bool = False, seed: int | None = None,
                     scaled: bool = True, dtype: str = "float16", tiling: str = "auto", output: str = "numpy",
                     timeout: float | None = None, packed: bool = False, priority: str = "interactive",
                     refine: int = 0) -> Any:
        """See `LatentClient.encode`."""
        call = calls.encode_call(images, model=model, sample=sample, seed=seed, scaled=scaled, dtype=dtype,
                                 tiling=tiling, output=output, packed=packed, refine=refine)
        calls.prioritized(call, priority)
        return calls.encode_result(await self._unary(self._stub.Encode, call.request, timeout), call)

    async def encode_indices(self, images: Any, *, model: str | None = None, tiling: str = "auto",
                             output: str = "numpy", timeout: float | None = None,
                             priority: str = "interactive") -> Any:
        """See `LatentClient.encode_indices`."""
        call = calls.prioritized(calls.indices_call(images, model=model, tiling=tiling, output=output), priority)
        return calls.encode_result(await self._unary(self._stub.Encode, call.request, timeout), call)

    async def posterior(self, images: Any, *, model: str | None = None, dtype: str = "float32",
                        tiling: str = "auto", output: str = "numpy", timeout: float | None = None,
                        priority: str = "interactive") -> tuple[Any, Any]:
        """The raw posterior of each image: (mean, logvar), unscaled, in the caller's form (KL models)."""
        call = calls.prioritized(calls.posterior_call(images, model=model, dtype=dtype, tiling=tiling, output=output),
                                 priority)
        return calls.posterior_result(await self._unary(self._stub.Encode, call.request, timeout), call)

    async def decode(self, latents: Any, *, model: str | None = None, format: str = "raw",
                     quality: int | None = None, sizes: Any = None, scaled: bool = True, tiling: str = "auto",
                     output: str = "numpy", timeout: float | None = None, packed: bool = False,
                     priority: str = "interactive") -> Any:
        """See `LatentClient.decode`."""
        call = calls.decode_call(latents, model=model, format=format, quality=quality, sizes=sizes, scaled=scaled,
                                 tiling=tiling, output=output, packed=packed)
        calls.prioritized(call, priority)
        return calls.decode_result(await self._unary(self._stub.Decode, call.request, timeout), call)

    def encode_many(self, images: Iterable[Any] | AsyncIterable[Any], *, model: str | None = None,
                    sample: bool = False, seed: int | None = None, scaled: bool = True, dtype: str = "float16",
                    tiling: str = "auto", output: str = "numpy", window: int = 16,
                    progress: Callable[[int], None] | None = None, on_error: OnError = "raise",
                    priority: str = "bulk") -> AsyncIterator[Any]:
        """See `LatentClient.encode_many`; `images` may also be an async iterable."""
        calls.priority_value(priority)  # a bad name fails here, not inside the stream
        def build(item: Any) -> calls.Call:
            return calls.prioritized(calls.encode_call(item, model=model, sample=sample, seed=seed, scaled=scaled,
                                                       dtype=dtype, tiling=tiling, output=output), priority)
        return self._many(self._stub.EncodeStream, images, build, calls.encode_result, window, progress, on_error)

    def decode_many(self, latents: Iterable[Any] | AsyncIterable[Any], *, model: str | None = None,
                    format: str = "raw", quality: int | None = None, scaled: bool = True, tiling: str = "auto",
                    output: str = "numpy", window: int = 16, progress: Callable[[int], None] | None = None,
                    on_error: OnError = "raise", priority: str = "bulk") -> AsyncIterator[Any]:
        """See `LatentClient.decode_many`."""
        calls.priority_value(priority)  # a bad name fails here, not inside the stream
        def build(item: Any) -> calls.Call:
            latents, sizes = item if isinstance(item, tuple) and len(item) == 2 else (item, None)
            return calls.prioritized(calls.decode_call(latents, model=model, format=format, quality=quality,
                                                       sizes=sizes, scaled=scaled, tiling=tiling, output=output),
                                     priority)
        return self._many(self._stub.DecodeStream, latents, build, calls.decode_result, window, progress, on_error)

    def _many(self, rpc: Callable, items: Any, build: Callable, parse: Callable, window: int,
              progress: Callable[[int], None] | None, on_error: OnError) -> AsyncIterator[Any]:
        if window < 1:
            raise ValueError("window must be at least 1")
        if on_error not in ("raise", "return"):
            raise ValueError("on_error must be 'raise' or 'return'")
        return self._stream(rpc, items, build, parse, window, progress, on_error)

    async def _stream(self, rpc: Callable, items: Any, build: Callable, parse: Callable, window: int,
                      progress: Callable[[int], None] | None, on_error: OnError) -> AsyncIterator[Any]:
        slots = asyncio.Semaphore(window)
        built: dict[int, calls.Call] = {}
        ready: dict[int, Any] = {}

        async def source() -> AsyncIterator[Any]:
            if hasattr(items, "__aiter__"):
                async for item in items:
                    yield item
            else:
                for item in items:
                    yield item

        async def requests() -> AsyncIterator[Any]:
            index = 0
            async for item in source():
                await slots.acquire()  # a slot frees when a result is handed over in order
                try:
                    call = build(item)
                except Exception as exc:  # noqa: BLE001 - a bad item fails alone, locally
                    ready[index] = exc
                else:
                    call.request.id = str(index)
                    built[index] = call
                    yield call.request
                index += 1

        stream = rpc(requests(), metadata=self._metadata)
        next_index = 0
        try:
            while True:
                try:
                    response = await stream.read()
                except grpc.RpcError as exc:
                    raise from_rpc_error(exc) from None
                done = response is grpc.aio.EOF
                if not done:
                    index = int(response.id)
                    call = built.pop(index)
                    ready[index] = from_stream_error(response.error) if response.error.code else parse(response, call)
                while next_index in ready:
                    result = ready.pop(next_index)
                    next_index += 1
                    slots.release()
                    if progress:
                        progress(next_index)
                    if isinstance(result, Exception) and on_error == "raise":
                        raise result
                    yield result
                if done:
                    return
        finally:
            stream.cancel()

    async def models(self, timeout: float | None = None) -> list[ServedModelInfo]:
        reply = await self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [ServedModelInfo.from_message(info) for info in reply.models]

    async def model(self, name: str | None = None, timeout: float | None = None) -> ServedModelInfo:
        reply = await self._unary(self._stub.GetModel, pb.GetModelRequest(name=name or ""), timeout)
        return ServedModelInfo.from_message(reply)

    async def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        request_class, response_class, names = health_messages()
        check = self._channel.unary_unary(CHECK_METHOD, request_serializer=request_class.SerializeToString,
                                          response_deserializer=response_class.FromString)
        return names[(await self._unary(check, request_class(service=service), timeout)).status]

    async def interpolate(self, image_a: Any, image_b: Any, *, steps: int = 8, method: str = "slerp",
                          model: str | None = None, format: str = "raw", output: str = "numpy",
                          timeout: float | None = None) -> list[Any]:
        request = pb.InterpolateRequest(model=model or "", image_a=calls.single_image(image_a, "image_a"),
                                        image_b=calls.single_image(image_b, "image_b"), steps=steps, method=method,
                                        format=calls.image_format(format, output))
        return calls.images_result(await self._unary(self._stub.Interpolate, request, timeout), output)

    async def sample(self, count: int, height: int, width: int, *, seed: int = 0, model: str | None = None,
                     format: str = "raw", output: str = "numpy", timeout: float | None = None) -> list[Any]:
        request = pb.SamplePriorRequest(model=model or "", count=count, height=height, width=width, seed=seed,
                                        format=calls.image_format(format, output))
        return calls.images_result(await self._unary(self._stub.SamplePrior, request, timeout), output)

    async def anomaly_score(self, images: Any, *, model: str | None = None,
                            timeout: float | None = None) -> list[AnomalyScore]:
        request = pb.AnomalyScoreRequest(model=model or "", images=calls.prepare_images(images).messages)
        reply = await self._unary(self._stub.AnomalyScore, request, timeout)
        return [AnomalyScore.from_message(score) for score in reply.scores]
