"""Tile layout and blending: full coverage, a partition of unity, exactness on pointwise maps."""

from __future__ import annotations

import pytest
import torch

from latentd.vae.tiling import blend_ramp, tile_spans, tiled_map


@pytest.mark.parametrize("length, tile, overlap", [(10, 16, 4), (16, 16, 4), (17, 16, 4), (100, 16, 4), (64, 8, 0)])
def test_spans_cover_with_at_least_the_overlap(length, tile, overlap):
    spans = tile_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(end - start == min(tile, length) for start, end in spans)
    assert all(b[0] <= a[1] - overlap for a, b in zip(spans, spans[1:]))


def test_bad_overlap():
    with pytest.raises(ValueError):
        tile_spans(100, 8, 8)


@pytest.mark.parametrize("length, scale", [(50, 1), (50, 8), (37, 2), (27, 1), (200, 3)])
def test_ramps_are_positive_and_sum_to_one_where_two_tiles_meet(length, scale):
    spans = tile_spans(length, 16, 6)
    total = torch.zeros(length * scale)
    covering = torch.zeros(length * scale)
    for index, (start, end) in enumerate(spans):
        ramp = blend_ramp(spans, index, scale)
        assert ramp.min() > 0 and ramp.max() <= 1
        total[start * scale : end * scale] += ramp
        covering[start * scale : end * scale] += 1
    pairwise = covering <= 2  # where three tiles meet, tiled_map's normalisation takes over
    torch.testing.assert_close(total[pairwise], torch.ones_like(total[pairwise]))


def test_pointwise_maps_are_exact_under_tiling():
    x = torch.randn(3, 40, 56)
    double = tiled_map(x, lambda batch: batch * 2, tile=16, overlap=4, in_scale=1, out_scale=1, batch_size=3)
    torch.testing.assert_close(double, x * 2)
    # A map that changes resolution: 2x nearest upsampling on a grid of 2 input (4 output) pixels per unit.
    upsample = lambda batch: torch.nn.functional.interpolate(batch, scale_factor=2)  # noqa: E731
    up = tiled_map(x, upsample, tile=6, overlap=2, in_scale=2, out_scale=4)
    torch.testing.assert_close(up, upsample(x[None])[0])
