"""What a request will cost (model work, answer size, memory held), from its headers and numbers alone."""

from __future__ import annotations

from dataclasses import dataclass

from latentd.v1.tensors import wire_dtype
from latentd.v1 import latentd_pb2 as pb
from latentd.vae.codec import Codec
from latentd.vae.errors import InvalidInputError
from latentd.vae.imageio import check_pixel_limit, read_size
from latentd.vae.pass_limits import activation_bytes_per_pixel

from .settings import ServerSettings
from .wire import ENCODED_FORMATS, OutputFormat, checked_shape, packed_image_size

MIB = 1024 * 1024
UINT8_PIXEL = 3  # bytes of a uint8 RGB pixel
FLOAT_PIXEL = 12  # bytes of a float32 RGB pixel (the [3, H, W] tensors a model reads)
# A decoded float image and, when tiled, the blend weights beside it (vae/tiling.py).
DECODED_PIXEL = FLOAT_PIXEL + 4
FLOAT32 = 4
# A model call's fixed cost, as the pixels it could have computed meanwhile: every call counts at least
# this many, so that thousands of sliver tiles (a 1 x 16777216 image) cost what they take.
MIN_CALL_PIXELS = 64 * 64
# Refinement (options.refine_steps): each step a decode, its backward pass (about twice a decode) and
# the decoder's activations held for it. Held bytes per image pixel: REFINE_ACTIVATION_BYTES per unit of
# sum(channels * (layers_per_block + 2) / 4**level) over the decoder's levels (level 0 at full size).
# The default model (135 units) grew its peak RSS by 3.7-4.0 KB per pixel in encode(refine=1) at 256 and
# 512 px (2 cores, CPU); 32 bytes a unit covers that. Unknown layouts count as SD's decoder (928 units).
REFINE_MODEL_CALLS = 3
REFINE_ACTIVATION_BYTES = 32
REFINE_UNKNOWN_UNITS = 928
ITEM_OVERHEAD = 64  # bytes of an item's message framing, shape and small fields, generously
RESPONSE_OVERHEAD = 1024
# Largest side each encoded output format can hold (Pillow refuses more).
FORMAT_MAX_SIDE = {"PNG": 2**31 - 1, "JPEG": 65535, "WEBP": 16383}


class ResponseTooLargeError(InvalidInputError):
    """The answer would exceed the message size limit: not retryable, the request must change."""


@dataclass(frozen=True)
class Cost:
    """One request's cost: model work in image pixels, the answer's bytes, and the server memory held
    while it runs (the request as received, decoded pixels, latents, the answer)."""

    model_pixels: int = 0
    response_bytes: int = 0  # its items; the response's own framing is RESPONSE_OVERHEAD more
    held_bytes: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.model_pixels + other.model_pixels, self.response_bytes + other.response_bytes,
                    self.held_bytes + other.held_bytes)

    def __mul__(self, count: int) -> "Cost":
        return Cost(self.model_pixels * count, self.response_bytes * count, self.held_bytes * count)


def check(cost: Cost, settings: ServerSettings, field: str, what: str) -> Cost:
    """Refuse a request that can never be served within the limits, naming `field` and the limit;
    `what` says what the field counts (in the messages)."""
    if cost.model_pixels > settings.max_request_pixels:
        raise InvalidInputError(f"{field}: {what} need {cost.model_pixels} model pixels (sizes padded to the model's "
                                f"factor, tile overlaps counted, a model call at least {MIN_CALL_PIXELS}), over "
                                f"max_request_pixels {settings.max_request_pixels}; send fewer or smaller images per "
                                "request", field=field)
    limit = settings.max_message_mb * MIB
    if cost.response_bytes + RESPONSE_OVERHEAD > limit:
        raise ResponseTooLargeError(f"{field}: the answer to {what} would take up to "
                                    f"{cost.response_bytes + RESPONSE_OVERHEAD} bytes, over "
                                    f"the message limit max_message_mb {settings.max_message_mb} ({limit} bytes); "
                                    "ask for fewer images per request, a smaller format, or use a stream", field=field)
    budget = settings.memory_budget_mb * MIB
    if cost.held_bytes > budget:
        raise InvalidInputError(f"{field}: {what} would hold {cost.held_bytes} bytes of server memory, over "
                                f"memory_budget_mb {settings.memory_budget_mb}; send fewer or smaller images per "
                                "request", field=field)
    return cost


