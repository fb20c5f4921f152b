"""The HTTP Remote VAE endpoint (`--http-port`): diffusers' own `remote_decode` / `remote_encode`, unchanged,
against a real server give what the in-process codec gives; bad input is a 4xx naming the field."""

from __future__ import annotations

import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from diffusers.utils.remote_utils import remote_decode, remote_encode
from PIL import Image

from latentd.vae.latent_ops import pack_latents
from tests.conftest import smooth_image
from tests.integration.test_operations import _self_signed

SCALE, SHIFT = 0.5, 0.1  # the tiny model's own factors (tests/conftest.py)


def _based(harness):
    """The harness with `base`, its HTTP endpoint's URL."""
    harness.base = f"http://127.0.0.1:{harness.server.http_port}"
    return harness


@pytest.fixture
def http(start_server):
    return _based(start_server(http_port=0, max_batch_size=1))


def _latents(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.manual_seed(seed))


def _local(harness, scaled_latents: torch.Tensor, **kwargs):
    """The in-process codec's decode of diffusers-scaled latents [B, C, h, w]."""
    z = scaled_latents / SCALE + SHIFT
    return harness.codec().decode(list(z), scaled=False, **kwargs)


@pytest.mark.filterwarnings("ignore:`do_scaling` is deprecated")
def test_decode_to_tensors_matches_the_local_codec(http):
    latents = _latents(2, 4, 8, 12)
    url = f"{http.base}/default/decode"
    floats = remote_decode(endpoint=url, tensor=latents, scaling_factor=SCALE, shift_factor=SHIFT, output_type="pt",
                           return_type="pt")
    assert floats.dtype == torch.float32 and floats.shape == (2, 3, 16, 24)
    torch.testing.assert_close(floats, torch.stack(_local(http, latents, output="tensor")), atol=1e-5, rtol=1e-5)
    pixels = remote_decode(endpoint=url, tensor=latents, scaling_factor=SCALE, shift_factor=SHIFT, output_type="pt",
                           partial_postprocess=True, return_type="pt")
    assert pixels.dtype == torch.uint8 and pixels.shape == (2, 16, 24, 3)
    np.testing.assert_array_equal(pixels.numpy(), np.stack(_local(http, latents)))
    # float16 latents answer in float16; the model's own factors with do_scaling alone (its deprecated form)
    half = remote_decode(endpoint=f"{http.base}/tiny/decode", tensor=latents.half(), do_scaling=True,
                         output_type="pt", return_type="pt")
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), floats, atol=5e-3, rtol=0)
    brain = remote_decode(endpoint=url, tensor=latents.bfloat16(), scaling_factor=SCALE, shift_factor=SHIFT,
                          output_type="pt", return_type="pt")
    assert brain.dtype == torch.bfloat16
    torch.testing.assert_close(brain.float(), floats, atol=5e-2, rtol=0)


def test_decode_to_png_and_jpeg(http):
    latents = _latents(1, 4, 8, 8, seed=1)
    expected = _local(http, latents)[0]
    png = remote_decode(endpoint=f"{http.base}/default/decode", tensor=latents, scaling_factor=SCALE,
                        shift_factor=SHIFT, image_format="png")
    assert png.format == "png"
    np.testing.assert_array_equal(np.asarray(png), expected)
    jpeg = remote_decode(endpoint=f"{http.base}/default/decode", tensor=latents, scaling_factor=SCALE,
                         shift_factor=SHIFT)  # output_type pil, jpg: remote_decode's defaults
    assert jpeg.format == "jpeg" and jpeg.size == (16, 16)
    buffer = io.BytesIO()  # random weights decode noise, which JPEG loses much of: compare with a local JPEG
    Image.fromarray(expected).save(buffer, format="JPEG", quality=90)
    local_jpeg = np.asarray(Image.open(buffer)).astype(int)
    assert np.abs(np.asarray(jpeg).astype(int) - local_jpeg).mean() < 1


def test_raw_latents_without_factors(http):
    z = _latents(1, 4, 8, 8, seed=2)
    got = remote_decode(endpoint=f"{http.base}/default/decode", tensor=z, do_scaling=False, output_type="pt",
                        partial_postprocess=True, return_type="pt")
    np.testing.assert_array_equal(got[0].numpy(), http.codec().decode(z[0], scaled=False))


