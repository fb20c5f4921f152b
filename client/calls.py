"""Request building and reply parsing shared by the sync and async clients (no I/O here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from latentd.v1 import latentd_pb2 as pb

from .convert import (
    Form,
    check_output,
    image_from_message,
    images_output,
    latents_output,
    prepare_images,
    prepare_latents,
)
from .errors import InvalidInputError
from latentd.v1.tensors import LATENT_DTYPES as WIRE_LATENT_DTYPES
from latentd.v1.tensors import from_tensor, wire_dtype

LATENT_DTYPES = {name: wire_dtype(name).proto for name in WIRE_LATENT_DTYPES}
FILE_FORMATS = {"png": pb.PNG, "jpeg": pb.JPEG, "webp": pb.WEBP}
TILING = {"auto": pb.TILING_AUTO, "on": pb.TILING_ON, "off": pb.TILING_OFF}
# The queue a request waits in on the server: interactive first; bulk (encode_many, archives) never starves.
PRIORITY = {"interactive": pb.INTERACTIVE, "bulk": pb.BULK}


def _choice(value: str, table: dict, name: str) -> Any:
    if value not in table:
        raise InvalidInputError(f"{name} must be one of {', '.join(table)}, got {value!r}")
    return table[value]


@dataclass(frozen=True)
class Call:
    """A built request plus what is needed to answer the caller in kind."""

    request: Any
    form: Form
    output: str


def priority_value(priority: str) -> int:
    """The wire Priority of "interactive" or "bulk"; InvalidInputError naming `priority` otherwise."""
    return _choice(priority, PRIORITY, "priority")


def prioritized(call: Call, priority: str) -> Call:
    """The call, its request queued as `priority` says."""
    call.request.priority = priority_value(priority)
    return call


def encode_call(images: Any, *, model: str | None, sample: bool, seed: int | None, scaled: bool, dtype: str,
                tiling: str, output: str, packed: bool = False, refine: int = 0) -> Call:
    output = check_output(output, ("numpy", "tensor"))
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise InvalidInputError(f"refine must be a whole number of steps >= 0, got {refine!r}")
    options = pb.EncodeOptions(raw=not scaled, sample=sample, latent_dtype=_choice(dtype, LATENT_DTYPES, "dtype"),
                               tiling=_choice(tiling, TILING, "tiling"), packed=bool(packed),
                               refine_steps=min(refine, 2**32 - 1))
    if seed is not None:
        if not sample:
            raise InvalidInputError("seed only applies with sample=True")
        options.seed = int(seed)
    prepared = prepare_images(images)
    return Call(pb.EncodeRequest(model=model or "", images=prepared.messages, options=options), prepared.form, output)


def posterior_call(images: Any, *, model: str | None, dtype: str, tiling: str, output: str) -> Call:
    call = encode_call(images, model=model, sample=False, seed=None, scaled=False, dtype=dtype, tiling=tiling,
                       output=output)
    call.request.options.posterior = True
    return call


def indices_call(images: Any, *, model: str | None, tiling: str, output: str) -> Call:
    """Encode asking a VQ model for codebook indices (their dtype is always INT32: no latent_dtype)."""
    call = encode_call(images, model=model, sample=False, seed=None, scaled=True, dtype="float32", tiling=tiling,
                       output=output)
    call.request.options.indices = True
    call.request.options.latent_dtype = pb.DTYPE_UNSPECIFIED
    return call


def posterior_result(response: pb.EncodeResponse, call: Call) -> Any:
    """(mean, logvar) pairs in the caller's form and kind."""
    means = [from_tensor(item.latents, "latents") for item in response.items]
    logvars = [from_tensor(item.logvar, "logvar") for item in response.items]
    return latents_output(means, call.form, call.output), latents_output(logvars, call.form, call.output)


def encode_result(response: pb.EncodeResponse, call: Call) -> Any:
    arrays = [from_tensor(item.latents, "latents") for item in response.items]
    return latents_output(arrays, call.form, call.output)


def decode_call(latents: Any, *, model: str | None, format: str, quality: int | None, sizes: Any, scaled: bool,
                tiling: str, output: str, packed: bool = False) -> Call:
    output = check_output(output)
    if format == "raw":
        wire = pb.RAW_FLOAT if output == "tensor" else pb.RAW_UINT8
    else:
        wire = _choice(format, FILE_FORMATS, "format")
    if quality is not None and not 1 <= quality <= 100:
        raise InvalidInputError(f"quality must be 1-100, got {quality}")
    prepared = prepare_latents(latents, sizes, packed=packed)
    options = pb.DecodeOptions(raw=not scaled, format=wire, quality=quality or 0,
                               tiling=_choice(tiling, TILING, "tiling"), packed=bool(packed))
    return Call(pb.DecodeRequest(model=model or "", items=prepared.messages, options=options), prepared.form, output)


def decode_result(response: pb.DecodeResponse, call: Call) -> Any:
    return images_output([image_from_message(image, call.output) for image in response.images], call.form,
                         call.output)


def images_result(response: pb.ImagesResponse, output: str) -> list[Any]:
    return [image_from_message(image, output) for image in response.images]


def image_format(format: str, output: str) -> int:
    """The wire format for interpolate/sample replies."""
    if format == "raw":
        return pb.RAW_FLOAT if check_output(output) == "tensor" else pb.RAW_UINT8
    check_output(output)
    return _choice(format, FILE_FORMATS, "format")


def single_image(image: Any, label: str) -> pb.Image:
    prepared = prepare_images(image)
    if len(prepared.messages) != 1:
        raise InvalidInputError(f"{label}: expected one image, got {len(prepared.messages)}")
    return prepared.messages[0]