def check_items(count: int, settings: ServerSettings, field: str) -> None:
    """A batched request's items all wait in its model's queue at once: more than queue_limit never fit."""
    if count > settings.queue_limit:
        raise InvalidInputError(f"{field} has {count} items, over queue_limit {settings.queue_limit}; split the "
                                "request", field=field)


# ---- inputs -----------------------------------------------------------------------------------

def image_size(message: pb.Image, field: str, max_pixels: int) -> tuple[int, int, int]:
    """(height, width, bytes per decoded pixel) of an Image message from its file header or tensor
    shape, checked against max_pixels; (0, 0, 0) for a message too malformed to size, which
    wire.read_image refuses (naming the field) before any work."""
    kind = message.WhichOneof("content")
    if kind == "encoded":
        if not message.encoded:
            return 0, 0, 0
        try:
            width, height = read_size(message.encoded, name=field)
        except InvalidInputError as exc:
            exc.field = f"{field}.encoded"
            raise
        _check_pixels(width, height, max_pixels, f"{field}.encoded")
        return height, width, UINT8_PIXEL
    if kind == "pixels":
        shape = checked_shape(message.pixels, f"{field}.pixels")
        if len(shape) != 3:
            return 0, 0, 0
        if message.pixels.dtype == pb.UINT8:
            height, width, per_pixel = shape[0], shape[1], UINT8_PIXEL
        else:
            height, width, per_pixel = shape[1], shape[2], 2 * FLOAT_PIXEL  # the array and its float32 tensor
        if height > 0 and width > 0:
            _check_pixels(width, height, max_pixels, f"{field}.pixels")
            return height, width, per_pixel
    return 0, 0, 0


def _check_pixels(width: int, height: int, max_pixels: int, field: str) -> None:
    try:
        check_pixel_limit(width, height, max_pixels, field)
    except InvalidInputError as exc:
        exc.field = field
        raise


def model_pixels(codec: Codec, height: int, width: int, *, decode: bool, tiling: str) -> int:
    """The model work of encoding (or decoding back to) one height x width image, in image pixels."""
    calls = codec.model_calls(height, width, decode=decode, tiling=tiling)
    return sum(count * max(pixels, MIN_CALL_PIXELS) for pixels, count in calls.items())


def shared_norm_bytes(codec: Codec, height: int, width: int, *, decode: bool, tiling: str) -> int:
    """Activations a tiled image holds under tile_norms="image": every tile waits at each GroupNorm for the
    others, so all its tiles' activations are alive at once (the estimate of vae/pass_limits.py, per tile pixel);
    0 for an untiled image and the other modes, whose activations one pass's pixels bound."""
    if codec.options.tile_norms != "image" or not codec.is_tiled(height, width, decode=decode, tiling=tiling):
        return 0
    pixels = sum(p * n for p, n in codec.model_calls(height, width, decode=decode, tiling=tiling).items())
    return pixels * activation_bytes_per_pixel(codec.model, codec.placement.dtype)


