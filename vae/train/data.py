"""Training data: image folders scanned recursively, deterministic random crops and flips, skipped bad files."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from latentd.v1.errors import one_line

from ..errors import InvalidImageError, InvalidInputError
from ..imageio import find_image_files, open_image

logger = logging.getLogger(__name__)

TRAINING_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Fallback images tried when a file fails to decode mid-run (it was readable when scanned).
_FALLBACK_TRIES = 8


@dataclass
class ScanResult:
    files: list[Path]
    skipped: list[tuple[Path, str]]


def scan_images(folders: Sequence[str | Path], *, check: bool = True) -> ScanResult:
    """Every JPEG/PNG/WebP under `folders` (recursive, sorted); unreadable ones listed, not fatal."""
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for folder in folders:
        if not Path(folder).is_dir():
            raise InvalidInputError(f"data folder {folder} does not exist", field="data.train_dirs")
    for path in find_image_files(list(folders), TRAINING_SUFFIXES):
        reason = _unreadable(path) if check else None
        if reason is None:
            files.append(path)
        else:
            skipped.append((path, reason))
    for path, reason in skipped:
        logger.warning("skipping %s: %s", path, reason)
    return ScanResult(files, skipped)


def _unreadable(path: Path) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                image.verify()
    except Exception as exc:  # any decoder failure means the same thing here
        return one_line(exc)
    return None


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The crop/flip randomness of one sample: fixed by (seed, epoch, index), whichever worker loads it."""
    return np.random.default_rng([seed, epoch, index])


def random_crop(image: Image.Image, size: int, rng: np.random.Generator, hflip: bool) -> np.ndarray:
    """A size x size crop (upscaling images smaller than the crop), flipped with probability 1/2."""
    width, height = image.size
    if min(width, height) < size:
        scale = size / min(width, height)
        image = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                             Image.Resampling.BICUBIC)
        width, height = image.size
    left = int(rng.integers(0, width - size + 1))
    top = int(rng.integers(0, height - size + 1))
    crop = np.array(image.crop((left, top, left + size, top + size)))
    if hflip and rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def to_model_tensor(pixels: np.ndarray) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1]."""
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


class CropDataset(Dataset):
    """Random crops of image files. Keys are (index, epoch) pairs from `EpochSampler`."""

    def __init__(self, files: Sequence[Path], crop_size: int, *, hflip: bool = True, seed: int = 0):
        if not files:
            raise InvalidInputError("no readable training images found", field="data.train_dirs")
        self.files = list(files)
        self.crop_size = crop_size
        self.hflip = hflip
        self.seed = seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        """(crop, number of files that failed before one decoded)."""
        index, epoch = key
        for attempt in range(_FALLBACK_TRIES):
            path = self.files[(index + attempt) % len(self.files)]
            try:
                image = open_image(path)
            except InvalidImageError as exc:
                logger.warning("skipping %s: %s", path, exc.reason)
                continue
            rng = item_rng(self.seed, epoch, index)
            return to_model_tensor(random_crop(image, self.crop_size, rng, self.hflip)), attempt
        raise InvalidInputError(f"{_FALLBACK_TRIES} consecutive training images failed to decode near {path}",
                                field="data.train_dirs")


def collate_crops(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, int]:
    return torch.stack([crop for crop, _ in items]), sum(skipped for _, skipped in items)


class EpochSampler(Sampler):
    """A seeded permutation per epoch, yielding (index, epoch) keys so workers know the epoch.

    The order depends only on (seed, epoch), so a resumed run can skip to the exact batch.
    """

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        for index in torch.randperm(self.size, generator=generator).tolist():
            yield index, self.epoch


def load_validation_images(folder: str | Path | None, limit: int) -> list[tuple[str, np.ndarray]]:
    """Up to `limit` validation images (name, HWC uint8), in file-name order; bad files skipped."""
    if folder is None or limit <= 0:
        return []
    images = []
    for path in scan_images([folder]).files[:limit]:
        images.append((path.name, np.array(open_image(path))))
    return images
