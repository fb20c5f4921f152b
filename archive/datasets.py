"""Training on an archive: `LatentDataset` (map-style) and `LatentIterableDataset` (sharded, shuffled, resumable).

Both read lazily: each process (each DataLoader worker) opens the archive on first use and reads an
item's tensors from its shard (safetensors `safe_open`, memory-mapped for local archives), decoding
q8 and q8-zstd on the fly. An item is a dict:

    latents          float32 [C, h, w], diffusers-scaled (a posterior sample with `sample=True`)
    original_size    (height, width) of the source image      } SDXL micro-conditioning,
    crop_top_left    (top, left) the size policy cropped at   } as tensors of 2 int64
    target_size      (height, width) of the encoded image     }
    flipped          whether these are the mirrored image's latents (and crop)
    key              the archive key
    logvar           float32 [C, h, w], with `logvar=True` (archives written with --logvar)

This module imports torch: it is for training machines (the rest of `latentd.archive` is not).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from latentd.v1.errors import one_line
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .manifest import ArchiveError, ItemRecord
from .quantize import LatentFormat, Stored, load_batch
from .reader import Archive, Problem, check_record
from .text import shown

log = logging.getLogger(__name__)
ON_ERROR = ("raise", "skip")


class _Items:
    """The shared part of both datasets: the archive's encoded records, read once, and how an item is made."""

    def __init__(self, path: str | os.PathLike, *, size: int | None, flip: bool | str, sample: bool, logvar: bool,
                 seed: int, verify_checksums: bool, on_error: str, entropy_model: Any = None) -> None:
        if flip not in (False, True, "random"):
            raise ValueError(f"flip={flip!r}: expected False, True or 'random'")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r}: expected one of {', '.join(ON_ERROR)}")
        self.path, self.size, self.flip, self.sample, self.logvar = path, size, flip, sample, logvar
        self.seed, self.verify_checksums, self.on_error = seed, verify_checksums, on_error
        self.entropy_model = entropy_model
        self.epoch = 0
        self.skipped = 0  # items skipped with on_error="skip", in this process
        with Archive(path) as archive:
            # a row that does not parse stays in its place, as a Problem that fails (or skips) its item
            self.records: list[ItemRecord | Problem] = [
                entry if isinstance(entry, Problem) else entry.record for entry in archive.scan()]
            self.meta = archive.meta
        self._archive: Archive | None = None
        self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_archive"], state["_pid"] = None, None  # each worker opens its own
        return state

    def archive(self) -> Archive:
        if self._archive is None or self._pid != os.getpid():
            self._archive = Archive(self.path, verify_checksums=self.verify_checksums,
                                    entropy_model=self.entropy_model)
            self._pid = os.getpid()
        return self._archive

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def item(self, index: int) -> dict[str, Any]:
        """Item `index` (in manifest order); ArchiveError naming the archive and the key if it cannot be read."""
        batch, errors = self.batch([index])
        if errors:
            raise errors[0]
        item = {name: value[0] for name, value in batch.items()}
        item["flipped"] = bool(item["flipped"])
        return item

    def batch(self, indices: list[int]) -> tuple[dict[str, Any] | None, list[ArchiveError]]:
        """Items `indices` stacked as the DataLoader's default collation stacks them, decoded together
        (one MED inverse for all q8-zstd latents of a shape); the items that cannot be read are left out,
        each as an ArchiveError naming the archive and its key. None when none could be read."""
        errors: list[ArchiveError] = []
        reads: list[_Read] = []
        for index in indices:
            record = self.records[index]
            try:
                if isinstance(record, Problem):
                    raise ArchiveError(str(record))
                reads.append(self._read(index, record))
            except Exception as exc:  # noqa: BLE001 - whatever a damaged entry raises, named with its archive and key
                key = f"{shown(record.key)}: " if isinstance(record, ItemRecord) else ""
                errors.append(ArchiveError(f"{self.path}: {key}{one_line(exc)}"))
        if reads and len({tuple(read.shape) for read in reads}) > 1:
            shapes = ", ".join(f"{shown(read.record.key)} {read.shape}" for read in reads)
            raise ArchiveError(f"{self.path}: latents of different shapes cannot be stacked ({shapes}); "
                               "read them unbatched or bucket the archive by size")
        if not reads:
            return None, errors
        latents = self._decoded(reads, "latents")
        logvar = self._decoded(reads, "logvar") if self.sample or self.logvar else None
        # numpy, not torch: torch's intra-op threads make this tiny reduction slow on a busy machine
        finite = np.isfinite(latents.numpy()).reshape(len(reads), -1).all(1)
        if logvar is not None:
            finite &= np.isfinite(logvar.numpy()).reshape(len(reads), -1).all(1)
        for i in np.flatnonzero(~finite):
            errors.append(ArchiveError(f"{self.path}: {shown(reads[i].record.key)}: latents hold values that "
                                       "are not finite"))
        if not finite.all():
            keep = np.flatnonzero(finite)
            reads, latents = [reads[i] for i in keep], latents[keep]
            logvar = logvar[keep] if logvar is not None else None
            if not reads:
                return None, errors
        if self.sample:
            noise = torch.stack([torch.randn(read.shape, generator=torch.Generator().manual_seed(
                int(self._rng(read.index).integers(1 << 62)) + 1)) for read in reads])
            latents = latents + torch.exp(0.5 * logvar) * noise
        batch = {
            "latents": latents,
            "original_size": torch.tensor([[r.record.height, r.record.width] for r in reads]),
            "crop_top_left": torch.tensor([r.crop_top_left for r in reads]),
            "target_size": torch.tensor([r.target_size for r in reads]),
            "flipped": torch.tensor([r.flipped for r in reads]),
            "key": [r.record.key for r in reads],
        }
        if self.logvar:
            batch["logvar"] = logvar
        return batch, errors

    def _read(self, index: int, record: ItemRecord) -> "_Read":
        """Which stored arrays make item `index`, read and unpacked (what can fail for one entry alone)."""
        archive = self.archive()
        check_record(record)
        variants = archive.variants(record)
        if self.size is None:
            variant = variants[0]
        else:
            found = [v for v in variants if str(v.get("size_policy", "")).endswith(f":{self.size}")]
            if not found:
                sizes = ", ".join(shown(v.get("size_policy")) for v in variants)
                raise ArchiveError(f"no latents of size {self.size} (it has {sizes})")
            variant = found[0]
        tensors = variant.get("tensors") or {}
        flipped = self.flip is True or (self.flip == "random" and bool(self._rng(index).integers(2)))
        role = "flipped" if flipped else "latents"
        if role not in tensors:
            raise ArchiveError("the archive holds no flipped latents (encode with --flip)")
        shape = variant.get("latent_shape")
        stored = {"latents": archive.unpacked(record, tensors[role], shape)}
        if self.sample or self.logvar:
            logvar_role = "flipped_logvar" if flipped else "logvar"
            if logvar_role not in tensors:
                raise ArchiveError("the archive holds no log-variance (encode with --logvar)")
            stored["logvar"] = archive.unpacked(record, tensors[logvar_role], shape)
        left = variant.get("flipped_crop_left", 0) if flipped else variant.get("crop_left", 0)
        return _Read(index, record, shape, flipped, stored, (int(variant.get("crop_top") or 0), int(left or 0)),
                     (int(variant["encoded_height"]), int(variant["encoded_width"])))

    @staticmethod
    def _decoded(reads: list["_Read"], role: str) -> torch.Tensor:
        """float32 [n, C, h, w]: the reads' `role` arrays, finished together per storage format; in a
        DataLoader worker it is allocated in shared memory, where the loader would copy it to."""
        out = torch.empty((len(reads), *reads[0].shape))
        if get_worker_info() is not None:
            out.share_memory_()
        array = out.numpy()
        by_format: dict[str, list[int]] = {}
        for i, read in enumerate(reads):
            by_format.setdefault(read.stored[role][1].name, []).append(i)
        for positions in by_format.values():
            fmt = reads[positions[0]].stored[role][1]
            if len(positions) == len(reads):
                load_batch([read.stored[role][0] for read in reads], fmt, array)
            else:
                part = np.empty((len(positions), *reads[0].shape), np.float32)
                load_batch([reads[i].stored[role][0] for i in positions], fmt, part)
                array[positions] = part
        return out


