"""Reading an archive lazily (`open_archive`), checking it (`verify_archive`), and safe output names.

A manifest may come from someone else: every shard it names must be a file of the archive folder, every
entry is checked before use, and a damaged entry is that entry's problem, never the whole archive's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .manifest import MANIFEST, ArchiveError, ItemRecord, Manifest
from .quantize import LatentFormat, Stored, entropy_format, get_format, load_batch, unpack
from latentd.v1.errors import one_line

from .sizing import SizePolicy
from .storage import RangeShard, RemoteFolder, is_url, local_path, remove_staging, staging_folder
from .text import shown
from .writer import file_sha256, tensor_name

MAX_LATENT_VALUES = 1 << 28  # one entry's latents, whatever its manifest row says (1 GiB as float32)
OPEN_SHARDS = 32  # shard handles kept open while reading


@dataclass
class Problem:
    """One entry (or shard) that cannot be used, and why."""

    key: str
    reason: str

    def __str__(self) -> str:
        return f"{shown(self.key)}: {shown(self.reason, 500)}"


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

    @property
    def indices(self) -> np.ndarray:
        """A `vq` archive's codebook indices of the main latents, int32 [h, w]."""
        return self._archive.indices(self.record)


class Archive:
    """A latent archive opened for reading; iterate it for `ArchiveEntry` objects in encoding order.

    With `verify_checksums`, each shard's size and SHA-256 are checked against the manifest before
    its first entry is read; entries of a shard that fails raise ArchiveError.

    >>> with open_archive("out/kodak.latents") as archive:      # doctest: +SKIP
    ...     for entry in archive:
    ...         train_step(entry.latents, entry.record.extra)
    """

    def __init__(self, folder: str | os.PathLike, *, verify_checksums: bool = False,
                 entropy_model: Any = None) -> None:
        self.location = str(folder)
        # An fsspec URL: the manifest is fetched into a local folder, shards are read with ranged reads.
        self.remote = RemoteFolder(folder) if is_url(folder) else None
        self._staging: Path | None = None
        if self.remote:
            if not self.remote.exists(MANIFEST):
                raise FileNotFoundError(f"{folder}: not a latent archive (no {MANIFEST})")
            self._staging = staging_folder()
            self.remote.download(MANIFEST, self._staging / MANIFEST)
            self.folder = self._staging
        else:
            self.folder = local_path(folder)
        self.manifest = Manifest(self.folder)
        self.meta = {k: _maybe_json(v) for k, v in self.manifest.meta().items()}
        self.verify_checksums = verify_checksums
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self._checked: dict[str, str | None] = {}  # shard name -> its problem, None if sound
        # Format entropy: an EntropyModel or its folder; None takes the one shipped with the archive's VAE.
        self._entropy_model = entropy_model
        self._entropy: LatentFormat | None = None
        # Archives of format version 1 stored q8-zstd codes without spatial prediction.
        self._unpredicted = str(self.meta.get("format_version")) == "1"

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()
        self.manifest.close()
        if self._staging:
            remove_staging(self._staging)

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

    def scan(self) -> Iterator[ArchiveEntry | Problem]:
        """Every encoded entry whose manifest row is sound, and a Problem for each other one."""
        for row in self.manifest.rows("ok"):
            key = row["key"] if isinstance(row["key"], str) else repr(row["key"])
            try:
                record = ItemRecord.from_row(row)
                check_record(record)
            except ArchiveError as exc:
                yield Problem(key, str(exc))
                continue
            yield ArchiveEntry(record, self)

    def failures(self) -> list[ItemRecord]:
        return list(self.manifest.items("failed"))

    def shard_path(self, name: Any) -> Path | str:
        """The path of a shard the manifest names; ArchiveError unless it is a file of the archive folder
        (for a remote archive, its path on the remote file system)."""
        if not isinstance(name, str) or name in ("", ".", "..") or re.search(r"[/\\\0]", name):
            raise ArchiveError(f"shard name {shown(name)} is not a file name in the archive folder")
        if self.remote:
            return self.remote.path(name)
        path = self.folder / name
        if path.resolve().parent != self.folder.resolve():
            raise ArchiveError(f"shard {shown(name)} leads outside the archive folder")
        return path

    def shard_problem(self, name: Any) -> str | None:
        """Why a shard cannot be trusted (not confined, missing, size or checksum unlike the manifest's)."""
        if isinstance(name, str) and name in self._checked:
            return self._checked[name]
        try:
            path = self.shard_path(name)
        except ArchiveError as exc:
            return str(exc)
        row = self.manifest.connection.execute("SELECT bytes, sha256 FROM shards WHERE name = ?", (name,)).fetchone()
        if self.remote:
            problem = self._remote_shard_problem(name, row)
        elif row is None:
            problem = f"shard {shown(name)} is not in the manifest's shard list"
        elif not path.is_file():
            problem = f"shard {shown(name)} is missing"
        elif path.stat().st_size != row["bytes"]:
            problem = f"shard {shown(name)}: {path.stat().st_size} bytes, the manifest says {shown(row['bytes'])}"
        elif file_sha256(path) != row["sha256"]:
            problem = f"shard {shown(name)}: checksum mismatch (the file changed after it was written)"
        else:
            problem = None
        self._checked[name] = problem
        return problem

    def _remote_shard_problem(self, name: str, row: Any) -> str | None:
        if row is None:
            return f"shard {shown(name)} is not in the manifest's shard list"
        if not self.remote.exists(name):
            return f"shard {shown(name)} is missing"
        if (size := self.remote.size(name)) != row["bytes"]:
            return f"shard {shown(name)}: {size} bytes, the manifest says {shown(row['bytes'])}"
        if self.remote.sha256(name) != row["sha256"]:
            return f"shard {shown(name)}: checksum mismatch (the file changed after it was written)"
        return None

    def _shard(self, name: str):
        from safetensors import safe_open

        if name in self._handles:
            self._handles.move_to_end(name)
            return self._handles[name]
        path = self.shard_path(name)
        if self.verify_checksums and (problem := self.shard_problem(name)):
            raise ArchiveError(problem)
        if self.remote:
            self._handles[name] = RangeShard(self.remote, name)
        else:
            self._handles[name] = safe_open(str(path), framework="numpy")
        if len(self._handles) > OPEN_SHARDS:
            self._handles.popitem(last=False)
        return self._handles[name]

    def latents(self, record: ItemRecord) -> np.ndarray:
        """An entry's latents; ArchiveError (or the shard reader's error) when they cannot be read back
        as the manifest describes them."""
        check_record(record)
        return self.array(record, "", record.latent_shape)

    def array(self, record: ItemRecord, tag: str, shape: Any) -> np.ndarray:
        """One stored array of an entry: its main latents (tag "") or one its `variants` name."""
        stored, fmt = self.unpacked(record, tag, shape)
        out = np.empty((1, *shape), np.float32)
        load_batch([stored], fmt, out)
        return finite(out[0])

    def unpacked(self, record: ItemRecord, tag: str, shape: Any) -> tuple[Stored, LatentFormat]:
        """The per-entry half of `array`: the stored array read and unpacked (`quantize.unpack`), and its
        format, for `quantize.load_batch` to finish together with others of the same format and shape."""
        if not isinstance(tag, str) or not isinstance(shape, list) or len(shape) != 3 \
                or not all(isinstance(n, int) and n > 0 for n in shape) \
                or math.prod(shape) > MAX_LATENT_VALUES:
            raise ArchiveError(f"variant {shown(tag)} of shape {shown(shape)} is not what the writer writes")
        shard = self._shard(record.shard)
        base = record.tensor[: -len("::data")]
        fmt = get_format(record.format)
        if self._unpredicted:
            fmt = replace(fmt, predictor="none")
        if fmt.entropy:
            fmt = self.entropy_format()
        stored = Stored(shard.get_tensor(tensor_name(base, "data", tag)))
        if fmt.quantized:
            stored.scale = shard.get_tensor(tensor_name(base, "scale", tag))
            stored.offset = shard.get_tensor(tensor_name(base, "offset", tag))
        return unpack(stored, fmt, tuple(shape)), fmt

    def entropy_format(self) -> LatentFormat:
        """The archive's coded format (`entropy` or `vq`) bound to the model that wrote it; ArchiveError when
        there is no such model here or it is another one (its digest differs from the one the archive
        records, or it codes the other format)."""
        if self._entropy is not None:
            return self._entropy
        from .coding import coder_for, format_of, load_coding_model
        from .entropy_model import EntropyModel, packaged_entropy_model
        from .index_model import IndexModel

        model, source = self._entropy_model, "the entropy model given"
        if model is None:
            vae = str(self.meta.get("model"))
            model = packaged_entropy_model(vae)
            if model is None:
                raise ArchiveError(f"no entropy model ships with VAE {shown(vae)}: pass the one that wrote the "
                                   "archive (--entropy-model DIR, open_archive(..., entropy_model=DIR))")
            source = f"the entropy model shipped with {shown(vae)} ({model})"
        if not isinstance(model, (EntropyModel, IndexModel)):
            try:
                model = load_coding_model(model)
            except ValueError as exc:
                raise ArchiveError(str(exc)) from None
        recorded = self.meta.get("entropy_model")
        if recorded != model.digest:
            raise ArchiveError(f"the archive was written with entropy model {shown(str(recorded)[:16])}, "
                               f"{source} is {model.digest[:16]}: pass the one that wrote it (--entropy-model DIR)")
        if format_of(model) != self.meta.get("format"):
            raise ArchiveError(f"{source} codes the {format_of(model)} format, the archive's is "
                               f"{shown(self.meta.get('format'))}")
        step = self.meta.get("entropy_step") if isinstance(model, EntropyModel) else None
        self._entropy = entropy_format(coder_for(model, float(step) if isinstance(step, (int, float)) and step > 0
                                                 else None))
        return self._entropy

    def indices(self, record: ItemRecord, tag: str = "") -> np.ndarray:
        """A `vq` archive's entry as its codebook indices, int32 [h, w] (`tag`: one its `variants` name);
        ArchiveError for archives of other formats."""
        if self.meta.get("format") != "vq":
            raise ArchiveError(f"the archive's format is {shown(self.meta.get('format'))}: only vq archives "
                               "store codebook indices")
        check_record(record)
        from .index_coder import decode_indices

        shard = self._shard(record.shard)
        stream = shard.get_tensor(tensor_name(record.tensor[: -len("::data")], "data", tag))
        shape = record.latent_shape if not tag else next(
            (v["latent_shape"] for v in self.variants(record) if tag in v.get("tensors", {}).values()), None)
        if not isinstance(shape, list) or len(shape) != 3:
            raise ArchiveError(f"variant {shown(tag)} of {shown(record.key)} is not in the archive")
        return decode_indices(np.ascontiguousarray(stream, np.uint8).tobytes(), self.entropy_format().coder.model,
                              tuple(shape[1:]))

    def variants(self, record: ItemRecord) -> list[dict[str, Any]]:
        """What the archive holds for an entry, one dict per size (the main one first): size_policy,
        encoded_width, encoded_height, crop_top, crop_left, flipped_crop_left (with flips),
        latent_shape and tensors (role -> tag for `array`: latents, flipped, logvar, flipped_logvar).
        Archives written before crops were recorded get the crop their size policy computes."""
        if isinstance(record.variants, list) and record.variants and all(isinstance(v, dict) for v in record.variants):
            return record.variants
        top, left = record.crop_top, record.crop_left
        if top is None or left is None:
            try:
                top, left = SizePolicy.parse(str(self.meta.get("size_policy"))).plan(record.width, record.height)[2]
            except (ValueError, TypeError, ZeroDivisionError):
                top, left = 0, 0
        return [{"size_policy": str(self.meta.get("size_policy")), "encoded_width": record.encoded_width,
                 "encoded_height": record.encoded_height, "crop_top": top, "crop_left": left,
                 "latent_shape": record.latent_shape, "tensors": {"latents": ""}}]


