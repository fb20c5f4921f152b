"""Where images come from: folders (recursive), list files, tar and zip files, webdataset shards."""

from __future__ import annotations

import json
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm")
LIST_SUFFIXES = (".txt", ".lst")


@dataclass
class SourceItem:
    """One image to encode. `read` returns its bytes; sources are read one at a time, in order."""

    key: str  # unique name in the archive (a relative path, or a webdataset key)
    origin: str  # where it came from, for people: "photos/a.jpg", "shard-0.tar:000123.jpg"
    read: Callable[[], bytes]
    extra: dict[str, Any] = field(default_factory=dict)  # webdataset sidecar JSON


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _folder(root: Path, prefix: str) -> Iterator[SourceItem]:
    for path in sorted(p for p in root.rglob("*") if p.is_file() and _is_image(p.name)):
        relative = path.relative_to(root).as_posix()
        yield SourceItem(prefix + relative, str(path), path.read_bytes)


def _list_file(path: Path) -> Iterator[SourceItem]:
    for line in path.read_text().splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        target = Path(entry) if Path(entry).is_absolute() else path.parent / entry
        # A missing file still becomes an item: it is listed as failed in the manifest, not skipped silently.
        yield SourceItem(entry, str(target), target.read_bytes)


def _webdataset_key(name: str) -> str:
    """webdataset keys are the member path up to the first dot of the file name."""
    path = PurePosixPath(name)
    return str(path.parent / path.name.split(".", 1)[0]) if str(path.parent) != "." else path.name.split(".", 1)[0]


def _tar(path: Path, prefix: str) -> Iterator[SourceItem]:
    with tarfile.open(path) as archive:
        members = [m for m in archive.getmembers() if m.isfile()]
        sidecars = {_webdataset_key(m.name): m for m in members if m.name.endswith(".json")}
        images = [m for m in members if _is_image(m.name)]
        # A webdataset shard has one image per key; then the key (not the file name) names the item.
        keys = [_webdataset_key(m.name) for m in images]
        webdataset = bool(sidecars) and len(set(keys)) == len(keys)
        for member, key in zip(images, keys):
            extra = {}
            if webdataset and key in sidecars:
                try:
                    extra = {"json": json.loads(archive.extractfile(sidecars[key]).read())}
                except ValueError:
                    extra = {"json_error": "unreadable sidecar JSON"}
            name = key if webdataset else member.name
            yield SourceItem(prefix + name, f"{path}:{member.name}",
                             lambda member=member: archive.extractfile(member).read(), extra)


def _zip(path: Path, prefix: str) -> Iterator[SourceItem]:
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.is_dir() and _is_image(info.filename):
                yield SourceItem(prefix + info.filename, f"{path}:{info.filename}",
                                 lambda info=info: archive.read(info))


def iter_sources(paths: list[str | Path]) -> Iterator[SourceItem]:
    """Items of every source in order; with several sources, keys are prefixed by the source's name."""
    for path in map(Path, paths):
        prefix = f"{path.name}/" if len(paths) > 1 else ""
        name = path.name.lower()
        if path.is_dir():
            yield from _folder(path, prefix)
        elif name.endswith((".tar", ".tar.gz", ".tgz")):
            yield from _tar(path, prefix)
        elif name.endswith(".zip"):
            yield from _zip(path, prefix)
        elif name.endswith(LIST_SUFFIXES):
            yield from _list_file(path)
        elif path.is_file() and _is_image(name):
            yield SourceItem(prefix + path.name if prefix else path.name, str(path), path.read_bytes)
        else:
            raise FileNotFoundError(f"{path}: not a folder, list file (.txt), tar, zip or image file")
