"""The Hugging Face Remote VAE HTTP protocol (diffusers' `remote_decode` / `remote_encode`), over the servicer.

An adapter only: query parameters and raw tensor bytes become Encode/Decode messages that take the
servicer's path (costs, memory admission, the batcher, metrics and the log line), and their answers
become image or tensor bytes. Errors are JSON `{"error", "field"}`, mapped from the same status table
as gRPC's (status.py). See docs/service.md, "HTTP (Hugging Face Remote VAE protocol)".
"""

from __future__ import annotations

import contextlib
import json
import math
import ssl
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import numpy as np
import torch
from aiohttp import web

from latentd.v1 import latentd_pb2 as pb
from latentd.v1.tensors import LATENT_DTYPES, MAX_DIMS, from_tensor, to_tensor, wire_dtype
from latentd.vae.errors import InvalidInputError
from latentd.vae.latent_ops import unpack_latents

from .costs import MIB
from .echo import bounded, quoted
from .interceptors import AuthInterceptor
from .servicer import LatentdServicer
from .settings import ServerSettings
from .status import status_for


HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,  # the answer would be too large: the request must change
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,  # queue full or memory budget taken: retry later
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.CANCELLED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# Input dtypes: latents and float pixels; uint8 pixels on encode.
PIXEL_DTYPES = ("uint8", *LATENT_DTYPES)
OUTPUT_TYPES = ("pil", "pt")
IMAGE_FORMATS = {"jpg": pb.JPEG, "jpeg": pb.JPEG, "png": pb.PNG}
CONTENT_TYPES = {pb.JPEG: "image/jpeg", pb.PNG: "image/png"}
DEFAULT_MODEL_ALIAS = "default"  # the default model answers under this name too (as on the Hub's endpoints)


class HttpError(InvalidInputError):
    """A request the protocol refuses before any work: its HTTP status and the query field at fault."""

    def __init__(self, message: str, field: str, status: int = 400) -> None:
        super().__init__(message, field=field)
        self.status = status


def _error(status: int, message: str, field: str | None, headers: dict | None = None) -> web.Response:
    return web.json_response({"error": bounded(message), "field": field}, status=status, headers=headers)


def _http_field(field: str | None, default: str) -> str:
    """A servicer's field (`items[0].latents.shape`) in this protocol's terms (`shape`)."""
    if not field:
        return default
    head, _, rest = field.partition(".")
    if head.startswith(("items", "images")):
        if rest in ("height", "width"):
            return rest
        last = rest.rpartition(".")[2]
        if last in ("shape", "dtype"):
            return last
        return "body" if rest else default  # the tensor's or the file's contents
    return {"options.format": "output_type", "options.quality": "image_format"}.get(field, field)


# ---- query parameters --------------------------------------------------------------------------

def _param(query, name: str) -> str | None:
    value = query.get(name)
    return None if value is None or value == "" or value == "None" else value


