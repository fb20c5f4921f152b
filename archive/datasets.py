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
from typing import Any, Iterator

import numpy as np
import torch
from latentd.v1.errors import one_line
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .manifest import ArchiveError, ItemRecord
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
        record = self.records[index]
        if isinstance(record, Problem):
            raise ArchiveError(f"{self.path}: {record}")
        try:
            return self._item(index, record)
        except Exception as exc:  # noqa: BLE001 - whatever a damaged entry raises, named with its archive and key
            raise ArchiveError(f"{self.path}: {shown(record.key)}: {one_line(exc)}") from exc

    def _item(self, index: int, record: ItemRecord) -> dict[str, Any]:
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
        latents = torch.from_numpy(archive.array(record, tensors[role], shape))
        logvar = None
        if self.sample or self.logvar:
            logvar_role = "flipped_logvar" if flipped else "logvar"
            if logvar_role not in tensors:
                raise ArchiveError("the archive holds no log-variance (encode with --logvar)")
            logvar = torch.from_numpy(archive.array(record, tensors[logvar_role], shape))
        if self.sample:
            generator = torch.Generator().manual_seed(int(self._rng(index).integers(1 << 62)) + 1)
            latents = latents + torch.exp(0.5 * logvar) * torch.randn(latents.shape, generator=generator)
        left = variant.get("flipped_crop_left", 0) if flipped else variant.get("crop_left", 0)
        item = {
            "latents": latents,
            "original_size": torch.tensor([record.height, record.width]),
            "crop_top_left": torch.tensor([int(variant.get("crop_top") or 0), int(left or 0)]),
            "target_size": torch.tensor([int(variant["encoded_height"]), int(variant["encoded_width"])]),
            "flipped": flipped,
            "key": record.key,
        }
        if self.logvar:
            item["logvar"] = logvar
        return item


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
    """

    def __init__(self, path: str | os.PathLike, *, rank: int | None = None, world_size: int | None = None,
                 seed: int = 0, shuffle: bool = True, batch_size: int = 1, size: int | None = None,
                 flip: bool | str = False, sample: bool = False, logvar: bool = False,
                 on_error: str = "raise", verify_checksums: bool = False, entropy_model: Any = None) -> None:
        if rank is None or world_size is None:
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
            world_size = world_size if world_size is not None else (
                torch.distributed.get_world_size() if distributed else 1)
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"rank {rank} of world_size {world_size}, batch_size {batch_size}: expected "
                             "0 <= rank < world_size and batch_size >= 1")
        self.rank, self.world_size, self.shuffle, self.batch_size = rank, world_size, shuffle, batch_size
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
