"""Interpolation, prior sampling and anomaly scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from latentd.vae import InvalidInputError
from latentd.vae.latent_ops import (
    gaussian_like,
    interpolation_path,
    lerp,
    pack_latents,
    packed_latent_size,
    slerp,
    unpack_latents,
)
from latentd.vae.metrics import mse, psnr
from tests.conftest import smooth_image


def test_lerp_and_slerp_endpoints_and_norms():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    half = slerp(a, b, 0.5)
    assert half.norm().item() == pytest.approx(1.0)  # on the sphere, unlike lerp
    assert lerp(a, b, 0.5).norm().item() == pytest.approx(math.sqrt(0.5))
    torch.testing.assert_close(slerp(a, a * 2, 0.5), a * 1.5)  # parallel: falls back to lerp


def test_path_checks():
    a = torch.randn(4, 3, 3)
    path = interpolation_path(a, -a + 1, 5, "lerp")
    assert path.shape == (5, 4, 3, 3)
    with pytest.raises(InvalidInputError, match="steps"):
        interpolation_path(a, a, 1, "lerp")
    with pytest.raises(InvalidInputError, match="method"):
        interpolation_path(a, a, 3, "cubic")


def test_per_item_noise_is_reproducible():
    assert torch.equal(gaussian_like((2, 3), 5, 0), gaussian_like((2, 3), 5, 0))
    assert not torch.equal(gaussian_like((2, 3), 5, 0), gaussian_like((2, 3), 5, 1))
    assert not torch.equal(gaussian_like((2, 3), 5, 0), gaussian_like((2, 3), 6, 0))


def test_codec_interpolation_ends_at_the_reconstructions(tiny_codec):
    a, b = smooth_image(16, 20, seed=1), smooth_image(16, 20, seed=2)
    frames = tiny_codec.interpolate(a, b, steps=4, method="slerp")
    assert len(frames) == 4 and all(f.shape == (16, 20, 3) for f in frames)
    ends = tiny_codec.roundtrip([a, b])
    assert psnr(frames[0], ends[0]) > 40 and psnr(frames[-1], ends[1]) > 40
    with pytest.raises(InvalidInputError, match="one size"):
        tiny_codec.interpolate(a, smooth_image(8, 8), steps=3)


def test_prior_samples(tiny_codec):
    first = tiny_codec.sample_prior(2, 12, 9, seed=3)
    assert [f.shape for f in first] == [(12, 9, 3)] * 2
    assert all(np.array_equal(x, y) for x, y in zip(first, tiny_codec.sample_prior(2, 12, 9, seed=3)))
    assert not np.array_equal(first[0], tiny_codec.sample_prior(1, 12, 9, seed=4)[0])
    with pytest.raises(InvalidInputError):
        tiny_codec.sample_prior(0, 8, 8)


def test_anomaly_score_is_the_reconstruction_error(tiny_codec):
    images = [smooth_image(16, 16, seed=1), smooth_image(24, 16, seed=2)]
    scores = tiny_codec.anomaly_score(images)
    for image, reconstruction, score in zip(images, tiny_codec.roundtrip(images), scores):
        assert score.mse == pytest.approx(mse(image, reconstruction))
        assert score.psnr == pytest.approx(psnr(image, reconstruction))


def _flux_pack(latents: torch.Tensor) -> torch.Tensor:
    """`FluxPipeline._pack_latents` of diffusers 0.42, line for line (the pipeline needs transformers)."""
    batch_size, (num_channels_latents, height, width) = 1, latents.shape
    latents = latents[None].view(batch_size, num_channels_latents, height // 2, 2, width // 2, 2)
    latents = latents.permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch_size, (height // 2) * (width // 2), num_channels_latents * 4)[0]


def _flux_unpack(latents: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """`FluxPipeline._unpack_latents` of diffusers 0.42, line for line."""
    latents = latents[None]
    batch_size, num_patches, channels = latents.shape
    height = 2 * (int(height) // (vae_scale_factor * 2))
    width = 2 * (int(width) // (vae_scale_factor * 2))
    latents = latents.view(batch_size, height // 2, width // 2, channels // 4, 2, 2)
    latents = latents.permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch_size, channels // (2 * 2), height, width)[0]


@pytest.mark.parametrize("image_size", [(512, 512), (256, 384), (520, 272)])
def test_pack_and_unpack_match_the_flux_pipeline(image_size):
    height, width = packed_latent_size(*image_size, 8)
    latents = torch.randn(16, height, width, generator=torch.Generator().manual_seed(0))
    tokens = pack_latents(latents)
    assert tokens.shape == ((height // 2) * (width // 2), 64)
    assert torch.equal(tokens, _flux_pack(latents))
    assert torch.equal(unpack_latents(tokens, *image_size, 8), _flux_unpack(tokens, *image_size, 8))
    assert torch.equal(unpack_latents(tokens, *image_size, 8), latents)


def test_packing_refuses_odd_latents_and_tokens_that_do_not_fit():
    with pytest.raises(InvalidInputError) as odd:
        pack_latents(torch.zeros(4, 3, 4))
    assert odd.value.field == "packed"
    with pytest.raises(InvalidInputError) as misfit:
        unpack_latents(torch.zeros(15, 64), 64, 64, 8)
    assert misfit.value.field == "latents" and "[16, 4 * channels]" in str(misfit.value)
    with pytest.raises(InvalidInputError) as no_size:
        unpack_latents(torch.zeros(16, 64), 0, 64, 8)
    assert no_size.value.field == "height"
    with pytest.raises(InvalidInputError):
        unpack_latents(torch.zeros(16, 63), 64, 64, 8)
