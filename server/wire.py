"""Request messages -> validated codec inputs, codec outputs -> response messages; errors name the field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from latentd.v1.tensors import LATENT_DTYPES, TensorError, from_tensor, tensor_shape, to_tensor, wire_dtype
from latentd.v1 import latentd_pb2 as pb
from latentd.vae.convert import tensor_to_uint8
from latentd.vae.errors import InvalidInputError
from latentd.vae.imageio import check_pixel_limit, encode_image, open_image
from latentd.vae.codes import lookup
from latentd.vae.latent_ops import packed_latent_size, unpack_latents
from latentd.vae.refine import MAX_REFINE_STEPS
from latentd.v1.results import ModelInfo, ServedModelInfo

from .echo import quoted


TILING = {pb.TILING_AUTO: "auto", pb.TILING_ON: "on", pb.TILING_OFF: "off"}
PRIORITY = {pb.INTERACTIVE: "interactive", pb.BULK: "bulk"}  # the batcher's names (batcher.PRIORITIES)
# Encoded output formats: (Pillow format name, takes a quality).
ENCODED_FORMATS = {pb.IMAGE_FORMAT_UNSPECIFIED: ("PNG", False), pb.PNG: ("PNG", False), pb.JPEG: ("JPEG", True),
                   pb.WEBP: ("WEBP", True)}
DEFAULT_QUALITY = 90
# Float pixels are in [-1, 1]; the band leaves room for resampling overshoot. Far beyond it they are no
# image, and the model overflows to NaN on them.
FLOAT_PIXEL_BOUND = 1.5
# Real latents stay within about +-100; far beyond, a model's float32 normalisation overflows to NaN.
LATENT_BOUND = 1e4


def _tensor(message: pb.Tensor, field: str) -> np.ndarray:
    try:
        return from_tensor(message, field)
    except TensorError as exc:
        raise InvalidInputError(str(exc), field=exc.field) from None


def checked_shape(message: pb.Tensor, field: str) -> tuple[int, ...]:
    """A tensor's shape, checked as `_tensor` checks it, without reading its data (for costing)."""
    try:
        return tensor_shape(message, field)
    except TensorError as exc:
        raise InvalidInputError(str(exc), field=exc.field) from None


def _check_bound(array: np.ndarray, bound: float, field: str) -> None:
    largest = float(np.abs(array).max()) if array.size else 0.0
    if largest > bound:
        raise InvalidInputError(f"{field} holds values beyond +-{bound:g} (largest magnitude {largest:.3g})",
                                field=field)


INTERPOLATION_STEPS = (2, 64)
DEFAULT_STEPS = 8


def interpolation(request: pb.InterpolateRequest) -> tuple[int, str]:
    """(steps, method) of an Interpolate request, with their defaults, checked."""
    steps = request.steps or DEFAULT_STEPS
    low, high = INTERPOLATION_STEPS
    if not low <= steps <= high:
        raise InvalidInputError(f"steps must be {low}-{high}, got {request.steps}", field="steps")
    method = request.method or "slerp"
    if method not in ("slerp", "lerp"):
        raise InvalidInputError(f"method must be slerp or lerp, got {quoted(method)}", field="method")
    return steps, method


MAX_PRIOR_SAMPLES = 64


def prior_sample(request: pb.SamplePriorRequest, max_pixels: int) -> None:
    """Check a SamplePrior request's count and image size."""
    if not 1 <= request.count <= MAX_PRIOR_SAMPLES:
        raise InvalidInputError(f"count must be 1-{MAX_PRIOR_SAMPLES}, got {request.count}", field="count")
    for name in ("height", "width"):
        if getattr(request, name) < 1:
            raise InvalidInputError(f"{name} must be positive", field=name)
    if request.height * request.width > max_pixels:
        raise InvalidInputError(f"height x width exceeds max_pixels {max_pixels}", field="height")


def nonempty(items: Sequence[Any], field: str) -> None:
    """Refuse a request whose repeated field `field` holds nothing to work on."""
    if not items:
        raise InvalidInputError(f"{field} is empty", field=field)


def tiling(value: int, field: str) -> str:
    if value not in TILING:
        raise InvalidInputError(f"{field} {value} is not a Tiling value", field=field)
    return TILING[value]


