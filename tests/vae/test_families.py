"""Model families beyond SD-style KL-VAEs: per-channel latent statistics (SDXL-style configs), Sana's
AutoencoderDC, FLUX.2's AutoencoderKLFlux2 (patches and BatchNorm statistics), 16-channel tiny
autoencoders; each on a tiny random-weight model of the real diffusers class, checked against the
formula the matching diffusers pipeline uses (copied here: the pipelines need transformers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from latentd.v1.results import ServedModelInfo
from latentd.vae import Codec, InvalidInputError
from latentd.vae.errors import ModelLoadError
from latentd.vae.latent_ops import patchify, unpatchify

from tests.conftest import make_tiny_dc, make_tiny_flux2, make_tiny_kl, make_tiny_taesd, smooth_image
from tests.vae.codec_contract import CodecContract

# Playground v2.5's VAE statistics (SDXL architecture, its config's latents_mean / latents_std).
PLAYGROUND_MEAN = [-1.6574, 1.886, -1.383, 2.5155]
PLAYGROUND_STD = [8.4927, 5.9022, 6.5498, 5.2299]


def make_tiny_sdxl_style(**overrides):
    return make_tiny_kl(latents_mean=PLAYGROUND_MEAN, latents_std=PLAYGROUND_STD, scaling_factor=0.5,
                        shift_factor=None, **overrides)


class TestStatisticsCodec(CodecContract):
    tiling_psnr_floor = 15.0

    def make_codec(self, **kwargs) -> Codec:
        return Codec(make_tiny_sdxl_style(), name="tiny-sdxl-style", **kwargs)


class TestDCCodec(CodecContract):
    # Linear attention sees the whole tile (and a random-weight model magnifies it), so tiles differ more
    # from the whole than with convolutions alone: measured 14.6 dB on the round trip. diffusers tiles
    # DC-AE the same way (its own tiled_encode/tiled_decode), so tiling stays allowed.
    tiling_psnr_floor = 12.0

    def make_codec(self, **kwargs) -> Codec:
        return Codec(make_tiny_dc(), name="tiny-dc", **kwargs)


class TestFlux2Codec(CodecContract):
    tiling_psnr_floor = 15.0

    def make_codec(self, **kwargs) -> Codec:
        return Codec(make_tiny_flux2(), name="tiny-flux2", **kwargs)


class TestSixteenChannelTinyCodec(CodecContract):
    def make_codec(self, **kwargs) -> Codec:
        return Codec(make_tiny_taesd(latent_channels=16), name="tiny-taef1", **kwargs)


def _pixels(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1


# ---- SDXL-style per-channel statistics ---------------------------------------------------------

def test_statistics_follow_the_sdxl_pipelines(image):
    model = make_tiny_sdxl_style()
    codec = Codec(make_tiny_sdxl_style())
    assert codec.info.latents_mean == tuple(PLAYGROUND_MEAN) and codec.info.latents_std == tuple(PLAYGROUND_STD)
    with torch.no_grad():
        init_latents = model.encode(_pixels(image)).latent_dist.mode()
        # StableDiffusionXLImg2ImgPipeline.prepare_latents (diffusers 0.42):
        latents_mean = torch.tensor(model.config.latents_mean).view(1, 4, 1, 1)
        latents_std = torch.tensor(model.config.latents_std).view(1, 4, 1, 1)
        init_latents = (init_latents - latents_mean) * model.config.scaling_factor / latents_std
        # StableDiffusionXLPipeline.__call__, before vae.decode:
        latents = init_latents * latents_std / model.config.scaling_factor + latents_mean
        decoded = model.decode(latents).sample
    torch.testing.assert_close(codec.encode(image)[None], init_latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(codec.decode(init_latents, output="tensor"), decoded, rtol=1e-4, atol=1e-5)


def test_statistics_of_the_wrong_length_are_refused():
    with pytest.raises(ModelLoadError, match="one per latent channel"):
        Codec(make_tiny_kl(latents_mean=[0.0] * 3, latents_std=[1.0] * 3))
    with pytest.raises(ModelLoadError, match="positive"):
        Codec(make_tiny_kl(latents_mean=[0.0] * 4, latents_std=[1.0, 0.0, 1.0, 1.0]))


def test_sd3_style_shift_follows_the_sd3_pipelines(image):
    model = make_tiny_kl(scaling_factor=1.5305, shift_factor=0.0609)
    codec = Codec(make_tiny_kl(scaling_factor=1.5305, shift_factor=0.0609))
    assert codec.info.latents_mean == ()
    with torch.no_grad():
        init_latents = model.encode(_pixels(image)).latent_dist.mode()
        # StableDiffusion3Img2ImgPipeline.prepare_latents:
        init_latents = (init_latents - model.config.shift_factor) * model.config.scaling_factor
        # StableDiffusion3Pipeline.__call__, before vae.decode:
        latents = (init_latents / model.config.scaling_factor) + model.config.shift_factor
        decoded = model.decode(latents).sample
    torch.testing.assert_close(codec.encode(image)[None], init_latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(codec.decode(init_latents, output="tensor"), decoded, rtol=1e-4, atol=1e-5)


# ---- Sana's DC-AE ------------------------------------------------------------------------------

def test_dc_follows_the_sana_pipelines(image):
    model = make_tiny_dc()
    codec = Codec(make_tiny_dc())
    info = codec.info
    assert (info.model_class, info.latent_channels, info.scaling_factor) == ("AutoencoderDC", 8, 0.41407)
    assert info.has_posterior is False and info.patch_size == 1
    with torch.no_grad():
        # SanaControlNetPipeline.__call__ (the control image's latents):
        control_image = model.encode(_pixels(image)).latent
        control_image = control_image * model.config.scaling_factor
        # SanaPipeline.__call__:
        decoded = model.decode(control_image / model.config.scaling_factor, return_dict=False)[0]
    torch.testing.assert_close(codec.encode(image)[None], control_image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(codec.decode(control_image, output="tensor"), decoded, rtol=1e-4, atol=1e-5)
    with pytest.raises(InvalidInputError, match="deterministic"):
        codec.encode(image, sample=True, seed=1)


@pytest.mark.parametrize("layers, factor", [([1, 1], 2), ([1, 1, 1], 4), ([0, 1, 1], 4), ([1, 1, 1, 1], 8)])
def test_dc_factor_is_counted_as_its_encoder_downsamples(layers, factor):
    blocks = len(layers)
    model = make_tiny_dc(encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                         encoder_block_out_channels=[8] * (blocks - 1) + [16],
                         decoder_block_out_channels=[8] * (blocks - 1) + [16],
                         encoder_layers_per_block=layers, decoder_layers_per_block=[1] * blocks,
                         encoder_qkv_multiscales=[[]] * blocks, decoder_qkv_multiscales=[[]] * blocks)
    codec = Codec(model)
    assert codec.factor == factor
    with torch.no_grad():
        assert model.encode(torch.zeros(1, 3, 8 * factor, 8 * factor)).latent.shape[-2:] == (8, 8)


# ---- FLUX.2: 2x2 patches normalised by the VAE's BatchNorm statistics --------------------------

def _flux2_patchify_latents(latents):
    """`Flux2Pipeline._patchify_latents` of diffusers 0.42, line for line."""
    batch_size, num_channels_latents, height, width = latents.shape
    latents = latents.view(batch_size, num_channels_latents, height // 2, 2, width // 2, 2)
    latents = latents.permute(0, 1, 3, 5, 2, 4)
    latents = latents.reshape(batch_size, num_channels_latents * 4, height // 2, width // 2)
    return latents


def _flux2_unpatchify_latents(latents):
    """`Flux2Pipeline._unpatchify_latents`, line for line."""
    batch_size, num_channels_latents, height, width = latents.shape
    latents = latents.reshape(batch_size, num_channels_latents // (2 * 2), 2, 2, height, width)
    latents = latents.permute(0, 1, 4, 2, 5, 3)
    latents = latents.reshape(batch_size, num_channels_latents // (2 * 2), height * 2, width * 2)
    return latents


def test_patchify_matches_the_flux2_pipeline():
    z = torch.randn(2, 4, 6, 10)
    torch.testing.assert_close(patchify(z, 2), _flux2_patchify_latents(z), rtol=0, atol=0)
    torch.testing.assert_close(unpatchify(patchify(z, 2), 2), z, rtol=0, atol=0)
    torch.testing.assert_close(unpatchify(patchify(z, 2), 2), _flux2_unpatchify_latents(patchify(z, 2)), rtol=0,
                               atol=0)
    assert patchify(z, 1) is z


def test_flux2_follows_the_flux2_pipeline(image):
    model = make_tiny_flux2()
    codec = Codec(make_tiny_flux2())
    info = codec.info
    assert (info.model_class, info.patch_size, info.latent_channels, info.downsampling_factor) == \
        ("AutoencoderKLFlux2", 2, 16, 4)
    assert info.has_posterior and len(info.latents_mean) == len(info.latents_std) == 16
    with torch.no_grad():
        # Flux2Pipeline._encode_vae_image (retrieve_latents with sample_mode="argmax": the mode):
        image_latents = model.encode(_pixels(image)).latent_dist.mode()
        image_latents = _flux2_patchify_latents(image_latents)
        latents_bn_mean = model.bn.running_mean.view(1, -1, 1, 1)
        latents_bn_std = torch.sqrt(model.bn.running_var.view(1, -1, 1, 1) + model.config.batch_norm_eps)
        image_latents = (image_latents - latents_bn_mean) / latents_bn_std
        # Flux2Pipeline.__call__, before vae.decode:
        latents = image_latents * latents_bn_std + latents_bn_mean
        latents = _flux2_unpatchify_latents(latents)
        decoded = model.decode(latents, return_dict=False)[0]
    torch.testing.assert_close(codec.encode(image)[None], image_latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(codec.decode(image_latents, output="tensor"), decoded, rtol=1e-4, atol=1e-5)
    raw = codec.encode(image, scaled=False)
    with torch.no_grad():
        torch.testing.assert_close(unpatchify(raw[None], 2), model.encode(_pixels(image)).latent_dist.mode(),
                                   rtol=1e-5, atol=1e-5)


def test_flux2_posterior_and_samples_are_patched(image):
    codec = Codec(make_tiny_flux2())
    [(mean, logvar)] = codec.posterior(image)
    assert mean.shape == logvar.shape == (16, 12, 16)
    first = codec.encode(image, sample=True, seed=3)
    assert torch.equal(first, codec.encode(image, sample=True, seed=3)) and first.shape == (16, 12, 16)


def test_flux2_half_precision_keeps_its_statistics_exact():
    codec = Codec(make_tiny_flux2(), dtype="bfloat16")
    assert codec.info.latents_mean == Codec(make_tiny_flux2()).info.latents_mean
    assert codec.info.dtype == "bfloat16"


def test_fast_inference_leaves_dc_blocks_alone():
    from latentd.vae.fast_inference import optimize_for_inference

    assert optimize_for_inference(make_tiny_dc()) == 0


# ---- what ModelInfo carries over the wire ------------------------------------------------------

def test_statistics_and_patches_survive_the_wire_message():
    info = Codec(make_tiny_flux2(), name="f2").info
    served = ServedModelInfo(**info.to_dict(), device="cpu", max_pixels=10, max_batch_size=2)
    back = ServedModelInfo.from_message(served.to_message())
    assert back == served and back.patch_size == 2 and isinstance(back.latents_mean, tuple)
    plain = ServedModelInfo(**Codec(make_tiny_kl()).info.to_dict())
    assert ServedModelInfo.from_message(plain.to_message()).latents_mean == ()


# ---- FLUX.1's packed layout in process (the server's EncodeOptions.packed mirrors it) -----------

def test_codec_packs_and_unpacks_as_the_server_does(image):
    from latentd.vae.latent_ops import pack_latents

    codec = Codec(make_tiny_kl(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159))
    plain = codec.encode(image)
    packed = codec.encode(image, packed=True)
    assert packed.shape == (12 * 16, 64)  # a 24x32 latent grid in 2x2 patches
    torch.testing.assert_close(packed, pack_latents(plain), rtol=0, atol=0)
    np.testing.assert_array_equal(codec.decode(packed, sizes=(48, 64), packed=True), codec.decode(plain))
    assert codec.decode(packed, sizes=(51, 66), packed=True).shape == (48, 64, 3)
    both = codec.encode(np.stack([image, image]), packed=True)
    assert both.shape == (2, 192, 64) and len(codec.decode(both, sizes=(48, 64), packed=True)) == 2
    with pytest.raises(InvalidInputError) as caught:
        codec.encode(smooth_image(18, 64), packed=True)
    assert caught.value.field == "packed"
    with pytest.raises(InvalidInputError) as caught:
        codec.decode(packed, packed=True)
    assert caught.value.field == "sizes"
    with pytest.raises(InvalidInputError) as caught:
        codec.decode(packed, sizes=(64, 64), packed=True)
    assert caught.value.field == "latents"
