"""Writing an archive: shards of safetensors filled in memory, renamed into place, then committed to the manifest.

Resume rule: an item is in the archive exactly when the manifest lists it. A shard file is renamed
into place before its transaction commits, so after a crash there may be a complete shard file that
the manifest does not know; it is removed on reopening and its items are encoded again. A shard is
written when it reaches its size or when its first item has waited `commit_s` seconds, so a crash
loses at most those seconds of work; `compact` merges the small shards this leaves, by the same rule
(new shard renamed into place, one transaction, old files removed last).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentd.vae.fileio import follow_umask

from .manifest import FORMAT_VERSION, MANIFEST, ItemRecord, Manifest
from .quantize import LatentFormat, store
from .storage import RemoteFolder, is_url, local_path, remove_staging, staging_folder

SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".safetensors"
COMMIT_S = 5.0  # seconds of encoded work held in memory at most; `latentd encode --commit-s`


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:06d}{SHARD_SUFFIX}"


def tensor_name(base: str, role: str, tag: str = "") -> str:
    """A stored tensor's name: `KEY::data` (`::scale`, `::offset` for q8) for an image's main latents,
    `KEY::data::TAG` for the others it has (another size, the flipped image, a log-variance; see
    variants.py). Names end in their role or tag, so no two keys' tensors can share a name."""
    return f"{base}::{role}::{tag}" if tag else f"{base}::{role}"


