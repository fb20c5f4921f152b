"""The `entropy` format's probability model: per-channel integer histograms of latents, trained, saved and loaded.

Each channel has a step unit: the decoder's image error grows with a channel's quantisation noise at
its own rate (`sensitivity`), so at equal rate the error is least with steps in proportion to
1 / sqrt(sensitivity) (high-rate theory); the unit is that, scaled to the channels' standard deviations
(without a measured sensitivity, the standard deviation itself).

Each channel is coded in three phases (context.py): A (even row, even column), B (odd, odd), C (the
rest). A value is predicted from values already decoded - B from its four diagonal A neighbours, C from
its four direct neighbours, all phases from the earlier channels at the same place - by a linear
predictor with integer weights (least squares on the training latents), and its residual is coded. The
model holds a fine histogram of residuals per channel and phase (a group; FINE bins per unit, integer
counts). A step of S units is k = round(S * FINE) fine bins for every channel; each group's coarse
table sums fine counts, Laplace smooths and scales to 2**PRECISION in integer arithmetic only, so every
machine derives the same tables from the same file; its digest (SHA-256 of config and tables) is what
an archive records. Trained without context, the weights are zero: a factorized model per channel.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

FINE = 64  # fine histogram bins per step unit
SPAN = 32  # the fine histogram covers mean +- SPAN units; values beyond it are counted as escapes
UNIT_RANGE = 8.0  # a channel's unit stays within its standard deviation times or over this
PRECISION = 24  # bits of the coder's fixed-point probabilities (constriction's ANS coder)
MARGIN = 2  # coarse symbols kept beyond the outermost ones seen in training, before escaping
DEFAULT_STEP = 0.09375  # quantisation step in units, 6 fine bins (docs/compression.md: the RD curve)
CONFIG_FILE = "config.json"
TABLES_FILE = "tables.safetensors"
KIND = "phases"


@dataclass(frozen=True)
class EntropyModelConfig:
    """What the tables belong to: the VAE and its latent scaling, and how they were trained."""

    vae: str
    scaling_factor: float
    shift_factor: float
    channels: int
    fine: int = FINE
    span: int = SPAN
    default_step: float = DEFAULT_STEP
    kind: str = KIND
    context: bool = True  # predict from decoded neighbours and channels; False: zero weights (factorized)
    images: int = 0
    sources: tuple[str, ...] = ()

    def check(self) -> None:
        if self.kind != KIND:
            raise ValueError(f"entropy model kind {self.kind!r} is not {KIND!r}")
        if not (isinstance(self.channels, int) and 0 < self.channels <= 4096):
            raise ValueError(f"entropy model channels {self.channels!r} is not 1..4096")
        if not (isinstance(self.fine, int) and 1 <= self.fine <= 1024 and isinstance(self.span, int)
                and 1 <= self.span <= 1024):
            raise ValueError("entropy model fine and span must be integers in 1..1024")
        if not (isinstance(self.default_step, (int, float)) and self.default_step > 0):
            raise ValueError(f"entropy model default_step {self.default_step!r} is not positive")


@dataclass
class EntropyModel:
    """mean, std: float32 [C] of the training latents; unit: float32 [C], each channel's step unit;
    weights: int64 [3C, features(C)], each group's predictor in 1/2**WEIGHT_BITS (context.py);
    counts: int64 [3C, 2 * span * fine + 1], fine bin i (from -span * fine) counting residuals within
    half a bin of i * unit / fine; outside: int64 [3C], residuals beyond the histogram."""

    config: EntropyModelConfig
    mean: np.ndarray
    std: np.ndarray
    unit: np.ndarray
    weights: np.ndarray
    counts: np.ndarray
    outside: np.ndarray
    _tables: dict[int, "CoarseTables"] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.config.check()
        from .context import MAX_WEIGHT, PHASES, features

        c, bins = self.config.channels, 2 * self.config.span * self.config.fine + 1
        groups = c * PHASES
        self.mean = np.asarray(self.mean, np.float32).reshape(-1)
        self.std = np.asarray(self.std, np.float32).reshape(-1)
        self.unit = np.asarray(self.unit, np.float32).reshape(-1)
        self.weights = np.asarray(self.weights, np.int64)
        self.counts = np.asarray(self.counts, np.int64)
        self.outside = np.asarray(self.outside, np.int64).reshape(-1)
        if self.mean.shape != (c,) or self.std.shape != (c,) or self.unit.shape != (c,) \
                or self.outside.shape != (groups,) or self.counts.shape != (groups, bins) \
                or self.weights.shape != (groups, features(c)):
            raise ValueError(f"entropy model tables do not match {c} channels of {bins} bins")
        if np.abs(self.weights).max(initial=0) > MAX_WEIGHT:
            raise ValueError(f"entropy model weights must be within +-{MAX_WEIGHT}")
        if not (np.isfinite(self.mean).all() and np.isfinite(self.std).all() and (self.std > 0).all()
                and np.isfinite(self.unit).all() and (self.unit > 0).all()):
            raise ValueError("entropy model mean, std and unit must be finite, std and unit positive")
        if (self.counts < 0).any() or (self.outside < 0).any() or self.counts.sum() + self.outside.sum() > 1 << 52:
            raise ValueError("entropy model counts must be non-negative and at most 2**52 in all")

    @property
    def digest(self) -> str:
        """SHA-256 of the config and the tables (little-endian bytes): which model wrote a stream. The
        tables are not changed after construction, so it is computed once."""
        if "digest" in self._tables:
            return self._tables["digest"]
        digest = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
        for array, dtype in ((self.mean, "<f4"), (self.std, "<f4"), (self.unit, "<f4"), (self.weights, "<i8"),
                             (self.counts, "<i8"), (self.outside, "<i8")):
            digest.update(np.ascontiguousarray(array, dtype).tobytes())
        self._tables["digest"] = digest.hexdigest()
        return self._tables["digest"]

    def step_bins(self, step: float) -> int:
        """A step in units as a whole number of fine bins (at least one)."""
        if not (isinstance(step, (int, float)) and np.isfinite(step) and step > 0):
            raise ValueError(f"entropy step {step!r} is not a positive number")
        bins = int(round(step * self.config.fine))
        if not 1 <= bins <= 65535:
            raise ValueError(f"entropy step {step:g} is {bins} bins of 1/{self.config.fine} unit, not 1..65535")
        return bins

    def tables(self, bins: int) -> "CoarseTables":
        if bins not in self._tables:
            self._tables[bins] = coarse_tables(self, bins)
        return self._tables[bins]

    def save(self, folder: str | os.PathLike) -> Path:
        from safetensors.numpy import save_file

        from latentd.vae.fileio import follow_umask, write_atomic

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        temp = out / (TABLES_FILE + ".tmp")
        save_file({"mean": self.mean, "std": self.std, "unit": self.unit, "weights": self.weights,
                   "counts": self.counts, "outside": self.outside}, str(temp))
        follow_umask(temp)
        os.replace(temp, out / TABLES_FILE)
        config = {**asdict(self.config), "sources": list(self.config.sources), "digest": self.digest}
        write_atomic(out / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
        return out


def read_model_folder(folder: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json without its digest, tables) of a trained coding model's folder; ValueError naming what is wrong."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(folder)
    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
        tables = load_file(str(path / TABLES_FILE))
    except FileNotFoundError as exc:
        raise ValueError(f"{path}: not an entropy model ({exc.filename} missing)") from None
    except (OSError, ValueError, SafetensorError) as exc:
        raise ValueError(f"{path}: unreadable entropy model ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path / CONFIG_FILE}: not a JSON object")
    raw.pop("digest", None)
    return raw, tables


def model_from(config_type: type, model_type: type, names: tuple[str, ...], raw: dict,
               tables: dict[str, np.ndarray], where: str):
    """A coding model (`model_type(config, **tables)`) from a parsed config.json without its digest and the
    tables `names`; ValueError naming `where` and what is wrong."""
    known = set(config_type.__dataclass_fields__)
    if unknown := sorted(set(raw) - known):
        raise ValueError(f"{where}: unknown fields {', '.join(unknown)}")
    try:
        config = config_type(**{**raw, "sources": tuple(raw.get("sources", ()))})
        return model_type(config, **{name: tables[name] for name in names})
    except (TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"{where}: not a usable entropy model ({exc})") from None


def entropy_model_from(raw: dict, tables: dict[str, np.ndarray], where: str) -> EntropyModel:
    """An EntropyModel from a parsed config.json (without its digest) and its tables; ValueError naming `where`."""
    return model_from(EntropyModelConfig, EntropyModel, ("mean", "std", "unit", "weights", "counts", "outside"),
                      raw, tables, where)


def load_entropy_model(folder: str | os.PathLike) -> EntropyModel:
    """An entropy model folder of the `entropy` format (config.json + tables.safetensors); ValueError naming
    what is wrong (coding.load_coding_model reads either format's)."""
    raw, tables = read_model_folder(folder)
    return entropy_model_from(raw, tables, str(folder))


def packaged_entropy_model(vae: str) -> Path | None:
    """The entropy model shipped next to a packaged VAE (`weights/<name>/entropy/`), if any."""
    from latentd.vae.registry import get_spec, is_registered

    if not is_registered(vae):
        return None
    weights = get_spec(vae).packaged_path()
    folder = weights / "entropy" if weights else None
    return folder if folder and (folder / CONFIG_FILE).is_file() else None


@dataclass(frozen=True)
class CoarseTables:
    """Per group (channel * 3 + phase): the lowest coarse residual `low[g]`, and `weights[g]` (int64) of
    the residuals low..low + n - 2 then the escape, summing to 2**PRECISION, each at least 1."""

    bins: int
    low: tuple[int, ...]
    weights: tuple[np.ndarray, ...]

    def probabilities(self, group: int) -> np.ndarray:
        """Exact float64 (integers over a power of two) for the coder."""
        return self.weights[group].astype(np.float64) / float(1 << PRECISION)


def coarse_index(fine_index: np.ndarray, bins: int) -> np.ndarray:
    """The coarse symbol a fine bin falls in: round(i / bins), halves up, in integers."""
    return np.floor_divide(2 * fine_index + bins, 2 * bins)


def normalise(weights: np.ndarray, total: int = 1 << PRECISION) -> np.ndarray:
    """Positive integer weights scaled to sum to `total` exactly, each at least 1, integers only."""
    weights = np.asarray(weights, np.int64)
    n, whole = len(weights), int(weights.sum())
    if n > total // 2:
        raise ValueError(f"{n} symbols do not fit {total} probability units")
    scaled = 1 + (weights * (total - n)) // whole  # callers keep weights below 2**36, so no int64 overflow
    scaled[int(np.argmax(weights))] += total - int(scaled.sum())
    return scaled


def within_36_bits(counts: np.ndarray) -> np.ndarray:
    """Positive counts shifted down until their sum fits 36 bits (each kept at least 1), so that `normalise`
    multiplies far inside int64."""
    shift = max(0, int(counts.sum()).bit_length() - 36)
    return np.maximum(counts >> shift, 1)


def coarse_tables(model: EntropyModel, bins: int) -> CoarseTables:
    span = model.config.span * model.config.fine
    fine_index = np.arange(-span, span + 1, dtype=np.int64)
    coarse = coarse_index(fine_index, bins)
    lows, weights = [], []
    for group in range(len(model.counts)):
        counts = model.counts[group]
        seen = np.nonzero(counts)[0]
        first, last = (coarse[seen[0]], coarse[seen[-1]]) if len(seen) else (0, 0)
        low, high = max(first - MARGIN, coarse[0]), min(last + MARGIN, coarse[-1])
        summed = np.zeros(high - low + 1, np.int64)
        inside = (coarse >= low) & (coarse <= high)
        np.add.at(summed, coarse[inside] - low, counts[inside])
        beyond = int(counts[~inside].sum()) + int(model.outside[group])
        smoothed = np.append(summed, beyond) + 1  # Laplace: every symbol and the escape stay codable
        lows.append(int(low))
        weights.append(normalise(within_36_bits(smoothed)))
    return CoarseTables(bins, tuple(lows), tuple(weights))


def units(std: np.ndarray, sensitivity: np.ndarray | None) -> np.ndarray:
    """Step units in proportion to 1 / sqrt(sensitivity), with the geometric mean of the standard deviations
    (within UNIT_RANGE of each); the standard deviations without a sensitivity."""
    std = np.asarray(std, np.float64)
    if sensitivity is None:
        return std.astype(np.float32)
    sensitivity = np.asarray(sensitivity, np.float64)
    if sensitivity.shape != std.shape or not (np.isfinite(sensitivity).all() and (sensitivity > 0).all()):
        raise ValueError(f"sensitivity {sensitivity.tolist()} is not one positive number per channel")
    raw = 1 / np.sqrt(sensitivity)
    unit = raw * np.exp(np.log(std).mean() - np.log(raw).mean())
    return np.clip(unit, std / UNIT_RANGE, std * UNIT_RANGE).astype(np.float32)


class HistogramTrainer:
    """Trains on latents [C, h, w] (already diffusers-scaled) in passes: mean and std (`observe`), then
    the units (`settle`), the predictors' least squares (`fit`, with context) and their weights
    (`solve`), then the residual histograms (`count`)."""

    def __init__(self, channels: int, context: bool = True) -> None:
        from .context import PHASES, features

        self.channels, self.context = channels, context
        self._sum = np.zeros(channels, np.float64)
        self._squares = np.zeros(channels, np.float64)
        self._n = 0
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.unit: np.ndarray | None = None
        groups, width = channels * PHASES, features(channels)
        self._gram = np.zeros((groups, width, width))
        self._moment = np.zeros((groups, width))
        self.weights = np.zeros((groups, width), np.int64)
        self.counts = np.zeros((groups, 2 * SPAN * FINE + 1), np.int64)
        self.outside = np.zeros(groups, np.int64)

    def observe(self, latents: np.ndarray) -> None:
        flat = self._checked(latents).reshape(self.channels, -1).astype(np.float64)
        self._sum += flat.sum(axis=1)
        self._squares += (flat ** 2).sum(axis=1)
        self._n += flat.shape[1]

    def settle(self, sensitivity: np.ndarray | None = None) -> None:
        if not self._n:
            raise ValueError("no latents to train on")
        mean = self._sum / self._n
        self.mean = mean.astype(np.float32)
        self.std = np.sqrt(np.maximum(self._squares / self._n - mean ** 2, 1e-12)).astype(np.float32)
        self.unit = units(self.std, sensitivity)

    def _groups(self, latents: np.ndarray):
        """(group, feature matrix [n, F], targets [n]) of latents in units from the mean."""
        from .context import PHASES, feature_columns, size, take

        work = ((self._checked(latents) - self.mean[:, None, None]) / self.unit[:, None, None]).astype(np.float64)
        cache: dict = {}
        for channel in range(self.channels):
            for phase in range(PHASES):
                if size(phase, *work.shape[1:]):
                    yield (channel * PHASES + phase, np.stack(feature_columns(work, channel, phase, cache), axis=1),
                           take(work[channel], phase))

    def fit(self, latents: np.ndarray) -> None:
        if self.context:
            for group, matrix, target in self._groups(latents):
                self._gram[group] += matrix.T @ matrix
                self._moment[group] += matrix.T @ target

    def solve(self) -> None:
        from .context import MAX_WEIGHT, WEIGHT_BITS

        if self.context:
            for group in range(len(self.weights)):
                solution = np.linalg.lstsq(self._gram[group] + 1e-6 * np.eye(len(self._gram[group])),
                                           self._moment[group], rcond=None)[0]
                self.weights[group] = np.clip(np.rint(solution * (1 << WEIGHT_BITS)), -MAX_WEIGHT, MAX_WEIGHT)

    def count(self, latents: np.ndarray) -> None:
        from .context import WEIGHT_BITS

        for group, matrix, target in self._groups(latents):
            residual = target - matrix @ (self.weights[group] / float(1 << WEIGHT_BITS))
            index = np.rint(residual * FINE)
            inside = np.abs(index) <= SPAN * FINE
            self.counts[group] += np.bincount(index[inside].astype(np.int64) + SPAN * FINE,
                                              minlength=self.counts.shape[1])
            self.outside[group] += int((~inside).sum())

    def _checked(self, latents: np.ndarray) -> np.ndarray:
        latents = np.asarray(latents, np.float32)
        if latents.ndim != 3 or latents.shape[0] != self.channels:
            raise ValueError(f"latents of shape {latents.shape}, expected [{self.channels}, h, w]")
        if not np.isfinite(latents).all():
            raise ValueError("latents hold values that are not finite")
        return latents

    def model(self, config: EntropyModelConfig) -> EntropyModel:
        return EntropyModel(config, self.mean, self.std, self.unit, self.weights.copy(), self.counts.copy(),
                            self.outside.copy())


def train_model(latents: Iterable[np.ndarray], config: EntropyModelConfig,
                sensitivity: np.ndarray | None = None) -> EntropyModel:
    """Passes over a re-iterable collection of latents; `sensitivity` [C]: see `units`."""
    trainer = HistogramTrainer(config.channels, config.context)
    for array in latents:
        trainer.observe(array)
    trainer.settle(sensitivity)
    for array in latents:
        trainer.fit(array)
    trainer.solve()
    for array in latents:
        trainer.count(array)
    return trainer.model(config)
