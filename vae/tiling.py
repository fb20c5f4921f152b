"""Tiled application of a convolutional model with overlap blending, for images of any size.

Tiles are laid out on the latent grid so that every tile edge falls on a latent pixel in both the
input and the output. Overlapping outputs are blended with linear ramps normalised by their summed
weight, so each output pixel is a convex combination of the tiles that cover it and no seam shows.
Memory is bounded by the tile size: only one batch of tiles is alive at a time. Tiles blend where
the model's outputs are (on a GPU, on the device). With
`shared_norms`, the model's GroupNorm layers use the whole image's statistics instead of each
tile's (see `tile_norms`), which removes what makes tiles visible at the cost of holding every
tile's activations at once.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

from .stopping import checkpoint
from .tile_norms import RecomputedStatistics, SharedStatistics

# Tiles sharing statistics run as one thread each and hold their activations together; beyond this
# many (a 4096-pixel sliver has thousands) each tile normalises alone, in bounded threads and memory.
MAX_SHARED_TILES = 512


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


def core_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The spans cut at the middle of each overlap: a partition of [0, length), one part per tile."""
    cuts = [0] + [(spans[i - 1][1] + spans[i][0]) // 2 for i in range(1, len(spans))] + [spans[-1][1]]
    return list(zip(cuts[:-1], cuts[1:]))


def tiled_map(
    x: torch.Tensor,
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    tile: int,
    overlap: int,
    in_scale: int,
    out_scale: int,
    batch_size: int = 1,
    shared_norms: bool = False,
    recompute_norms: bool = False,
) -> torch.Tensor:
    """Apply `fn` (a batch [B, C, h, w] -> [B, C', h', w']) to `x` [C, H, W] tile by tile.

    `tile` and `overlap` are in latent-grid units; the grid has H / in_scale rows, and the output
    has out_scale output pixels per grid unit (encode: in_scale=f, out_scale=1; decode: 1 and f).
    With `shared_norms`, every tile runs on its own (batch of one) and the GroupNorm layers of the
    model behind `fn` normalise with the whole image's statistics (`tile_norms.TileGroupNorm`), up to
    MAX_SHARED_TILES tiles: all tiles at once, or with `recompute_norms` one at a time, rerun once per
    GroupNorm layer (`tile_norms.RecomputedStatistics`).
    """
    grid_h, grid_w = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    rows, cols = tile_spans(grid_h, tile, overlap), tile_spans(grid_w, tile, overlap)
    cells = [(i, j) for i in range(len(rows)) for j in range(len(cols))]

    def tile_of(i: int, j: int) -> torch.Tensor:
        return x[:, rows[i][0] * in_scale : rows[i][1] * in_scale, cols[j][0] * in_scale : cols[j][1] * in_scale]

    if shared_norms and 1 < len(cells) <= MAX_SHARED_TILES:
        checkpoint()
        row_cores, col_cores = core_spans(rows), core_spans(cols)
        calls = [(lambda i=i, j=j: fn(tile_of(i, j)[None]),
                  (rows[i][1] - rows[i][0], cols[j][1] - cols[j][0]),
                  (row_cores[i][0] - rows[i][0], row_cores[i][1] - rows[i][0],
                   col_cores[j][0] - cols[j][0], col_cores[j][1] - cols[j][0])) for i, j in cells]
        # The tiles agree wherever their edges do not reach: each output pixel comes from its core.
        row_weights = [core_weight(rows, row_cores, i, out_scale) for i in range(len(rows))]
        col_weights = [core_weight(cols, col_cores, j, out_scale) for j in range(len(cols))]

        def blend(results) -> torch.Tensor:
            return _blend(zip(cells, (result[0] for result in results)), rows, cols, grid_h, grid_w, out_scale,
                          (row_weights, col_weights))
        if not recompute_norms:
            return blend(SharedStatistics(len(calls)).run(calls))
        # Recomputed tiles come one at a time and are blended as they come, never held together.
        with contextlib.closing(RecomputedStatistics(len(calls)).stream(calls)) as results:
            return blend(results)

    def batches():
        for first in range(0, len(cells), batch_size):
            checkpoint()
            chunk = cells[first : first + batch_size]
            # Tiles of one chunk can differ in size only at the edges; group equal shapes.
            by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
            for i, j in chunk:
                by_shape.setdefault((rows[i][1] - rows[i][0], cols[j][1] - cols[j][0]), []).append((i, j))
            for group in by_shape.values():
                yield from zip(group, fn(torch.stack([tile_of(i, j) for i, j in group])))
    ramps = ([blend_ramp(rows, i, out_scale) for i in range(len(rows))],
             [blend_ramp(cols, j, out_scale) for j in range(len(cols))])
    return _blend(batches(), rows, cols, grid_h, grid_w, out_scale, ramps)


def core_weight(spans: list[tuple[int, int]], cores: list[tuple[int, int]], index: int, scale: int) -> torch.Tensor:
    """1-D weights of tile `index` in output units: 1 on its core, 0 elsewhere."""
    start, end = spans[index]
    weights = torch.zeros((end - start) * scale)
    weights[(cores[index][0] - start) * scale : (cores[index][1] - start) * scale] = 1.0
    return weights


def _blend(results, rows: list[tuple[int, int]], cols: list[tuple[int, int]], grid_h: int, grid_w: int,
           out_scale: int, weights: tuple[list[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
    """Sum the tiles' outputs ((i, j), [C', h', w']) under their 1-D row and column weights and normalise."""
    out: torch.Tensor | None = None  # allocated once the first tile tells the output channels and device
    total: torch.Tensor | None = None
    row_ramps, col_ramps = weights
    for (i, j), result in results:
        result = result.float()
        if out is None:
            out = torch.zeros(result.shape[0], grid_h * out_scale, grid_w * out_scale, device=result.device)
            total = torch.zeros(1, grid_h * out_scale, grid_w * out_scale, device=result.device)
            row_ramps = [ramp.to(result.device) for ramp in row_ramps]
            col_ramps = [ramp.to(result.device) for ramp in col_ramps]
        weight = row_ramps[i][:, None] * col_ramps[j][None, :]
        ys = slice(rows[i][0] * out_scale, rows[i][1] * out_scale)
        xs = slice(cols[j][0] * out_scale, cols[j][1] * out_scale)
        out[:, ys, xs] += result * weight
        total[:, ys, xs] += weight  # type: ignore[index]
    assert out is not None and total is not None  # the grid always has at least one tile
    return out.div_(total)