@dataclass
class _Read:
    """One item between reading and decoding: where it came from and its unpacked arrays by role."""

    index: int
    record: ItemRecord
    shape: list[int]
    flipped: bool
    stored: dict[str, tuple[Stored, LatentFormat]]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]


class LatentDataset(Dataset):
    """Map-style: `len(ds)` encoded images, `ds[i]` the dict described in the module docstring, in the
    archive's encoding order. `size`: which of the sizes stored with `--sizes` (the side S; None: the
    main one); `flip`: False, True or "random" (seeded by (seed, epoch, index)); `sample`: a posterior
    sample z = latents + exp(logvar / 2) * eps (seeded the same way) instead of the mean; `logvar`:
    include the log-variance; `entropy_model`: for format entropy, the model (or its folder) that wrote
    the archive when it is not the one shipped with its VAE. A damaged entry raises ArchiveError naming
    the archive and its key."""

    def __init__(self, path: str | os.PathLike, *, size: int | None = None, flip: bool | str = False,
                 sample: bool = False, logvar: bool = False, seed: int = 0, verify_checksums: bool = False,
                 entropy_model: Any = None) -> None:
        self._items = _Items(path, size=size, flip=flip, sample=sample, logvar=logvar, seed=seed,
                             verify_checksums=verify_checksums, on_error="raise", entropy_model=entropy_model)

    def __len__(self) -> int:
        return len(self._items.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self._items.item(index % len(self))

    def set_epoch(self, epoch: int) -> None:
        """Another epoch: other random flips and posterior samples (same seed and epoch, same draws)."""
        self._items.epoch = epoch

    @property
    def keys(self) -> list[str]:
        return [record.key for record in self._items.records]


class LatentIterableDataset(IterableDataset):
    """Every encoded image exactly once per epoch across all ranks and DataLoader workers, in an order
    shuffled from (seed, epoch); `set_epoch(n)` before each epoch, as with DistributedSampler.

    The epoch's order is split by rank (item i of the order goes to rank i % world_size; `rank` and
    `world_size` default to torch.distributed's when it is initialised, else 0 and 1), then the rank's
    items by DataLoader worker in runs of `batch_size` (give the DataLoader's), so that the loader
    hands them out in the rank's order whatever `num_workers`. That makes resuming exact:
    `state_dict(consumed=n)` (n: items this rank's loop has taken this epoch; without it, the items this
    object yielded itself, which is right for num_workers=0) and, after a restart,
    `load_state_dict(state)` yield exactly the rank's remaining items. Ranks get at most one item apart.

    `on_error`: "raise" (an ArchiveError naming the archive and the key) or "skip" (log it, count it in
    `skipped` of the process that read it, go on). Other options as for LatentDataset.

    `batched=True` yields whole batches instead of items, stacked as the default collation stacks them
    (give the DataLoader `batch_size=None`): the worker reads and decodes `batch_size` items together
    and puts them in shared memory once, which is several times faster through a DataLoader with
    workers (docs/archives.md). A skipped item leaves its batch one shorter; all latents of a batch
    must have one shape.
    """

    def __init__(self, path: str | os.PathLike, *, rank: int | None = None, world_size: int | None = None,
                 seed: int = 0, shuffle: bool = True, batch_size: int = 1, size: int | None = None,
                 flip: bool | str = False, sample: bool = False, logvar: bool = False,
                 on_error: str = "raise", verify_checksums: bool = False, batched: bool = False,
                 entropy_model: Any = None) -> None:
        if rank is None or world_size is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
            world_size = world_size if world_size is not None else (
                torch.distributed.get_world_size() if distributed else 1)
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"rank {rank} of world_size {world_size}, batch_size {batch_size}: expected "
                             "0 <= rank < world_size and batch_size >= 1")
        self.rank, self.world_size, self.shuffle, self.batch_size = rank, world_size, shuffle, batch_size
        self.batched = batched
        self._items = _Items(path, size=size, flip=flip, sample=sample, logvar=logvar, seed=seed,
                             verify_checksums=verify_checksums, on_error=on_error, entropy_model=entropy_model)
        self._start = 0  # items of this rank's epoch already consumed (load_state_dict)
        self._yielded = 0

    @property
    def epoch(self) -> int:
        return self._items.epoch

    @property
    def skipped(self) -> int:
        return self._items.skipped

    def set_epoch(self, epoch: int) -> None:
        self._items.epoch = epoch
        self._start = self._yielded = 0

    def order(self) -> np.ndarray:
        """The epoch's order of all items (manifest indices), the same in every process."""
        count = len(self._items.records)
        if not self.shuffle:
            return np.arange(count)
        return np.random.default_rng([self._items.seed, self._items.epoch]).permutation(count)

    def rank_indices(self) -> np.ndarray:
        """This rank's items this epoch, in the order its loader delivers them."""
        return self.order()[self.rank::self.world_size]

    def __len__(self) -> int:
        """This rank's items per epoch (before a resume's skip)."""
        return len(self.rank_indices())

    def _worker_indices(self) -> Iterator[int]:
        mine = self.rank_indices()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for position in range(self._start, len(mine)):
            # runs of batch_size dealt round robin, as the DataLoader collects them back
            if ((position - self._start) // self.batch_size) % workers == worker:
                yield int(mine[position])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.batched:
            yield from self._batches()
            return
        for index in self._worker_indices():
            try:
                item = self._items.item(index)
            except ArchiveError as exc:
                if self._items.on_error == "raise":
                    raise
                self._items.skipped += 1
                self._yielded += 1  # a position passed, as the loop will count it
                log.error("skipped (%d so far in this process): %s", self._items.skipped, exc)
                continue
            self._yielded += 1
            yield item

    def _batches(self) -> Iterator[dict[str, Any]]:
        run: list[int] = []
        for index in self._worker_indices():
            run.append(index)
            if len(run) == self.batch_size:
                yield from self._batch(run)
                run = []
        if run:
            yield from self._batch(run)

    def _batch(self, run: list[int]) -> Iterator[dict[str, Any]]:
        batch, errors = self._items.batch(run)
        if errors and self._items.on_error == "raise":
            raise errors[0]
        for error in errors:
            self._items.skipped += 1
            log.error("skipped (%d so far in this process): %s", self._items.skipped, error)
        self._yielded += len(run)  # skipped positions passed too, as the loop will count them
        if batch is not None:
            yield batch

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """Where this rank stands: {seed, epoch, consumed}. `consumed`: the items of this epoch the
        training loop has taken from this rank's loader (skipped ones count as taken)."""
        if consumed is None:
            consumed = self._start + self._yielded
        return {"seed": self._items.seed, "epoch": self._items.epoch, "consumed": int(consumed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next iteration yields this rank's items of `state`'s epoch after the consumed ones."""
        if int(state["seed"]) != self._items.seed:
            raise ValueError(f"state of seed {state['seed']}, this dataset has seed {self._items.seed}")
        self._items.epoch = int(state["epoch"])
        self._start, self._yielded = int(state["consumed"]), 0
