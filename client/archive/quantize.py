"""Latent storage formats: float16, bfloat16, and q8 (8-bit per-channel affine) with optional zstd on top."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..tensors import _to_bfloat16_bits


@dataclass(frozen=True)
class LatentFormat:
    name: str
    bits: int  # per latent value, before zstd
    quantized: bool = False
    zstd: bool = False


# The one table of storage formats.
FORMATS: tuple[LatentFormat, ...] = (
    LatentFormat("float16", 16),
    LatentFormat("bfloat16", 16),
    LatentFormat("q8", 8, quantized=True),
    LatentFormat("q8-zstd", 8, quantized=True, zstd=True),
)
FORMAT_NAMES = tuple(f.name for f in FORMATS)
ZSTD_LEVEL = 19  # latents are small; the slowest levels still run far faster than the model


def get_format(name: str) -> LatentFormat:
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise ValueError(f"unknown latent format {name!r} (known: {', '.join(FORMAT_NAMES)})")


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


def store(latents: np.ndarray, fmt: LatentFormat) -> Stored:
    """Latents [C, h, w] in a storage format."""
    # C order: safetensors writes an array's memory as it lies, and channels_last latents are strided.
    latents = np.ascontiguousarray(latents, dtype=np.float32)
    if fmt.name == "float16":
        return Stored(latents.astype(np.float16))
    if fmt.name == "bfloat16":
        return Stored(_to_bfloat16_bits(latents.astype(np.float32)).view(np.uint16))
    codes, scale, offset = quantize_q8(latents)
    if fmt.zstd:
        import zstandard

        packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(codes.tobytes())
        return Stored(np.frombuffer(packed, np.uint8).copy(), scale, offset)
    return Stored(codes, scale, offset)


def load(stored: Stored, fmt: LatentFormat, shape: tuple[int, ...]) -> np.ndarray:
    """Stored latents back to float32 [C, h, w]."""
    if fmt.name == "float16":
        return stored.data.astype(np.float32)
    if fmt.name == "bfloat16":
        return (stored.data.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    codes = stored.data
    if fmt.zstd:
        import zstandard

        raw = zstandard.ZstdDecompressor().decompress(codes.tobytes(), max_output_size=int(np.prod(shape)))
        codes = np.frombuffer(raw, np.uint8).reshape(shape)
    return dequantize_q8(codes.reshape(shape), stored.scale, stored.offset)
