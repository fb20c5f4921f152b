"""The `entropy` latent stream: latents quantised in uniform per-channel steps, predicted, and the residuals
ANS-coded with an EntropyModel's tables (group by group, context.py's order).

A stream is a fixed header, the escaped residuals as raw int32, then the coder's uint32 words:

    magic "LTE1", step (fine bins, uint16), 0 (uint16), model digest (8 bytes), channels, height, width,
    escapes, words, CRC-32 of the symbols (uint32 each; little-endian throughout)

Decoding refuses a stream whose header, length, symbol count or CRC disagree: a truncated or damaged
stream is an error, never a wrong latent.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from .context import PHASES, predict, put, size, take
from .entropy_model import CoarseTables, EntropyModel

MAGIC = b"LTE1"
HEADER = struct.Struct("<4sHH8s6I")
# Symbols and predictions stay within +-LIMIT, so residuals fit int32; a latent further from its mean
# (2**30 steps) is clipped there.
LIMIT = (1 << 30) - 1


class EntropyStreamError(ValueError):
    """An entropy-coded stream that cannot be decoded as it claims."""


def checked_latents(latents: np.ndarray, channels: int, owner: str) -> np.ndarray:
    """`latents` as float32 [channels, h, w]; ValueError (`owner` [C, h, w]) for another shape or a value not finite."""
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 3 or latents.shape[0] != channels:
        raise ValueError(f"latents of shape {list(latents.shape)}, {owner} [{channels}, h, w]")
    if not np.isfinite(latents).all():
        raise ValueError("latents hold values that are not finite")
    return latents


@dataclass(frozen=True)
class EntropyCoder:
    """One model at one step; `encode` latents float32 [C, h, w] to stream bytes and `decode` them back."""

    model: EntropyModel
    step: float

    format_name = "entropy"

    @property
    def label(self) -> str:
        return f"entropy@{self.step:g}"

    @property
    def bins(self) -> int:
        return self.model.step_bins(self.step)

    def steps(self, bins: int) -> np.ndarray:
        """float32 [C]: each channel's step for a step of `bins` fine bins."""
        return (np.float32(bins) * self.model.unit / np.float32(self.model.config.fine)).astype(np.float32)

    def quantize(self, latents: np.ndarray) -> np.ndarray:
        """int32 [C, h, w] symbols: latents in steps from each channel's mean, rounded."""
        latents = checked_latents(latents, self.model.config.channels, "the entropy model codes")
        # float64: a float32 latent divided by a small step can overflow float32 (then it is clipped).
        steps = self.steps(self.bins).astype(np.float64)[:, None, None]
        scaled = np.rint((latents - self.model.mean[:, None, None].astype(np.float64)) / steps)
        return np.clip(scaled, -LIMIT, LIMIT).astype(np.int32)

    def dequantize(self, symbols: np.ndarray, bins: int) -> np.ndarray:
        steps = self.steps(bins)[:, None, None]
        return (symbols.astype(np.float32) * steps + self.model.mean[:, None, None]).astype(np.float32)

    def encode(self, latents: np.ndarray) -> bytes:
        return encode_symbols(self.quantize(latents), self.model, self.bins)

    def decode(self, stream: bytes, shape: tuple[int, ...]) -> np.ndarray:
        symbols, bins = decode_symbols(stream, self.model, shape)
        return self.dequantize(symbols, bins)


def _alphabet(tables: CoarseTables, group: int, residuals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coder indices, escaped) of one group's residuals: the escape is the last index."""
    size = len(tables.weights[group])
    index = residuals - tables.low[group]
    escaped = (index < 0) | (index >= size - 1)
    return np.where(escaped, size - 1, index).astype(np.int32), escaped


def _groups(shape: tuple[int, ...]):
    """(group, channel, phase, count) in coding order: channel by channel, phases A, B, C."""
    channels, height, width = shape
    for channel in range(channels):
        for phase in range(PHASES):
            yield channel * PHASES + phase, channel, phase, size(phase, height, width)


