"""The packaged `default` model: it ships with the package, maps 512x512 to 64x64x4 and reconstructs Kodak."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from latentd.vae import get_spec, load_codec
from latentd.vae.metrics import psnr

KODAK = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "kodak"
# The shipped weights reach 28.3 dB on kodim23 (`latentd eval`); random weights reach about 10 dB
# and wrong scaling factors far less than 20, so the floor catches a broken export or load.
KODIM_PSNR_FLOOR = 20.0
MAX_WEIGHT_BYTES = 25 * 1024 * 1024


@pytest.fixture(scope="module")
def codec():
    return load_codec("default", device="cpu")


def test_weights_are_packaged_fp16_safetensors_within_budget():
    from safetensors import safe_open

    folder = get_spec("default").packaged_path()
    assert folder is not None, "vae/weights/default/ must hold the default model"
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= MAX_WEIGHT_BYTES
    with safe_open(str(weights), framework="pt") as handle:
        assert {str(handle.get_slice(key).get_dtype()) for key in handle.keys()} == {"F16"}


def test_maps_512_squares_to_64x64x4_latents_with_unit_scale(codec):
    assert codec.info.latent_channels == 4 and codec.info.downsampling_factor == 8
    assert codec.info.scaling_factor > 0 and np.isfinite(codec.info.shift_factor)
    image = np.zeros((512, 512, 3), np.uint8)
    assert tuple(codec.encode(image).shape) == (4, 64, 64)


@pytest.mark.skipif(not KODAK.is_dir(), reason=f"Kodak images not found at {KODAK}")
def test_round_trips_a_kodak_image_above_the_floor(codec):
    from PIL import Image

    original = np.asarray(Image.open(KODAK / "kodim23.png").convert("RGB"))
    latents = codec.encode(original)
    # Scaled latents of a real photo have roughly unit variance in every channel, as the diffusion
    # convention expects: the model ships per-channel statistics (one global scale left channel 0 at
    # 0.43 and channel 2 at 1.72 standard deviations on the training images).
    assert len(codec.info.latents_mean) == len(codec.info.latents_std) == 4
    channel_std = latents.reshape(4, -1).std(dim=1)
    assert ((channel_std > 0.6) & (channel_std < 1.6)).all(), channel_std
    reconstruction = codec.decode(latents.half().float(), sizes=original.shape[:2])
    assert psnr(original, reconstruction) > KODIM_PSNR_FLOOR