def shard_index(name: str) -> int | None:
    match = re.fullmatch(rf"{SHARD_PREFIX}(\d+){re.escape(SHARD_SUFFIX)}", name)
    return int(match.group(1)) if match else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_offsets(path: Path) -> dict[str, int]:
    """Byte offset of each tensor's data in a safetensors file (8-byte header size, JSON header, data)."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    return {name: 8 + size + entry["data_offsets"][0] for name, entry in header.items() if name != "__metadata__"}


@dataclass
class ArchiveSettings:
    """What every image of one archive shares; a resumed run must ask for the same."""

    format: str
    size_policy: str
    model: str
    scaling_factor: float
    shift_factor: float
    downsampling_factor: int
    sizes: tuple[int, ...] = ()  # `--sizes`: sides S of the size policy besides its own (center-crop, buckets)
    flip: bool = False  # latents of the horizontally flipped image too
    logvar: bool = False  # the posterior log-variance too
    entropy_model: str = ""  # format entropy: the digest of the entropy model that codes the latents
    entropy_step: float = 0.0  # format entropy: the quantisation step, in the entropy model's units
    # The model's per-channel statistics, when it scales by them (convention.py): decoding with a model
    # scaled otherwise converts through the raw latents.
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()

    def as_meta(self) -> dict[str, Any]:
        meta = {"format_version": FORMAT_VERSION, "format": self.format, "size_policy": self.size_policy,
                "model": self.model, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "downsampling_factor": self.downsampling_factor}
        # Only when asked for, so archives without them keep the settings older writers recorded.
        if self.sizes:
            meta["sizes"] = list(self.sizes)
        if self.flip:
            meta["flip"] = True
        if self.logvar:
            meta["logvar"] = True
        if self.entropy_model:
            meta["entropy_model"] = self.entropy_model
            meta["entropy_step"] = self.entropy_step
        if self.latents_mean:
            meta["latents_mean"], meta["latents_std"] = list(self.latents_mean), list(self.latents_std)
        return meta


class ArchiveMismatchError(ValueError):
    """Resuming an archive with different settings would mix incompatible latents."""


@dataclass
class _PendingShard:
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    records: list[ItemRecord] = field(default_factory=list)
    nbytes: int = 0
    started: float = 0.0  # time.monotonic() of the first record


class ArchiveWriter:
    def __init__(self, folder: str | os.PathLike, settings: ArchiveSettings, fmt: LatentFormat,
                 shard_bytes: int = 256 << 20, commit_s: float = COMMIT_S) -> None:
        # An fsspec URL: the manifest and each new shard live in a local staging folder and are mirrored
        # to the URL (storage.py); anything else is a local folder.
        self.remote = RemoteFolder(folder) if is_url(folder) else None
        if self.remote:
            self.folder = staging_folder()
            if self.remote.exists(MANIFEST):
                self.remote.download(MANIFEST, self.folder / MANIFEST)
        else:
            self.folder = local_path(folder)
            self.folder.mkdir(parents=True, exist_ok=True)
        self.settings, self.fmt, self.shard_bytes, self.commit_s = settings, fmt, shard_bytes, commit_s
        self.manifest = Manifest(self.folder, create=True)
        if self.remote:
            self.manifest.after_commit = self._upload_manifest
        self._check_settings()
        known = self.manifest.shard_names()
        if self.remote:
            for name in self.remote.names():
                if name.startswith(SHARD_PREFIX) and name not in known:  # as below
                    self.remote.remove(name)
        for path in self.folder.glob(f"{SHARD_PREFIX}*"):
            if path.name not in known:  # a temporary file, or a shard renamed just before a crash
                path.unlink()
        self.done = self.manifest.keys()
        self.hashes = self.manifest.hashes()
        self._next = max((i for i in map(shard_index, known) if i is not None), default=-1) + 1
        self._pending = _PendingShard()

    def _check_settings(self) -> None:
        wanted = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in self.settings.as_meta().items()}
        found = self.manifest.meta()
        if not found:
            self.manifest.set_meta(self.settings.as_meta())
            return
        optional = [k for k in ("sizes", "flip", "logvar", "entropy_model", "entropy_step", "latents_mean", "latents_std")
                    if k in found and k not in wanted]
        different = [k for k in [*wanted, *optional] if found.get(k) != wanted.get(k)]
        if different:
            detail = ", ".join(f"{k}: archive has {found.get(k)}, asked {wanted[k]}" for k in different)
            raise ArchiveMismatchError(f"{self.folder} was written with other settings ({detail}); "
                                       "use another output folder")

    def add(self, record: ItemRecord, latents: np.ndarray, extras: dict[str, np.ndarray] | None = None) -> None:
        """Queue one encoded image (`extras`: tag -> the other arrays its `variants` name, stored in the
        same format); the shard is written when it reaches its size or `commit_s`."""
        if record.key in self.done:  # keys are unique by construction (sources.py); never overwrite one
            raise ValueError(f"key {record.key!r} is already in the archive")
        name, nbytes, tensors = record.key, 0, {}
        for tag, array in [("", latents), *(extras or {}).items()]:  # all stored before any is queued
            stored = store(np.asarray(array, np.float32), self.fmt)
            tensors[tensor_name(name, "data", tag)] = stored.data
            if stored.scale is not None:
                tensors[tensor_name(name, "scale", tag)] = stored.scale
                tensors[tensor_name(name, "offset", tag)] = stored.offset
            nbytes += stored.nbytes
        self._pending.tensors.update(tensors)
        record.tensor = f"{name}::data"
        record.latent_shape = list(latents.shape)
        record.format = self.fmt.name
        record.nbytes = nbytes  # every array of the image
        record.bpp = nbytes * 8 / (record.width * record.height)
        record.model = self.settings.model
        record.scaling_factor, record.shift_factor = self.settings.scaling_factor, self.settings.shift_factor
        if not self._pending.records:
            self._pending.started = time.monotonic()
        self._pending.records.append(record)
        self._pending.nbytes += nbytes
        self.done.add(record.key)
        if record.sha256:
            self.hashes.setdefault(record.sha256, record.key)
        if self._pending.nbytes >= self.shard_bytes or time.monotonic() - self._pending.started >= self.commit_s:
            self.flush()

    def add_without_latents(self, record: ItemRecord) -> None:
        """A failure or a duplicate: committed at once (it needs no shard)."""
        if record.key in self.done:
            raise ValueError(f"key {record.key!r} is already in the archive")
        self.manifest.add([record])
        self.done.add(record.key)

    def flush(self) -> None:
        """Write the pending shard under a temporary name, rename it, then commit its items."""
        pending, self._pending = self._pending, _PendingShard()
        if not pending.records:
            return
        name, final = self._write_shard(pending.tensors)
        offsets = tensor_offsets(final)
        for record in pending.records:
            record.shard, record.offset = name, offsets[record.tensor]
        digest, size = file_sha256(final), final.stat().st_size
        self._publish(name, final)
        self.manifest.commit_shard(name, digest, size, pending.records)

    def _publish(self, name: str, final: Path) -> None:
        """A remote archive: the complete shard uploaded under its final name (before its commit), and
        the staging copy removed."""
        if self.remote:
            self.remote.upload(final, name)
            final.unlink()

    def _upload_manifest(self) -> None:
        self.remote.upload(self.folder / MANIFEST, MANIFEST)

    def _write_shard(self, tensors: dict[str, np.ndarray]) -> tuple[str, Path]:
        """The next shard file, complete and synced under its final name (not yet in the manifest)."""
        from safetensors.numpy import save_file

        name = shard_name(self._next)
        self._next += 1
        final = self.folder / name
        temp = final.with_name(final.name + ".tmp")
        save_file(tensors, str(temp), metadata={"format": self.fmt.name, "model": self.settings.model})
        follow_umask(temp)  # safetensors creates 0600
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, final)
        return name, final

    def compact(self) -> int:
        """Merge runs of consecutive shards under half the shard size into shards of at most that size;
        the number of shards this removed."""
        self.flush()
        groups: list[list[str]] = [[]]
        size = 0
        for row in self.manifest.shards():  # name order is writing order
            small = row["bytes"] < self.shard_bytes // 2
            if groups[-1] and (not small or size + row["bytes"] > self.shard_bytes):
                groups.append([])
                size = 0
            if small:
                groups[-1].append(row["name"])
                size += row["bytes"]
        removed = 0
        for group in (g for g in groups if len(g) > 1):
            self._merge(group)
            removed += len(group) - 1
        return removed

    def _merge(self, names: list[str]) -> None:
        from safetensors import safe_open

        tensors: dict[str, np.ndarray] = {}
        for name in names:
            if self.remote:
                self.remote.download(name, self.folder / name)
            with safe_open(str(self.folder / name), framework="numpy") as shard:
                tensors.update((tensor, shard.get_tensor(tensor)) for tensor in shard.keys())
            if self.remote:
                (self.folder / name).unlink()
        name, final = self._write_shard(tensors)
        digest, size, offsets = file_sha256(final), final.stat().st_size, tensor_offsets(final)
        self._publish(name, final)
        self.manifest.replace_shards(names, name, digest, size, offsets)
        for old in names:
            # a crash before this leaves orphans, removed on reopening
            if self.remote:
                try:
                    self.remote.remove(old)
                except FileNotFoundError:
                    pass
            else:
                (self.folder / old).unlink(missing_ok=True)

    def close(self) -> None:
        self.flush()
        self.manifest.close()
        if self.remote:
            self._upload_manifest()  # an archive with nothing committed yet still has its manifest
            remove_staging(self.folder)