def refine_steps(options: pb.EncodeOptions, field: str = "options.refine_steps") -> int:
    """Encode's refinement steps: within MAX_REFINE_STEPS, and never with a posterior sample."""
    steps = options.refine_steps
    if steps > MAX_REFINE_STEPS:
        raise InvalidInputError(f"{field} must be 0-{MAX_REFINE_STEPS}, got {steps}", field=field)
    if steps and options.sample:
        raise InvalidInputError(f"{field}: refinement improves the posterior mean; it does not combine with "
                                "options.sample", field=field)
    return steps


def priority(value: int, field: str = "priority") -> str:
    if value not in PRIORITY:
        raise InvalidInputError(f"{field} {value} is not a Priority value (INTERACTIVE or BULK)", field=field)
    return PRIORITY[value]


def latent_dtype(value: int, field: str) -> str:
    try:
        name = "float32" if value == pb.DTYPE_UNSPECIFIED else wire_dtype(value).name
    except TensorError:
        name = None
    if name not in LATENT_DTYPES:
        raise InvalidInputError(f"{field} must be FLOAT32, FLOAT16 or BFLOAT16", field=field)
    return name


def index_options(options: pb.EncodeOptions, info: ModelInfo) -> None:
    """Check an Encode asking for codebook indices: a VQ model, and none of the latent-only options."""
    if not info.codebook_size:
        raise InvalidInputError(f"options.indices: model {info.name!r} ({info.model_class}) has no codebook; "
                                "indices need a VQ model", field="options.indices")
    for flag in ("raw", "sample", "posterior", "packed"):
        if getattr(options, flag):
            raise InvalidInputError(f"options.{flag} does not combine with options.indices", field=f"options.{flag}")
    if options.latent_dtype != pb.DTYPE_UNSPECIFIED:
        raise InvalidInputError("options.latent_dtype does not apply to options.indices (always INT32)",
                                field="options.latent_dtype")
    if options.refine_steps:
        raise InvalidInputError("options.refine_steps does not combine with options.indices (it refines "
                                "continuous latents)", field="options.refine_steps")


@dataclass(frozen=True)
class DecodeItem:
    latents: torch.Tensor  # float32 [C, h, w]
    size: tuple[int, int]  # crop to (height, width)
    scaled: bool = True  # diffusers-scaled latents (else raw z)


@dataclass(frozen=True)
class OutputFormat:
    format: int
    quality: int

    @property
    def encoded(self) -> bool:
        """PNG/JPEG/WebP bytes (worth a worker thread) rather than raw pixels."""
        return self.format in ENCODED_FORMATS

    @classmethod
    def parse(cls, format: int, quality: int, prefix: str = "options.") -> "OutputFormat":
        if format not in ENCODED_FORMATS and format not in (pb.RAW_UINT8, pb.RAW_FLOAT):
            raise InvalidInputError(f"{prefix}format {format} is not an ImageFormat value", field=f"{prefix}format")
        if not 0 <= quality <= 100:
            raise InvalidInputError(f"{prefix}quality must be 1-100 (0: {DEFAULT_QUALITY}), got {quality}",
                                    field=f"{prefix}quality")
        return cls(format, quality or DEFAULT_QUALITY)


def read_image(message: pb.Image, field: str, max_pixels: int) -> np.ndarray | torch.Tensor:
    """An Image message as uint8 RGB [H, W, 3] (files, uint8 pixels) or float32 [3, H, W] in [-1, 1]
    (float pixels, as diffusers pipelines hold images)."""
    kind = message.WhichOneof("content")
    if kind == "encoded":
        if not message.encoded:
            raise InvalidInputError(f"{field}.encoded is empty", field=f"{field}.encoded")
        return np.asarray(open_image(message.encoded, name=field, max_pixels=max_pixels))
    if kind == "pixels":
        pixels = _tensor(message.pixels, f"{field}.pixels")
        if pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3:
            check_pixel_limit(pixels.shape[1], pixels.shape[0], max_pixels, field)
            return pixels
        if pixels.dtype in (np.float32, np.float16) and pixels.ndim == 3 and pixels.shape[0] == 3:
            check_pixel_limit(pixels.shape[2], pixels.shape[1], max_pixels, field)
            if not np.isfinite(pixels).all():
                raise InvalidInputError(f"{field}.pixels holds NaN or infinite values", field=f"{field}.pixels")
            _check_bound(pixels, FLOAT_PIXEL_BOUND, f"{field}.pixels")
            return torch.from_numpy(pixels.astype(np.float32))
        raise InvalidInputError(f"{field}.pixels must be uint8 [H, W, 3] or float [3, H, W], got "
                                f"{pixels.dtype.name} {list(pixels.shape)}", field=f"{field}.pixels")
    raise InvalidInputError(f"{field} has neither encoded bytes nor pixels", field=field)


