"""The real server over loopback: results equal the in-process codec, bad input is INVALID_ARGUMENT."""

from __future__ import annotations

import io
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from latentd.v1.tensors import from_tensor, to_tensor
from latentd.server import models, wire
from latentd.v1 import latentd_pb2 as pb
from latentd.client import LatentClient
from latentd.vae.codec import Codec, CodecOptions
from tests.conftest import make_tiny_kl, smooth_image


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_request(images, **options) -> pb.EncodeRequest:
    return pb.EncodeRequest(images=[pb.Image(encoded=png(image)) for image in images],
                            options=pb.EncodeOptions(**options))


def test_encode_and_decode_equal_the_in_process_codec_bit_for_bit(start_server):
    # A generous batch delay makes the server batch this request's images exactly as the in-process
    # codec groups them (by shape); convolution results depend on the batch size in the last bits.
    harness = start_server(max_batch_delay_ms=300)
    images = [smooth_image(40, 56, seed=1), smooth_image(40, 56, seed=2), smooth_image(33, 17, seed=3)]
    response = harness.stub.Encode(encode_request(images), timeout=30)
    codec = harness.codec()
    assert response.model == "tiny" and len(response.items) == 3
    for image, item, expected in zip(images, response.items, codec.encode(images)):
        assert torch.equal(torch.from_numpy(from_tensor(item.latents, "latents")), expected)
        assert (item.height, item.width) == image.shape[:2]
    decoded = harness.stub.Decode(pb.DecodeRequest(
        items=[pb.Latents(latents=item.latents, height=item.height, width=item.width) for item in response.items],
        options=pb.DecodeOptions(format=pb.RAW_UINT8)), timeout=30)
    latents = [torch.from_numpy(from_tensor(item.latents, "x")) for item in response.items]
    expected = codec.decode(latents, sizes=[image.shape[:2] for image in images])
    for out, image in zip(decoded.images, expected):
        assert np.array_equal(from_tensor(out.pixels, "pixels"), image)


def test_raw_pixels_png_output_and_fp16_latents(harness):
    image = smooth_image(32, 48, seed=5)
    request = pb.EncodeRequest(images=[pb.Image(pixels=to_tensor(image))],
                               options=pb.EncodeOptions(latent_dtype=pb.FLOAT16, raw=True))
    item = harness.stub.Encode(request, timeout=30).items[0]
    assert item.latents.dtype == pb.FLOAT16
    raw = harness.codec().encode(image, scaled=False)
    np.testing.assert_array_equal(from_tensor(item.latents, "x"), raw.numpy().astype(np.float16))
    out = harness.stub.Decode(pb.DecodeRequest(items=[pb.Latents(latents=item.latents)],
                                               options=pb.DecodeOptions(raw=True)), timeout=30).images[0]
    decoded = np.asarray(Image.open(io.BytesIO(out.encoded)))
    assert decoded.shape == (32, 48, 3)  # PNG by default, latent grid x factor


def test_sampling_with_a_seed_is_reproducible_and_matches_in_process(start_server):
    harness = start_server(max_batch_delay_ms=300)
    images = [smooth_image(24, 24, seed=s) for s in range(2)]
    first = harness.stub.Encode(encode_request(images, sample=True, seed=11), timeout=30)
    again = harness.stub.Encode(encode_request(images, sample=True, seed=11), timeout=30)
    expected = harness.codec().encode(images, sample=True, seed=11)
    for a, b, e in zip(first.items, again.items, expected):
        assert a.latents.data == b.latents.data
        assert torch.equal(torch.from_numpy(from_tensor(a.latents, "x")), e)