def finite(latents: np.ndarray) -> np.ndarray:
    """`latents`, or ArchiveError when they hold a value that is not finite."""
    if not np.isfinite(latents).all():
        raise ArchiveError("latents hold values that are not finite")
    return latents


def check_record(record: ItemRecord) -> None:
    """ArchiveError naming the first column of an encoded entry that cannot be what the writer wrote."""
    def positive_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    shape = record.latent_shape
    if not isinstance(record.shard, str):
        raise ArchiveError(f"manifest column shard is {shown(record.shard)}, not a shard name")
    if not isinstance(record.tensor, str) or not record.tensor.endswith("::data"):
        raise ArchiveError(f"manifest column tensor is {shown(record.tensor)}, not a tensor name")
    if not isinstance(shape, list) or len(shape) != 3 or not all(map(positive_int, shape)) \
            or math.prod(shape) > MAX_LATENT_VALUES:
        raise ArchiveError(f"manifest column latent_shape is {shown(shape)}, not 3 positive sizes "
                           f"of at most {MAX_LATENT_VALUES} values")
    if not (positive_int(record.encoded_width) and positive_int(record.encoded_height)):
        raise ArchiveError("manifest columns encoded_width and encoded_height must be positive integers")
    try:
        get_format(record.format)
    except (ValueError, TypeError):
        raise ArchiveError(f"manifest column format is {shown(record.format)}, not a latent format") from None