def test_packed_flux_latents_with_height_and_width(http):
    latents = _latents(2, 4, 8, 12, seed=3)
    packed = torch.stack([pack_latents(item) for item in latents])  # [2, 24, 16]
    got = remote_decode(endpoint=f"{http.base}/default/decode", tensor=packed, height=16, width=24,
                        scaling_factor=SCALE, shift_factor=SHIFT, output_type="pt", partial_postprocess=True,
                        return_type="pt")
    np.testing.assert_array_equal(got.numpy(), np.stack(_local(http, latents)))


def test_encode_images_and_tensors_matches_the_local_codec(http):
    image = smooth_image(24, 32, seed=4)
    url = f"{http.base}/default/encode"
    scaled = remote_encode(endpoint=url, image=Image.fromarray(image), scaling_factor=SCALE, shift_factor=SHIFT)
    assert scaled.dtype == torch.float32 and scaled.shape == (1, 4, 12, 16)
    torch.testing.assert_close(scaled[0], http.codec().encode(image), atol=1e-5, rtol=1e-5)
    raw = remote_encode(endpoint=url, image=Image.fromarray(image))
    torch.testing.assert_close(raw[0], http.codec().encode(image, scaled=False), atol=1e-5, rtol=1e-5)
    pixels = torch.rand(2, 3, 16, 16, generator=torch.manual_seed(5)) * 2 - 1  # float [B, 3, H, W] in [-1, 1]
    got = remote_encode(endpoint=url, image=pixels, scaling_factor=SCALE, shift_factor=SHIFT)
    torch.testing.assert_close(got, torch.stack(http.codec().encode(list(pixels))), atol=1e-5, rtol=1e-5)
    uint8 = remote_encode(endpoint=url, image=torch.from_numpy(image))  # uint8 [H, W, 3]
    torch.testing.assert_close(uint8, raw, atol=1e-5, rtol=1e-5)


def test_health_models_and_unknown_routes(http):
    assert requests.get(f"{http.base}/health", timeout=10).json() == {"status": "SERVING"}
    listing = requests.get(f"{http.base}/models", timeout=10).json()
    assert listing["default_model"] == "tiny"
    assert [(m["name"], m["latent_channels"], m["scaling_factor"]) for m in listing["models"]] == [
        ("tiny", 4, SCALE), ("fast", 4, 1.0)]
    answer = requests.post(f"{http.base}/nope/decode", timeout=10)
    assert answer.status_code == 404 and answer.json()["field"] == "model"
    answer = requests.get(f"{http.base}/tiny/decode", timeout=10)
    assert answer.status_code == 405 and answer.json()["field"] == "method"
    assert requests.get(f"{http.base}/elsewhere", timeout=10).status_code == 404


def test_bearer_tokens(start_server):
    harness = start_server(http_port=0, auth_tokens=("s3cret",))
    base = f"http://127.0.0.1:{harness.server.http_port}"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        answer = requests.get(f"{base}/models", headers=headers, timeout=10)
        assert answer.status_code == 401 and answer.json()["field"] == "Authorization"
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    with pytest.raises(RuntimeError, match="bearer token"):  # diffusers' client sends no token
        remote_decode(endpoint=f"{base}/tiny/decode", tensor=_latents(1, 4, 4, 4), do_scaling=False,
                      output_type="pt", return_type="pt")
    assert requests.get(f"{base}/models", headers={"Authorization": "Bearer s3cret"}, timeout=10).ok
    assert requests.get(f"{base}/health", timeout=10).ok  # probes need no token


def _post(harness, path: str, body: bytes, **params) -> requests.Response:
    return requests.post(f"{harness.base}{path}", data=body, params=params, timeout=30)


def _floats(*shape, value=0.0) -> bytes:
    return np.full(shape, value, np.float32).tobytes()


