"""The `vq` latent stream: latents snapped to their nearest codebook vectors, and the indices ANS-coded with an
IndexModel's tables (one flag per position, then the literals).

A stream is a fixed header, then the coder's uint32 words:

    magic "LTV1", 0 (uint32), model digest (8 bytes), height, width, literals, words, CRC-32 of the
    indices (uint32 each; little-endian throughout)

Decoding refuses a stream whose header, length, flags, literal count or CRC disagree: a truncated or
damaged stream is an error, never a wrong latent.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from .entropy_coder import EntropyStreamError, checked_latents
from .entropy_model import PRECISION
from .index_model import LEFT, LITERAL, UP, IndexModel, flags_of

MAGIC = b"LTV1"
HEADER = struct.Struct("<4sI8s5I")
NEAREST_CHUNK = 1 << 20  # distances computed at once (float32: 4 MiB), whatever the codebook's size


@dataclass(frozen=True)
class IndexCoder:
    """One index model; `encode` latents float32 [D, h, w] (diffusers-scaled) to stream bytes, `decode` them
    back to their codebook vectors, `decode_indices` to the indices."""

    model: IndexModel

    format_name = "vq"
    label = "vq"

    def raw(self, latents: np.ndarray) -> np.ndarray:
        """Diffusers-scaled latents -> the quantiser's input (latents / scaling + shift), float64 [D, h, w]."""
        config = self.model.config
        return np.asarray(latents, np.float64) / config.scaling_factor + config.shift_factor

    def nearest(self, latents: np.ndarray) -> np.ndarray:
        """int32 [h, w]: the index of the codebook vector nearest each position's latent (Euclidean, as
        diffusers' VectorQuantizer; in float64, ties to the lowest index)."""
        dim = self.model.config.codebook_dim
        latents = checked_latents(latents, dim, "the codebook's vectors are")
        return nearest_codes(self.raw(latents).reshape(dim, -1).T, self.model.codebook).reshape(latents.shape[1:])

    def vectors(self, indices: np.ndarray) -> np.ndarray:
        """Indices [h, w] -> their codebook vectors as diffusers-scaled latents, float32 [D, h, w]."""
        config = self.model.config
        raw = self.model.codebook[indices].transpose(2, 0, 1).astype(np.float64)
        return ((raw - config.shift_factor) * config.scaling_factor).astype(np.float32)

    def encode(self, latents: np.ndarray) -> bytes:
        return encode_indices(self.nearest(latents), self.model)

    def decode(self, stream: bytes, shape: tuple[int, ...]) -> np.ndarray:
        if len(shape) != 3 or shape[0] != self.model.config.codebook_dim:
            raise EntropyStreamError(f"latents of shape {list(shape)}, the codebook's vectors are "
                                     f"[{self.model.config.codebook_dim}, h, w]")
        return self.vectors(decode_indices(stream, self.model, tuple(shape[1:])))