def open_archive(path: str | os.PathLike, *, verify_checksums: bool = False, entropy_model: Any = None) -> Archive:
    """`entropy_model`: for archives of format entropy, the EntropyModel (or its folder) that wrote them
    when it is not the one shipped with their VAE."""
    return Archive(path, verify_checksums=verify_checksums, entropy_model=entropy_model)


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, TypeError, RecursionError):
        return value


def verify_archive(folder: str | os.PathLike, entropy_model: Any = None) -> list[Problem]:
    """Every problem found: each shard's confinement, size and checksum, and every manifest entry read
    back from its shard; one damaged entry never hides the others."""
    problems: list[Problem] = []
    with open_archive(folder, entropy_model=entropy_model) as archive:
        shards = {}
        for row in archive.manifest.shards():
            shards[row["name"]] = row["items"]
            if problem := archive.shard_problem(row["name"]):
                problems.append(Problem(str(row["name"]), problem))
        counts: dict[str, int] = {}
        for entry in archive.scan():
            if isinstance(entry, Problem):
                problems.append(entry)
                continue
            record = entry.record
            counts[record.shard] = counts.get(record.shard, 0) + 1
            if record.shard not in shards:
                problems.append(Problem(record.key, f"its shard {shown(record.shard)} is not in the shard list"))
                continue
            try:
                archive.latents(record)
                for variant in archive.variants(record):  # the other sizes, flips and log-variances
                    for tag in variant.get("tensors", {}).values():
                        archive.array(record, tag, variant.get("latent_shape"))
            except Exception as exc:  # noqa: BLE001 - whatever a damaged shard raises is this entry's problem
                problems.append(Problem(record.key, f"unreadable in {shown(record.shard)}: {one_line(exc)}"))
        for name, items in shards.items():
            if counts.get(name, 0) != items:
                problems.append(Problem(str(name), f"{counts.get(name, 0)} items listed, the shard row says "
                                                   f"{shown(items)}"))
    return problems


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 200  # bytes of one output path component (file systems allow 255)
MAX_DEPTH = 32  # output folders under DIR


def _bounded(part: str, room: int = MAX_NAME) -> str:
    """A path component of at most `room` characters; a long one keeps its start and a digest of the whole."""
    if len(part) <= room:
        return part
    return f"{part[:room - 17]}-{hashlib.sha256(part.encode()).hexdigest()[:16]}"


def safe_relative_path(key: str, suffix: str) -> Path:
    """A key as a relative output path that cannot leave the output folder (no absolute paths, no
    `..`, no odd characters, no component or depth a file system refuses), whatever a hostile
    manifest says."""
    parts = [_UNSAFE.sub("_", part) for part in re.split(r"[\\/]+", key)]
    parts = [part for part in parts if part not in ("", ".", "..")]
    parts = [part.lstrip(".") or "_" for part in parts] or ["_"]
    if len(parts) > MAX_DEPTH:
        parts = [*parts[:MAX_DEPTH - 1], "_".join(parts[MAX_DEPTH - 1:])]
    last = Path(parts[-1])
    stem = last.stem if last.suffix else parts[-1]
    folders = [_bounded(part) for part in parts[:-1]]
    return Path(*folders, _bounded(stem, MAX_NAME - len(suffix)) + suffix)