def encode_symbols(symbols: np.ndarray, model: EntropyModel, bins: int) -> bytes:
    import constriction

    tables = model.tables(bins)
    channels, height, width = symbols.shape
    work = np.zeros(symbols.shape, np.int64)  # what the decoder will have decoded, 0 elsewhere
    coded, escapes, cache = [], [], {}
    for group, channel, phase, count in _groups(symbols.shape):
        values = take(symbols[channel], phase).astype(np.int64)
        residuals = values - predict(work, channel, phase, model.weights[group], LIMIT, cache)
        put(work[channel], phase, values)
        index, escaped = _alphabet(tables, group, residuals)
        coded.append((group, index))
        escapes.append(residuals[escaped])
    coder = constriction.stream.stack.AnsCoder()
    for group, index in reversed(coded):  # a stack: the last group goes in first, decoding starts with the first
        coder.encode_reverse(index, constriction.stream.model.Categorical(tables.probabilities(group), perfect=False))
    words = np.asarray(coder.get_compressed(), "<u4")
    escaped = np.concatenate(escapes).astype("<i4")
    crc = zlib.crc32(np.ascontiguousarray(symbols, "<i4").tobytes())
    header = HEADER.pack(MAGIC, bins, 0, bytes.fromhex(model.digest[:16]), channels, height, width,
                         len(escaped), len(words), crc)
    return header + escaped.tobytes() + words.tobytes()


def stream_header(stream: bytes) -> dict[str, object]:
    """The header fields of a stream (for `inspect`); EntropyStreamError if it has none."""
    if len(stream) < HEADER.size:
        raise EntropyStreamError(f"entropy stream of {len(stream)} bytes ends inside its {HEADER.size}-byte header")
    magic, bins, _, digest, channels, height, width, escapes, words, crc = HEADER.unpack_from(stream)
    if magic != MAGIC:
        raise EntropyStreamError(f"not an entropy stream (starts {magic!r}, expected {MAGIC!r})")
    return {"bins": bins, "model": digest.hex(), "shape": [channels, height, width], "escapes": escapes,
            "words": words, "crc32": crc}


def decode_symbols(stream: bytes, model: EntropyModel, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """(int32 symbols of `shape`, step in fine bins); EntropyStreamError for any disagreement."""
    import constriction

    head = stream_header(stream)
    if head["model"] != model.digest[:16]:
        raise EntropyStreamError(f"written by entropy model {head['model']}, this one is {model.digest[:16]} "
                                 "(pass the entropy model that wrote the archive)")
    if len(shape) != 3 or shape[0] != model.config.channels:
        raise EntropyStreamError(f"latents of shape {list(shape)}, the entropy model codes "
                                 f"[{model.config.channels}, h, w]")
    if list(shape) != head["shape"]:
        raise EntropyStreamError(f"stream holds latents of shape {head['shape']}, {list(shape)} expected")
    bins, escapes, words = int(head["bins"]), int(head["escapes"]), int(head["words"])
    count = int(np.prod(shape))
    if bins < 1 or escapes > count:
        raise EntropyStreamError(f"stream header is damaged (step {bins} bins, {escapes} escapes of {count})")
    expected = HEADER.size + 4 * escapes + 4 * words
    if len(stream) != expected:
        kind = "ends early" if len(stream) < expected else "runs on"
        raise EntropyStreamError(f"stream {kind}: {len(stream)} bytes, its header says {expected}")
    escaped = np.frombuffer(stream, "<i4", escapes, HEADER.size)
    compressed = np.frombuffer(stream, "<u4", words, HEADER.size + 4 * escapes).astype(np.uint32)
    tables = model.tables(bins)
    work = np.zeros(shape, np.int64)
    used, cache = 0, {}
    try:
        coder = constriction.stream.stack.AnsCoder(compressed)
        for group, channel, phase, count in _groups(tuple(shape)):
            family = constriction.stream.model.Categorical(tables.probabilities(group), perfect=False)
            index = np.asarray(coder.decode(family, count), np.int64)
            escape = index == len(tables.weights[group]) - 1
            needed = int(escape.sum())
            if used + needed > escapes:
                raise EntropyStreamError(f"stream decodes to more than its {escapes} escaped symbols")
            residuals = index + tables.low[group]
            residuals[escape] = escaped[used:used + needed]
            used += needed
            values = predict(work, channel, phase, model.weights[group], LIMIT, cache) + residuals
            if np.abs(values).max(initial=0) > LIMIT:
                raise EntropyStreamError("stream decodes to symbols out of range (damaged)")
            put(work[channel], phase, values)
        leftover = not coder.is_empty()
    except EntropyStreamError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the coder raises on bad words is a damaged stream
        raise EntropyStreamError(f"stream is damaged ({exc})") from None
    if leftover or used != escapes:
        raise EntropyStreamError("stream decodes to the wrong symbol count (damaged or truncated)")
    result = work.astype(np.int32)
    if zlib.crc32(np.ascontiguousarray(result, "<i4").tobytes()) != head["crc32"]:
        raise EntropyStreamError("stream decodes to symbols whose CRC-32 differs from its header's (damaged)")
    return result, bins