def _bool(query, name: str, default: bool) -> bool:
    value = _param(query, name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise HttpError(f"{name} must be true or false, got {quoted(value)}", name)


def _number(query, name: str, kind: type, *, positive: bool = False) -> Any:
    value = _param(query, name)
    if value is None:
        return None
    try:
        number = kind(value)
    except ValueError:
        raise HttpError(f"{name} must be a{'n integer' if kind is int else ' number'}, got {quoted(value)}",
                        name) from None
    if not math.isfinite(number) or (positive and number <= 0):
        raise HttpError(f"{name} must be {'positive' if positive else 'finite'}, got {quoted(value)}", name)
    return number


def _shape(query) -> tuple[int, ...] | None:
    """`shape` as diffusers' requests sends it (the key repeated once per dimension), or `[1,4,64,64]`."""
    values = query.getall("shape", [])
    if not values:
        return None
    text = values[0] if len(values) == 1 else ",".join(values)
    try:
        shape = tuple(int(part) for part in text.strip().strip("[]").split(",") if part.strip())
    except ValueError:
        raise HttpError(f"shape must be integers, got {quoted(','.join(values))}", "shape") from None
    if not 1 <= len(shape) <= MAX_DIMS or any(n < 1 for n in shape):
        raise HttpError(f"shape {list(shape)} must have 1-{MAX_DIMS} positive dimensions", "shape")
    return shape


def _dtype(query, allowed: tuple[str, ...]) -> str:
    name = _param(query, "dtype") or "float32"
    if name not in allowed:
        raise HttpError(f"dtype {quoted(name)} is not one of {', '.join(allowed)}", "dtype")
    return name


def _check_size(shape: tuple[int, ...], dtype: str, limit: int) -> None:
    """A shape whose tensor could never arrive within the message limit is refused before the body is read."""
    needed = math.prod(shape) * wire_dtype(dtype).itemsize
    if needed > limit:
        raise HttpError(f"shape {list(shape)} of {dtype} takes {needed} bytes, over the message limit "
                        f"({limit} bytes)", "shape")


def _tensor(body: bytes, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The body as an array of `shape` (float32 for the float dtypes; bfloat16 widened)."""
    expected = math.prod(shape) * wire_dtype(dtype).itemsize
    if len(body) != expected:
        raise HttpError(f"the body has {len(body)} bytes; shape {list(shape)} of {dtype} needs {expected}", "body")
    array = from_tensor(pb.Tensor(dtype=wire_dtype(dtype).proto, shape=shape, data=body), "body")
    if array.dtype != np.uint8 and not np.isfinite(array).all():
        raise HttpError("the tensor holds NaN or infinite values", "body")
    return array if array.dtype == np.uint8 else array.astype(np.float32, copy=False)


def _scaling(query) -> tuple[float | None, float | None, bool]:
    """(scaling_factor, shift_factor, whether to use the model's own factors) as remote_decode /
    remote_encode send them: the model's own with `do_scaling` and neither factor given."""
    scale = _number(query, "scaling_factor", float)
    if scale == 0:
        raise HttpError("scaling_factor must not be 0", "scaling_factor")
    shift = _number(query, "shift_factor", float)
    return scale, shift, _bool(query, "do_scaling", False) and scale is None and shift is None


def _tensor_response(array: np.ndarray, dtype: str) -> web.Response:
    data = to_tensor(array, dtype).data
    return web.Response(body=data, content_type="tensor/binary",
                        headers={"shape": json.dumps(list(array.shape)), "dtype": dtype})


# ---- the application ---------------------------------------------------------------------------

class RemoteVaeHttp:
    """The routes: `POST /{model}/decode`, `POST /{model}/encode`, `GET /health`, `GET /models`."""

    def __init__(self, servicer: LatentdServicer, settings: ServerSettings, serving: Callable[[], bool]) -> None:
        self.servicer = servicer
        self.settings = settings
        self.serving = serving
        self.limit = settings.max_message_mb * MIB
        self.auth = AuthInterceptor(settings.auth_tokens) if settings.auth_tokens else None
        self.in_progress = 0  # encode/decode requests: at most max_concurrent_rpcs, as gRPC has it

    def app(self) -> web.Application:
        # client_max_size: a body past the message limit is refused as it arrives (413), not buffered.
        app = web.Application(client_max_size=self.limit + 1, middlewares=[self._errors, self._authorized])
        app.router.add_get("/health", self.health)
        app.router.add_get("/models", self.models)
        app.router.add_post("/{model}/decode", self.decode)
        app.router.add_post("/{model}/encode", self.encode)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Every failure as JSON `{"error", "field"}`: 4xx for the request's faults, 500 without internals."""
        default = "shape" if request.path.endswith("/decode") else "body"
        try:
            return await handler(request)
        except HttpError as exc:
            return _error(exc.status, str(exc), exc.field)
        except web.HTTPException as exc:  # aiohttp's own: no route, wrong method, body too large
            field = {404: "path", 405: "method", 413: "body"}.get(exc.status)
            message = (f"the body is over the message limit max_message_mb {self.settings.max_message_mb}"
                       if exc.status == 413 else exc.reason)
            return _error(exc.status, message, field)
        except Exception as exc:  # noqa: BLE001 - answered, never a dropped connection or a traceback
            code, message = status_for(exc)
            status = HTTP_STATUS.get(code, 500)
            field = _http_field(getattr(exc, "field", None), default) if status < 500 else None
            return _error(status, message, field)

    @web.middleware
    async def _authorized(self, request: web.Request, handler) -> web.StreamResponse:
        """With tokens set, `Authorization: Bearer <token>` on every route but /health, checked before
        the body is read."""
        open_route = self.auth is None or request.path == "/health"
        if open_route or self.auth.allows(request.headers.getall("Authorization", [])):
            return await handler(request)
        return _error(401, "missing or invalid bearer token", "Authorization", {"WWW-Authenticate": "Bearer"})

    async def _body(self, request: web.Request) -> bytes:
        """The body, within the message limit; callers hold a place among `max_concurrent_rpcs`."""
        if request.content_length is not None and request.content_length >= self.limit + 1:
            raise HttpError(f"the body has {request.content_length} bytes, over the message limit max_message_mb "
                            f"{self.settings.max_message_mb}", "body", 413)
        body = await request.read()
        if not body:
            raise HttpError("the body is empty", "body")
        return body

    def _model(self, request: web.Request) -> str:
        """The served model a path names; `default` is the default model unless a model has that name."""
        name = request.match_info["model"]
        if name == DEFAULT_MODEL_ALIAS and name not in self.settings.models:
            return self.settings.default_model
        if name not in self.settings.models:
            raise HttpError(f"model {quoted(name)} is not served here (served: {', '.join(self.settings.models)})",
                            "model", 404)
        return name

    # ---- routes --------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        serving = self.serving()
        return web.json_response({"status": "SERVING" if serving else "NOT_SERVING"}, status=200 if serving else 503)

    async def models(self, request: web.Request) -> web.Response:
        pool = self.servicer.pool
        infos = [asdict(self.servicer.served_info(pool.get(name))) for name in pool.names]
        return web.json_response({"default_model": self.settings.default_model, "models": infos})

    async def decode(self, request: web.Request) -> web.Response:
        with self._place():
            return await self._decode(request)

    async def encode(self, request: web.Request) -> web.Response:
        with self._place():
            return await self._encode(request)

    @contextlib.contextmanager
    def _place(self) -> Iterator[None]:
        """One of `max_concurrent_rpcs` places, taken before the body is read (bodies waiting for
        admission are bounded as gRPC's are), or 503 at once."""
        if self.in_progress >= self.settings.max_concurrent_rpcs:
            raise HttpError(f"{self.in_progress} HTTP requests in progress, the limit max_concurrent_rpcs; retry "
                            "shortly", "max_concurrent_rpcs", 503)
        self.in_progress += 1
        try:
            yield
        finally:
            self.in_progress -= 1

    async def _decode(self, request: web.Request) -> web.Response:
        model = self._model(request)
        query = request.query
        shape = _shape(query)
        if shape is None:
            raise HttpError("shape is required: the latents' dimensions", "shape")
        dtype = _dtype(query, LATENT_DTYPES)
        output_type = _param(query, "output_type") or "pil"
        if output_type not in OUTPUT_TYPES:
            raise HttpError(f"output_type must be pil or pt (an image codec serves no video), got "
                            f"{quoted(output_type)}", "output_type")
        image_format = (_param(query, "image_format") or "jpg").lower()
        if image_format not in IMAGE_FORMATS:
            raise HttpError(f"image_format must be jpg or png, got {quoted(image_format)}", "image_format")
        partial = _bool(query, "partial_postprocess", False)
        height, width = _number(query, "height", int, positive=True), _number(query, "width", int, positive=True)
        if (height is None) != (width is None):
            raise HttpError("height and width go together", "height" if height is None else "width")
        scale, shift, model_scaling = _scaling(query)
        packed = len(shape) == 3 and height is not None
        if len(shape) not in (3, 4):
            raise HttpError(f"shape {list(shape)} must be [B, C, h, w], [C, h, w] or packed [B, tokens, C * 4] "
                            "with height and width", "shape")
        count = shape[0] if len(shape) == 4 or packed else 1
        if output_type == "pil" and count != 1:
            raise HttpError(f"output_type pil answers one image; these latents hold {count}: send one, or ask "
                            "for output_type pt", "output_type")
        _check_size(shape, dtype, self.limit)
        latents = _tensor(await self._body(request), shape, dtype)
        batch = latents if len(shape) == 4 or packed else latents[None]
        codec = self.servicer.pool.get(model).codec
        items = [torch.from_numpy(np.ascontiguousarray(item)) for item in batch]
        if packed:
            try:
                items = [unpack_latents(item, height, width, codec.factor) for item in items]
            except InvalidInputError as exc:
                raise HttpError(str(exc), "height" if exc.field == "height" else "shape") from None
        if scale is not None or shift is not None:  # diffusers' `latents / scaling_factor + shift_factor`
            items = [item / (scale or 1.0) + (shift or 0.0) for item in items]
        crop = {} if packed or height is None else {"height": height, "width": width}
        if output_type == "pil":
            format = IMAGE_FORMATS[image_format]
        else:
            format = pb.RAW_UINT8 if partial else pb.RAW_FLOAT
        message = pb.DecodeRequest(
            model=model, items=[pb.Latents(latents=to_tensor(item.numpy(), "float32"), **crop) for item in items],
            options=pb.DecodeOptions(format=format, raw=not model_scaling))
        response = await self.servicer.decode(message, rpc="HttpDecode")
        if output_type == "pil":
            return web.Response(body=response.images[0].encoded, content_type=CONTENT_TYPES[format])
        images = np.stack([from_tensor(image.pixels, "pixels") for image in response.images])
        # uint8 [B, H, W, 3] postprocessed, or float [B, 3, H, W] in [-1, 1] in the latents' dtype.
        return _tensor_response(images, "uint8" if partial else dtype)

    async def _encode(self, request: web.Request) -> web.Response:
        model = self._model(request)
        query = request.query
        shape = _shape(query)
        scale, shift, model_scaling = _scaling(query)
        dtype = "float32" if shape is None else _dtype(query, PIXEL_DTYPES)
        if shape is not None:
            # float [B, 3, H, W] / [3, H, W] in [-1, 1], or uint8 [B, H, W, 3] / [H, W, 3]
            if len(shape) not in (3, 4):
                raise HttpError(f"shape {list(shape)} must be float [B, 3, H, W] or [3, H, W] in [-1, 1], or uint8 "
                                "[B, H, W, 3] or [H, W, 3]", "shape")
            _check_size(shape, dtype, self.limit)
        body = await self._body(request)
        if shape is None:  # an image file (remote_encode sends a PIL image as PNG)
            images = [pb.Image(encoded=body)]
        else:
            pixels = _tensor(body, shape, dtype)
            images = [pb.Image(pixels=to_tensor(item)) for item in (pixels[None] if len(shape) == 3 else pixels)]
            dtype = "float32" if dtype == "uint8" else dtype
        message = pb.EncodeRequest(model=model, images=images, options=pb.EncodeOptions(raw=not model_scaling))
        response = await self.servicer.encode(message, rpc="HttpEncode")
        # One image file, or one tensor's images: the latents share a shape.
        array = np.stack([from_tensor(item.latents, "latents") for item in response.items])
        if scale is not None or shift is not None:  # diffusers' `(latents - shift_factor) * scaling_factor`
            array = (array - (shift or 0.0)) * (scale or 1.0)
        return _tensor_response(array, dtype)


def ssl_context(settings: ServerSettings) -> ssl.SSLContext | None:
    """HTTPS from the gRPC server's certificate files (client certificates required as there)."""
    if settings.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(Path(settings.tls_cert), Path(settings.tls_key))
        if settings.tls_client_ca:
            context.load_verify_locations(Path(settings.tls_client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInputError(f"TLS file: {exc}", field="tls_cert") from exc
    return context


class HttpServer:
    """The running HTTP endpoint on the server's event loop; `stop` drains it."""

    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self.runner = runner
        self.port = port

    @classmethod
    async def start(cls, servicer: LatentdServicer, settings: ServerSettings,
                    serving: Callable[[], bool]) -> "HttpServer":
        app = RemoteVaeHttp(servicer, settings, serving).app()
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=settings.grace_s)
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.http_port, ssl_context=ssl_context(settings))
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise InvalidInputError(f"cannot serve HTTP on {settings.host}:{settings.http_port}: "
                                    f"{exc.strerror or exc}", field="http_port") from exc
        return cls(runner, runner.addresses[0][1])

    async def stop(self, grace: float) -> None:
        """No new connections or requests; those in flight get `grace` seconds, then are cancelled."""
        # aiohttp takes the drain time when the runner is made; a stop sets its own (the runner's slot).
        self.runner._shutdown_timeout = grace
        await self.runner.cleanup()