def test_concurrent_clients_get_their_own_results_batched_together(start_server):
    harness = start_server(max_batch_size=8, max_batch_delay_ms=50)
    images = [smooth_image(32, 32, seed=s) for s in range(12)]
    results: dict[int, bytes] = {}
    barrier = threading.Barrier(len(images))

    def client(index: int) -> None:
        barrier.wait()
        results[index] = harness.stub.Encode(encode_request([images[index]]), timeout=30).items[0].latents.data

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    codec = harness.codec()
    for index, image in enumerate(images):
        np.testing.assert_allclose(np.frombuffer(results[index], "<f4"), codec.encode(image).numpy().ravel(),
                                   rtol=1e-5, atol=1e-5)
    labels = {"model": "tiny", "op": "encode"}
    sizes = harness.server.metrics.registry.get_sample_value("latentd_batch_size_sum", labels)
    calls = harness.server.metrics.registry.get_sample_value("latentd_batch_size_count", labels)
    assert sizes == 12 and calls < 12  # 12 requests shared fewer model calls


def _invalid(harness, rpc, request, field):
    with pytest.raises(grpc.RpcError) as raised:
        getattr(harness.stub, rpc)(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert field in raised.value.details()


def _latents(shape=(4, 8, 8), dtype="float32", fill=0.1) -> pb.Tensor:
    return to_tensor(np.full(shape, fill, np.float32), dtype)


BAD_REQUESTS = [
    ("Encode", pb.EncodeRequest(), "images"),
    ("Encode", pb.EncodeRequest(images=[pb.Image(encoded=png(smooth_image(8, 8))), pb.Image(encoded=b"not an image")]),
     "images[1]"),
    ("Encode", pb.EncodeRequest(images=[pb.Image(encoded=b"")]), "images[0].encoded"),
    ("Encode", pb.EncodeRequest(images=[pb.Image()]), "images[0]"),
    ("Encode", pb.EncodeRequest(images=[pb.Image(pixels=to_tensor(np.zeros((8, 8, 4), np.uint8)))]),
     "images[0].pixels"),
    ("Encode", pb.EncodeRequest(images=[pb.Image(pixels=pb.Tensor(dtype=pb.UINT8, shape=[8, 8, 3], data=b"x"))]),
     "images[0].pixels.data"),
    ("Encode", pb.EncodeRequest(images=[pb.Image(pixels=to_tensor(np.zeros((300, 300, 3), np.uint8)))]),
     "images[0]"),  # over max_pixels
    ("Encode", pb.EncodeRequest(images=[pb.Image(encoded=png(smooth_image(8, 8)))],
                                options=pb.EncodeOptions(latent_dtype=pb.UINT8)), "options.latent_dtype"),
    ("Decode", pb.DecodeRequest(), "items"),
    ("Decode", pb.DecodeRequest(items=[pb.Latents(latents=_latents((3, 8, 8)))]), "items[0].latents.shape"),
    ("Decode", pb.DecodeRequest(items=[pb.Latents(latents=_latents(fill=float("nan")))]), "items[0].latents"),
    ("Decode", pb.DecodeRequest(items=[pb.Latents(latents=_latents(), height=17)]), "items[0].height"),
    ("Decode", pb.DecodeRequest(items=[pb.Latents(latents=pb.Tensor(dtype=pb.FLOAT32, shape=[4, 8, 8], data=b"1"))]),
     "items[0].latents.data"),
    ("Decode", pb.DecodeRequest(items=[pb.Latents(latents=to_tensor(np.zeros((4, 8, 8), np.uint8)))]),
     "items[0].latents.dtype"),
    ("Decode", pb.DecodeRequest(items=[pb.Latents(latents=_latents())], options=pb.DecodeOptions(quality=101)),
     "options.quality"),
    ("SamplePrior", pb.SamplePriorRequest(count=0, height=8, width=8), "count"),
    ("Interpolate", pb.InterpolateRequest(image_a=pb.Image(encoded=png(smooth_image(8, 8))),
                                          image_b=pb.Image(encoded=png(smooth_image(8, 16)))), "images"),
]


def test_every_bad_request_is_invalid_argument_naming_the_field_and_others_keep_being_served(start_server):
    harness = start_server(max_pixels=256 * 256)
    good = encode_request([smooth_image(16, 16)])
    for rpc, request, field in BAD_REQUESTS:
        _invalid(harness, rpc, request, field)
        assert len(harness.stub.Encode(good, timeout=30).items) == 1


def test_models_are_listed_with_their_conventions(harness):
    listed = harness.stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert listed.default_model == "tiny" and [m.name for m in listed.models] == ["tiny", "fast"]
    tiny = harness.stub.GetModel(pb.GetModelRequest(name="tiny"), timeout=10)
    info = harness.codec().info
    assert (tiny.latent_channels, tiny.downsampling_factor) == (info.latent_channels, info.downsampling_factor)
    assert tiny.scaling_factor == pytest.approx(info.scaling_factor) and tiny.has_posterior
    fast = harness.stub.GetModel(pb.GetModelRequest(name="fast"), timeout=10)
    assert fast.model_class == "AutoencoderTiny" and not fast.has_posterior
    with pytest.raises(grpc.RpcError) as raised:
        harness.stub.Encode(pb.EncodeRequest(model="fast", images=[pb.Image(encoded=png(smooth_image(16, 16)))],
                                             options=pb.EncodeOptions(sample=True)), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "options.sample" in raised.value.details()


def test_latent_space_operations(harness):
    a, b = smooth_image(16, 24, seed=1), smooth_image(16, 24, seed=2)
    frames = harness.stub.Interpolate(pb.InterpolateRequest(
        image_a=pb.Image(encoded=png(a)), image_b=pb.Image(encoded=png(b)), steps=4, format=pb.RAW_UINT8), timeout=30)
    expected = harness.codec().interpolate(a, b, steps=4)
    assert [np.array_equal(from_tensor(f.pixels, "f"), e) for f, e in zip(frames.images, expected)] == [True] * 4
    samples = harness.stub.SamplePrior(pb.SamplePriorRequest(count=2, height=16, width=16, seed=3,
                                                             format=pb.RAW_FLOAT), timeout=30)
    floats = [from_tensor(image.pixels, "p") for image in samples.images]
    assert floats[0].shape == (3, 16, 16) and floats[0].dtype == np.float32 and not np.array_equal(*floats)
    scores = harness.stub.AnomalyScore(pb.AnomalyScoreRequest(images=[pb.Image(encoded=png(a))]), timeout=30)
    assert scores.scores[0].psnr == pytest.approx(harness.codec().anomaly_score(a)[0].psnr)


def test_streams_answer_every_request_by_id_and_report_bad_ones_in_band(start_server):
    harness = start_server(max_batch_size=1)  # one image per model call: the same numerics as in-process
    images = {f"req-{i}": smooth_image(16 + 8 * (i % 2), 16, seed=i) for i in range(6)}

    def requests():
        for request_id, image in images.items():
            yield pb.EncodeRequest(id=request_id, images=[pb.Image(encoded=png(image))])
        yield pb.EncodeRequest(id="bad", images=[pb.Image(encoded=b"garbage")])

    answers = {response.id: response for response in harness.stub.EncodeStream(requests(), timeout=60)}
    assert set(answers) == set(images) | {"bad"}
    assert answers["bad"].error.code == "INVALID_ARGUMENT" and "images[0]" in answers["bad"].error.message
    codec = harness.codec()
    for request_id, image in images.items():
        assert not answers[request_id].error.code
        got = torch.from_numpy(from_tensor(answers[request_id].items[0].latents, "x"))
        assert torch.equal(got, codec.encode(image))

    decode_requests = [pb.DecodeRequest(id=request_id, items=[pb.Latents(latents=answers[request_id].items[0].latents)],
                                        options=pb.DecodeOptions(format=pb.JPEG, quality=80))
                       for request_id in images]
    decoded = {response.id: response for response in harness.stub.DecodeStream(iter(decode_requests), timeout=60)}
    assert set(decoded) == set(images)
    assert all(Image.open(io.BytesIO(r.images[0].encoded)).format == "JPEG" for r in decoded.values())


def _thread_recorder(monkeypatch, threads: dict[str, set[str]]):
    """`recorded(owner, name)` wraps owner.name so that each call adds its thread's name to threads[name]."""
    def recorded(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            threads.setdefault(name, set()).add(threading.current_thread().name)
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, wrapper)
    return recorded


def test_all_torch_work_of_lone_requests_runs_on_the_wide_compute_lane(start_server, monkeypatch):
    """Loading, warm-up, batches, conversions and the latent-space RPCs all run on the compute lanes;
    requests one at a time all take the wide one, `latentd-compute`, with every thread (see ModelPool)."""
    threads: dict[str, set[str]] = {}
    recorded = _thread_recorder(monkeypatch, threads)

    recorded(models, "load_codec")
    for name in ("encode", "decode", "posterior", "unscale", "latents_from_posterior", "interpolate", "sample_prior",
                 "anomaly_score"):
        recorded(Codec, name)
    for name in ("latents_array", "image_array"):
        recorded(wire, name)
    harness = start_server()
    image = smooth_image(16, 24)
    for options in (pb.EncodeOptions(), pb.EncodeOptions(posterior=True), pb.EncodeOptions(sample=True, seed=1)):
        encoded = harness.stub.Encode(pb.EncodeRequest(images=[pb.Image(pixels=to_tensor(image))], options=options),
                                      timeout=30)
    for output in (pb.PNG, pb.RAW_FLOAT):
        harness.stub.Decode(pb.DecodeRequest(items=[pb.Latents(latents=encoded.items[0].latents)],
                                             options=pb.DecodeOptions(format=output)), timeout=30)
    harness.stub.Interpolate(pb.InterpolateRequest(image_a=pb.Image(encoded=png(image)),
                                                   image_b=pb.Image(pixels=to_tensor(image)), steps=2), timeout=30)
    harness.stub.SamplePrior(pb.SamplePriorRequest(count=1, height=16, width=16), timeout=30)
    harness.stub.AnomalyScore(pb.AnomalyScoreRequest(images=[pb.Image(encoded=png(image))]), timeout=30)
    assert set(threads) == {"load_codec", "encode", "decode", "posterior", "unscale", "latents_from_posterior",
                            "interpolate", "sample_prior", "anomaly_score", "latents_array", "image_array"}
    assert {name for names in threads.values() for name in names} == {"latentd-compute"}


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="narrow lanes need at least 2 intra-op threads")
def test_batches_that_meet_run_side_by_side_on_narrow_lanes(start_server, monkeypatch):
    """Batches ready while another computes wait for its threads, then take narrow lanes with a share
    of them each. Results stay those of the codec (within float rounding: the thread count, like the
    batch size, may change the last bits)."""
    harness = start_server(max_batch_size=1, cpu_compute_lanes=2)
    first_in, release = threading.Event(), threading.Event()
    calls: list[tuple[str, int]] = []
    original = Codec.posterior

    def posterior(self, images, **kwargs):
        calls.append((threading.current_thread().name, torch.get_num_threads()))
        if len(calls) == 1:
            first_in.set()
            assert release.wait(30)
        return original(self, images, **kwargs)

    monkeypatch.setattr(Codec, "posterior", posterior)

    def meet(images):
        """The first image's batch computes while the others' become ready."""
        calls.clear()
        first_in.clear()
        release.clear()
        with ThreadPoolExecutor(len(images)) as pool:
            first = pool.submit(harness.stub.Encode, encode_request(images[:1]), timeout=30)
            assert first_in.wait(10)
            rest = [pool.submit(harness.stub.Encode, encode_request([image]), timeout=30) for image in images[1:]]
            # Every other request at the server before the first ends: one batch waiting for a lane (a
            # batcher worker per narrow lane), the rest queued; never a wall-clock guess.
            batcher, lanes = harness.server.pool.get("").batcher, harness.server.pool._lanes
            deadline = time.monotonic() + 10
            while not (lanes._waiting >= 1 and batcher.depth >= len(images) - 2):
                assert time.monotonic() < deadline, "the other requests never reached the batcher"
                time.sleep(0.01)
            release.set()
            return [first.result(30)] + [future.result(30) for future in rest]

    images = [smooth_image(24, 24, seed=s) for s in range(3)]
    responses = meet(images)
    processes = torch.get_num_threads()
    share = processes // 2
    assert calls[0] == ("latentd-compute", processes)
    assert len(calls) == 3 and all(lane in (("latentd-compute-0", share), ("latentd-compute-1", share))
                                   for lane in calls[1:])
    # An image above models.CPU_SHARED_PIXELS keeps every thread, even when batches meet.
    meet([smooth_image(24, 24), smooth_image(264, 264)])
    assert len(calls) == 2 and calls[1] == ("latentd-compute", processes)
    monkeypatch.setattr(Codec, "posterior", original)
    for image, response in zip(images, responses):
        np.testing.assert_allclose(from_tensor(response.items[0].latents, "latents"),
                                   harness.codec().encode(image).numpy(), rtol=1e-5, atol=1e-5)


def test_with_overlap_only_the_model_call_runs_on_the_lane_and_results_are_unchanged(start_server, monkeypatch):
    """overlap=on (a GPU's default): conversions run on the batcher's workers, beside other batches'
    model calls; the answers stay the in-process codec's, bit for bit."""
    threads: dict[str, set[str]] = {}
    recorded = _thread_recorder(monkeypatch, threads)

    harness = start_server(overlap="on", max_batch_delay_ms=300)
    for name in ("posterior", "decode", "unscale"):  # recorded from here: the warm-up ran on the lane
        recorded(Codec, name)
    for name in ("latents_array", "image_array"):
        recorded(wire, name)
    images = [smooth_image(40, 56, seed=1), smooth_image(40, 56, seed=2), smooth_image(33, 17, seed=3)]
    response = harness.stub.Encode(encode_request(images), timeout=30)
    decoded = harness.stub.Decode(pb.DecodeRequest(
        items=[pb.Latents(latents=item.latents, height=item.height, width=item.width) for item in response.items],
        options=pb.DecodeOptions(format=pb.RAW_UINT8)), timeout=30)
    assert threads["posterior"] == threads["decode"] == {"latentd-compute"}
    for name in ("unscale", "latents_array", "image_array"):
        assert threads[name] and all(thread.startswith("batcher-tiny") for thread in threads[name]), (name, threads)
    monkeypatch.undo()
    codec = harness.codec()
    for item, expected in zip(response.items, codec.encode(images)):
        assert torch.equal(torch.from_numpy(from_tensor(item.latents, "latents")), expected)
    latents = [torch.from_numpy(from_tensor(item.latents, "x")) for item in response.items]
    expected = codec.decode(latents, sizes=[image.shape[:2] for image in images])
    for out, image in zip(decoded.images, expected):
        assert np.array_equal(from_tensor(out.pixels, "pixels"), image)


def test_a_server_recomputing_tile_statistics_answers_the_untiled_image_s_latents(start_server, tmp_path,
                                                                                    monkeypatch):
    """tile_norms image-recompute: a tiled image (above the CPU's 1024 px threshold) gets the latents of the
    side-by-side image statistics, and the tiles' spilled blocks leave nothing in the temporary folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    image = smooth_image(1040, 96, seed=5)
    harness = start_server(tile_norms="image-recompute")
    with LatentClient(harness.address) as client:
        served = client.encode(image, model="tiny", dtype="float32")
    local = Codec(make_tiny_kl(), options=CodecOptions(tile_norms="image"))
    assert local.is_tiled(1040, 96, decode=False)
    np.testing.assert_allclose(served, local.encode(image).numpy(), rtol=0, atol=1e-5)
    assert not list(tmp_path.iterdir())
