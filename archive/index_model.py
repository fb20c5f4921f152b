"""The `vq` format's probability model: a VQ model's codebook and the frequencies of its indices, trained, saved and loaded.

An index is coded as one of three flags - the same as its left neighbour, the same as its upper one
(when that differs from the left), or a literal - and a literal as its codebook index. Both tables are
integer counts from training indices, Laplace smoothed and scaled to 2**PRECISION in integers only (as
the `entropy` format's, entropy_model.py), so every machine derives the same tables from the same file.
The codebook travels with the tables: indices mean nothing without it, and an archive of indices reads
back as latents with the model alone. The digest (SHA-256 of config, codebook and counts) is what an
archive records.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .entropy_model import CONFIG_FILE, TABLES_FILE, model_from, normalise, within_36_bits

KIND = "indices"
FLAGS = ("left", "up", "literal")  # the flag symbols, in their table's order
LEFT, UP, LITERAL = range(3)
MAX_CODEBOOK = 1 << 20  # codes; each needs one of the 2**PRECISION probability units and room to spare


@dataclass(frozen=True)
class IndexModelConfig:
    """What the tables belong to: the VQ model and its latent scaling, and how they were trained."""

    vae: str
    scaling_factor: float
    shift_factor: float
    codebook_size: int
    codebook_dim: int
    kind: str = KIND
    images: int = 0
    sources: tuple[str, ...] = ()

    def check(self) -> None:
        if self.kind != KIND:
            raise ValueError(f"index model kind {self.kind!r} is not {KIND!r}")
        if not (isinstance(self.codebook_size, int) and 2 <= self.codebook_size <= MAX_CODEBOOK):
            raise ValueError(f"index model codebook_size {self.codebook_size!r} is not 2..{MAX_CODEBOOK}")
        if not (isinstance(self.codebook_dim, int) and 1 <= self.codebook_dim <= 4096):
            raise ValueError(f"index model codebook_dim {self.codebook_dim!r} is not 1..4096")
        for name in ("scaling_factor", "shift_factor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value)) or (name == "scaling_factor" and value == 0):
                raise ValueError(f"index model {name} {value!r} is not a finite (non-zero) number")


@dataclass
class IndexModel:
    """codebook: float32 [K, D], the raw (unscaled) code vectors; counts: int64 [K], literals of each
    index in training; flags: int64 [3], how often each flag was coded."""

    config: IndexModelConfig
    codebook: np.ndarray
    counts: np.ndarray
    flags: np.ndarray
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.config.check()
        size, dim = self.config.codebook_size, self.config.codebook_dim
        self.codebook = np.ascontiguousarray(self.codebook, np.float32)
        self.counts = np.asarray(self.counts, np.int64).reshape(-1)
        self.flags = np.asarray(self.flags, np.int64).reshape(-1)
        if self.codebook.shape != (size, dim) or self.counts.shape != (size,) or self.flags.shape != (len(FLAGS),):
            raise ValueError(f"index model tables do not match a codebook of {size} codes of dimension {dim}")
        if not np.isfinite(self.codebook).all():
            raise ValueError("index model codebook holds values that are not finite")
        if (self.counts < 0).any() or (self.flags < 0).any() or self.counts.sum() + self.flags.sum() > 1 << 52:
            raise ValueError("index model counts must be non-negative and at most 2**52 in all")

    @property
    def digest(self) -> str:
        """SHA-256 of the config, the codebook and the counts (little-endian bytes), computed once."""
        if "digest" not in self._cache:
            digest = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
            for array, dtype in ((self.codebook, "<f4"), (self.counts, "<i8"), (self.flags, "<i8")):
                digest.update(np.ascontiguousarray(array, dtype).tobytes())
            self._cache["digest"] = digest.hexdigest()
        return self._cache["digest"]

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(flag weights [3], literal weights [K]): int64, each summing to 2**PRECISION, each at least 1."""
        if "tables" not in self._cache:
            self._cache["tables"] = (normalise(within_36_bits(self.flags + 1)), normalise(within_36_bits(self.counts + 1)))
        return self._cache["tables"]

    def save(self, folder: str | os.PathLike) -> Path:
        from safetensors.numpy import save_file

        from latentd.vae.fileio import follow_umask, write_atomic

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        temp = out / (TABLES_FILE + ".tmp")
        save_file({"codebook": self.codebook, "counts": self.counts, "flags": self.flags}, str(temp))
        follow_umask(temp)
        os.replace(temp, out / TABLES_FILE)
        config = {**asdict(self.config), "sources": list(self.config.sources), "digest": self.digest}
        write_atomic(out / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
        return out


def index_model_from(raw: dict, tables: dict[str, np.ndarray], where: str) -> IndexModel:
    """An IndexModel from a parsed config.json (without its digest) and its tables; ValueError naming `where`."""
    return model_from(IndexModelConfig, IndexModel, ("codebook", "counts", "flags"), raw, tables, where)


def flags_of(indices: np.ndarray) -> np.ndarray:
    """int8 [h, w]: each index's flag in raster order (LEFT where it equals its left neighbour, else UP
    where it equals its upper one, else LITERAL)."""
    flags = np.full(indices.shape, LITERAL, np.int8)
    flags[1:][indices[1:] == indices[:-1]] = UP
    flags[:, 1:][indices[:, 1:] == indices[:, :-1]] = LEFT
    return flags


class IndexTrainer:
    """Counts flags and literals over training indices [h, w]."""

    def __init__(self, codebook: np.ndarray) -> None:
        self.codebook = np.asarray(codebook, np.float32)
        self.counts = np.zeros(len(self.codebook), np.int64)
        self.flags = np.zeros(len(FLAGS), np.int64)

    def count(self, indices: np.ndarray) -> None:
        indices = np.asarray(indices)
        if indices.ndim != 2 or not np.issubdtype(indices.dtype, np.integer) or indices.size == 0:
            raise ValueError(f"indices of shape {list(indices.shape)} ({indices.dtype}), expected integers [h, w]")
        if indices.min() < 0 or indices.max() >= len(self.codebook):
            raise ValueError(f"indices outside the codebook [0, {len(self.codebook)})")
        flags = flags_of(indices)
        self.flags += np.bincount(flags.ravel(), minlength=len(FLAGS))
        self.counts += np.bincount(indices[flags == LITERAL].astype(np.int64), minlength=len(self.codebook))

    def model(self, config: IndexModelConfig) -> IndexModel:
        return IndexModel(config, self.codebook.copy(), self.counts.copy(), self.flags.copy())

