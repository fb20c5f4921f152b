"""Tiled application of a convolutional model with overlap blending, for images of any size.

Tiles are laid out on the latent grid so that every tile edge falls on a latent pixel in both the
input and the output. Overlapping outputs are blended with linear ramps normalised by their summed
weight, so each output pixel is a convex combination of the tiles that cover it and no seam shows.
Memory is bounded by the tile size: only one batch of tiles is alive at a time.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .stopping import checkpoint


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Start/end pairs covering [0, length) with tiles of `tile` overlapping by at least `overlap`."""
    if tile <= overlap:
        raise ValueError(f"tile ({tile}) must be larger than overlap ({overlap})")
    if length <= tile:
        return [(0, length)]
    # The fewest tiles that keep `overlap`, spread evenly so that every overlap is about equal.
    count = 1 + math.ceil((length - tile) / (tile - overlap))
    return [(start, start + tile) for start in (round(i * (length - tile) / (count - 1)) for i in range(count))]


def blend_ramp(spans: list[tuple[int, int]], index: int, scale: int) -> torch.Tensor:
    """1-D weights of tile `index` in output units (`scale` output pixels per grid unit).

    The weight rises linearly across the overlap with the previous tile and falls across the
    overlap with the next one; elsewhere it is 1. Weights stay positive so the sum never vanishes.
    """
    start, end = spans[index]
    length = (end - start) * scale
    weights = torch.ones(length)
    if index > 0:
        rise = (spans[index - 1][1] - start) * scale
        if rise > 0:
            weights[:rise] = (torch.arange(rise) + 0.5) / rise
    if index + 1 < len(spans):
        fall = (end - spans[index + 1][0]) * scale
        if fall > 0:
            weights[length - fall :] = torch.minimum(weights[length - fall :], (torch.arange(fall, 0, -1) - 0.5) / fall)
    return weights


def tiled_map(
    x: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    tile: int,
    overlap: int,
    in_scale: int,
    out_scale: int,
    batch_size: int = 1,
) -> torch.Tensor:
    """Apply `fn` (a batch [B, C, h, w] -> [B, C', h', w']) to `x` [C, H, W] tile by tile.

    `tile` and `overlap` are in latent-grid units; the grid has H / in_scale rows, and the output
    has out_scale output pixels per grid unit (encode: in_scale=f, out_scale=1; decode: 1 and f).
    """
    grid_h, grid_w = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    rows, cols = tile_spans(grid_h, tile, overlap), tile_spans(grid_w, tile, overlap)
    out: torch.Tensor | None = None  # allocated once the first tile tells the output channels
    total = torch.zeros(1, grid_h * out_scale, grid_w * out_scale)
    row_ramps = [blend_ramp(rows, i, out_scale) for i in range(len(rows))]
    col_ramps = [blend_ramp(cols, j, out_scale) for j in range(len(cols))]
    cells = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
    for first in range(0, len(cells), batch_size):
        checkpoint()
        chunk = cells[first : first + batch_size]
        # Tiles of one chunk can differ in size only at the edges; group equal shapes.
        by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, j in chunk:
            shape = (rows[i][1] - rows[i][0], cols[j][1] - cols[j][0])
            by_shape.setdefault(shape, []).append((i, j))
        for group in by_shape.values():
            batch = torch.stack(
                [
                    x[:, rows[i][0] * in_scale : rows[i][1] * in_scale, cols[j][0] * in_scale : cols[j][1] * in_scale]
                    for i, j in group
                ]
            )
            results = fn(batch).float().cpu()
            if out is None:
                out = torch.zeros(results.shape[1], grid_h * out_scale, grid_w * out_scale)
            for (i, j), result in zip(group, results):
                weight = row_ramps[i][:, None] * col_ramps[j][None, :]
                ys = slice(rows[i][0] * out_scale, rows[i][1] * out_scale)
                xs = slice(cols[j][0] * out_scale, cols[j][1] * out_scale)
                out[:, ys, xs] += result * weight
                total[:, ys, xs] += weight
    assert out is not None  # the grid always has at least one tile
    return out.div_(total)
