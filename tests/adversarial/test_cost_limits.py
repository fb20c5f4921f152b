"""Requests whose cost is set by their numbers (sizes, counts, steps, tiles) are refused before any work,
naming the field and the limit, with a code that says whether retrying can help; long work stops on
deadline and cancellation."""

from __future__ import annotations

import functools
import io
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from latentd.v1 import latentd_pb2 as pb
from tests.conftest import smooth_image
from tests.integration.test_service import encode_request


@functools.lru_cache(maxsize=None)
def blank_png(width: int, height: int) -> bytes:
    """A flat one-bit PNG: a few KB on the wire, width x height RGB pixels once decoded."""
    buffer = io.BytesIO()
    Image.new("1", (width, height), 1).save(buffer, "PNG")
    return buffer.getvalue()


def refused(call, request, code: grpc.StatusCode, *words: str, timeout: float = 30) -> str:
    with pytest.raises(grpc.RpcError) as raised:
        call(request, timeout=timeout)
    assert raised.value.code() == code, raised.value.details()
    for word in words:
        assert word in raised.value.details(), raised.value.details()
    return raised.value.details()


def assert_still_serving(harness) -> None:
    health = health_pb2_grpc.HealthStub(harness.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    response = harness.stub.Encode(encode_request([smooth_image(16, 16)]), timeout=30)
    assert len(response.items) == 1


def requests_counted(harness, rpc: str, code: str) -> float:
    return harness.server.metrics.registry.get_sample_value("latentd_requests_total", {"rpc": rpc, "code": code}) or 0


@pytest.fixture
def harness(start_server):
    return start_server()


def test_a_one_pixel_high_sliver_of_prior_samples_is_refused(harness):
    refused(harness.stub.SamplePrior, pb.SamplePriorRequest(count=1, height=1, width=16777216),
            grpc.StatusCode.INVALID_ARGUMENT, "width", "max_request_pixels")
    assert_still_serving(harness)


def test_prior_samples_whose_answer_cannot_be_sent_are_out_of_range_and_logged_so(harness):
    refused(harness.stub.SamplePrior, pb.SamplePriorRequest(count=64, height=1024, width=1024),
            grpc.StatusCode.OUT_OF_RANGE, "count", "max_message_mb")
    assert requests_counted(harness, "SamplePrior", "OUT_OF_RANGE") == 1
    assert requests_counted(harness, "SamplePrior", "OK") == 0
    assert_still_serving(harness)


def test_interpolation_steps_over_the_request_cost_are_refused(harness):
    image = pb.Image(encoded=blank_png(4096, 4096))
    refused(harness.stub.Interpolate, pb.InterpolateRequest(image_a=image, image_b=image, steps=64),
            grpc.StatusCode.INVALID_ARGUMENT, "steps", "max_request_pixels")
    assert_still_serving(harness)


def test_eighty_small_pngs_of_4096x4096_are_refused_before_decoding(harness):
    request = pb.EncodeRequest(images=[pb.Image(encoded=blank_png(4096, 4096))] * 80)
    assert request.ByteSize() < 2 * 1024 * 1024  # the request was 1.25 MiB
    refused(harness.stub.Encode, request, grpc.StatusCode.INVALID_ARGUMENT, "images", "max_request_pixels")
    assert_still_serving(harness)


def test_anomaly_scores_over_the_request_cost_are_refused(harness):
    request = pb.AnomalyScoreRequest(images=[pb.Image(encoded=blank_png(4096, 4096))] * 3)
    refused(harness.stub.AnomalyScore, request, grpc.StatusCode.INVALID_ARGUMENT, "images", "max_request_pixels")
    assert_still_serving(harness)


def test_an_image_header_over_max_pixels_is_refused(harness):
    request = pb.EncodeRequest(images=[pb.Image(encoded=blank_png(8, 8)), pb.Image(encoded=blank_png(5000, 4000))])
    refused(harness.stub.Encode, request, grpc.StatusCode.INVALID_ARGUMENT, "images[1]", "exceeds the limit")
    assert_still_serving(harness)


def test_more_images_than_the_queue_holds_is_invalid_even_on_an_idle_server(start_server):
    harness = start_server(queue_limit=4)
    refused(harness.stub.Encode, encode_request([smooth_image(8, 8)] * 5), grpc.StatusCode.INVALID_ARGUMENT,
            "images", "queue_limit 4")
    assert_still_serving(harness)


def test_decoded_images_whose_answer_cannot_be_sent_are_out_of_range(harness):
    latents = np.zeros((4, 512, 512), np.float32)
    item = pb.Latents(latents=pb.Tensor(dtype=pb.FLOAT32, shape=list(latents.shape), data=latents.tobytes()))
    request = pb.DecodeRequest(items=[item] * 6, options=pb.DecodeOptions(format=pb.RAW_FLOAT))
    refused(harness.stub.Decode, request, grpc.StatusCode.OUT_OF_RANGE, "items", "max_message_mb")
    assert_still_serving(harness)


def test_a_request_larger_than_the_whole_memory_budget_is_invalid(start_server):
    harness = start_server(memory_budget_mb=16)
    refused(harness.stub.Encode, pb.EncodeRequest(images=[pb.Image(encoded=blank_png(1024, 1024))]),
            grpc.StatusCode.INVALID_ARGUMENT, "images", "memory_budget_mb 16")
    assert_still_serving(harness)


def test_streams_answer_impossible_requests_with_their_code_and_go_on(harness):
    too_costly = pb.EncodeRequest(id="costly", images=[pb.Image(encoded=blank_png(4096, 4096))] * 80)
    fine = encode_request([smooth_image(16, 16)])
    fine.id = "fine"
    answers = {r.id: r for r in harness.stub.EncodeStream(iter([too_costly, fine]), timeout=60)}
    costly = answers["costly"].error
    assert costly.code == "INVALID_ARGUMENT" and "max_request_pixels" in costly.message
    assert not answers["fine"].HasField("error") and len(answers["fine"].items) == 1
    latents = np.zeros((4, 512, 512), np.float32)
    item = pb.Latents(latents=pb.Tensor(dtype=pb.FLOAT32, shape=list(latents.shape), data=latents.tobytes()))
    big = pb.DecodeRequest(id="big", items=[item] * 6, options=pb.DecodeOptions(format=pb.RAW_FLOAT))
    (answer,) = harness.stub.DecodeStream(iter([big]), timeout=60)
    assert answer.error.code == "OUT_OF_RANGE" and "items" in answer.error.message
    assert_still_serving(harness)


# A sliver sample the default limits refuse: allowed here, it runs for minutes in ~40000 tile calls.
LONG = pb.SamplePriorRequest(count=1, height=1, width=16777216)


@pytest.mark.slow
def test_a_deadline_stops_long_work_between_tiles(start_server):
    harness = start_server(max_request_pixels=10**12)
    refused(harness.stub.SamplePrior, LONG, grpc.StatusCode.DEADLINE_EXCEEDED, timeout=2)
    assert_still_serving(harness)  # within its 30 s: the compute lane is free again


@pytest.mark.slow
def test_cancelling_stops_long_work_between_tiles(start_server):
    harness = start_server(max_request_pixels=10**12)
    call = harness.stub.SamplePrior.future(LONG, timeout=600)
    registry = harness.server.metrics.registry
    deadline = time.monotonic() + 30
    while not registry.get_sample_value("latentd_memory_held_bytes"):  # admitted: its work starts
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)
    call.cancel()
    assert_still_serving(harness)
    assert requests_counted(harness, "SamplePrior", "CANCELLED") == 1