def image_size(image: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """(height, width) of what `read_image` returns."""
    return tuple(image.shape[-2:]) if isinstance(image, torch.Tensor) else tuple(image.shape[:2])


def check_packable(sizes: list[tuple[int, int]], factor: int) -> None:
    """Packed answers need images whose sides are multiples of 2 x factor (FluxPipeline's sizes), so
    that their latents unpack from the image size alone."""
    for index, (height, width) in enumerate(sizes):
        if height % (2 * factor) or width % (2 * factor):
            raise InvalidInputError(f"options.packed: images[{index}] is {height}x{width}; packed latents need "
                                    f"sides that are multiples of {2 * factor} (twice the model's factor)",
                                    field="options.packed")


def packed_image_size(message: pb.Latents, field: str, factor: int) -> tuple[int, int]:
    """The image that packed latents decode to: FluxPipeline's, each side of the item's height and width
    rounded down to a multiple of 2 x factor (both required, at least that much)."""
    for name in ("height", "width"):
        if getattr(message, name) < 2 * factor:
            raise InvalidInputError(f"{field}.{name}: packed latents need the image's {name}, at least "
                                    f"{2 * factor} (twice the model's factor), got {getattr(message, name)}",
                                    field=f"{field}.{name}")
    height, width = packed_latent_size(message.height, message.width, factor)
    return height * factor, width * factor


def _unpacked(array: np.ndarray, message: pb.Latents, field: str, info: ModelInfo) -> np.ndarray:
    """Packed latents [(h/2) * (w/2), C * 4] (FLUX.1's layout) as [C, h, w], checked against the item's size."""
    label = f"{field}.latents"
    height, width = packed_image_size(message, field, info.downsampling_factor)
    tokens = (height // info.downsampling_factor // 2) * (width // info.downsampling_factor // 2)
    if array.ndim != 2 or array.shape != (tokens, 4 * info.latent_channels):
        raise InvalidInputError(f"{label}.shape must be [{tokens}, {4 * info.latent_channels}] (packed) for a "
                                f"{message.height}x{message.width} image and model {info.name!r}, got "
                                f"{list(array.shape)}", field=f"{label}.shape")
    latents = unpack_latents(torch.from_numpy(np.ascontiguousarray(array)), message.height, message.width,
                             info.downsampling_factor)
    return latents.numpy()


def read_latents(message: pb.Latents, field: str, info: ModelInfo, max_pixels: int,
                 packed: bool = False, codebook: torch.Tensor | None = None) -> DecodeItem:
    """A Latents message as raw-or-scaled float32 latents [C, h, w] plus the size to crop to; `packed`:
    the message holds FLUX.1's packed layout, unpacked here. INT32 latents are a VQ model's codebook
    indices [h, w], replaced here by their (raw) codebook vectors from `codebook`."""
    array = _tensor(message.latents, f"{field}.latents")
    label = f"{field}.latents"
    if array.dtype == np.int32:
        return _read_indices(array, message, field, info, max_pixels, packed, codebook)
    indices_too = " (or INT32 codebook indices)" if info.codebook_size else ""
    if array.dtype not in (np.float32, np.float16):
        raise InvalidInputError(f"{label}.dtype must be FLOAT32, FLOAT16 or BFLOAT16{indices_too}, got "
                                f"{array.dtype.name}", field=f"{label}.dtype")
    if info.codebook_size and array.ndim == 2 and not packed:  # indices [h, w] sent as floats
        raise InvalidInputError(f"{label}.dtype must be INT32 for codebook indices [h, w], got {array.dtype.name}",
                                field=f"{label}.dtype")
    if packed:
        array = _unpacked(array, message, field, info)
    if array.ndim != 3 or array.shape[0] != info.latent_channels:
        raise InvalidInputError(f"{label}.shape must be [{info.latent_channels}, h, w] for model {info.name!r}, "
                                f"got {list(array.shape)}", field=f"{label}.shape")
    channels, h, w = array.shape
    if h == 0 or w == 0:
        raise InvalidInputError(f"{label}.shape {list(array.shape)} is empty", field=f"{label}.shape")
    if not np.isfinite(array).all():
        raise InvalidInputError(f"{label} holds NaN or infinite values", field=label)
    _check_bound(array, LATENT_BOUND, label)
    full = (h * info.downsampling_factor, w * info.downsampling_factor)
    height, width = full if packed else (message.height or full[0], message.width or full[1])
    for name, value, limit in (("height", height, full[0]), ("width", width, full[1])):
        if not 0 < value <= limit:
            raise InvalidInputError(f"{field}.{name} must be 1-{limit} for these latents, got {value}",
                                    field=f"{field}.{name}")
    check_pixel_limit(full[1], full[0], max_pixels, label)
    return DecodeItem(torch.from_numpy(array.astype(np.float32)), (height, width))


def _read_indices(array: np.ndarray, message: pb.Latents, field: str, info: ModelInfo, max_pixels: int,
                  packed: bool, codebook: torch.Tensor | None) -> DecodeItem:
    label = f"{field}.latents"
    size = info.codebook_size
    if not size or codebook is None:
        raise InvalidInputError(f"{label}.dtype INT32 holds codebook indices; model {info.name!r} "
                                f"({info.model_class}) has no codebook: send FLOAT32, FLOAT16 or BFLOAT16 latents",
                                field=f"{label}.dtype")
    if packed:
        raise InvalidInputError("options.packed does not apply to codebook indices", field="options.packed")
    if array.ndim != 2 or 0 in array.shape:
        raise InvalidInputError(f"{label}.shape must be [h, w] (codebook indices) for model {info.name!r}, got "
                                f"{list(array.shape)}", field=f"{label}.shape")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= size:
        raise InvalidInputError(f"{label} holds index {low if low < 0 else high}, outside the codebook [0, {size})",
                                field=label)
    full = (array.shape[0] * info.downsampling_factor, array.shape[1] * info.downsampling_factor)
    height, width = message.height or full[0], message.width or full[1]
    for name, value, limit in (("height", height, full[0]), ("width", width, full[1])):
        if not 0 < value <= limit:
            raise InvalidInputError(f"{field}.{name} must be 1-{limit} for these indices, got {value}",
                                    field=f"{field}.{name}")
    check_pixel_limit(full[1], full[0], max_pixels, label)
    return DecodeItem(lookup(torch.from_numpy(array.astype(np.int64)), codebook), (height, width), scaled=False)


def latents_array(latents: torch.Tensor) -> np.ndarray:
    """Latents as a float32 CPU array (torch work: runs on a compute lane)."""
    return latents.detach().cpu().float().numpy()


def latents_message(latents: np.ndarray, dtype: str) -> pb.Tensor:
    return to_tensor(latents, dtype)


def image_array(image: torch.Tensor, output: OutputFormat) -> np.ndarray:
    """A decoded float [3, H, W] image in [-1, 1] as the array its message needs: float32 [3, H, W]
    for RAW_FLOAT, else uint8 [H, W, 3] (torch work: runs on a compute lane)."""
    if output.format == pb.RAW_FLOAT:
        return image.float().cpu().numpy()
    return tensor_to_uint8(image.cpu())


def image_message(pixels: np.ndarray, output: OutputFormat) -> pb.Image:
    """An `image_array` result in the requested format (PNG/JPEG/WebP encoding included)."""
    if output.format == pb.RAW_FLOAT:
        return pb.Image(pixels=to_tensor(pixels, "float32"))
    if output.format == pb.RAW_UINT8:
        return pb.Image(pixels=to_tensor(pixels, "uint8"))
    return pb.Image(encoded=encode_file(pixels, output))


def encode_file(pixels: np.ndarray, output: OutputFormat) -> bytes:
    name, lossy = ENCODED_FORMATS[output.format]
    return encode_image(pixels, name, output.quality if lossy else None)


def served_info(info: ModelInfo, *, device: str, max_pixels: int, max_batch_size: int) -> ServedModelInfo:
    return ServedModelInfo(**info.to_dict(), device=device, max_pixels=max_pixels, max_batch_size=max_batch_size)
