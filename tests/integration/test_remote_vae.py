"""The diffusers shims against a real server: a real pipeline, the calls pipelines make, chunking, slicing, tiling,
half precision on the wire and the AutoencoderDC shim, each compared with the local VAE (no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from diffusers.image_processor import VaeImageProcessor

from latentd.client import LatentClient
from latentd.client.diffusers import RemoteAutoencoderDC, RemoteAutoencoderKL
from latentd.vae import load_model


@pytest.fixture
def remote_and_local(start_server, model_dirs):
    harness = start_server(max_batch_size=1)
    local = load_model(model_dirs["tiny"]).model.eval()
    return RemoteAutoencoderKL(harness.address, model="tiny"), local


def _pipeline(vae) -> DiTPipeline:
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
        norm_elementwise_affine=False)
    return DiTPipeline(transformer=transformer.eval(), vae=vae, scheduler=DDIMScheduler())


def test_a_pipeline_gives_the_same_images_with_the_remote_vae(remote_and_local):
    remote, local = remote_and_local
    pipe = _pipeline(local)
    expected = pipe(class_labels=[1, 3], num_inference_steps=2, generator=torch.manual_seed(0),
                    output_type="np").images
    pipe.vae = remote  # the one-line swap
    got = pipe(class_labels=[1, 3], num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert got.shape == expected.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert remote.config.scaling_factor == pytest.approx(local.config.scaling_factor)
    assert 2 ** (len(remote.config.block_out_channels) - 1) == 2 ** (len(local.config.block_out_channels) - 1)


def test_encode_matches_the_local_posterior(remote_and_local):
    remote, local = remote_and_local
    x = torch.rand(2, 3, 24, 32, generator=torch.manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = local.encode(x).latent_dist
    got = remote.encode(x).latent_dist
    torch.testing.assert_close(got.mode(), expected.mode(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.std, expected.std, atol=1e-5, rtol=1e-5)
    # What img2img pipelines do (`retrieve_latents`): sample the posterior with the caller's generator.
    with torch.no_grad():
        local_sample = local.encode(x).latent_dist.sample(torch.manual_seed(3))
    torch.testing.assert_close(remote.encode(x).latent_dist.sample(torch.manual_seed(3)), local_sample,
                               atol=1e-4, rtol=1e-4)
    z = expected.mode()
    sample = remote.decode(z, return_dict=False)[0]
    with torch.no_grad():
        torch.testing.assert_close(sample, local.decode(z).sample, atol=1e-4, rtol=1e-4)


def test_deterministic_models_are_refused(start_server):
    harness = start_server()
    with pytest.raises(ValueError, match="no posterior"):
        RemoteAutoencoderKL(harness.address, model="fast")


# ---- the whole shim: the calls pipelines make, chunking, slicing, tiling, wire dtype, AutoencoderDC ----------


class RecordingClient(LatentClient):
    """A LatentClient that notes each encode/decode request: (method, images, dtype sent, options)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[str, int, torch.dtype, dict]] = []

    def posterior(self, images, **options):
        self.sent.append(("posterior", len(images), images.dtype, options))
        return super().posterior(images, **options)

    def encode(self, images, **options):
        self.sent.append(("encode", len(images), images.dtype, options))
        return super().encode(images, **options)

    def decode(self, latents, **options):
        self.sent.append(("decode", len(latents), latents.dtype, options))
        return super().decode(latents, **options)


def _images(count: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 3, height, width, generator=torch.manual_seed(seed)) * 2 - 1


