"""The Python SDK against a real server: input kinds, streams, retries, deadlines, errors, async twin."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from latentd.client import (
    AsyncLatentClient,
    DeadlineExceededError,
    InvalidInputError,
    LatentClient,
    NotFoundError,
    RetryPolicy,
    UnauthenticatedError,
    UnavailableError,
)
from tests.conftest import smooth_image
from tests.integration.test_operations import Gate


@pytest.fixture
def served(start_server):
    harness = start_server(max_batch_size=1)  # one image per model call: the in-process numerics exactly
    with LatentClient(harness.address, timeout=30) as client:
        yield harness, client


def test_every_input_kind_round_trips(served, tmp_path):
    harness, client = served
    codec = harness.codec()
    image = smooth_image(24, 32, seed=4)
    path = tmp_path / "in.png"
    Image.fromarray(image).save(path)
    expected = codec.encode(image).numpy()
    as_float = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
    inputs = {"path": str(path), "pathlib": path, "bytes": path.read_bytes(), "pil": Image.fromarray(image),
              "hwc": image, "chw uint8": image.transpose(2, 0, 1).copy(), "torch uint8": torch.from_numpy(image),
              "float chw": as_float, "float numpy": as_float.numpy()}
    for name, value in inputs.items():
        latents = client.encode(value, dtype="float32")
        np.testing.assert_allclose(latents, expected, atol=2e-6, err_msg=name)
    batch = client.encode(np.stack([image, image]), dtype="float32")  # NHWC
    assert batch.shape == (2, *expected.shape)
    nchw = client.encode(as_float[None].repeat(2, 1, 1, 1), output="torch")  # NCHW float, torch out
    assert isinstance(nchw, torch.Tensor) and nchw.dtype == torch.float16 and nchw.shape[0] == 2
    listed = client.encode([image, smooth_image(16, 16)])
    assert isinstance(listed, list) and listed[1].shape == (4, 8, 8)

    decoded = client.decode(expected, sizes=(24, 32))
    assert np.array_equal(decoded, codec.decode(torch.from_numpy(expected), sizes=(24, 32)))
    assert client.decode(expected, output="pil").size == (32, 24)
    floats = client.decode(expected, output="torch")
    assert floats.dtype == torch.float32 and floats.shape == (3, 24, 32) and floats.min() >= -1
    for fmt, pil_name in (("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")):
        encoded = client.decode(expected, format=fmt, quality=80)
        assert Image.open(io.BytesIO(encoded)).format == pil_name


def test_sampling_and_scaling_options(served):
    harness, client = served
    image = smooth_image(16, 16, seed=1)
    a = client.encode(image, sample=True, seed=5, dtype="float32")
    assert np.array_equal(a, client.encode(image, sample=True, seed=5, dtype="float32"))
    assert not np.array_equal(a, client.encode(image, sample=True, seed=6, dtype="float32"))
    raw = client.encode(image, scaled=False, dtype="float32")
    np.testing.assert_allclose(raw, harness.codec().encode(image, scaled=False).numpy(), atol=2e-6)
    with pytest.raises(InvalidInputError, match="seed"):
        client.encode(image, seed=3)


def test_streams_keep_order_with_thousands_of_items_and_bounded_memory(served):
    harness, client = served
    images = [np.full((8, 8, 3), i % 251, np.uint8) for i in range(2000)]
    pulled = 0
    most_ahead = 0
    consumed = 0

    def source():
        nonlocal pulled, most_ahead
        for image in images:
            pulled += 1
            most_ahead = max(most_ahead, pulled - consumed)
            yield image

    seen = []
    for latents in client.encode_many(source(), window=8, progress=seen.append, dtype="float32"):
        consumed += 1
        assert latents.shape == (4, 4, 4)
    assert consumed == 2000 and seen[-1] == 2000 and seen == sorted(seen)
    assert most_ahead <= 8 + 1  # never more than the window pulled ahead of what the caller consumed
    firsts = list(client.encode_many(images[:50], window=4, dtype="float32"))
    codec = harness.codec()
    for image, latents in zip(images[:50:7], firsts[::7]):
        np.testing.assert_allclose(latents, codec.encode(image).numpy(), atol=2e-6)
    decoded = list(client.decode_many(((lat, (8, 8)) for lat in firsts), window=4))
    assert len(decoded) == 50 and decoded[0].shape == (8, 8, 3)


def test_a_bad_stream_item_fails_alone(served):
    harness, client = served
    items = [smooth_image(8, 8), b"not an image", "/no/such/file.png", smooth_image(8, 8, seed=2)]
    results = list(client.encode_many(items, on_error="return"))
    assert isinstance(results[1], InvalidInputError) and "images[0]" in str(results[1])
    assert isinstance(results[2], InvalidInputError) and "/no/such/file.png" in str(results[2])
    assert results[0].shape == results[3].shape == (4, 4, 4)
    with pytest.raises(InvalidInputError):
        list(client.encode_many(items))


def test_errors_are_typed_and_carry_the_field(served):
    harness, client = served
    with pytest.raises(InvalidInputError) as raised:
        client.decode(np.zeros((3, 4, 4), np.float32))
    assert "items[0].latents.shape" in str(raised.value)
    registry = harness.server.metrics.registry
    assert registry.get_sample_value("latentd_requests_total", {"rpc": "Decode", "code": "INVALID_ARGUMENT"}) == 1
    with pytest.raises(NotFoundError, match="model"):
        client.encode(smooth_image(8, 8), model="missing")


def test_models_health_and_latent_operations(served):
    harness, client = served
    assert [m.name for m in client.models()] == ["tiny", "fast"] and client.model("fast").model_class == \
        "AutoencoderTiny"
    assert client.health() == "SERVING"
    a, b = smooth_image(16, 16, seed=1), smooth_image(16, 16, seed=2)
    frames = client.interpolate(a, b, steps=3)
    assert len(frames) == 3 and frames[0].shape == (16, 16, 3)
    assert len(client.sample(2, 16, 16, seed=1, output="pil")) == 2
    assert client.anomaly_score([a, b])[0].psnr > 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_retries_on_unavailable_until_the_server_is_up(start_server):
    port = _free_port()
    threading.Timer(0.8, lambda: start_server(port=port)).start()
    client = LatentClient(f"127.0.0.1:{port}", timeout=60, retries=RetryPolicy(attempts=30, initial=0.2, maximum=0.5))
    started = time.monotonic()
    assert client.encode(smooth_image(8, 8)).shape == (4, 4, 4)
    assert time.monotonic() - started > 0.5
    with pytest.raises(UnavailableError):
        LatentClient(f"127.0.0.1:{_free_port()}", retries=RetryPolicy(attempts=2, initial=0.01)).models()


def test_deadlines_propagate(start_server):
    harness = start_server(max_batch_size=1)
    gate = Gate(harness.codec())
    client = LatentClient(harness.address)
    holder = threading.Thread(target=lambda: client.encode(smooth_image(8, 8), timeout=30))
    holder.start()
    assert gate.entered.wait(10)
    with pytest.raises(DeadlineExceededError):
        client.encode(smooth_image(8, 8, seed=1), timeout=0.3)
    gate.open.set()
    holder.join(30)


def test_tokens(start_server):
    harness = start_server(auth_tokens=("t0ken",))
    with pytest.raises(UnauthenticatedError):
        LatentClient(harness.address).models()
    assert LatentClient(harness.address, token="t0ken").models()


def test_the_async_client_matches_the_sync_one(served):
    harness, client = served
    images = [smooth_image(16, 16, seed=s) for s in range(5)]

    async def run():
        async with AsyncLatentClient(harness.address, timeout=30) as aclient:
            one = await aclient.encode(images[0], dtype="float32")
            many = [x async for x in aclient.encode_many(images, window=2, dtype="float32")]
            decoded = await aclient.decode(one)
            health = await aclient.health()
            with pytest.raises(InvalidInputError):
                await aclient.encode(b"garbage")
            return one, many, decoded, health

    one, many, decoded, health = asyncio.run(run())
    assert np.array_equal(one, client.encode(images[0], dtype="float32"))
    assert all(np.array_equal(a, b) for a, b in zip(many, client.encode_many(images, dtype="float32")))
    assert np.array_equal(decoded, client.decode(one)) and health == "SERVING"


def test_leaving_a_stream_early_cancels_it(served):
    harness, client = served

    def endless():
        seed = 0
        while True:
            seed += 1
            yield smooth_image(8, 8, seed=seed)

    for count, _ in enumerate(client.encode_many(endless(), window=4), start=1):
        if count == 5:
            break
    registry = harness.server.metrics.registry
    deadline = time.monotonic() + 10
    while registry.get_sample_value("latentd_requests_total", {"rpc": "EncodeStream", "code": "OK"}) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert client.health() == "SERVING"  # the server is fine and serves on


def test_a_deadline_with_no_time_left_is_deadline_exceeded(served):
    harness, client = served
    with pytest.raises(DeadlineExceededError):
        client.models(timeout=0)

    async def run():
        async with AsyncLatentClient(harness.address) as aclient:
            await aclient.models(timeout=0)

    with pytest.raises(DeadlineExceededError):
        asyncio.run(run())


def test_refinement_on_the_server_is_the_in_process_refinement(served):
    harness, client = served
    codec, image = harness.codec(), smooth_image(32, 40, seed=9)
    refined = client.encode(image, dtype="float32", refine=4)
    np.testing.assert_allclose(refined, codec.encode(image, refine=4).numpy(), atol=1e-4)
    plain = client.encode(image, dtype="float32")
    error = [np.mean((codec.decode(torch.from_numpy(z)).astype(np.float32) - image) ** 2) for z in (plain, refined)]
    assert error[1] < error[0]
    for kwargs, field in (({"refine": 201}, "options.refine_steps must be 0-200"),
                          ({"refine": 2, "sample": True}, "options.refine_steps: refinement improves"),
                          ({"refine": 2, "tiling": "on"}, "untiled images only")):
        with pytest.raises(InvalidInputError, match=field):
            client.encode(image, **kwargs)
    with pytest.raises(InvalidInputError, match="refine must be a whole number"):
        client.encode(image, refine=-1)
