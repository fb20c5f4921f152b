"""`RemoteAutoencoderKL` in a real diffusers pipeline (tiny random components, no downloads) equals the local VAE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from latentd.client.diffusers import RemoteAutoencoderKL
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
