"""How much one forward pass may take: pixels per pass and tiles, fixed on a CPU, from free memory on a GPU."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

# Activation tensors alive at once per channel of the widest level (a resnet block holds its input, the
# norm's and activation's outputs, a convolution's output and the residual sum; cuDNN's workspace and
# the allocator's rounding on top). An estimate on the generous side: the GPU test checks it against
# the peak the SD architecture actually reaches.
LIVE_TENSORS = 8
# Channels assumed where a model's config does not tell its widths.
UNKNOWN_WIDTH = 512
# Tiles are cut so that this many fit one pass: a batch of tiles keeps a large GPU busy where one
# tile would not, and smaller tiles waste more work on their overlaps.
TILES_PER_PASS = 4
# Tile sides are multiples of this (and of the model's factor): the sizes convolution kernels like.
TILE_ALIGN = 64
# The least a pass is granted however little memory is free: one small tile still runs (or fails
# with the device's own out-of-memory error, which the server reports as RESOURCE_EXHAUSTED).
MIN_PASS_PIXELS = 128 * 128


@dataclass(frozen=True)
class PassLimits:
    """What one forward pass takes, in image pixels.

    `max_batch_pixels`: images x H x W per pass (larger groups are split). `tile_size`: tile side.
    `tiles_per_pass`: tiles of one image batched into a pass. Tiling="auto" tiles an image whose side
    exceeds `tile_threshold` (CPU), or when `tile_above_pixels` is set, whose pixels exceed it (GPU:
    what does not fit one pass)."""

    max_batch_pixels: int
    tile_size: int
    tiles_per_pass: int = 1
    tile_threshold: int = 1024
    tile_above_pixels: int | None = None

    def tiles(self, height: int, width: int) -> bool:
        """Whether tiling="auto" tiles a `height` x `width` image (padded to the model's factor)."""
        if self.tile_above_pixels is not None:
            return height * width > self.tile_above_pixels
        return max(height, width) > self.tile_threshold


def widest_level(model: Any) -> int:
    """Channels per image pixel at the model's most memory-hungry resolution: each decoder level's
    width divided by how many image pixels one of its positions covers, the largest. SD's decoder:
    256 channels at full resolution (the last upsampler's output) outweigh 512 at half."""
    config = getattr(model, "config", None)
    widths = (getattr(config, "decoder_block_out_channels", None) or getattr(config, "block_out_channels", None))
    if not widths:
        return UNKNOWN_WIDTH
    widths = [int(width) for width in widths]
    # Level i runs at 1/2^i of the image's side; the block above it is upsampled into level i's
    # resolution, so level i holds tensors of max(widths[i], widths[i + 1]) channels.
    per_pixel = [max(widths[i:i + 2]) / 4 ** i for i in range(len(widths))]
    return max(1, math.ceil(max(per_pixel)))


def activation_bytes_per_pixel(model: Any, dtype: torch.dtype) -> int:
    """Estimated peak activation bytes per image pixel of one forward pass of `model` in `dtype`."""
    return widest_level(model) * LIVE_TENSORS * torch.empty((), dtype=dtype).element_size()


def plan_passes(free_bytes: int, bytes_per_pixel: int, *, fraction: float, factor: int, overlap: int) -> PassLimits:
    """Limits for a GPU with `free_bytes` free, of which passes may use `fraction`: as many pixels per
    pass as the estimate allows, images that do not fit one pass tiled, tiles cut so that
    TILES_PER_PASS of them fit a pass (sides aligned to TILE_ALIGN and the factor, above `overlap`)."""
    if free_bytes < 0 or bytes_per_pixel <= 0 or not 0 < fraction <= 1:
        raise ValueError(f"free_bytes {free_bytes}, bytes_per_pixel {bytes_per_pixel}, fraction {fraction}")
    max_pixels = max(MIN_PASS_PIXELS, int(free_bytes * fraction) // bytes_per_pixel)
    align = math.lcm(TILE_ALIGN, factor)
    tile = int(math.sqrt(max_pixels / TILES_PER_PASS)) // align * align
    # Above the overlap by a whole aligned step, so that tiles advance.
    tile = max(tile, (overlap // align + 1) * align)
    return PassLimits(max_batch_pixels=max_pixels, tile_size=tile, tiles_per_pass=max(1, max_pixels // tile ** 2),
                      tile_above_pixels=max_pixels)