def test_a_stable_diffusion_style_call_sequence_matches_the_local_vae(start_server, model_dirs):
    harness = start_server(max_batch_size=1)
    local = load_model(model_dirs["tiny"]).model.eval()
    vae = RemoteAutoencoderKL(client=RecordingClient(harness.address), model="tiny")
    # What pipelines and their loaders do to a VAE before using it.
    assert vae.eval().requires_grad_(False).to("cpu", dtype=torch.float32) is vae
    vae.enable_slicing()
    vae.disable_slicing()
    config = vae.config
    assert config.scaling_factor == pytest.approx(local.config.scaling_factor)
    assert config.latent_channels == local.config.latent_channels and config.force_upcast is False
    assert config.latents_mean is None and config.get("latents_std") is None and "shift_factor" in config
    vae_scale_factor = 2 ** (len(config.block_out_channels) - 1)
    assert vae_scale_factor == 2 ** (len(local.config.block_out_channels) - 1)

    processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
    pixels = (torch.rand(2, 20, 24, 3, generator=torch.manual_seed(5))).numpy()  # NHWC in [0, 1]
    x = processor.preprocess(pixels)  # NCHW in [-1, 1], sides a multiple of vae_scale_factor
    latents = vae.encode(x).latent_dist.sample(torch.manual_seed(3)) * config.scaling_factor  # img2img
    decoded = vae.decode(latents / config.scaling_factor, return_dict=False)[0]
    got = processor.postprocess(decoded, output_type="np")
    with torch.no_grad():
        local_latents = local.encode(x).latent_dist.sample(torch.manual_seed(3)) * config.scaling_factor
        expected = processor.postprocess(local.decode(local_latents / config.scaling_factor, return_dict=False)[0],
                                         output_type="np")
    torch.testing.assert_close(latents, local_latents, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert [(method, count) for method, count, _, _ in vae.client.sent] == [("posterior", 2), ("decode", 2)]
    assert all(options["tiling"] == "auto" for *_, options in vae.client.sent)


def test_tiling_and_slicing_become_request_options_and_training_is_refused(harness):
    vae = RemoteAutoencoderKL(client=RecordingClient(harness.address), model="tiny")
    vae.enable_tiling()
    assert vae.use_tiling
    vae.encode(_images(3, 16, 16))
    vae.enable_slicing()
    vae.disable_tiling()
    vae.decode(torch.zeros(3, 4, 8, 8))
    sent = [(method, count, options["tiling"]) for method, count, _, options in vae.client.sent]
    assert sent == [("posterior", 3, "on"), ("decode", 1, "off"), ("decode", 1, "off"), ("decode", 1, "off")]
    assert vae.train(False) is vae and not vae.training
    with pytest.raises(RuntimeError, match="gradients"):
        vae.train()
    with pytest.raises(RuntimeError, match="gradients"):
        vae.requires_grad_(True)
    with pytest.raises(ValueError, match="wire_dtype"):
        RemoteAutoencoderKL(client=vae.client, model="tiny", wire_dtype="bfloat16")


def test_batches_over_the_message_limit_are_sent_in_order_in_pieces(start_server, model_dirs):
    harness = start_server(max_message_mb=1)
    local = load_model(model_dirs["tiny"]).model.eval()
    client = RecordingClient(harness.address)
    x = _images(6, 128, 128)  # 6 x 192 KiB of float32 pixels: over the 1 MiB limit in one request
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED|message|larger than max"):
        client.posterior(x, model="tiny", output="tensor")
    client.sent.clear()
    vae = RemoteAutoencoderKL(client=client, model="tiny", max_message_mb=1)
    got = vae.encode(x).latent_dist
    z = got.mode()
    images = vae.decode(z).sample
    assert [(method, count) for method, count, _, _ in client.sent] == [
        ("posterior", 4), ("posterior", 2), ("decode", 4), ("decode", 2)]
    with torch.no_grad():
        expected = local.encode(x).latent_dist
        torch.testing.assert_close(z, expected.mode(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.std, expected.std, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(images, local.decode(z).sample, atol=1e-4, rtol=1e-4)


def test_half_precision_on_the_wire_stays_close_to_the_local_vae(start_server, model_dirs):
    harness = start_server(max_batch_size=1)
    local = load_model(model_dirs["tiny"]).model.eval()
    vae = RemoteAutoencoderKL(client=RecordingClient(harness.address), model="tiny", wire_dtype="float16")
    x = _images(2, 24, 32)
    got = vae.encode(x).latent_dist
    images = vae.decode(got.mode()).sample
    assert got.mode().dtype == torch.float32 and images.dtype == torch.float32  # the caller's dtype
    assert [(method, dtype, options["dtype"] if method == "posterior" else None)
            for method, _, dtype, options in vae.client.sent] == [
        ("posterior", torch.float16, "float16"), ("decode", torch.float16, None)]
    with torch.no_grad():
        expected = local.encode(x).latent_dist
        torch.testing.assert_close(got.mode(), expected.mode(), atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(images, local.decode(got.mode()).sample, atol=2e-2, rtol=1e-2)


def test_a_sana_style_call_sequence_with_the_autoencoder_dc_shim(start_server, model_dirs):
    harness = start_server(max_batch_size=1)
    local = load_model(model_dirs["tiny"]).model.eval()
    vae = RemoteAutoencoderDC(harness.address, model="tiny")
    config = vae.config
    vae_scale_factor = 2 ** (len(config.encoder_block_out_channels) - 1)  # what SanaPipeline computes
    assert vae_scale_factor == 2 ** (len(local.config.block_out_channels) - 1)
    x = _images(2, 16, 24)
    latents = vae.encode(x).latent * config.scaling_factor
    image = vae.decode(latents.to(vae.dtype) / config.scaling_factor, return_dict=False)[0]
    with torch.no_grad():
        expected = local.encode(x).latent_dist.mode()
        torch.testing.assert_close(latents / config.scaling_factor, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(image, local.decode(expected).sample, atol=1e-4, rtol=1e-4)
    # Deterministic models, refused by the KL shim, stand in for an AutoencoderDC.
    fast = RemoteAutoencoderDC(harness.address, model="fast")
    assert fast.encode(x, return_dict=False)[0].shape[0] == 2
