"""Model families over a real server: FLUX.1's packed latents both ways, and each family's latent
conventions (per-channel statistics, patches, deterministic DC-AE) in ListModels and GetModel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from latentd.client import InvalidInputError, LatentClient
from latentd.v1 import latentd_pb2 as pb
from latentd.vae.latent_ops import pack_latents

from tests.conftest import make_tiny_dc, make_tiny_flux2, make_tiny_kl, smooth_image
from tests.integration.conftest import ServerFactory


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from latentd.vae import save_model

    root = tmp_path_factory.mktemp("families")
    return {
        # FLUX.1's conventions on a tiny 16-channel KL (factor 2).
        "flux1": str(save_model(make_tiny_kl(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
                                root / "flux1")),
        "sdxl-style": str(save_model(make_tiny_kl(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[2.0, 3.0, 4.0, 5.0],
                                                  scaling_factor=0.5, shift_factor=None), root / "sdxl-style")),
        "flux2": str(save_model(make_tiny_flux2(), root / "flux2")),
        "dc": str(save_model(make_tiny_dc(), root / "dc")),
    }


@pytest.fixture(scope="module")
def served(family_dirs):
    with ServerFactory(family_dirs) as factory:
        harness = factory(max_batch_size=1)
        with LatentClient(harness.address, timeout=60) as client:
            yield harness, client


def test_packed_encode_is_the_flux_layout_of_the_plain_answer(served):
    _, client = served
    image = smooth_image(24, 32, seed=3)
    plain = client.encode(image, model="flux1", dtype="float32")
    packed = client.encode(image, model="flux1", dtype="float32", packed=True)
    assert plain.shape == (16, 12, 16) and packed.shape == (6 * 8, 64)
    np.testing.assert_array_equal(packed, pack_latents(torch.from_numpy(plain)).numpy())
    batch = client.encode(np.stack([image, image]), model="flux1", dtype="float32", packed=True)
    assert batch.shape == (2, 48, 64)


def test_packed_decode_matches_the_plain_decode(served):
    _, client = served
    image = smooth_image(24, 32, seed=5)
    plain = client.encode(image, model="flux1", dtype="float32")
    packed = client.encode(image, model="flux1", dtype="float32", packed=True)
    expected = client.decode(plain, model="flux1")
    np.testing.assert_array_equal(client.decode(packed, model="flux1", sizes=(24, 32), packed=True), expected)
    # FluxPipeline's rounding: each side down to a multiple of twice the factor.
    assert client.decode(packed, model="flux1", sizes=(27, 35), packed=True).shape == (24, 32, 3)
    listed = client.decode([packed, packed], model="flux1", sizes=[(24, 32)] * 2, packed=True)
    assert len(listed) == 2 and listed[1].shape == (24, 32, 3)


def test_packed_errors_name_the_field(served):
    harness, client = served
    with pytest.raises(InvalidInputError, match="options.packed.*multiples of 4"):
        client.encode(smooth_image(22, 32), model="flux1", packed=True)
    packed = client.encode(smooth_image(24, 32), model="flux1", dtype="float32", packed=True)
    with pytest.raises(InvalidInputError, match=r"items\[0\].latents.shape"):
        client.decode(packed, model="flux1", sizes=(32, 32), packed=True)
    with pytest.raises(InvalidInputError, match="sizes"):
        client.decode(packed, model="flux1", packed=True)
    # Straight to the wire: no height given.
    request = pb.DecodeRequest(model="flux1", options=pb.DecodeOptions(packed=True),
                               items=[pb.Latents(latents=pb.Tensor(dtype=pb.FLOAT32, shape=list(packed.shape),
                                                                   data=packed.tobytes()))])
    import grpc

    with pytest.raises(grpc.RpcError) as caught:
        harness.stub.Decode(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[0].height" in caught.value.details()


def test_models_report_their_conventions(served):
    harness, client = served
    listed = {info.name: info for info in client.models()}
    flux1, sdxl, flux2, dc = listed["flux1"], listed["sdxl-style"], listed["flux2"], listed["dc"]
    assert (flux1.scaling_factor, flux1.shift_factor, flux1.latents_mean, flux1.patch_size) == \
        (pytest.approx(0.3611), pytest.approx(0.1159), (), 1)
    assert sdxl.latents_mean == pytest.approx((0.1, -0.2, 0.3, 0.0))
    assert sdxl.latents_std == pytest.approx((2.0, 3.0, 4.0, 5.0))
    codec = harness.codec("flux2")
    assert (flux2.model_class, flux2.patch_size, flux2.latent_channels, flux2.downsampling_factor) == \
        ("AutoencoderKLFlux2", 2, 16, 4)
    assert flux2.latents_mean == pytest.approx(codec.info.latents_mean)
    assert flux2.latents_std == pytest.approx(codec.info.latents_std)
    assert (dc.model_class, dc.has_posterior, dc.scaling_factor) == ("AutoencoderDC", False, pytest.approx(0.41407))
    assert client.model("flux2") == listed["flux2"]


def test_families_round_trip_as_in_process(served):
    harness, client = served
    image = smooth_image(16, 24, seed=2)
    for name in ("sdxl-style", "flux2", "dc"):
        codec = harness.codec(name)
        latents = client.encode(image, model=name, dtype="float32")
        torch.testing.assert_close(torch.from_numpy(latents), codec.encode(image), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(client.decode(latents, model=name), codec.decode(torch.from_numpy(latents)))
