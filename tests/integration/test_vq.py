"""A VQ model over a real server: codebook indices out of Encode and into Decode, GetModel's codebook,
and INVALID_ARGUMENT naming the field for bad indices."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from latentd.client import AsyncLatentClient, InvalidInputError, LatentClient
from latentd.v1 import latentd_pb2 as pb
from latentd.v1.tensors import to_tensor
from tests.conftest import make_tiny_kl, make_tiny_vq, smooth_image
from tests.integration.conftest import ServerFactory


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from latentd.vae import save_model

    root = tmp_path_factory.mktemp("vq")
    with ServerFactory({"vq": str(save_model(make_tiny_vq(), root / "vq")),
                        "kl": str(save_model(make_tiny_kl(), root / "kl"))}) as factory:
        harness = factory(max_batch_size=4)
        with LatentClient(harness.address, timeout=60) as client:
            yield harness, client


def test_get_model_reports_the_codebook(served):
    harness, client = served
    info = client.model("vq")
    assert (info.model_class, info.codebook_size, info.codebook_dim, info.latent_channels) == ("VQModel", 64, 3, 3)
    assert client.model("kl").codebook_size == 0
    message = harness.stub.GetModel(pb.GetModelRequest(name="vq"))
    assert (message.codebook_size, message.codebook_dim) == (64, 3)


def _largest_difference(a, b) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_indices_round_trip_as_in_process(served):
    harness, client = served
    image = smooth_image(30, 40, seed=4)
    codec = harness.codec("vq")
    indices = client.encode_indices(image, model="vq")
    assert indices.dtype == np.int32 and indices.shape == (15, 20)
    np.testing.assert_array_equal(indices, codec.encode(image, indices=True).numpy())
    decoded = client.decode(indices, model="vq", sizes=(30, 40))
    # Up to float rounding between the server's batches and an in-process call: at most 1 in 255.
    assert _largest_difference(decoded, codec.decode(codec.encode(image, indices=True), sizes=(30, 40))) <= 1
    # The pre-quantisation latents decode to the same image (the model quantises them itself).
    latents = client.encode(image, model="vq", dtype="float32")
    assert _largest_difference(client.decode(latents, model="vq", sizes=(30, 40)), decoded) <= 1
    batch = client.encode_indices(np.stack([image, image]), model="vq")
    assert batch.shape == (2, 15, 20) and client.decode(batch, model="vq").shape == (2, 30, 40, 3)


def test_the_async_client_asks_for_indices_too(served):
    harness, client = served
    image = smooth_image(16, 16, seed=2)

    async def go():
        async with AsyncLatentClient(harness.address, timeout=60) as aio:
            return await aio.encode_indices([image], model="vq")

    listed = asyncio.run(go())
    assert isinstance(listed, list) and listed[0].shape == (8, 8)
    np.testing.assert_array_equal(listed[0], client.encode_indices(image, model="vq"))


def _decode(harness, array, dtype, **options):
    request = pb.DecodeRequest(model="vq", items=[pb.Latents(latents=to_tensor(np.asarray(array), dtype))],
                               options=pb.DecodeOptions(**options))
    return harness.stub.Decode(request, timeout=30)


@pytest.mark.parametrize(("array", "dtype", "options", "field"), [
    (np.full((4, 4), 64), "int32", {}, "items[0].latents"),
    (np.full((4, 4), -3), "int32", {}, "items[0].latents"),
    (np.zeros((1, 4, 4)), "int32", {}, "items[0].latents.shape"),
    (np.zeros((4, 4)), "float32", {}, "items[0].latents.dtype"),
    (np.zeros((4, 4)), "int32", {"packed": True}, "options.packed"),
])
def test_bad_indices_are_invalid_argument_naming_the_field(served, array, dtype, options, field):
    harness, _ = served
    with pytest.raises(grpc.RpcError) as raised:
        _decode(harness, array, dtype, **options)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in raised.value.details()


@pytest.mark.parametrize(("model", "options", "field"), [
    ("kl", {}, "options.indices"),
    ("vq", {"raw": True}, "options.raw"),
    ("vq", {"latent_dtype": pb.FLOAT16}, "options.latent_dtype"),
])
def test_index_encodes_refuse_what_does_not_apply(served, model, options, field):
    harness, _ = served
    image = pb.Image(pixels=to_tensor(smooth_image(8, 8)))
    request = pb.EncodeRequest(model=model, images=[image], options=pb.EncodeOptions(indices=True, **options))
    with pytest.raises(grpc.RpcError) as raised:
        harness.stub.Encode(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in raised.value.details()


def test_the_sdk_refuses_indices_beyond_int32_and_kl_models_refuse_indices(served):
    _, client = served
    with pytest.raises(InvalidInputError, match="int32 range"):
        client.decode(np.full((2, 2), 2**40, np.int64), model="vq")
    with pytest.raises(InvalidInputError, match="no codebook"):
        client.decode(np.zeros((2, 2), np.int32), model="kl")
    with pytest.raises(InvalidInputError, match="options.indices"):
        client.encode_indices(smooth_image(8, 8), model="kl")