def _latents_bytes(codec: Codec, height: int, width: int, itemsize: int = FLOAT32) -> int:
    f = codec.factor
    return codec.info.latent_channels * -(-height // f) * -(-width // f) * itemsize


def refine_bytes_per_pixel(codec: Codec) -> int:
    """Memory one refinement step holds per image pixel, from the decoder's layout (see REFINE_*)."""
    config = getattr(codec.model, "config", None) or {}
    channels, layers = config.get("block_out_channels"), config.get("layers_per_block")
    if not channels or not isinstance(layers, int) or not all(isinstance(c, int) for c in channels):
        return REFINE_ACTIVATION_BYTES * REFINE_UNKNOWN_UNITS
    units = sum(c * (layers + 2) / 4**level for level, c in enumerate(channels))
    return int(REFINE_ACTIVATION_BYTES * units) + 1


def _refine_image(codec: Codec, height: int, width: int, steps: int, index: int, tiling: str) -> Cost:
    """Refining one image's latent `steps` steps: untiled decodes and backward passes, its activations."""
    if codec.is_tiled(height, width, decode=False, tiling=tiling):
        raise InvalidInputError(f"options.refine_steps: refinement runs on untiled images only; images[{index}] "
                                f"is {height}x{width}, which the server tiles", field="options.refine_steps")
    decode = model_pixels(codec, height, width, decode=True, tiling="off")
    return Cost(steps * REFINE_MODEL_CALLS * decode, 0, height * width * refine_bytes_per_pixel(codec))


def _encode_image(codec: Codec, height: int, width: int, per_pixel: int, tiling: str) -> Cost:
    """Encoding one image: its decoded pixels, the float batch it joins, its posterior moments."""
    pixels = height * width
    held = (pixels * (per_pixel + FLOAT_PIXEL) + 2 * _latents_bytes(codec, height, width)
            + shared_norm_bytes(codec, height, width, decode=False, tiling=tiling))
    return Cost(model_pixels(codec, height, width, decode=False, tiling=tiling), 0, held)


def _decode_image(codec: Codec, height: int, width: int, crop: tuple[int, int], output: OutputFormat,
                  tiling: str) -> Cost:
    """Decoding one latent to a height x width image cropped to `crop`, answered in `output`."""
    answer = output_bytes(crop[0], crop[1], output)
    held = (2 * _latents_bytes(codec, height, width) + height * width * DECODED_PIXEL
            + crop[0] * crop[1] * (FLOAT_PIXEL if output.format == pb.RAW_FLOAT else UINT8_PIXEL) + 2 * answer
            + shared_norm_bytes(codec, height, width, decode=True, tiling=tiling))
    return Cost(model_pixels(codec, height, width, decode=True, tiling=tiling), answer + ITEM_OVERHEAD, held)


def output_bytes(height: int, width: int, output: OutputFormat) -> int:
    """The largest answer one image can take: raw pixels exactly, an encoded file at PNG's worst
    case (its pixels, a filter byte a row, deflate's stored blocks and chunk framing)."""
    pixels = height * width
    if output.format == pb.RAW_FLOAT:
        return pixels * FLOAT_PIXEL
    if output.format == pb.RAW_UINT8:
        return pixels * UINT8_PIXEL
    return pixels * UINT8_PIXEL + height + pixels * UINT8_PIXEL // 1000 + 1024


def check_format_size(height: int, width: int, output: OutputFormat, field: str) -> None:
    if output.format in ENCODED_FORMATS:
        name = ENCODED_FORMATS[output.format][0]
        if max(height, width) > FORMAT_MAX_SIDE[name]:
            raise InvalidInputError(f"{field}: {name} holds images up to {FORMAT_MAX_SIDE[name]} pixels a side, "
                                    f"not {height}x{width}; ask for another format", field=field)


# ---- one cost per RPC ---------------------------------------------------------------------------

def encode_cost(request: pb.EncodeRequest, codec: Codec, settings: ServerSettings, tiling: str,
                latent_dtype: str) -> Cost:
    check_items(len(request.images), settings, "images")
    itemsize = wire_dtype(latent_dtype).itemsize
    outputs = 2 if request.options.posterior else 1
    cost = Cost(held_bytes=request.ByteSize())
    for index, message in enumerate(request.images):
        height, width, per_pixel = image_size(message, f"images[{index}]", settings.max_pixels)
        answer = outputs * _latents_bytes(codec, height, width, itemsize) + ITEM_OVERHEAD
        cost += _encode_image(codec, height, width, per_pixel, tiling) + Cost(0, answer, 2 * answer)
        if request.options.refine_steps and height and width:
            cost += _refine_image(codec, height, width, request.options.refine_steps, index, tiling)
    return check(cost, settings, "images", f"{len(request.images)} images")


def decode_cost(request: pb.DecodeRequest, codec: Codec, settings: ServerSettings, tiling: str,
                output: OutputFormat) -> Cost:
    check_items(len(request.items), settings, "items")
    f = codec.factor
    cost = Cost(held_bytes=request.ByteSize())
    for index, item in enumerate(request.items):
        shape = checked_shape(item.latents, f"items[{index}].latents")
        if request.options.packed:  # [tokens, 4C] of an image of the item's height and width
            if len(shape) != 2 or min(shape) < 1 or min(item.height, item.width) < 2 * f:
                continue  # wire.read_latents refuses it, naming the field
            height, width = packed_image_size(item, f"items[{index}]", f)
        elif item.latents.dtype == pb.INT32:  # a VQ model's codebook indices [h, w]
            if len(shape) != 2 or min(shape) < 1:
                continue  # wire.read_latents refuses it, naming the field
            height, width = shape[0] * f, shape[1] * f
        elif len(shape) != 3 or min(shape) < 1:
            continue  # wire.read_latents refuses it, naming the field
        else:
            height, width = shape[1] * f, shape[2] * f
        _check_pixels(width, height, settings.max_pixels, f"items[{index}].latents")
        # A crop outside 1..full is refused by wire.read_latents before any work; costed at full size.
        crop = tuple(value if 0 < value <= full and not request.options.packed else full
                     for value, full in ((item.height, height), (item.width, width)))
        check_format_size(*crop, output, f"items[{index}]")
        cost += _decode_image(codec, height, width, crop, output, tiling)
    return check(cost, settings, "items", f"{len(request.items)} items")


def sample_prior_cost(request: pb.SamplePriorRequest, codec: Codec, settings: ServerSettings,
                      output: OutputFormat) -> Cost:
    height, width = request.height, request.width
    # A sample is decoded from latents padded to the factor, then cropped.
    f = codec.factor
    full = (-(-height // f) * f, -(-width // f) * f)
    one = _decode_image(codec, *full, (height, width), output, "auto")
    field = "count"
    if one.model_pixels > settings.max_request_pixels:
        field = "width" if width >= height else "height"
    check_format_size(height, width, output, field)
    return check(one * request.count, settings, field, f"{request.count} samples of {height}x{width}")


def interpolate_cost(request: pb.InterpolateRequest, codec: Codec, settings: ServerSettings, steps: int,
                     output: OutputFormat) -> Cost:
    cost = Cost(held_bytes=request.ByteSize())
    sizes = []
    for name in ("image_a", "image_b"):
        height, width, per_pixel = image_size(getattr(request, name), name, settings.max_pixels)
        sizes.append((height, width))
        cost += _encode_image(codec, height, width, per_pixel, "auto")
    height, width = sizes[0]
    f = codec.factor
    full = (-(-height // f) * f, -(-width // f) * f)
    check_format_size(height, width, output, "steps")
    frame = _decode_image(codec, *full, (height, width), output, "auto")
    cost += frame * steps
    return check(cost, settings, "steps", f"{steps} steps of {height}x{width}")


def anomaly_cost(request: pb.AnomalyScoreRequest, codec: Codec, settings: ServerSettings) -> Cost:
    cost = Cost(held_bytes=request.ByteSize())
    for index, message in enumerate(request.images):
        height, width, per_pixel = image_size(message, f"images[{index}]", settings.max_pixels)
        f = codec.factor
        full = (-(-height // f) * f, -(-width // f) * f)
        # A round trip: the encode, then a decode held as float beside the original (both to uint8).
        cost += _encode_image(codec, height, width, per_pixel, "auto") + Cost(
            model_pixels(codec, *full, decode=True, tiling="auto"), ITEM_OVERHEAD,
            full[0] * full[1] * DECODED_PIXEL + 2 * height * width * UINT8_PIXEL)
    return check(cost, settings, "images", f"{len(request.images)} images")
