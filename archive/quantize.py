"""Latent storage formats: float16, bfloat16, q8 (8-bit per-channel affine), q8 predicted and zstd-packed, entropy-coded,
and VQ codebook indices entropy-coded."""

from __future__ import annotations

import math
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
    # Coded by a trained model (coding.py), bound as `coder` with `entropy_format`: `entropy` quantises
    # in uniform per-channel steps and ANS-codes the residuals (an EntropyCoder: model and step), `vq`
    # snaps each position to its nearest codebook vector and ANS-codes the indices (an IndexCoder).
    entropy: bool = False
    coder: Any = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        """The format and, for entropy, its step: `entropy@0.5`."""
        return self.coder.label if self.coder is not None else self.name


# The one table of storage formats.
FORMATS: tuple[LatentFormat, ...] = (
    LatentFormat("float16", 16),
    LatentFormat("bfloat16", 16),
    LatentFormat("q8", 8, quantized=True),
    LatentFormat("q8-zstd", 8, quantized=True, zstd=True, predictor="med"),
    LatentFormat("entropy", 0, entropy=True),  # bits: as many as the model needs
    LatentFormat("vq", 0, entropy=True),  # VQ models only: their codebook indices
)
FORMAT_NAMES = tuple(f.name for f in FORMATS)
ZSTD_LEVEL = 19  # latents are small; the slowest levels still run far faster than the model


def get_format(name: str) -> LatentFormat:
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise ValueError(f"unknown latent format {name!r} (known: {', '.join(FORMAT_NAMES)})")


def entropy_format(coder: Any) -> LatentFormat:
    """The format a coder codes (`entropy` for an EntropyCoder, `vq` for an IndexCoder), bound to it."""
    return replace(get_format(coder.format_name), coder=coder)


def _coder(fmt: LatentFormat) -> Any:
    if fmt.coder is None:
        raise ValueError(f"the {fmt.name} format needs its entropy model (entropy_format(coding.coder_for(model)))")
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


def dequantize_q8(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray, out: np.ndarray | None = None
                  ) -> np.ndarray:
    """codes * scale + offset per channel, float32 [C, h, w]; into `out` when given (no temporary)."""
    out = np.empty(codes.shape, np.float32) if out is None else out
    np.multiply(codes, scale[:, None, None], out=out, casting="unsafe")
    out += offset[:, None, None]
    return out


def _med_prediction(left: np.ndarray, up: np.ndarray, up_left: np.ndarray) -> np.ndarray:
    """LOCO-I / JPEG-LS median edge detector: min(left, up) above an edge, max below, else the gradient;
    which is the gradient clipped to [min, max]."""
    return np.clip(left + up - up_left, np.minimum(left, up), np.maximum(left, up))


def med_residuals(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [C, h, w] -> uint8 residuals (code - MED prediction mod 256); outside the image
    the neighbours count as 0."""
    x = np.pad(codes.astype(np.int16), ((0, 0), (1, 0), (1, 0)))
    prediction = _med_prediction(x[:, 1:, :-1], x[:, :-1, 1:], x[:, :-1, :-1])
    return ((x[:, 1:, 1:] - prediction) % 256).astype(np.uint8)


def med_codes(residuals: np.ndarray) -> np.ndarray:
    """Inverse of `med_residuals`, one anti-diagonal at a time: every neighbour of a value on
    diagonal d lies on diagonal d-1 or d-2, so each step is one vectorized operation over all planes.

    The codes are held skewed, `skew[d + 2, i + 1, plane]` = code (i, d - i), so that a diagonal's
    values and their neighbours are contiguous slices rather than gathers; the rows and diagonals
    never written stay 0, the value of neighbours outside the image."""
    planes, height, width = residuals.shape
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    skewed = np.zeros((height + width - 1, height, planes), np.int16)
    skewed[rows + cols, rows] = residuals.transpose(1, 2, 0)
    codes = np.zeros((height + width + 1, height + 1, planes), np.int16)
    for diagonal in range(height + width - 1):
        low, high = max(0, diagonal - width + 1), min(height - 1, diagonal) + 1  # the rows it crosses
        left = codes[diagonal + 1, low + 1:high + 1]
        up, up_left = codes[diagonal + 1, low:high], codes[diagonal, low:high]
        prediction = _med_prediction(left, up, up_left)
        codes[diagonal + 2, low + 1:high + 1] = (skewed[diagonal, low:high] + prediction) & 255
    return codes[rows + cols + 2, rows + 1].transpose(2, 0, 1).astype(np.uint8)


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
    out = np.empty((1, *shape), np.float32)
    load_batch([unpack(stored, fmt, shape)], fmt, out)
    return out[0]


def unpack(stored: Stored, fmt: LatentFormat, shape: tuple[int, ...]) -> Stored:
    """The first, per-item stage of loading: zstd undone and sizes checked against `shape`, MED not yet;
    an entropy-coded stream decoded whole (its coder checks its length, count and checksum)."""
    expected = math.prod(shape)
    if fmt.entropy:
        return Stored(_coder(fmt).decode(np.ascontiguousarray(stored.data, np.uint8).tobytes(), tuple(shape)))
    if fmt.quantized and any(a is None or a.shape != (shape[0],) for a in (stored.scale, stored.offset)):
        raise ValueError(f"per-channel scale and offset must hold {shape[0]} values each")
    if not fmt.zstd:
        if stored.data.size != expected:
            raise ValueError(f"stored latents hold {stored.data.size} values, shape {list(shape)} needs {expected}")
        return stored
    import zstandard

    packed = stored.data.tobytes()
    if zstandard.frame_content_size(packed) not in (-1, expected):  # never allocate what a header claims
        raise ValueError(f"zstd frame holds {zstandard.frame_content_size(packed)} bytes, {expected} expected")
    raw = zstandard.ZstdDecompressor().decompress(packed, max_output_size=expected)
    if len(raw) != expected:
        raise ValueError(f"zstd frame holds {len(raw)} bytes, {expected} expected")
    return Stored(np.frombuffer(raw, np.uint8).reshape(shape), stored.scale, stored.offset)


def load_batch(unpacked: list[Stored], fmt: LatentFormat, out: np.ndarray) -> None:
    """Latents from `unpack` of one format and shape into `out` (float32 [n, C, h, w]).

    The MED inverse runs once over all n: its cost is per anti-diagonal step, not per value, so
    decoding a batch together costs about what one latent alone does."""
    if fmt.name == "float16" or fmt.entropy:
        for index, stored in enumerate(unpacked):
            out[index] = stored.data.reshape(out.shape[1:])
        return
    if fmt.name == "bfloat16":
        for index, stored in enumerate(unpacked):
            out[index] = (stored.data.astype(np.uint32) << 16).view(np.float32).reshape(out.shape[1:])
        return
    codes = np.stack([stored.data.reshape(out.shape[1:]) for stored in unpacked])
    if fmt.predictor == "med":
        codes = med_codes(codes.reshape(-1, *out.shape[2:])).reshape(codes.shape)
    for index, stored in enumerate(unpacked):
        dequantize_q8(codes[index], stored.scale, stored.offset, out=out[index])
