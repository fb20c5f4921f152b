"""Archives on object storage and other fsspec file systems (`s3://`, `gs://`, `memory://`, ...).

A local path (or a `file://` URL, which is one) is used directly: shards are memory-mapped and
renamed into place. For any other URL the writer works in a local staging folder and mirrors to the
URL: a shard is uploaded under a temporary name and moved to its final name *before* its rows are
committed, and the manifest (SQLite, which needs a local file) is uploaded the same way after each
commit. On an object store a move is a copy, and an object appears whole or not at all, so readers
never see part of a shard or a manifest; a crash between a shard's upload and the manifest's leaves
an orphan shard that the next run removes, exactly as on a local disk. Readers fetch the manifest
once and read each tensor with a ranged read of its shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def is_url(location: Any) -> bool:
    """Whether an archive location is an fsspec URL that is not a local path (`file://` is one)."""
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def local_path(location: str | os.PathLike) -> Path:
    """A local archive location as a Path (`file:///x/y` -> /x/y)."""
    if isinstance(location, str) and location.startswith("file://"):
        return Path(location[len("file://"):])
    return Path(location)


class RemoteFolder:
    """An archive folder at an fsspec URL."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")

    def __str__(self) -> str:
        return self.url

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def names(self) -> list[str]:
        """File names in the folder (none if it does not exist)."""
        try:
            return [str(p).rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def size(self, name: str) -> int:
        return int(self.fs.size(self.path(name)))

    def upload(self, local: Path, name: str) -> None:
        """`local` to `name`, under a temporary name first, then moved: the object appears whole."""
        temp = self.path(name + ".tmp")
        self.fs.put_file(str(local), temp)
        self.fs.mv(temp, self.path(name))

    def download(self, name: str, local: Path) -> None:
        self.fs.get_file(self.path(name), str(local))

    def remove(self, name: str) -> None:
        self.fs.rm_file(self.path(name))

    def sha256(self, name: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open(self.path(name), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()


def staging_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="latentd-archive-"))


def remove_staging(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


# safetensors dtypes the archive writes
_DTYPES = {"F16": np.float16, "F32": np.float32, "U8": np.uint8, "U16": np.uint16, "I8": np.int8,
           "I16": np.int16, "I32": np.int32, "F64": np.float64, "BF16": np.uint16}
MAX_HEADER = 100 << 20


class RangeShard:
    """A safetensors shard on a remote file system, read one tensor at a time with ranged reads
    (what `safe_open` does for a local file by memory-mapping it)."""

    def __init__(self, folder: RemoteFolder, name: str) -> None:
        self.fs, self.path = folder.fs, folder.path(name)
        (size,) = struct.unpack("<Q", self.fs.cat_file(self.path, 0, 8))
        if size > MAX_HEADER:
            raise ValueError(f"safetensors header of {size} bytes")
        self.header = json.loads(self.fs.cat_file(self.path, 8, 8 + size))
        self.start = 8 + size

    def keys(self) -> list[str]:
        return [name for name in self.header if name != "__metadata__"]

    def get_tensor(self, name: str) -> np.ndarray:
        entry = self.header[name]
        begin, end = entry["data_offsets"]
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        shape = tuple(entry["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ValueError(f"tensor {name}: {end - begin} bytes for shape {shape}")
        data = self.fs.cat_file(self.path, self.start + begin, self.start + end)
        return np.frombuffer(data, dtype).reshape(shape)
