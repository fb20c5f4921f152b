"""Where images come from: folders (recursive), list files, tar and zip files, webdataset shards.

Keys (what names an image in the archive; resume relies on the same sources giving the same keys):
- one source: the item's name inside it (path relative to the folder, tar or zip member name, webdataset
  key, list-file entry as written, the file name of an image given alone);
- several sources: `LABEL/NAME`, LABEL being the source's file or folder name, or, for sources that share
  a name, the shortest tail of their absolute paths that tells them apart (`a/imgs`, `b/imgs`); list-file
  entries stay as written;
- a key met again in the same run (a tar member name repeated, one entry in two list files) becomes
  `KEY~2`, `KEY~3`, ...: the first one not yet taken. Nothing is dropped for having a name already seen.
Archives written before this scheme named items of several sources `NAME/...` whatever the other
sources' names, and kept only the first item of a key met twice; each item whose key differs from that
old one carries it as `legacy_key`, so that resuming such an archive finds what it already holds.
An unreadable member, or the unreadable rest of a source, is an item whose `read` raises: the encoder
records it as failed with the reason and goes on.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter, defaultdict
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Callable, Iterable, Iterator

from latentd.v1.errors import one_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm")
LIST_SUFFIXES = (".txt", ".lst")
MAX_ITEM_BYTES = 256 << 20  # one image file or member, read whole; `latentd encode --max-item-mb`
_CHUNK = 1 << 20


class UnreadableItem(Exception):
    """An item that cannot be read (too large, truncated, not what it claims); recorded as failed."""


@dataclass
class SourceItem:
    """One image to encode. `read` returns its bytes, `load_extra` its metadata (webdataset sidecar JSON);
    sources are read one at a time, in order, and either may raise for this item alone."""

    key: str  # unique name in the archive (see the module docstring)
    origin: str  # where it came from, for people: "photos/a.jpg", "shard-0.tar:000123.jpg"
    read: Callable[[], bytes]
    load_extra: Callable[[], dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    legacy_key: str | None = None  # its key in archives written before keys were unique (see above)


def read_limited(handle: IO[bytes], limit: int, declared: int | None = None) -> bytes:
    """All of `handle` in chunks, refusing more than `limit` bytes (whatever a header declares)."""
    if declared is not None and declared > limit:
        raise UnreadableItem(f"{declared} bytes, over the item limit of {limit} bytes (--max-item-mb)")
    chunks, total = [], 0
    while chunk := handle.read(min(_CHUNK, limit + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise UnreadableItem(f"more than the item limit of {limit} bytes (--max-item-mb)")
    return b"".join(chunks)


def _read_file(path: Path, limit: int) -> bytes:
    with open(path, "rb") as handle:
        return read_limited(handle, limit, os.fstat(handle.fileno()).st_size)


def _unreadable(key: str, origin: str, reason: str) -> SourceItem:
    def read() -> bytes:
        raise UnreadableItem(reason)

    return SourceItem(key, origin, read)


def rest_key(path: Path, prefix: str) -> str:
    """The key of the failure that stands for the unreadable rest of a source: `LABEL#rest`."""
    return f"{prefix.rstrip('/') or path.name}#rest"


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _folder(root: Path, prefix: str, limit: int) -> Iterator[SourceItem]:
    for path in sorted(p for p in root.rglob("*") if p.is_file() and _is_image(p.name)):
        relative = path.relative_to(root).as_posix()
        yield SourceItem(prefix + relative, str(path), lambda path=path: _read_file(path, limit))


def _list_file(path: Path, limit: int) -> Iterator[SourceItem]:
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            target = Path(entry) if Path(entry).is_absolute() else path.parent / entry
            # A missing file still becomes an item: it is listed as failed in the manifest, not skipped silently.
            yield SourceItem(entry, str(target), lambda target=target: _read_file(target, limit))


def _webdataset_key(name: str) -> str:
    """webdataset keys are the member path up to the first dot of the file name."""
    path = PurePosixPath(name)
    return str(path.parent / path.name.split(".", 1)[0]) if str(path.parent) != "." else path.name.split(".", 1)[0]


def _tar_member(archive: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    handle = archive.extractfile(member)
    if handle is None:
        raise UnreadableItem("not a regular file")
    return read_limited(handle, limit, member.size)


def _sidecar(archive: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> dict[str, Any]:
    try:
        return {"json": json.loads(_tar_member(archive, member, limit))}
    except RecursionError:
        raise UnreadableItem(f"sidecar {member.name}: JSON nested too deeply") from None
    except ValueError as exc:
        raise UnreadableItem(f"sidecar {member.name}: not JSON ({exc})") from None


def _tar_end(archive: tarfile.TarFile) -> str | None:
    """Why the tar ends early, if it does: a complete tar ends with a zero block after its last member;
    `tarfile` stops silently at a truncated or corrupt header."""
    archive.fileobj.seek(archive.offset)
    block = archive.fileobj.read(tarfile.BLOCKSIZE)
    if block and not block.strip(b"\0"):
        return None
    return "truncated or corrupt after its last readable member" if block else "truncated (no end-of-archive marker)"


def _tar(path: Path, prefix: str, limit: int) -> Iterator[SourceItem]:
    with tarfile.open(path) as archive:
        members, broken = [], None
        try:
            for member in archive:  # headers only: member data is read when its item is
                if member.isfile():
                    members.append(member)
            broken = _tar_end(archive)
        except Exception as exc:  # noqa: BLE001 - a damaged stream: what was read before it is kept
            broken = f"truncated or damaged after {len(members)} members: {one_line(exc)}"
        sidecars = {_webdataset_key(m.name): m for m in members if m.name.endswith(".json")}
        images = [m for m in members if _is_image(m.name)]
        # A webdataset shard has one image per key; then the key (not the file name) names the item.
        keys = [_webdataset_key(m.name) for m in images]
        webdataset = bool(sidecars) and len(set(keys)) == len(keys)
        for member, key in zip(images, keys):
            sidecar = sidecars.get(key) if webdataset else None
            yield SourceItem(prefix + (key if webdataset else member.name), f"{path}:{member.name}",
                             lambda member=member: _tar_member(archive, member, limit),
                             (lambda sidecar=sidecar: _sidecar(archive, sidecar, limit)) if sidecar else None)
        if broken:
            yield _unreadable(rest_key(path, prefix), f"{path}@{archive.offset}", broken)


def _zip(path: Path, prefix: str, limit: int) -> Iterator[SourceItem]:
    def read(info: zipfile.ZipInfo) -> bytes:
        with archive.open(info) as handle:  # checks the CRC when the member ends
            return read_limited(handle, limit, info.file_size)

    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.is_dir() and _is_image(info.filename):
                yield SourceItem(prefix + info.filename, f"{path}:{info.filename}", lambda info=info: read(info))


def source_labels(paths: list[Path]) -> list[str]:
    """The LABEL of each source (see the module docstring); ValueError for a source given twice."""
    if len(paths) == 1:
        return [""]
    real = Counter(os.path.realpath(p) for p in paths)
    twice = sorted({str(p) for p in paths if real[os.path.realpath(p)] > 1})
    if twice:
        raise ValueError(f"source given twice: {', '.join(twice)}")
    parts = [Path(os.path.abspath(p)).parts[1:] or (str(p),) for p in paths]
    namesakes: dict[str, list[tuple[str, ...]]] = defaultdict(list)
    for mine in parts:
        namesakes[mine[-1]].append(mine)
    depths = {}
    for name, group in namesakes.items():
        depth = 1
        while len({other[-depth:] for other in group}) < len(group):
            depth += 1
        depths[name] = depth
    return ["/".join(mine[-depths[mine[-1]]:]) for mine in parts]


def source_kind(path: Path) -> str:
    """folder, tar, zip, list or image; ValueError for anything else."""
    name = path.name.lower()
    if path.is_dir():
        return "folder"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    if name.endswith(".zip"):
        return "zip"
    if name.endswith(LIST_SUFFIXES):
        return "list"
    if path.is_file() and _is_image(name):
        return "image"
    raise ValueError(f"{path}: not a folder, list file (.txt), tar, zip or image file")


def _source(path: Path, label: str, limit: int) -> Iterator[SourceItem]:
    prefix = f"{label}/" if label else ""
    kind = source_kind(path)
    if kind == "folder":
        yield from _folder(path, prefix, limit)
    elif kind == "tar":
        yield from _tar(path, prefix, limit)
    elif kind == "zip":
        yield from _zip(path, prefix, limit)
    elif kind == "list":
        yield from _list_file(path, limit)
    else:
        yield SourceItem(prefix + path.name, str(path), lambda: _read_file(path, limit))


def _isolated(path: Path, label: str, limit: int) -> Iterator[SourceItem]:
    """A source's items; if the source itself breaks (not a zip, unreadable list), one failed item for
    the rest of it, and the next source goes on."""
    count = 0
    prefix, legacy = (f"{label}/", f"{path.name}/") if label else ("", "")
    renamed = prefix != legacy and source_kind(path) != "list"  # list entries never had a prefix
    try:
        for item in _source(path, label, limit):
            count += 1
            if renamed and item.key.startswith(prefix):
                item.legacy_key = legacy + item.key[len(prefix):]
            yield item
    except Exception as exc:  # noqa: BLE001 - any damage is this source's failure, never the run's
        where = f"after {count} items: " if count else ""
        yield _unreadable(rest_key(path, prefix), str(path), f"unreadable source {where}{one_line(exc)}")


def unique_keys(items: Iterable[SourceItem]) -> Iterator[SourceItem]:
    """Items with a key met before renamed `KEY~N` (the first N from 2 not taken)."""
    seen: set[str] = set()
    next_number: dict[str, int] = {}
    for item in items:
        if item.key in seen:
            base, number = item.key, next_number.get(item.key, 2)
            while f"{base}~{number}" in seen:
                number += 1
            next_number[base] = number + 1
            item.key, item.legacy_key = f"{base}~{number}", item.legacy_key or base
        seen.add(item.key)
        yield item


def iter_sources(paths: list[str | Path], max_item_bytes: int = MAX_ITEM_BYTES) -> Iterator[SourceItem]:
    """Items of every source in order, each key unique (see the module docstring); ValueError at once for
    a source given twice or of no known kind."""
    paths = [Path(p) for p in paths]
    labels = source_labels(paths)
    for path in paths:
        source_kind(path)
    return unique_keys(item for path, label in zip(paths, labels) for item in _isolated(path, label, max_item_bytes))
