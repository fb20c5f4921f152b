"""The crop sheet of `latentd eval --grid`: full-resolution centre crops side by side, one labelled row each."""

from __future__ import annotations

import numpy as np
import pytest

from latentd.evaluate.grid import LABEL_HEIGHT, center_crop, crop_sheet


def test_center_crop_takes_the_middle_unscaled_and_keeps_small_sides():
    image = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    assert np.array_equal(center_crop(image, 4), image[3:7, 4:8])
    assert np.array_equal(center_crop(image, 50), image)


def test_each_row_shows_the_crop_of_the_original_beside_that_of_the_reconstruction():
    rng = np.random.default_rng(0)
    originals = [rng.integers(0, 256, (300, 400, 3), dtype=np.uint8), rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)]
    reconstructions = [255 - image for image in originals]
    sheet = np.array(crop_sheet(originals, reconstructions, ["a.png  PSNR 20.00 dB", "b.png"], crop=256))
    assert sheet.shape == (2 * (LABEL_HEIGHT + 4) + 256 + 64, 256 + 4 + 256, 3)
    top = LABEL_HEIGHT
    assert np.array_equal(sheet[top:top + 256, :256], center_crop(originals[0], 256))
    assert np.array_equal(sheet[top:top + 256, 260:516], center_crop(reconstructions[0], 256))
    second = top + 256 + 4 + LABEL_HEIGHT
    assert np.array_equal(sheet[second:second + 64, 52:100], reconstructions[1])
    assert (sheet[:LABEL_HEIGHT] < 128).any()  # the label is drawn


def test_a_sheet_needs_matching_lists():
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError):
        crop_sheet([image], [image, image], ["x"])
    with pytest.raises(ValueError):
        crop_sheet([], [], [])