BAD_DECODES = [  # (body, query, status, field)
    (_floats(1, 4, 4, 4)[:-4], {"shape": [1, 4, 4, 4]}, 400, "body"),
    (_floats(1, 4, 4, 4), {}, 400, "shape"),
    (_floats(1, 4, 4, 4), {"shape": [1, 4, 4, 4], "dtype": "int64"}, 400, "dtype"),
    (_floats(1, 4, 4, 4), {"shape": [1, 4, 100000, 100000]}, 400, "shape"),
    (_floats(1, 4, 4, 4), {"shape": "1,4,x,4"}, 400, "shape"),
    (_floats(1, 4, 4, 4), {"shape": [1, 4, 0, 16]}, 400, "shape"),
    (_floats(1, 4, 4, 4, value=np.nan), {"shape": [1, 4, 4, 4]}, 400, "body"),
    (_floats(1, 4, 4, 4, value=1e30), {"shape": [1, 4, 4, 4]}, 400, "body"),
    (_floats(1, 3, 4, 4), {"shape": [1, 3, 4, 4]}, 400, "shape"),  # the model has 4 channels
    (_floats(2, 4, 4, 4), {"shape": [2, 4, 4, 4], "output_type": "pil"}, 400, "output_type"),
    (_floats(1, 4, 4, 4), {"shape": [1, 4, 4, 4], "output_type": "mp4"}, 400, "output_type"),
    (_floats(1, 4, 4, 4), {"shape": [1, 4, 4, 4], "image_format": "gif"}, 400, "image_format"),
    (_floats(1, 4, 4, 4), {"shape": [1, 4, 4, 4], "scaling_factor": "big"}, 400, "scaling_factor"),
    (_floats(1, 4, 4, 4), {"shape": [1, 4, 4, 4], "scaling_factor": 0}, 400, "scaling_factor"),
    (_floats(1, 4, 4, 4), {"shape": [1, 4, 4, 4], "partial_postprocess": "maybe"}, 400, "partial_postprocess"),
    (_floats(1, 4, 16), {"shape": [1, 4, 16], "height": 16, "width": 16}, 400, "shape"),  # 4 tokens need 8x8
    (_floats(1, 4, 16), {"shape": [1, 4, 16], "height": 8}, 400, "width"),
    (_floats(1, 4, 4, 4), {"shape": [1, 4, 4, 4], "height": 100, "width": 8}, 400, "height"),
    (b"", {"shape": [1, 4, 4, 4]}, 400, "body"),
]


@pytest.mark.parametrize(("body", "query", "status", "field"), BAD_DECODES)
def test_bad_decodes_name_the_field(http, body, query, status, field):
    answer = _post(http, "/default/decode", body, **query)
    assert (answer.status_code, answer.json()["field"]) == (status, field), answer.text
    assert answer.json()["error"] and "Traceback" not in answer.text


def test_bad_encodes_name_the_field(start_server):
    harness = _based(start_server(http_port=0, max_pixels=32 * 32))
    big = io.BytesIO()
    Image.fromarray(smooth_image(64, 64)).save(big, format="PNG")
    for body, query, field in ((b"not an image", {}, "body"), (big.getvalue(), {}, "body"),
                               (_floats(1, 3, 8, 8, value=9.0), {"shape": [1, 3, 8, 8]}, "body"),
                               (_floats(3, 8), {"shape": [3, 8]}, "shape"),
                               (_floats(1, 3, 8, 8), {"shape": [1, 3, 8, 8], "dtype": "float64"}, "dtype")):
        answer = _post(harness, "/tiny/encode", body, **query)
        assert (answer.status_code, answer.json()["field"]) == (400, field), answer.text


def test_bodies_over_the_message_limit_are_refused_413(start_server):
    harness = start_server(http_port=0, max_message_mb=1)
    url = f"http://127.0.0.1:{harness.server.http_port}/tiny/decode"
    big = bytes(2 * 1024 * 1024)
    answer = requests.post(url, data=big, params={"shape": [1, 4, 8, 8]}, timeout=30)
    assert answer.status_code == 413 and answer.json()["field"] == "body"
    chunked = requests.post(url, data=iter([big[:1 << 20], big[1 << 20:]]), params={"shape": [1, 4, 8, 8]},
                            timeout=30)  # no Content-Length: refused as it arrives
    assert chunked.status_code == 413 and chunked.json()["field"] == "body"
    answer = requests.post(url, data=bytes(8), params={"shape": [1, 4, 256, 512]}, timeout=30)
    assert answer.status_code == 400 and answer.json()["field"] == "shape"  # refused before its body is read


