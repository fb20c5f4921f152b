"""PSNR, SSIM and MS-SSIM as CompressAI reports them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from latentd.vae.metrics import mean_of, ms_ssim, mse, psnr, ssim
from tests.conftest import smooth_image


def test_psnr_known_value():
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 10, np.uint8)
    assert mse(a, b) == 100
    assert psnr(a, b) == pytest.approx(20 * math.log10(255) - 20)
    assert psnr(a, a) == math.inf


def test_ssim_and_ms_ssim():
    image = smooth_image(200, 240)
    noise = np.random.default_rng(0).integers(-20, 20, image.shape)
    noisy = np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)
    assert ssim(image, image) == pytest.approx(1.0)
    assert 0 < ssim(image, noisy) < 1
    assert ms_ssim(image, image) == pytest.approx(1.0)
    assert 0 < ms_ssim(image, noisy) < 1
    assert ms_ssim(image[:100], noisy[:100]) is None  # too small for five scales


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        psnr(np.zeros((2, 2, 3)), np.zeros((2, 2, 3)))


def test_mean_of_per_image_values():
    assert mean_of([1.0, None, 3.0]) == 2.0
    assert mean_of([None]) is None
