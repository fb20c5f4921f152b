"""Operating the server: backpressure, deadlines, health, reflection, metrics, auth, TLS and draining shutdown."""

from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from latentd.v1 import latentd_pb2 as pb
from latentd.v1 import latentd_pb2_grpc as pb_grpc
from tests.conftest import smooth_image
from tests.integration.test_service import encode_request


class Gate:
    """Holds the model's encode until released, counting the images it was asked to compute."""

    def __init__(self, codec) -> None:
        self.open = threading.Event()
        self.entered = threading.Event()
        self.images = 0
        self._posterior = codec.posterior
        codec.posterior = self

    def __call__(self, images, **kwargs):
        self.images += len(images)
        self.entered.set()
        assert self.open.wait(30), "test never released the gate"
        return self._posterior(images, **kwargs)


def _wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_a_full_queue_answers_resource_exhausted(start_server):
    # One compute lane, so one batcher worker: every request but the one computing waits in the queue.
    harness = start_server(max_batch_size=1, queue_limit=1, cpu_compute_lanes=1)
    gate = Gate(harness.codec())
    request = encode_request([smooth_image(16, 16)])
    with ThreadPoolExecutor(2) as pool:
        computing = pool.submit(harness.stub.Encode, request, timeout=30)
        assert gate.entered.wait(10)
        waiting = pool.submit(harness.stub.Encode, request, timeout=30)
        batcher = harness.server.pool.get("").batcher
        _wait_until(lambda: batcher.depth == 1)
        with pytest.raises(grpc.RpcError) as raised:
            harness.stub.Encode(request, timeout=30)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        gate.open.set()
        assert len(computing.result(30).items) == 1 and len(waiting.result(30).items) == 1


def test_an_expired_deadline_is_not_computed(start_server):
    # Two compute lanes (the default): the second batcher worker takes the request at once and waits
    # for a lane; the deadline is checked once it holds one.
    harness = start_server(max_batch_size=1, cpu_compute_lanes=2)
    gate = Gate(harness.codec())
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(harness.stub.Encode, encode_request([smooth_image(16, 16)]), timeout=30)
        assert gate.entered.wait(10)
        with pytest.raises(grpc.RpcError) as raised:
            harness.stub.Encode(encode_request([smooth_image(16, 16, seed=1)]), timeout=0.3)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.open.set()
        blocker.result(30)
    # Only the first image reached the model; the expired one was dropped before compute.
    harness.stub.Encode(encode_request([smooth_image(8, 8)]), timeout=30)
    assert gate.images == 2


def test_a_cancelled_request_is_not_computed(start_server):
    harness = start_server(max_batch_size=1, cpu_compute_lanes=1)  # one batcher worker: the request waits queued
    gate = Gate(harness.codec())
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(harness.stub.Encode, encode_request([smooth_image(16, 16)]), timeout=30)
        assert gate.entered.wait(10)
        batcher = harness.server.pool.get("").batcher
        call = harness.stub.Encode.future(encode_request([smooth_image(16, 16, seed=1)]), timeout=30)
        _wait_until(lambda: batcher.depth == 1)
        call.cancel()
        registry = harness.server.metrics.registry  # the server saw the cancellation and gave up the item
        _wait_until(lambda: registry.get_sample_value("latentd_requests_total",
                                                      {"rpc": "Encode", "code": "CANCELLED"}) == 1)
        gate.open.set()
        blocker.result(30)
    harness.stub.Encode(encode_request([smooth_image(8, 8)]), timeout=30)
    assert gate.images == 2


def test_out_of_memory_splits_the_batch_and_fails_only_what_cannot_fit(start_server):
    import torch

    harness = start_server(max_batch_size=8, max_batch_delay_ms=200)
    codec = harness.codec()
    original = codec.posterior
    seen = []

    def tight_memory(images, **kwargs):
        seen.append(len(images))
        too_big = any(image.shape[0] > 40 for image in images)
        if len(images) > 2 or too_big:  # as if a batch above 2 images, or one large image, did not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(images, **kwargs)

    codec.posterior = tight_memory
    images = [smooth_image(32, 32, seed=s) for s in range(4)]
    response = harness.stub.Encode(encode_request(images), timeout=30)
    assert len(response.items) == 4 and seen[0] == 4 and max(seen[1:]) <= 2
    with pytest.raises(grpc.RpcError) as raised:
        harness.stub.Encode(encode_request([smooth_image(48, 48)]), timeout=30)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of memory" in raised.value.details() and "GiB" not in raised.value.details()


def test_one_log_line_per_request(start_server, caplog):
    harness = start_server(log_requests=True)
    with caplog.at_level("INFO", logger="latentd.server.requests"):
        harness.stub.Encode(pb.EncodeRequest(id="req-42", images=[pb.Image(encoded=encode_request(
            [smooth_image(16, 24)]).images[0].encoded)] * 2), timeout=30)
        _wait_until(lambda: any("req-42" in r.getMessage() for r in caplog.records))
    line = next(r.getMessage() for r in caplog.records if "req-42" in r.getMessage())
    for part in ("rpc=Encode", "model=tiny", "items=2", "sizes=16x24", "code=OK", "queue_ms=", "compute_ms="):
        assert part in line, line


