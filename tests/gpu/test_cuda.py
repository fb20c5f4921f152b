"""The codec and the service on a CUDA device: numerics against plain diffusers, the float32 retry, a served
round trip. Marked `gpu`: skipped where CUDA is unavailable (tests/conftest.py)."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_kl, smooth_image

pytestmark = pytest.mark.gpu

# Relative L2 error allowed against diffusers in float32 on the same device, by latentd's compute dtype
# (float32 too may run TF32 matrix products on Ampere and later).
TOLERANCE = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def sd_model():
    """The SD VAE's architecture with seeded random weights, float32 on the CPU."""
    from latentd.vae.loading import load_model

    return load_model("sd", random_seed=0).model.eval()


@pytest.fixture(scope="module")
def reference(sd_model):
    """Plain diffusers in float32 on the GPU: latents (posterior mode) and the decoded images of them."""
    model = copy.deepcopy(sd_model).to("cuda")
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = model.encode(images.to("cuda")).latent_dist.mode().float().cpu()
        decoded = model.decode(latents.to("cuda")).sample.float().cpu()
    return images, latents, decoded


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_agrees_with_diffusers_in_each_dtype(sd_model, reference, dtype):
    from latentd.vae import Codec

    model = copy.deepcopy(sd_model)
    model.register_to_config(force_upcast=False)  # float16 asked for is float16 run
    codec = Codec(model, name="sd", device="cuda", dtype=dtype)
    assert codec.placement.device.type == "cuda" and codec.placement.dtype == dtype
    images, latents, decoded = reference
    ours = codec.encode(images, scaled=False)
    assert ours.device.type == "cpu" and torch.isfinite(ours).all()
    assert relative_error(ours, latents) < TOLERANCE[dtype]
    pixels = codec.decode(latents, scaled=False, output="tensor")
    assert relative_error(pixels.clamp(-1, 1), decoded.clamp(-1, 1)) < TOLERANCE[dtype]


def test_force_upcast_model_runs_in_bfloat16_when_float16_is_asked(sd_model):
    from latentd.vae import Codec
    from latentd.vae.devices import native_bf16

    codec = Codec(copy.deepcopy(sd_model), name="sd", device="cuda", dtype="float16")  # the SD config upcasts
    expected = torch.bfloat16 if native_bf16(torch.device("cuda")) else torch.float32
    assert codec.placement.dtype == expected


def test_float16_overflow_retries_in_float32_once(caplog):
    """A decoder whose last bias overflows float16 (1e5 > 65504) gives inf in half precision: the batch runs
    again in float32, and the model's later batches go to float32 without a second try."""
    from latentd.vae import Codec

    model = make_tiny_kl(force_upcast=False)
    with torch.no_grad():
        model.decoder.conv_out.bias.fill_(1e5)
    codec = Codec(model, name="overflow", device="cuda", dtype="float16")
    assert codec.placement.dtype == torch.float16
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING, logger="latentd.vae"):
        first = codec.decode(latents, scaled=False, output="tensor")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert torch.isfinite(first).all() and warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="latentd.vae"):
        second = codec.decode(latents, scaled=False, output="tensor")
    assert torch.isfinite(second).all()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    torch.testing.assert_close(second, first)


def test_served_round_trip_on_cuda(tmp_path):
    from latentd.client import LatentClient
    from latentd.vae import save_model

    from tests.integration.conftest import ServerFactory

    with ServerFactory({"tiny": str(save_model(make_tiny_kl(), tmp_path / "tiny"))}) as factory:
        harness = factory(device="cuda", max_batch_size=4)
        codec = harness.codec()
        assert codec.placement.device.type == "cuda"
        images = [smooth_image(48, 64, seed=seed) for seed in range(4)]
        with LatentClient(harness.address, timeout=60) as client:
            latents = [client.encode(image, dtype="float32") for image in images]
            for image, served in zip(images, latents):
                expected = codec.encode(image).float().numpy()
                np.testing.assert_allclose(served, expected, rtol=2e-2, atol=2e-2)
            decoded = client.decode(latents[0], sizes=(48, 64))
        assert decoded.shape == (48, 64, 3) and decoded.dtype == np.uint8
        local = codec.decode(torch.from_numpy(latents[0]), sizes=(48, 64))
        assert np.abs(decoded.astype(int) - np.asarray(local).astype(int)).max() <= 2
