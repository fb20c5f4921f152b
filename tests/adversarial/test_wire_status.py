"""A hostile client on the wire: malformed bytes, impossible tensors, unbounded strings, auth, ports, reflection
and health Watch; each answers the status that tells the truth, naming the field, and the server serves on."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from latentd.client import LatentClient
from latentd.client.cli import main
from latentd.client.errors import CALLER_ERRORS, RETRYABLE, InvalidInputError, NotFoundError
from latentd.v1.tensors import to_tensor
from latentd.server.app import create_server
from latentd.server.settings import ServerSettings
from latentd.v1 import latentd_pb2 as pb
from latentd.vae.errors import InvalidInputError as ServerInvalidInput
from tests.adversarial import rpcs
from tests.adversarial.rpcs import LATENTD, Rpc, assert_healthy, png
from tests.integration.conftest import ServerFactory

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def servers(model_dirs):  # noqa: F811
    with ServerFactory(model_dirs) as factory:
        yield factory


@pytest.fixture(scope="module")
def harness(servers):
    return servers(log_requests=True)


@pytest.fixture(scope="module")
def guarded(servers):
    """A server that wants a bearer token."""
    return servers(auth_tokens=(TOKEN,))


def _status(rpc: Rpc, channel, requests, **kwargs) -> tuple[grpc.StatusCode, str]:
    """A call's failure, as (code, details); a stream's in-band error counts as its status."""
    try:
        responses = rpc.call(channel, requests, **kwargs)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    errors = [r.error for r in responses if r.DESCRIPTOR.fields_by_name.get("error") and r.error.code]
    if errors:
        return grpc.StatusCode[errors[0].code], errors[0].message
    return grpc.StatusCode.OK, ""


# ---- malformed protobuf ------------------------------------------------------------------------

def _deep(depth: int) -> bytes:
    """An EncodeRequest whose options field nests `depth` length-delimited levels (field 3, again and again)."""
    body = b""
    for _ in range(depth):
        body = b"\x1a" + _varint(len(body)) + body
    return body


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


MALFORMED = {
    "garbage": b"\xff\xff\xff\xff",
    "truncated length": b"\x0a\x05ab",  # field 1, 5 bytes announced, 2 sent
    "bad utf-8 string": b"\x0a\x02\xc3\x28",  # field 1 is a string in every request type here
    "wire type 7": b"\x0f",
    "nested too deep": _deep(200),
    "varint of 11 bytes": b"\x08" + b"\xff" * 10 + b"\x01",
}


@pytest.mark.parametrize("rpc", rpcs.EVERY, ids=lambda rpc: rpc.name)
@pytest.mark.parametrize("payload", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_protobuf_is_invalid_argument_naming_the_request(harness, rpc, payload):
    try:
        rpc.request_type.FromString(payload)
    except Exception:  # noqa: BLE001 - what protobuf raises is what the server must survive
        pass
    else:
        pytest.skip("valid for this type (an unknown field, or field 1 is no string)")
    code, details = _status(rpc, harness.channel, [payload], raw=True)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "request" in details and rpc.request_type.DESCRIPTOR.full_name in details
    assert "Error" not in details and "<class" not in details  # no Python class names
    assert_healthy(harness.channel)


@pytest.mark.parametrize("rpc", [r for r in rpcs.EVERY if r.request_streaming], ids=lambda rpc: rpc.method)
def test_a_malformed_message_mid_stream_ends_the_stream_with_invalid_argument_naming_it(harness, rpc):
    good = rpc.valid().SerializeToString()
    code, details = _status(rpc, harness.channel, [good, MALFORMED["garbage"]], raw=True)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "request 1 of the stream" in details
    assert_healthy(harness.channel)


@pytest.mark.parametrize("method", ["/latentd.v1.Latentd/Nope", "/latentd.v2.Latentd/Encode", "/", "no-slash"])
def test_an_unknown_method_is_unimplemented(harness, guarded, method):
    for server in (harness, guarded):
        with pytest.raises(grpc.RpcError) as raised:
            server.channel.unary_unary(method)(MALFORMED["garbage"], timeout=10)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert_healthy(harness.channel)


@pytest.mark.parametrize("rpc", [r for r in rpcs.EVERY if r.request_streaming], ids=lambda rpc: rpc.method)
def test_an_empty_stream_ends_with_ok_and_no_answers(harness, rpc):
    assert rpc.call(harness.channel, [], raw=True) == []
    assert_healthy(harness.channel)


def test_health_watch_streams_the_status_as_it_changes(harness):
    stub = health_pb2_grpc.HealthStub(harness.channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
    try:
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        harness.call(harness.server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        harness.call(harness.server.health.set("", health_pb2.HealthCheckResponse.SERVING))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        watch.cancel()
    unknown = stub.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
    try:
        assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    finally:
        unknown.cancel()
    for service in ("", "latentd.v1.Latentd"):  # what client-side health checking asks for
        answer = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert next(answer).status == health_pb2.HealthCheckResponse.SERVING
        answer.cancel()
    assert_healthy(harness.channel)


def test_health_watch_with_malformed_bytes_is_invalid_argument(harness):
    watch = harness.channel.unary_stream("/grpc.health.v1.Health/Watch")
    with pytest.raises(grpc.RpcError) as raised:
        list(watch(MALFORMED["garbage"], timeout=10))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "HealthCheckRequest" in raised.value.details()
    assert_healthy(harness.channel)


# ---- auth decided before the body is read ----------------------------------------------------

AUTHED = [r for r in rpcs.EVERY if r is not rpcs.HEALTH_CHECK]


@pytest.mark.parametrize("rpc", AUTHED, ids=lambda rpc: rpc.method)
def test_unauthenticated_malformed_bytes_are_refused_before_parsing(guarded, rpc):
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "Basic " + TOKEN),)):
        code, details = _status(rpc, guarded.channel, [MALFORMED["garbage"]], raw=True, metadata=metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED, details
    code, _ = _status(rpc, guarded.channel, [MALFORMED["garbage"]], raw=True,
                      metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert_healthy(guarded.channel, metadata=(("authorization", f"Bearer {TOKEN}"),))


def test_an_unauthenticated_60_mib_body_is_refused_without_being_parsed(guarded):
    body = b"\x12" + _varint(60 << 20) + b"\x00" * (60 << 20)  # one 60 MiB field: a valid length prefix
    for rpc in (rpcs.ENCODE, rpcs.ENCODE_STREAM):
        code, _ = _status(rpc, guarded.channel, [body], raw=True, timeout=60)
        assert code == grpc.StatusCode.UNAUTHENTICATED
    assert_healthy(guarded.channel, metadata=(("authorization", f"Bearer {TOKEN}"),))


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_is_case_insensitive(guarded, scheme):
    for rpc in (rpcs.GET_MODEL, rpcs.ENCODE_STREAM):
        code, details = _status(rpc, guarded.channel, [rpc.valid()], metadata=(("authorization", f"{scheme} {TOKEN}"),))
        assert code == grpc.StatusCode.OK, details
    assert_healthy(guarded.channel, metadata=(("authorization", f"{scheme}  {TOKEN} "),))


# ---- impossible tensors ------------------------------------------------------------------------

def _tensor(dtype, shape, data: bytes) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


HOSTILE_TENSORS = {  # name -> (tensor, field suffix); shapes whose data agrees with them unless said
    "65 dims": (_tensor(pb.UINT8, [1] * 65, b"\x00"), "shape"),
    "9 dims": (_tensor(pb.FLOAT32, [1] * 9, b"\x00" * 4), "shape"),
    "2^62 dims, product 0": (_tensor(pb.FLOAT32, [0, 1 << 62, 1 << 62], b""), "shape"),
    "2^62 dims last 0": (_tensor(pb.UINT8, [1 << 62, 1 << 62, 0], b""), "shape"),
    "negative dim": (_tensor(pb.UINT8, [-1, 4, 3], b""), "shape"),
    "product past int64": (_tensor(pb.UINT8, [1 << 40, 1 << 40, 3], b"\x00"), "shape"),
    "data too short": (_tensor(pb.UINT8, [8, 8, 3], b"\x00"), "data"),
    "no shape": (_tensor(pb.FLOAT32, [], b"\x00" * 4), "shape"),
    "unknown dtype": (_tensor(99, [4, 8, 8], b"\x00" * 256), "dtype"),
    "empty image": (_tensor(pb.UINT8, [0, 8, 3], b""), ""),
}
FLOAT_IMAGES = {
    "float pixels 1e30": (to_tensor(np.full((3, 8, 8), 1e30, np.float32)), "pixels"),
    "float pixels -1e30": (to_tensor(np.full((3, 8, 8), -1e30, np.float32)), "pixels"),
    "float pixels 3.0": (to_tensor(np.full((3, 8, 8), 3.0, np.float32)), "pixels"),
    "float16 pixels 6e4": (to_tensor(np.full((3, 8, 8), 6e4, np.float16)), "pixels"),
}
HOSTILE_LATENTS = {
    "latents 1e30": (to_tensor(np.full((4, 8, 8), 1e30, np.float32)), "latents"),
    "latents -1e20": (to_tensor(np.full((4, 8, 8), -1e20, np.float32)), "latents"),
    "latents of width 0": (to_tensor(np.zeros((4, 8, 0), np.float32)), "latents.shape"),
}


def _with_image(rpc: Rpc, tensor: pb.Tensor) -> tuple[pb.Message, str]:
    """rpc's valid request with its (first) image replaced by `tensor` pixels, and that image's field."""
    image = pb.Image(pixels=tensor)
    if rpc is rpcs.INTERPOLATE:
        request = rpc.valid()
        request.image_a.CopyFrom(image)
        return request, "image_a"
    request = rpc.valid()
    del request.images[:]
    request.images.append(image)
    return request, "images[0]"


def _with_latents(rpc: Rpc, tensor: pb.Tensor) -> tuple[pb.Message, str]:
    request = rpc.valid()
    request.items[0].latents.CopyFrom(tensor)
    return request, "items[0].latents"


IMAGE_RPCS = [rpcs.ENCODE, rpcs.ENCODE_STREAM, rpcs.INTERPOLATE, rpcs.ANOMALY_SCORE]
LATENT_RPCS = [rpcs.DECODE, rpcs.DECODE_STREAM]


def _expect_invalid(harness, rpc, request, field):
    code, details = _status(rpc, harness.channel, [request])
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert field in details, details
    assert len(details) < 1024


@pytest.mark.parametrize("rpc", IMAGE_RPCS, ids=lambda rpc: rpc.name)
@pytest.mark.parametrize("case", [*HOSTILE_TENSORS, *FLOAT_IMAGES])
def test_impossible_image_tensors_are_invalid_argument_naming_the_field(harness, rpc, case):
    tensor, suffix = {**HOSTILE_TENSORS, **FLOAT_IMAGES}[case]
    request, field = _with_image(rpc, tensor)
    _expect_invalid(harness, rpc, request, field + ("" if suffix in ("", "pixels") else f".pixels.{suffix}"))
    assert_healthy(harness.channel)


@pytest.mark.parametrize("rpc", LATENT_RPCS, ids=lambda rpc: rpc.name)
@pytest.mark.parametrize("case", [*HOSTILE_TENSORS, *HOSTILE_LATENTS])
def test_impossible_latent_tensors_are_invalid_argument_naming_the_field(harness, rpc, case):
    tensor, suffix = {**HOSTILE_TENSORS, **HOSTILE_LATENTS}[case]
    request, field = _with_latents(rpc, tensor)
    _expect_invalid(harness, rpc, request, "items[0].latents")
    assert_healthy(harness.channel)


@pytest.mark.parametrize("value", [1.0, -1.0, 1.5])
def test_float_pixels_at_the_edge_of_the_range_are_encoded(harness, value):
    request, _ = _with_image(rpcs.ENCODE, to_tensor(np.full((3, 8, 8), value, np.float32)))
    assert len(rpcs.ENCODE.call(harness.channel, [request])[0].items) == 1


# ---- client strings echoed -------------------------------------------------------------------

LONG = "m" * 100_000


@pytest.mark.parametrize("rpc", [r for r in LATENTD if r is not rpcs.LIST_MODELS], ids=lambda rpc: rpc.name)
@pytest.mark.parametrize("model", ["nope", LONG, "two\nlines", "x" * 65])
def test_an_unknown_model_is_not_found_with_a_bounded_message(harness, rpc, model):
    request = rpc.valid()
    setattr(request, "name" if rpc is rpcs.GET_MODEL else "model", model)
    code, details = _status(rpc, harness.channel, [request])
    assert code == grpc.StatusCode.NOT_FOUND, details
    assert "model" in details and len(details) <= 1024 and "\n" not in details
    assert_healthy(harness.channel)


def test_a_long_interpolation_method_is_invalid_argument_with_a_bounded_message(harness):
    request = rpcs.INTERPOLATE.valid()
    request.method = LONG
    _expect_invalid(harness, rpcs.INTERPOLATE, request, "method")
    assert_healthy(harness.channel)


def _log_lines(caplog, marker: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "latentd.server.requests" and marker in r.getMessage()]


def _wait_for(condition, seconds: float = 10) -> None:
    done = threading.Event()
    for _ in range(int(seconds * 20)):
        if condition():
            return
        done.wait(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize("rpc", [rpcs.ENCODE, rpcs.ENCODE_STREAM, rpcs.DECODE, rpcs.DECODE_STREAM],
                         ids=lambda rpc: rpc.name)
def test_a_request_id_cannot_forge_a_log_line(harness, rpc, caplog):
    forged = "abc\nid=FORGED code=OK\r\x1b[2K\u2028 rpc=x"
    request = rpc.valid()
    request.id = forged
    with caplog.at_level(logging.INFO, logger="latentd.server.requests"):
        responses = rpc.call(harness.channel, [request])
        _wait_for(lambda: _log_lines(caplog, "FORGED"))
    assert responses[0].id == forged  # the answer repeats the id as sent
    [line] = _log_lines(caplog, "FORGED")
    assert not any(ch in line for ch in "\n\r\x1b\u2028")
    assert line.startswith(f"id={forged!r} rpc={rpc.name} ")  # the whole id, quoted and escaped


@pytest.mark.parametrize("rpc", [rpcs.ENCODE, rpcs.DECODE_STREAM], ids=lambda rpc: rpc.name)
def test_an_8_mib_request_id_writes_a_bounded_log_line(harness, rpc, caplog):
    huge = "marker8mib" + "i" * (8 << 20)
    request = rpc.valid()
    request.id = huge
    # The answer repeats the id, so it is larger than grpc's default 4 MiB a client accepts.
    with grpc.insecure_channel(harness.address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel, \
            caplog.at_level(logging.INFO, logger="latentd.server.requests"):
        responses = rpc.call(channel, [request], timeout=60)
        _wait_for(lambda: _log_lines(caplog, "marker8mib"))
    assert responses[0].id == huge
    [line] = _log_lines(caplog, "marker8mib")
    assert len(line) < 400 and f"({len(huge)} characters)" in line


def test_a_model_name_with_a_newline_cannot_forge_a_log_line(harness, caplog):
    name = "tiny\nid=FORGED code=OK"
    with caplog.at_level(logging.INFO, logger="latentd.server.requests"):
        _status(rpcs.GET_MODEL, harness.channel, [pb.GetModelRequest(name=name)])
        _wait_for(lambda: _log_lines(caplog, "FORGED"))
    [line] = _log_lines(caplog, "FORGED")
    assert "\n" not in line and f" model={name!r} " in line
    assert " code=NOT_FOUND " in line


# ---- ports -------------------------------------------------------------------------------------

def test_a_second_server_on_a_port_in_use_is_refused(harness, model_dirs):  # noqa: F811
    settings = ServerSettings(host="127.0.0.1", port=harness.port, models={"tiny": model_dirs["tiny"]})
    future = asyncio.run_coroutine_threadsafe(create_server(settings, load=False), harness.loop)
    with pytest.raises(ServerInvalidInput) as raised:
        future.result(30)
    assert raised.value.field == "port" and str(harness.port) in str(raised.value)
    assert_healthy(harness.channel)


def test_serve_on_a_port_in_use_exits_2_with_one_line(harness, model_dirs, capsys):  # noqa: F811
    code = main(["serve", "--host", "127.0.0.1", "--port", str(harness.port), "--model", f"tiny={model_dirs['tiny']}",
                 "--no-warmup"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("latentd serve: error: cannot listen on") and "in use" in err[-1]
    assert_healthy(harness.channel)


def test_serve_with_its_metrics_port_in_use_exits_2(model_dirs, capsys):  # noqa: F811
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code = main(["serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", str(taken.getsockname()[1]),
                     "--model", f"tiny={model_dirs['tiny']}", "--no-warmup"])
    assert code == 2 and "metrics" in capsys.readouterr().err.strip().splitlines()[-1]


# ---- reflection --------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_answers_under_both_versions(harness, version):
    [rpc] = [r for r in rpcs.REFLECTION if f".{version}." in r.method]
    requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="latentd.v1.Latentd"),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection")]
    listed, latentd, reflection_v1 = rpc.call(harness.channel, requests)
    names = {service.name for service in listed.list_services_response.service}
    assert names == {"latentd.v1.Latentd", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                     "grpc.reflection.v1alpha.ServerReflection"}
    assert latentd.file_descriptor_response.file_descriptor_proto
    assert reflection_v1.file_descriptor_response.file_descriptor_proto
    missing = rpc.call(harness.channel, [reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.Such")])
    assert missing[0].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


# ---- the SDK never retries an impossible request ------------------------------------------------

def _answered(harness, rpc: str, code: str) -> float:
    return harness.server.metrics.registry.get_sample_value("latentd_requests_total", {"rpc": rpc, "code": code}) or 0


def test_the_sdk_sends_an_impossible_request_once(harness):
    assert not RETRYABLE & CALLER_ERRORS
    with LatentClient(harness.address, retries=4) as client:
        before = _answered(harness, "GetModel", "NOT_FOUND")
        with pytest.raises(NotFoundError):
            client.model("nope")
        assert _answered(harness, "GetModel", "NOT_FOUND") == before + 1
        before = _answered(harness, "Encode", "INVALID_ARGUMENT")
        with pytest.raises(InvalidInputError, match="images"):
            client.encode(to_float_pixels(1e30))
        assert _answered(harness, "Encode", "INVALID_ARGUMENT") == before + 1
        before = _answered(harness, "SamplePrior", "INVALID_ARGUMENT")
        with pytest.raises(InvalidInputError, match="count"):
            client.sample(0, 16, 16)
        assert _answered(harness, "SamplePrior", "INVALID_ARGUMENT") == before + 1


def to_float_pixels(value: float) -> np.ndarray:
    return np.full((3, 8, 8), value, np.float32)


# ---- the CLI: --server and exit codes ----------------------------------------------------------

SERVER_COMMANDS = [["models"], ["health"], ["roundtrip", "x.png", "-o", "out"], ["encode", "src", "-o", "arch"],
                   ["decode", "arch", "-o", "out"], ["eval", "--images", "imgs"], ["bench", "archive", "src"]]


@pytest.mark.parametrize("command", SERVER_COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1:0", "host:-1", "bad host:50051", "[zz]:1",
                                     "127.0.0.1:5x"])
def test_a_bad_server_address_exits_2_with_one_line(command, address, capsys):
    assert main([*command, "--server", address]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--server" in err and err.startswith(f"latentd {command[0]}")


@pytest.mark.parametrize("command", [["models", "--server", "h"], ["health", "--server", "h"],
                                     ["encode", "src", "-o", "arch"], ["inspect", "a"],
                                     ["serve"], ["bench", "codec"], ["roundtrip", "x.png", "-o", "o"]],
                         ids=lambda c: c[0])
def test_an_unknown_flag_exits_2_with_one_line(command, capsys):
    assert main([*command, "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--no-such-flag" in err


@pytest.mark.parametrize("argv", [[], ["bench"], ["no-such-command"], ["serve", "--port", "x"],
                                  ["serve", "--port", "70000"], ["encode", "src", "-o", "a", "--batch-size", "0"]])
def test_bad_usage_exits_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentd") and "error:" in err and "\n" not in err


def test_the_exit_codes_are_in_the_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exit codes" in out and "bad usage or bad input" in out and "runtime failure" in out


def test_a_model_the_server_does_not_have_exits_2_and_an_unreachable_server_1(harness, tmp_path, capsys):
    image = tmp_path / "x.png"
    image.write_bytes(png())
    assert main(["roundtrip", str(image), "-o", str(tmp_path / "o"), "--server", harness.address,
                 "--model", "nope"]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    for command in (["models"], ["health"], ["roundtrip", str(image), "-o", str(tmp_path / "o")]):
        assert main([*command, "--server", f"127.0.0.1:{port}", "--timeout", "2"]) == 1
    assert_healthy(harness.channel)
