"""Reading an archive lazily (`open_archive`), checking it (`verify_archive`), and safe output names."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .manifest import ItemRecord, Manifest
from .quantize import Stored, get_format, load
from .writer import file_sha256


@dataclass
class ArchiveEntry:
    """One encoded image: its manifest record, and its latents (float32 [C, h, w]) read on first use."""

    record: ItemRecord
    _archive: "Archive"

    @property
    def key(self) -> str:
        return self.record.key

    @property
    def latents(self) -> np.ndarray:
        return self._archive.latents(self.record)


class Archive:
    """A latent archive opened for reading; iterate it for `ArchiveEntry` objects in encoding order.

    >>> with open_archive("out/kodak.latents") as archive:      # doctest: +SKIP
    ...     for entry in archive:
    ...         train_step(entry.latents, entry.record.extra)
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.manifest = Manifest(self.folder)
        self.meta = {k: _maybe_json(v) for k, v in self.manifest.meta().items()}
        self._handles: dict[str, Any] = {}
        # Archives of format version 1 stored q8-zstd codes without spatial prediction.
        self._unpredicted = str(self.meta.get("format_version")) == "1"

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()
        self.manifest.close()

    def __len__(self) -> int:
        return self.manifest.counts().get("ok", 0)

    def __iter__(self) -> Iterator[ArchiveEntry]:
        for record in self.manifest.items("ok"):
            yield ArchiveEntry(record, self)

    def __getitem__(self, key: str) -> ArchiveEntry:
        record = self.manifest.item(key)
        if record is None or record.status != "ok":
            raise KeyError(key)
        return ArchiveEntry(record, self)

    def failures(self) -> list[ItemRecord]:
        return list(self.manifest.items("failed"))

    def _shard(self, name: str):
        from safetensors import safe_open

        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), framework="numpy")
        return self._handles[name]

    def latents(self, record: ItemRecord) -> np.ndarray:
        shard = self._shard(record.shard)
        base = record.tensor[: -len("::data")]
        fmt = get_format(record.format)
        if self._unpredicted:
            fmt = replace(fmt, predictor="none")
        stored = Stored(shard.get_tensor(record.tensor))
        if fmt.quantized:
            stored.scale, stored.offset = shard.get_tensor(f"{base}::scale"), shard.get_tensor(f"{base}::offset")
        return load(stored, fmt, tuple(record.latent_shape))


def open_archive(path: str | os.PathLike) -> Archive:
    return Archive(path)


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def verify_archive(folder: str | os.PathLike) -> list[str]:
    """Every problem found: shard checksums and sizes, and every manifest item against its shard."""
    from safetensors import SafetensorError

    problems: list[str] = []
    with open_archive(folder) as archive:
        shards = {row["name"]: row for row in archive.manifest.shards()}
        for name, row in shards.items():
            path = archive.folder / name
            if not path.is_file():
                problems.append(f"{name}: missing")
            elif path.stat().st_size != row["bytes"]:
                problems.append(f"{name}: {path.stat().st_size} bytes, the manifest says {row['bytes']}")
            elif file_sha256(path) != row["sha256"]:
                problems.append(f"{name}: checksum mismatch (the file changed after it was written)")
        counts: dict[str, int] = {}
        for record in archive.manifest.items("ok"):
            counts[record.shard] = counts.get(record.shard, 0) + 1
            if record.shard not in shards or not (archive.folder / record.shard).is_file():
                problems.append(f"{record.key}: its shard {record.shard} is missing")
                continue
            try:
                latents = archive.latents(record)
            except (SafetensorError, KeyError, ValueError, OSError) as exc:
                problems.append(f"{record.key}: unreadable in {record.shard}: {exc}")
                continue
            if list(latents.shape) != record.latent_shape or not np.isfinite(latents).all():
                problems.append(f"{record.key}: latents do not match the manifest (shape or values)")
        for name, row in shards.items():
            if counts.get(name, 0) != row["items"]:
                problems.append(f"{name}: {counts.get(name, 0)} items listed, the shard row says {row['items']}")
    return problems


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_relative_path(key: str, suffix: str) -> Path:
    """A key as a relative output path that cannot leave the output folder (no absolute paths, no
    `..`, no odd characters), whatever a hostile manifest says."""
    parts = [_UNSAFE.sub("_", part) for part in re.split(r"[\\/]+", key)]
    parts = [part for part in parts if part not in ("", ".", "..")]
    parts = [part.lstrip(".") or "_" for part in parts] or ["_"]
    return Path(*parts).with_suffix(suffix) if Path(parts[-1]).suffix else Path(*parts[:-1], parts[-1] + suffix)
