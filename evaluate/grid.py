"""The comparison sheet of `latentd eval --grid`: full-resolution crops, original beside reconstruction, labelled."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

GAP = 4
LABEL_HEIGHT = 18


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central `size` x `size` pixels (or the whole side where the image is smaller), unscaled."""
    height, width = image.shape[:2]
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    return image[top:top + size, left:left + size]


def crop_sheet(originals: Sequence[np.ndarray], reconstructions: Sequence[np.ndarray], labels: Sequence[str],
               crop: int = 256) -> Image.Image:
    """One row per image: its centre crop at full resolution, then the same crop of the reconstruction,
    under a label (name and PSNR). Thumbnails hide the losses a codec makes; pixels at 1:1 show them."""
    if not (len(originals) == len(reconstructions) == len(labels)) or not originals:
        raise ValueError("crop_sheet needs as many originals, reconstructions and labels, at least one")
    rows = [(center_crop(o, crop), center_crop(r, crop)) for o, r in zip(originals, reconstructions)]
    width = max(a.shape[1] + GAP + b.shape[1] for a, b in rows)
    height = sum(LABEL_HEIGHT + max(a.shape[0], b.shape[0]) + GAP for a, b in rows)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for (original, reconstruction), label in zip(rows, labels):
        draw.text((2, y + 3), label, fill=(0, 0, 0))
        y += LABEL_HEIGHT
        sheet.paste(Image.fromarray(original), (0, y))
        sheet.paste(Image.fromarray(reconstruction), (original.shape[1] + GAP, y))
        y += max(original.shape[0], reconstruction.shape[0]) + GAP
    return sheet