def nearest_codes(vectors: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """int32 [n]: for each of `vectors` [n, D] the index of the nearest row of `codebook` [K, D] in float64.

    |v - e|^2 = |v|^2 - 2 v.e + |e|^2, and |v|^2 is the same for every code of a vector. The distances run
    in float32 (BLAS, four times float64's speed); a vector whose runner-up is within float32's rounding
    of its best is settled again in float64 among those close codes, so the answer is float64's."""
    codebook64 = np.asarray(codebook, np.float64)
    scaled32 = (-2.0 * codebook64).astype(np.float32).T  # exact: a power of two
    norms32 = (codebook64 ** 2).sum(axis=1).astype(np.float32)
    reach = float(np.sqrt(norms32.max(initial=0.0)))
    chunk = max(1, NEAREST_CHUNK // len(codebook64))
    out = np.empty(len(vectors), np.int32)
    for start in range(0, len(vectors), chunk):
        part = np.asarray(vectors[start:start + chunk], np.float64)
        distances = part.astype(np.float32) @ scaled32
        distances += norms32
        best = np.argmin(distances, axis=1)
        low = distances[np.arange(len(part)), best]
        # float32 rounding of |e|^2 - 2 v.e is at most a few ulps of its largest term
        tolerance = 16 * np.finfo(np.float32).eps * (reach ** 2 + 2 * reach * np.linalg.norm(part, axis=1) + 1)
        distances[np.arange(len(part)), best] = np.inf
        runner_up = distances.min(axis=1)
        distances[np.arange(len(part)), best] = low
        for row in np.nonzero(runner_up <= low + tolerance)[0]:
            candidates = np.nonzero(distances[row] <= low[row] + tolerance[row])[0]
            exact = ((codebook64[candidates] - part[row]) ** 2).sum(axis=1)
            best[row] = candidates[np.argmin(exact)]
        out[start:start + chunk] = best
    return out


def _categorical(weights: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(weights.astype(np.float64) / float(1 << PRECISION), perfect=False)


def encode_indices(indices: np.ndarray, model: IndexModel) -> bytes:
    """Indices [h, w] in [0, codebook_size) -> stream bytes."""
    import constriction

    indices = np.asarray(indices)
    if indices.ndim != 2 or indices.size == 0 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices of shape {list(indices.shape)} ({indices.dtype}), expected integers [h, w]")
    if indices.min() < 0 or indices.max() >= model.config.codebook_size:
        raise ValueError(f"indices outside the codebook [0, {model.config.codebook_size})")
    flag_weights, literal_weights = model.tables()
    flags = flags_of(indices)
    literals = indices[flags == LITERAL].astype(np.int32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(literals, _categorical(literal_weights))  # a stack: what is decoded last goes in first
    coder.encode_reverse(flags.ravel().astype(np.int32), _categorical(flag_weights))
    words = np.asarray(coder.get_compressed(), "<u4")
    crc = zlib.crc32(np.ascontiguousarray(indices, "<i4").tobytes())
    height, width = indices.shape
    return HEADER.pack(MAGIC, 0, bytes.fromhex(model.digest[:16]), height, width, len(literals), len(words),
                       crc) + words.tobytes()


def stream_header(stream: bytes) -> dict[str, object]:
    """The header fields of a stream (for `inspect`); EntropyStreamError if it has none."""
    if len(stream) < HEADER.size:
        raise EntropyStreamError(f"vq stream of {len(stream)} bytes ends inside its {HEADER.size}-byte header")
    magic, _, digest, height, width, literals, words, crc = HEADER.unpack_from(stream)
    if magic != MAGIC:
        raise EntropyStreamError(f"not a vq stream (starts {magic!r}, expected {MAGIC!r})")
    return {"model": digest.hex(), "shape": [height, width], "literals": literals, "words": words, "crc32": crc}


def decode_indices(stream: bytes, model: IndexModel, shape: tuple[int, int]) -> np.ndarray:
    """int32 indices of `shape` [h, w]; EntropyStreamError for any disagreement."""
    import constriction

    head = stream_header(stream)
    if head["model"] != model.digest[:16]:
        raise EntropyStreamError(f"written by index model {head['model']}, this one is {model.digest[:16]} "
                                 "(pass the entropy model that wrote the archive)")
    if list(shape) != head["shape"]:
        raise EntropyStreamError(f"stream holds indices of shape {head['shape']}, {list(shape)} expected")
    height, width = shape
    literals, words = int(head["literals"]), int(head["words"])
    if literals > height * width:
        raise EntropyStreamError(f"stream header is damaged ({literals} literals of {height * width})")
    if len(stream) != HEADER.size + 4 * words:
        kind = "ends early" if len(stream) < HEADER.size + 4 * words else "runs on"
        raise EntropyStreamError(f"stream {kind}: {len(stream)} bytes, its header says {HEADER.size + 4 * words}")
    flag_weights, literal_weights = model.tables()
    try:
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(stream, "<u4", words, HEADER.size).astype(np.uint32))
        flags = np.asarray(coder.decode(_categorical(flag_weights), height * width), np.int8).reshape(shape)
        if int((flags == LITERAL).sum()) != literals:
            raise EntropyStreamError(f"stream decodes to {int((flags == LITERAL).sum())} literals, its header says "
                                     f"{literals} (damaged)")
        values = np.asarray(coder.decode(_categorical(literal_weights), literals), np.int32)
        leftover = not coder.is_empty()
    except EntropyStreamError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the coder raises on bad words is a damaged stream
        raise EntropyStreamError(f"stream is damaged ({exc})") from None
    if leftover:
        raise EntropyStreamError("stream decodes to the wrong symbol count (damaged or truncated)")
    indices = _rebuild(flags, values)
    if zlib.crc32(np.ascontiguousarray(indices, "<i4").tobytes()) != head["crc32"]:
        raise EntropyStreamError("stream decodes to indices whose CRC-32 differs from its header's (damaged)")
    return indices


def _rebuild(flags: np.ndarray, literals: np.ndarray) -> np.ndarray:
    """Indices from their flags and literals, a row at a time: a row's UP and LITERAL positions are known
    from the row above and the literals, and each LEFT run copies the position before it."""
    if (flags[:, 0] == LEFT).any() or (flags[0] == UP).any():
        raise EntropyStreamError("stream decodes to a flag with no neighbour to copy (damaged)")
    height, width = flags.shape
    indices = np.empty(flags.shape, np.int32)
    literal_rows = np.cumsum((flags == LITERAL).sum(axis=1))
    columns = np.arange(width)
    for row in range(height):
        line, start = flags[row], literal_rows[row - 1] if row else 0
        known = line != LEFT
        values = np.empty(width, np.int32)
        values[line == LITERAL] = literals[start:literal_rows[row]]
        if row:
            values[line == UP] = indices[row - 1][line == UP]
        source = np.maximum.accumulate(np.where(known, columns, 0))  # the last known position at or before
        indices[row] = values[source]
    return indices