def test_health_reflection_and_metrics(start_server):
    harness = start_server(metrics_port=0)
    health = health_pb2_grpc.HealthStub(harness.channel)
    for service in ("", "latentd.v1.Latentd"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reflect = reflection_pb2_grpc.ServerReflectionStub(harness.channel)
    answers = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {service.name for answer in answers for service in answer.list_services_response.service}
    assert {"latentd.v1.Latentd", "grpc.health.v1.Health"} <= names

    harness.stub.Encode(encode_request([smooth_image(16, 16)]), timeout=30)
    with pytest.raises(grpc.RpcError):
        harness.stub.Encode(pb.EncodeRequest(), timeout=30)
    url = f"http://127.0.0.1:{harness.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert 'latentd_requests_total{code="OK",rpc="Encode"} 1.0' in text
    assert 'latentd_requests_total{code="INVALID_ARGUMENT",rpc="Encode"} 1.0' in text
    assert re.search(r'latentd_model_load_seconds\{model="tiny"\} [0-9.e-]+', text)
    assert 'latentd_queue_depth{model="tiny",priority="interactive"} 0.0' in text
    assert 'latentd_queue_depth{model="tiny",priority="bulk"} 0.0' in text
    # The compute stage's busy time per model and device (warm-up and the encode: above zero); on a CPU
    # no device memory gauges, the process's resident memory instead.
    busy = re.search(r'latentd_compute_busy_seconds_total\{device="cpu",model="tiny"\} ([0-9.e-]+)', text)
    assert busy and float(busy.group(1)) > 0
    assert re.search(r'latentd_compute_busy_fraction\{device="cpu",model="fast"\} [0-9.e-]+', text)
    assert re.search(r'latentd_model_weights_bytes\{device="cpu",model="tiny"\} [1-9][0-9.e+]*', text)
    assert "latentd_device_memory_used_bytes" not in text and "process_resident_memory_bytes" in text


def test_bearer_tokens(start_server):
    harness = start_server(auth_tokens=("s3cret", "other"))
    request = encode_request([smooth_image(16, 16)])
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
        with pytest.raises(grpc.RpcError) as raised:
            harness.stub.Encode(request, metadata=metadata, timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as raised:  # streams are guarded too
        list(harness.stub.EncodeStream(iter([request]), timeout=10))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert harness.stub.Encode(request, metadata=(("authorization", "Bearer other"),), timeout=10).items
    health = health_pb2_grpc.HealthStub(harness.channel)  # probes need no token
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    assert "s3cret" not in repr(harness.server.settings.redacted())


def _self_signed(tmp_path, name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_tls_and_mutual_tls(start_server, tmp_path):
    server_key, server_cert = _self_signed(tmp_path, "server")
    client_key, client_cert = _self_signed(tmp_path, "client")
    request = encode_request([smooth_image(16, 16)])

    tls = start_server(tls_cert=str(server_cert), tls_key=str(server_key),
                       channel_credentials=grpc.ssl_channel_credentials(server_cert.read_bytes()))
    assert tls.stub.Encode(request, timeout=30).items
    plaintext = pb_grpc.LatentdStub(grpc.insecure_channel(tls.address))
    with pytest.raises(grpc.RpcError):
        plaintext.Encode(request, timeout=5)

    mutual = start_server(tls_cert=str(server_cert), tls_key=str(server_key), tls_client_ca=str(client_cert),
                          channel_credentials=grpc.ssl_channel_credentials(
                              server_cert.read_bytes(), client_key.read_bytes(), client_cert.read_bytes()))
    assert mutual.stub.Encode(request, timeout=30).items
    anonymous = grpc.secure_channel(mutual.address, grpc.ssl_channel_credentials(server_cert.read_bytes()),
                                    options=[("grpc.ssl_target_name_override", "localhost")])
    with pytest.raises(grpc.RpcError) as raised:
        pb_grpc.LatentdStub(anonymous).Encode(request, timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_stop_drains_in_flight_requests_and_refuses_new_ones(start_server):
    harness = start_server(max_batch_size=1, grace_s=10)
    gate = Gate(harness.codec())
    health = health_pb2_grpc.HealthStub(harness.channel)
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(harness.stub.Encode, encode_request([smooth_image(16, 16)]), timeout=30)
        assert gate.entered.wait(10)
        stopping = harness.call(_start_stop(harness))
        _wait_until(lambda: _status(health) != health_pb2.HealthCheckResponse.SERVING)
        with pytest.raises(grpc.RpcError) as raised:
            harness.stub.Encode(encode_request([smooth_image(8, 8)]), timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        gate.open.set()
        assert len(in_flight.result(30).items) == 1  # finished within the grace period
        harness.call(_await(stopping))


async def _start_stop(harness):
    import asyncio

    return asyncio.ensure_future(harness.server.stop(10))


async def _await(task):
    await task


def _status(health):
    try:
        return health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
    except grpc.RpcError:
        return None


@pytest.mark.slow
def test_sigterm_drains_and_exits_zero(model_dirs, tmp_path):
    """`latentd serve` as a real process: it answers, and SIGTERM makes it exit 0 with a clean log."""
    process = subprocess.Popen(
        [sys.executable, "-m", "latentd.client.cli", "serve", "--port", "0", "--model", f"tiny={model_dirs['tiny']}",
         "--grace-s", "5"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        port = None
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            lines.append(line)
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            port = int(found.group(1)) if found else port
            if "serving tiny" in line:
                break
        assert port, "".join(lines)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.LatentdStub(channel)
            with ThreadPoolExecutor(4) as pool:
                answers = [pool.submit(stub.Encode, encode_request([smooth_image(256, 256, seed=i)]), timeout=60)
                           for i in range(4)]
                time.sleep(0.05)
                process.send_signal(signal.SIGTERM)
                results = []
                for answer in answers:
                    try:
                        results.append(answer.result(60))
                    except grpc.RpcError as exc:  # arrived after the drain began: refused, never dropped mid-way
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE
        assert process.wait(60) == 0
        log = "".join(lines) + process.stderr.read()
        assert "stopping: draining" in log and "stopped" in log
        assert results, "requests in flight when SIGTERM arrived finish"
    finally:
        if process.poll() is None:
            process.kill()
