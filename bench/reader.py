"""`latentd bench reader`: latents per second through a DataLoader from an archive, against one `.npz` per image.

The anchor is the kohya-style cache layout: one `.npz` per image (latents, original size, crop),
each loaded with `np.load` when its item is asked for. Both hold the same latents and go through the
same DataLoader (batch size, workers) in the same run: the archive read item by item with the default
collation, and read batched (the worker stacks each batch itself, `batched=True`).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from latentd.archive import LatentIterableDataset
from latentd.archive.manifest import ItemRecord
from latentd.archive.quantize import get_format
from latentd.archive.writer import ArchiveSettings, ArchiveWriter

TARGET = 5.0  # the archive's rate over the anchor's


@dataclass
class ReaderRow:
    layout: str  # "archive (FORMAT)", "archive (FORMAT) batched" or "npz per image"
    workers: int
    items: int
    seconds: float

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds else 0.0


class NpzDataset(Dataset):
    """The anchor: one kohya-style .npz per image, read with np.load per item."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        with np.load(self.paths[index]) as npz:
            return {"latents": torch.from_numpy(npz["latents"].astype(np.float32)),
                    "original_size": torch.from_numpy(npz["original_size"]),
                    "crop_top_left": torch.from_numpy(npz["crop_top_left"]),
                    "target_size": torch.from_numpy(npz["target_size"]), "key": self.paths[index].stem}


def write_layouts(root: Path, items: int, side: int, channels: int, fmt: str) -> tuple[Path, list[Path]]:
    """The same random latents [channels, side, side] as an archive and as .npz files."""
    rng = np.random.default_rng(0)
    settings = ArchiveSettings(fmt, f"center-crop:{side * 8}", "bench", 1.0, 0.0, 8)
    writer = ArchiveWriter(root / "bench.latents", settings, get_format(fmt), commit_s=3600)
    (root / "npz").mkdir()
    paths = []
    for index in range(items):
        latents = rng.standard_normal((channels, side, side), dtype=np.float32)
        key = f"{index:06d}"
        record = ItemRecord(key, key, "ok", width=side * 8, height=side * 8, encoded_width=side * 8,
                            encoded_height=side * 8, crop_top=0, crop_left=0)
        writer.add(record, latents)
        paths.append(root / "npz" / f"{key}.npz")
        np.savez(paths[-1], latents=latents.astype(np.float16), original_size=np.array([side * 8, side * 8]),
                 crop_top_left=np.array([0, 0]), target_size=np.array([side * 8, side * 8]))
    writer.compact()
    writer.close()
    return root / "bench.latents", paths


def _time(dataset, workers: int, batch_size: int | None) -> tuple[int, float]:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        persistent_workers=False, multiprocessing_context="fork" if workers else None)
    started = time.perf_counter()
    count = sum(len(batch["key"]) for batch in loader)
    return count, time.perf_counter() - started


def bench_reader(*, items: int = 2048, side: int = 64, channels: int = 4, fmt: str = "float16",
                 batch_size: int = 32, workers: tuple[int, ...] = (0, 2)) -> list[ReaderRow]:
    """Rows for the archive and the anchor at each worker count, one epoch each, interleaved."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="latentd-bench-reader-") as scratch:
        archive, paths = write_layouts(Path(scratch), items, side, channels, fmt)
        for count in workers:
            for layout, dataset, loader_batch in (
                    (f"archive ({fmt})", LatentIterableDataset(archive, batch_size=batch_size), batch_size),
                    (f"archive ({fmt}) batched",
                     LatentIterableDataset(archive, batch_size=batch_size, batched=True), None),
                    ("npz per image", NpzDataset(paths), batch_size)):
                seen, seconds = _time(dataset, count, loader_batch)
                rows.append(ReaderRow(layout, count, seen, seconds))
    return rows


def table(rows: list[ReaderRow]) -> str:
    """One line per (layout, workers), with the archive's ratio over the anchor at the same workers."""
    anchors = {row.workers: row.items_per_s for row in rows if row.layout == "npz per image"}
    lines = [f"{'layout':<28} {'workers':>7} {'items':>7} {'latents/s':>11} {'vs npz':>8}"]
    for row in rows:
        ratio = row.items_per_s / anchors[row.workers] if anchors.get(row.workers) else 0.0
        lines.append(f"{row.layout:<28} {row.workers:>7} {row.items:>7} {row.items_per_s:>11.0f} {ratio:>7.1f}x")
    return "\n".join(lines)
