"""Safe image decoding: EXIF orientation, every Pillow mode to RGB, a pixel limit, one error type."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageTooLargeError, InvalidImageError

# 8192 x 8192: four times a 4096x4096 image, a tenth of Pillow's own decompression-bomb error limit.
DEFAULT_MAX_PIXELS = 8192 * 8192
DEFAULT_BACKGROUND = (255, 255, 255)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def describe_source(source: object) -> str:
    """A short name for an input, used in error messages."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.width}x{source.height}>"
    return f"<{type(source).__name__}>"


def find_image_files(paths: "list[str | os.PathLike]", suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files among `paths`: files as given, folders searched recursively (sorted)."""
    found: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found += sorted(p for p in entry.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
        else:
            found.append(entry)
    return found


def open_image(
    source: ImageSource,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
) -> Image.Image:
    """Decode `source` (path, bytes, file object or PIL image) into an upright RGB image.

    Raises `ImageTooLargeError` above `max_pixels` before any pixel is decoded, and
    `InvalidImageError` (naming the input) for empty, corrupt, truncated or non-image data.
    """
    label = name or describe_source(source)
    if isinstance(source, Image.Image):
        image = source
        check_pixel_limit(image.width, image.height, max_pixels, label)
    else:
        image = _decode(source, label, max_pixels)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        pass
    return to_rgb(image, background)


def encode_image(image: "Image.Image | np.ndarray", format: str = "PNG", quality: int | None = None) -> bytes:
    """A PIL image or uint8 HWC array as file bytes in `format` (PNG, JPEG, WEBP, AVIF, ...); `quality`
    is passed to Pillow when given (lossy formats)."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    buffer = io.BytesIO()
    picture.save(buffer, format=format, **({} if quality is None else {"quality": int(quality)}))
    return buffer.getvalue()


def check_pixel_limit(width: int, height: int, max_pixels: int, label: str) -> None:
    if width <= 0 or height <= 0:
        raise InvalidImageError(label, f"empty image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLargeError(label, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")


def read_size(data: bytes, *, name: str | None = None) -> tuple[int, int]:
    """(width, height) of an image file's bytes, from its header alone: no pixel is decoded."""
    label = name or describe_source(data)
    with _image_errors(label):
        with Image.open(_stream(data, label)) as image:
            return image.size


def _stream(source: ImageSource, label: str) -> BinaryIO | str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise InvalidImageError(label, "empty data")
        return io.BytesIO(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InvalidImageError(label, "no such file")
        if path.stat().st_size == 0:
            raise InvalidImageError(label, "empty file")
        return str(path)
    return source


@contextlib.contextmanager
def _image_errors(label: str) -> Iterator[None]:
    """Pillow's failures as InvalidImageError / ImageTooLargeError naming the input."""
    try:
        with warnings.catch_warnings():
            # Our own limit replaces Pillow's global one; its warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(label, str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(label, "not a recognised image format") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImageError(label, f"corrupt or truncated image ({exc})") from exc


def _decode(source: ImageSource, label: str, max_pixels: int) -> Image.Image:
    stream = _stream(source, label)
    with _image_errors(label):
        image = Image.open(stream)
        check_pixel_limit(image.width, image.height, max_pixels, label)
        image.load()
    return image


def to_rgb(image: Image.Image, background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on `background`."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in _TRANSPARENT_MODES:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode in _HIGH_BIT_DEPTH_MODES:
        return Image.fromarray(_to_uint8(np.asarray(image), mode)).convert("RGB")
    return image.convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16-bit, 32-bit integer and float (0..255) samples to 8 bits."""
    scaled = values.astype(np.float64)
    # 16-bit data spans 0..65535; "I" holds 16-bit PNG samples, or 8-bit ones after a conversion.
    if mode.startswith("I;16") or (mode == "I" and scaled.size and scaled.max() > 255):
        scaled /= 257.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
