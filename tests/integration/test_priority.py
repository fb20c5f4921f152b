"""Request priorities end to end: the SDK keyword, the wire field, bad values, metrics by priority."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest

from latentd.client import LatentClient
from latentd.client.errors import InvalidInputError
from latentd.v1 import latentd_pb2 as pb
from tests.conftest import smooth_image
from tests.integration.test_service import encode_request


def test_bulk_and_interactive_requests_give_the_same_latents_and_show_in_the_metrics(start_server):
    harness = start_server(metrics_port=0)
    image = smooth_image(16, 16)
    with LatentClient(harness.address) as client:
        interactive = client.encode(image, model="tiny", dtype="float32")
        bulk = client.encode(image, model="tiny", dtype="float32", priority="bulk")
        streamed = list(client.encode_many([image, image], model="tiny", dtype="float32"))  # bulk by default
        decoded = client.decode(bulk, model="tiny", priority="bulk")
    np.testing.assert_array_equal(interactive, bulk)
    # The stream's two images run as one batch of two; a batch's size may change the CPU kernels'
    # summation order (seen on some EPYC machines), so the same latents to float rounding.
    np.testing.assert_allclose(streamed[1], bulk, rtol=1e-5, atol=1e-5)
    assert decoded.shape == (16, 16, 3)
    text = urllib.request.urlopen(f"http://127.0.0.1:{harness.server.metrics_port}/metrics", timeout=10).read().decode()
    assert 'latentd_queue_seconds_count{model="tiny",priority="interactive"} 1.0' in text
    assert 'latentd_queue_seconds_count{model="tiny",priority="bulk"} 4.0' in text
    assert 'latentd_request_seconds_count{priority="bulk",rpc="EncodeStream"} 2.0' in text
    assert 'latentd_request_seconds_count{priority="interactive",rpc="Encode"} 1.0' in text


@pytest.mark.parametrize("rpc", ["Encode", "Decode"])
def test_an_unknown_priority_value_is_invalid_argument_naming_it(harness, rpc):
    if rpc == "Encode":
        request = encode_request([smooth_image(16, 16)])
    else:
        latents = pb.Latents(latents=pb.Tensor(dtype=pb.FLOAT32, shape=[4, 8, 8], data=bytes(4 * 4 * 8 * 8)))
        request = pb.DecodeRequest(model="tiny", items=[latents])
    request.priority = 7
    with pytest.raises(grpc.RpcError) as raised:
        getattr(harness.stub, rpc)(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "priority" in raised.value.details()


def test_an_unknown_priority_name_fails_in_the_sdk_naming_it():
    client = LatentClient("127.0.0.1:1")  # never reached: the name fails first
    try:
        for call in (lambda: client.encode(smooth_image(16, 16), priority="urgent"),
                     lambda: client.decode(np.zeros((4, 8, 8), np.float32), priority="urgent"),
                     lambda: client.encode_many([], priority="urgent"),
                     lambda: client.decode_many([], priority="urgent")):
            with pytest.raises(InvalidInputError, match="priority"):
                call()
    finally:
        client.close()


def test_the_async_client_takes_priorities_too(harness):
    import asyncio

    from latentd.client import AsyncLatentClient

    image = smooth_image(16, 16)

    async def run():
        async with AsyncLatentClient(harness.address) as client:
            one = await client.encode(image, model="tiny", dtype="float32", priority="bulk")
            many = [z async for z in client.encode_many([image], model="tiny", dtype="float32",
                                                        priority="interactive")]
            with pytest.raises(InvalidInputError, match="priority"):
                await client.decode(one, model="tiny", priority="later")
            with pytest.raises(InvalidInputError, match="priority"):
                client.encode_many([image], priority="later")
            return one, many

    one, many = asyncio.run(run())
    np.testing.assert_array_equal(one, many[0])
