"""The entropy format's phases and linear predictors: which values are coded when, and from which decoded ones.

Phases of a channel: A (even row, even column), B (odd, odd), C (the rest). Features of a value, in this
order: its four diagonal neighbours (phase B) or four direct neighbours (phase C; none for A), then for
each earlier channel its value at the same place and the sum of that one's four direct neighbours. The
arrays hold what has been decoded so far and 0 elsewhere, the same in encoder and decoder, so a
prediction never depends on a value the decoder has not got; borders reflect (numpy's "reflect", which
keeps a position's phase) and fall back to zeros for sides shorter than 2.
"""

from __future__ import annotations

import numpy as np

PHASES = 3
WEIGHT_BITS = 12  # predictor weights are integers over 2**WEIGHT_BITS
MAX_WEIGHT = 8 << WEIGHT_BITS
DIAGONAL = ((-1, -1), (-1, 1), (1, -1), (1, 1))
DIRECT = ((-1, 0), (1, 0), (0, -1), (0, 1))


def features(channels: int) -> int:
    """Predictor weights per group: four own neighbours, two per earlier channel (padded with zeros)."""
    return 4 + 2 * (channels - 1)


# Each phase as the sub-grids (first row, first column; every second row and column) it is made of; a
# phase's values are its sub-grids' values, each in raster order, one after the other.
GRIDS = (((0, 0),), ((1, 1),), ((0, 1), (1, 0)))


def take(plane: np.ndarray, phase: int) -> np.ndarray:
    return np.concatenate([plane[row::2, col::2].ravel() for row, col in GRIDS[phase]])


def put(plane: np.ndarray, phase: int, values: np.ndarray) -> None:
    start = 0
    for row, col in GRIDS[phase]:
        target = plane[row::2, col::2]
        target[...] = values[start:start + target.size].reshape(target.shape)
        start += target.size


def size(phase: int, height: int, width: int) -> int:
    return sum(len(range(row, height, 2)) * len(range(col, width, 2)) for row, col in GRIDS[phase])


def _padded(plane: np.ndarray) -> np.ndarray:
    """`plane` with a border of one: numpy's "reflect" (which keeps every position's phase), zeros for
    sides shorter than 2."""
    height, width = plane.shape
    padded = np.zeros((height + 2, width + 2), plane.dtype)
    padded[1:-1, 1:-1] = plane
    if height >= 2 and width >= 2:
        padded[0], padded[-1] = padded[2], padded[-3]
        padded[:, 0], padded[:, -1] = padded[:, 2], padded[:, -3]
    return padded


def _shifted(padded: np.ndarray, phase: int, offsets) -> list[np.ndarray]:
    """The values at `offsets` from each position of `phase`, from a `_padded` plane."""
    height, width = padded.shape[0] - 2, padded.shape[1] - 2
    return [np.concatenate([padded[1 + row + dy:1 + height + dy:2, 1 + col + dx:1 + width + dx:2].ravel()
                            for row, col in GRIDS[phase]]) for dy, dx in offsets]


def _around(plane: np.ndarray) -> np.ndarray:
    """Each position's sum of its four direct neighbours."""
    padded = _padded(plane)
    return padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]


def feature_columns(work: np.ndarray, channel: int, phase: int, cache: dict | None = None) -> list[np.ndarray]:
    """The features (see the module docstring) of `phase`'s positions of `channel`, from `work`
    [C, h, w]; zeros where a group has none, so every group has `features(C)` columns. `cache` keeps
    the features of finished channels for the next groups of one coding pass."""
    cache = {} if cache is None else cache
    zero = np.zeros(size(phase, *work.shape[1:]), work.dtype)
    own = [zero] * 4 if phase == 0 else _shifted(_padded(work[channel]), phase, DIAGONAL if phase == 1 else DIRECT)
    others = []
    for earlier in range(work.shape[0] - 1):
        if earlier < channel:
            if earlier not in cache:
                cache[earlier] = _around(work[earlier])
            if (earlier, phase) not in cache:
                cache[earlier, phase] = [take(work[earlier], phase), take(cache[earlier], phase)]
            others += cache[earlier, phase]
        else:
            others += [zero, zero]
    return own + others


def predict(work: np.ndarray, channel: int, phase: int, weights: np.ndarray, limit: int,
            cache: dict | None = None) -> np.ndarray:
    """int64 predictions of `phase`'s symbols: round(sum(weights * features) / 2**WEIGHT_BITS), within
    +-limit; integers only, so every machine predicts the same."""
    total = np.zeros(size(phase, *work.shape[1:]), np.int64)
    if not weights.any():
        return total
    for weight, column in zip(weights.tolist(), feature_columns(work, channel, phase, cache)):
        if weight:
            total += weight * column
    return np.clip((total + (1 << (WEIGHT_BITS - 1))) >> WEIGHT_BITS, -limit, limit)