def test_https_with_the_grpc_certificate(start_server, tmp_path):
    import grpc

    key, cert = _self_signed(tmp_path, "server")
    harness = start_server(http_port=0, tls_cert=str(cert), tls_key=str(key),
                           channel_credentials=grpc.ssl_channel_credentials(cert.read_bytes()))
    base = f"https://localhost:{harness.server.http_port}"
    assert requests.get(f"{base}/health", verify=str(cert), timeout=10).json() == {"status": "SERVING"}
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://localhost:{harness.server.http_port}/health", timeout=10)


def test_stop_drains_http_requests_then_closes(start_server):
    from tests.integration.test_operations import Gate

    harness = start_server(http_port=0, max_batch_size=1, grace_s=10)
    base = f"http://127.0.0.1:{harness.server.http_port}"
    gate = Gate(harness.codec())
    image = Image.fromarray(smooth_image(16, 16))
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(remote_encode, endpoint=f"{base}/tiny/encode", image=image)
        assert gate.entered.wait(10)
        stopping = harness.call(_start_stop(harness.server))
        threading.Event().wait(0.2)
        with pytest.raises(requests.exceptions.ConnectionError):  # no new connections while draining
            requests.get(f"{base}/health", timeout=5)
        gate.open.set()
        assert in_flight.result(30).shape == (1, 4, 8, 8)  # finished within the grace period
        harness.call(_await(stopping))
    assert harness.server.serving is False


def test_no_http_endpoint_unless_asked(harness):
    assert harness.server.http_port is None


async def _start_stop(server):
    import asyncio

    return asyncio.ensure_future(server.stop(10))


async def _await(task):
    await task


def test_errors_are_json_remote_decode_raises_with(http):
    with pytest.raises(RuntimeError) as raised:
        remote_decode(endpoint=f"{http.base}/default/decode", tensor=_latents(1, 3, 4, 4), do_scaling=False,
                      output_type="pt", return_type="pt")
    assert "shape" in json.dumps(raised.value.args[0])


def test_an_unexpected_error_is_a_500_without_internals(http):
    codec = http.codec()

    def broken(*args, **kwargs):
        raise RuntimeError("boom at /secret/path")
    codec.decode = broken
    answer = _post(http, "/tiny/decode", _floats(1, 4, 4, 4), shape=[1, 4, 4, 4])
    assert answer.status_code == 500 and answer.json() == {
        "error": "internal error (RuntimeError); see the server log", "field": None}


def test_requests_beyond_max_concurrent_rpcs_are_refused_503_before_their_body(start_server):
    from tests.integration.test_operations import Gate

    harness = _based(start_server(http_port=0, max_batch_size=1, max_concurrent_rpcs=1))
    base = harness.base
    gate = Gate(harness.codec())
    image = Image.fromarray(smooth_image(16, 16))
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(remote_encode, endpoint=f"{base}/tiny/encode", image=image)
        assert gate.entered.wait(10)
        answer = requests.post(f"{base}/tiny/decode", data=_floats(1, 4, 4, 4), params={"shape": [1, 4, 4, 4]},
                               timeout=10)
        assert (answer.status_code, answer.json()["field"]) == (503, "max_concurrent_rpcs")
        gate.open.set()
        assert in_flight.result(30).shape == (1, 4, 8, 8)
    assert _post(harness, "/tiny/decode", _floats(1, 4, 4, 4), shape=[1, 4, 4, 4]).ok


def test_an_http_port_in_use_names_the_setting(model_dirs):
    import asyncio
    import socket

    from latentd.server.app import create_server
    from latentd.server.settings import ServerSettings
    from latentd.vae.errors import InvalidInputError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = ServerSettings(port=0, http_port=taken.getsockname()[1], models=model_dirs, log_requests=False)
        with pytest.raises(InvalidInputError, match="cannot serve HTTP") as raised:
            asyncio.run(create_server(settings, load=False))
    assert raised.value.field == "http_port"
