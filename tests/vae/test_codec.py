"""Codec behaviour on tiny models: the shared contract for each model class, plus KL-only features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentd.vae import Codec, CodecOptions, InvalidInputError, NumericalError
from tests.conftest import make_tiny_flux2, make_tiny_kl, make_tiny_taesd, smooth_image
from tests.vae.codec_contract import CodecContract


class TestKLCodec(CodecContract):
    tiling_psnr_floor = 15.0

    def make_codec(self, **kwargs) -> Codec:
        return Codec(make_tiny_kl(), name="tiny-kl", **kwargs)


class TestTinyCodec(CodecContract):
    def make_codec(self, **kwargs) -> Codec:
        return Codec(make_tiny_taesd(), name="tiny-taesd", **kwargs)


def test_info_reports_the_model(tiny_codec):
    info = tiny_codec.info
    assert (info.latent_channels, info.downsampling_factor) == (4, 2)
    assert (info.scaling_factor, info.shift_factor) == (0.5, 0.1)
    assert info.dtype == "float32" and info.has_posterior and info.parameters > 0
    assert Codec(make_tiny_taesd()).info.has_posterior is False


def test_sampling_is_reproducible_per_seed(tiny_codec, image):
    mean = tiny_codec.encode(image)
    first = tiny_codec.encode(image, sample=True, seed=7)
    assert torch.equal(first, tiny_codec.encode(image, sample=True, seed=7))
    assert not torch.equal(first, tiny_codec.encode(image, sample=True, seed=8))
    assert not torch.equal(first, mean)
    # An image's noise depends on its seed and position, not on the batch it travels in.
    batched = tiny_codec.encode([image, smooth_image(16, 16)], sample=True, seed=7)[0]
    torch.testing.assert_close(batched, first, rtol=1e-5, atol=1e-5)
    # Without a seed each call draws fresh noise.
    assert not torch.equal(tiny_codec.encode(image, sample=True), tiny_codec.encode(image, sample=True))


def test_sampling_a_deterministic_model_is_refused(image):
    with pytest.raises(InvalidInputError, match="deterministic") as caught:
        Codec(make_tiny_taesd()).encode(image, sample=True, seed=1)
    assert caught.value.field == "sample"


@pytest.mark.parametrize("make", [make_tiny_kl, make_tiny_flux2])  # FLUX.2's VAE has the same blocks
def test_fast_inference_matches_plain_diffusers(image, make):
    fast = Codec(make(), options=CodecOptions(optimize=True))
    plain = Codec(make(), options=CodecOptions(optimize=False))
    torch.testing.assert_close(fast.encode(image), plain.encode(image), rtol=1e-4, atol=1e-5)
    latents = plain.encode(image)
    torch.testing.assert_close(fast.decode(latents, output="tensor"), plain.decode(latents, output="tensor"),
                               rtol=1e-4, atol=1e-5)


def test_matches_diffusers_conventions(image):
    model = make_tiny_kl()
    codec = Codec(make_tiny_kl())
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        expected = model.encode(x).latent_dist.mode() * 0.5 - 0.1 * 0.5
        decoded = model.decode((expected + 0.05) / 0.5).sample
    torch.testing.assert_close(codec.encode(image)[None], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(codec.decode(expected, output="tensor"), decoded, rtol=1e-4, atol=1e-5)


def test_non_finite_half_precision_output_is_retried_in_float32(image, monkeypatch):
    codec = Codec(make_tiny_kl(), dtype="bfloat16")
    expected = Codec(make_tiny_kl()).encode(image)
    decoder = codec.model.decoder
    original = type(decoder).forward

    def overflowing(self, *args, **kwargs):  # what fp16 overflow looks like: inf in low precision only
        out = original(self, *args, **kwargs)
        return out * float("inf") if out.dtype != torch.float32 else out

    monkeypatch.setattr(type(decoder), "forward", overflowing)
    decoded = codec.decode(expected, output="tensor")
    assert torch.isfinite(decoded).all()
    reference = Codec(make_tiny_kl()).decode(expected, output="tensor")
    torch.testing.assert_close(decoded, reference, rtol=1e-4, atol=1e-4)


def test_after_one_overflow_the_model_runs_in_float32_at_once(image, monkeypatch):
    codec = Codec(make_tiny_kl(), dtype="bfloat16")
    latents = Codec(make_tiny_kl()).encode(image)
    decoder = codec.model.decoder
    original = type(decoder).forward
    calls = []

    def overflowing(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(out.dtype)
        return out * float("inf") if out.dtype != torch.float32 else out

    monkeypatch.setattr(type(decoder), "forward", overflowing)
    first = codec.decode(latents, output="tensor")
    assert calls == [torch.bfloat16, torch.float32]
    second = codec.decode(latents, output="tensor")
    assert calls == [torch.bfloat16, torch.float32, torch.float32]  # no second half-precision attempt
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("force_upcast, expected", [(True, torch.float32), (False, torch.float16)])
def test_float16_on_a_model_that_forces_upcast_runs_in_a_safe_dtype_up_front(force_upcast, expected):
    codec = Codec(make_tiny_kl(force_upcast=force_upcast), dtype="float16")
    assert codec.placement.dtype == expected  # the CPU has no native bfloat16: float32
    assert Codec(make_tiny_kl(force_upcast=True), dtype="bfloat16").placement.dtype == torch.bfloat16


def test_non_finite_float32_output_raises(image, monkeypatch):
    codec = Codec(make_tiny_kl())
    decoder = codec.model.decoder
    original = type(decoder).forward
    monkeypatch.setattr(type(decoder), "forward", lambda self, *a, **k: original(self, *a, **k) * float("nan"))
    with pytest.raises(NumericalError):
        codec.decode(codec.encode(image))


def test_options_are_checked():
    with pytest.raises(InvalidInputError, match="multiples"):
        Codec(make_tiny_kl(), options=CodecOptions(tile_size=33))
    with pytest.raises(InvalidInputError, match="tile_overlap"):
        Codec(make_tiny_kl(), options=CodecOptions(tile_size=32, tile_overlap=32))
    with pytest.raises(InvalidInputError, match="tiling"):
        Codec(make_tiny_kl()).encode(smooth_image(8, 8), tiling="sometimes")


def test_auto_tiling_starts_above_the_threshold(monkeypatch):
    codec = Codec(make_tiny_kl(), options=CodecOptions(tile_size=32, tile_overlap=8, tile_threshold=48))
    calls = []
    original = codec._decode_batch
    monkeypatch.setattr(codec, "_decode_batch", lambda z, model=None: calls.append(z.shape) or original(z, model))
    codec.decode(torch.zeros(4, 24, 24))  # 48 px: one untiled call
    assert calls == [(1, 4, 24, 24)]
    calls.clear()
    codec.decode(torch.zeros(4, 40, 24))  # 80 x 48 px: tiles of 16 latents
    assert len(calls) > 1 and all(shape[-1] <= 16 and shape[-2] <= 16 for shape in calls)


@pytest.mark.slow
def test_a_4096_square_image_is_tiled_with_bounded_batches(monkeypatch):
    # f8 like the real models (a factor-2 model would give 2048x2048 latents), narrow and fast.
    model = make_tiny_kl(block_out_channels=[8, 8, 8, 8], down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=4)
    codec = Codec(model, options=CodecOptions(tile_size=512, tile_overlap=64))
    largest = []
    original = codec._encode_batch
    monkeypatch.setattr(codec, "_encode_batch",
                        lambda x, model=None: largest.append(x.shape[-2] * x.shape[-1]) or original(x, model))
    image = np.zeros((4096, 4096, 3), np.uint8)
    image[:, :, 0] = np.arange(4096, dtype=np.uint16)[None, :] // 16
    out = codec.roundtrip(image)
    assert out.shape == image.shape
    assert max(largest) <= 512 * 512
