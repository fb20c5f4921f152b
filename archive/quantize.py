"""Latent storage formats: float16, bfloat16, q8 (8-bit per-channel affine), q8 predicted and zstd-packed, and entropy-coded."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from latentd.v1.tensors import _to_bfloat16_bits


@dataclass(frozen=True)
class LatentFormat:
    name: str
    bits: int  # per latent value, before zstd
    quantized: bool = False
    zstd: bool = False
    # Spatial prediction before zstd: "med" stores each code minus the LOCO-I median-edge prediction
    # from its left, upper and upper-left neighbours (mod 256). Lossless; on the default model's Kodak
    # latents it takes zstd from 0.425 to 0.347 bpp, because neighbouring latents are correlated and
    # zstd's byte matching does not see it.
    predictor: str = "none"
    # Quantised in uniform per-channel steps and ANS-coded with a trained model (entropy_coder.py);
    # `coder` (an EntropyCoder: the model and the step) is bound with `entropy_format`.
    entropy: bool = False
    coder: Any = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        """The format and, for entropy, its step: `entropy@0.5`."""
        return f"{self.name}@{self.coder.step:g}" if self.coder is not None else self.name


# The one table of storage formats.
FORMATS: tuple[LatentFormat, ...] = (
    LatentFormat("float16", 16),
    LatentFormat("bfloat16", 16),
    LatentFormat("q8", 8, quantized=True),
    LatentFormat("q8-zstd", 8, quantized=True, zstd=True, predictor="med"),
    LatentFormat("entropy", 0, entropy=True),  # bits: as many as the model needs
)
FORMAT_NAMES = tuple(f.name for f in FORMATS)
ZSTD_LEVEL = 19  # latents are small; the slowest levels still run far faster than the model


def get_format(name: str) -> LatentFormat:
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise ValueError(f"unknown latent format {name!r} (known: {', '.join(FORMAT_NAMES)})")


def entropy_format(coder: Any) -> LatentFormat:
    """The `entropy` format bound to an EntropyCoder (a model and a step)."""
    return replace(get_format("entropy"), coder=coder)


def _coder(fmt: LatentFormat) -> Any:
    if fmt.coder is None:
        raise ValueError("the entropy format needs its entropy model (entropy_format(EntropyCoder(model, step)))")
    return fmt.coder


@dataclass
class Stored:
    """A latent as stored: `data` (the tensor or zstd bytes as uint8) plus per-channel scale and offset."""

    data: np.ndarray
    scale: np.ndarray | None = None
    offset: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        extra = sum(a.nbytes for a in (self.scale, self.offset) if a is not None)
        return self.data.nbytes + extra


def quantize_q8(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[C, h, w] float -> (uint8 codes, per-channel scale, per-channel offset), x ~ codes * scale + offset.

    The error of each value is at most scale / 2 = (max - min) / 510 of its channel.
    """
    flat = latents.reshape(latents.shape[0], -1).astype(np.float32)
    low, high = flat.min(axis=1), flat.max(axis=1)
    scale = np.where(high > low, (high - low) / 255.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint((flat - low[:, None]) / scale[:, None]), 0, 255).astype(np.uint8)
    return codes.reshape(latents.shape), scale, low.astype(np.float32)


def dequantize_q8(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scale[:, None, None] + offset[:, None, None]


def _med_prediction(left: np.ndarray, up: np.ndarray, up_left: np.ndarray) -> np.ndarray:
    """LOCO-I / JPEG-LS median edge detector: min(left, up) above an edge, max below, else the gradient."""
    high, low = np.maximum(left, up), np.minimum(left, up)
    return np.where(up_left >= high, low, np.where(up_left <= low, high, left + up - up_left))


def med_residuals(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [C, h, w] -> uint8 residuals (code - MED prediction mod 256); outside the image
    the neighbours count as 0."""
    x = np.pad(codes.astype(np.int16), ((0, 0), (1, 0), (1, 0)))
    prediction = _med_prediction(x[:, 1:, :-1], x[:, :-1, 1:], x[:, :-1, :-1])
    return ((x[:, 1:, 1:] - prediction) % 256).astype(np.uint8)


def med_codes(residuals: np.ndarray) -> np.ndarray:
    """Inverse of `med_residuals`, one anti-diagonal at a time: every neighbour of a value on
    diagonal d lies on diagonal d-1 or d-2, so each step is one vectorized operation."""
    channels, height, width = residuals.shape
    x = np.zeros((channels, height + 1, width + 1), np.int16)
    for diagonal in range(height + width - 1):
        rows = np.arange(max(0, diagonal - width + 1), min(height, diagonal + 1))
        cols = diagonal - rows
        r, c = rows + 1, cols + 1  # in the padded array
        prediction = _med_prediction(x[:, r, c - 1], x[:, r - 1, c], x[:, r - 1, c - 1])
        x[:, r, c] = (residuals[:, rows, cols] + prediction) % 256
    return x[:, 1:, 1:].astype(np.uint8)


def store(latents: np.ndarray, fmt: LatentFormat) -> Stored:
    """Latents [C, h, w] in a storage format."""
    # C order: safetensors writes an array's memory as it lies, and channels_last latents are strided.
    latents = np.ascontiguousarray(latents, dtype=np.float32)
    if fmt.name == "float16":
        return Stored(latents.astype(np.float16))
    if fmt.name == "bfloat16":
        return Stored(_to_bfloat16_bits(latents.astype(np.float32)).view(np.uint16))
    if fmt.entropy:
        return Stored(np.frombuffer(_coder(fmt).encode(latents), np.uint8).copy())
    codes, scale, offset = quantize_q8(latents)
    if fmt.zstd:
        import zstandard

        payload = med_residuals(codes) if fmt.predictor == "med" else codes
        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(payload.tobytes())
        return Stored(np.frombuffer(packed, np.uint8).copy(), scale, offset)
    return Stored(codes, scale, offset)


def load(stored: Stored, fmt: LatentFormat, shape: tuple[int, ...]) -> np.ndarray:
    """Stored latents back to float32 [C, h, w]."""
    if fmt.name == "float16":
        return stored.data.astype(np.float32)
    if fmt.name == "bfloat16":
        return (stored.data.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if fmt.entropy:
        return _coder(fmt).decode(np.ascontiguousarray(stored.data, np.uint8).tobytes(), tuple(shape))
    codes = stored.data
    if fmt.zstd:
        import zstandard

        packed, expected = codes.tobytes(), int(np.prod(shape))
        if zstandard.frame_content_size(packed) not in (-1, expected):  # never allocate what a header claims
            raise ValueError(f"zstd frame holds {zstandard.frame_content_size(packed)} bytes, {expected} expected")
        raw = zstandard.ZstdDecompressor().decompress(packed, max_output_size=expected)
        codes = np.frombuffer(raw, np.uint8).reshape(shape)
        if fmt.predictor == "med":
            codes = med_codes(codes)
    return dequantize_q8(codes.reshape(shape), stored.scale, stored.offset)
