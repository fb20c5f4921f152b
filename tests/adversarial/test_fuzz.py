"""Property-based fuzzing of every RPC on one real server: random, mutated and raw-byte requests never answer
INTERNAL or UNKNOWN, never hang, and the server stays healthy. LATENTD_FUZZ_EXAMPLES scales the run."""

from __future__ import annotations

import collections
import math
import os

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from grpc_health.v1 import health_pb2

from tests.adversarial import rpcs
from tests.adversarial.rpcs import Rpc, assert_healthy, png
from tests.integration.conftest import ServerFactory

# Per RPC; 12 RPCs. Derandomized: CI sees the same examples every run; raise the count to search further.
EXAMPLES = int(os.environ.get("LATENTD_FUZZ_EXAMPLES", "80"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CALL_TIMEOUT_S = 30  # no request of this server's size limits takes nearly as long: more is a hang
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
EXAMPLES_RUN: collections.Counter = collections.Counter()
CODES: collections.Counter = collections.Counter()


@pytest.fixture(scope="module")
def harness(model_dirs):  # noqa: F811
    with ServerFactory(model_dirs) as factory:
        # Small images keep every fuzzed computation short, whatever sizes the examples ask for.
        yield factory(max_pixels=64 * 64, max_batch_delay_ms=1)


# ---- requests: generated from the message descriptors ------------------------------------------

IMAGES = [png(8, 8), png(5, 3, seed=1)]
INTERESTING_INTS = [0, 1, -1, 2, 3, 4, 8, 16, 63, 64, 65, 4096, 2**31 - 1, -2**31]
INTERESTING_WIDE = [*INTERESTING_INTS, 2**32, 2**62, 2**63 - 1, -2**63]
STRINGS = st.one_of(st.sampled_from(["", "tiny", "fast", "slerp", "lerp", "a\nb", "x" * 300]), st.text(max_size=30))
_T = FieldDescriptor
INTS = {
    _T.TYPE_INT32: (-2**31, 2**31 - 1, INTERESTING_INTS), _T.TYPE_SINT32: (-2**31, 2**31 - 1, INTERESTING_INTS),
    _T.TYPE_SFIXED32: (-2**31, 2**31 - 1, INTERESTING_INTS), _T.TYPE_UINT32: (0, 2**32 - 1, INTERESTING_INTS),
    _T.TYPE_FIXED32: (0, 2**32 - 1, INTERESTING_INTS), _T.TYPE_INT64: (-2**63, 2**63 - 1, INTERESTING_WIDE),
    _T.TYPE_SINT64: (-2**63, 2**63 - 1, INTERESTING_WIDE), _T.TYPE_SFIXED64: (-2**63, 2**63 - 1, INTERESTING_WIDE),
    _T.TYPE_UINT64: (0, 2**64 - 1, INTERESTING_WIDE), _T.TYPE_FIXED64: (0, 2**64 - 1, INTERESTING_WIDE),
}
ITEMSIZE = {1: 1, 2: 2, 3: 2, 4: 4}


def _int(field: FieldDescriptor) -> st.SearchStrategy[int]:
    low, high, interesting = INTS[field.type]
    return st.one_of(st.sampled_from([v for v in interesting if low <= v <= high]), st.integers(low, high))


def _values(dtype: int, count: int) -> st.SearchStrategy[bytes]:
    """`count` values of a wire dtype: any bit patterns, or finite numbers of any magnitude."""
    import numpy as np

    size = count * ITEMSIZE.get(dtype, 1)
    bits = st.binary(min_size=size, max_size=size)
    if dtype not in (2, 4) or count > 512:
        return bits
    numpy_dtype = np.float16 if dtype == 2 else np.float32
    finite = st.lists(st.floats(allow_nan=False, allow_infinity=False, width=16 if dtype == 2 else 32),
                      min_size=count, max_size=count)
    return st.one_of(bits, finite.map(lambda values: np.asarray(values, numpy_dtype).astype(
        np.dtype(numpy_dtype).newbyteorder("<")).tobytes()))


@st.composite
def _tensor(draw) -> Message:
    """Tensors that are mostly plausible (images, latents) so that requests get past the first check."""
    from latentd.v1 import latentd_pb2 as pb

    dtype = draw(st.one_of(st.sampled_from([1, 2, 3, 4]), st.integers(0, 2**31 - 1)))
    side = st.integers(0, 10)
    shape = draw(st.one_of(
        st.tuples(side, side, st.just(3)).map(list),  # uint8 HWC image
        st.tuples(st.just(3), side, side).map(list),  # float CHW image
        st.tuples(st.just(4), side, side).map(list),  # latents of the test models
        st.lists(st.sampled_from(INTERESTING_WIDE) | st.integers(-3, 12), max_size=6),
        st.lists(st.just(1), min_size=60, max_size=70),
    ))
    count = math.prod(shape) if all(n >= 0 for n in shape) else -1
    if 0 <= count * ITEMSIZE.get(dtype, 1) <= 1 << 14 and draw(st.booleans()):
        data = draw(_values(dtype, count))  # agrees with the shape
    else:
        data = draw(st.binary(max_size=64))
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy:
    if field.type in INTS:
        return _int(field)
    if field.type == _T.TYPE_BOOL:
        return st.booleans()
    if field.type in (_T.TYPE_FLOAT, _T.TYPE_DOUBLE):
        return st.floats(width=32 if field.type == _T.TYPE_FLOAT else 64)
    if field.type == _T.TYPE_STRING:
        # Mostly a served model, or requests stop at NOT_FOUND before their other fields are read.
        return st.one_of(st.sampled_from(["", "tiny", "fast"]), STRINGS) if field.name in ("model", "name") \
            else STRINGS
    if field.type == _T.TYPE_BYTES:  # image files, mutated image files, anything
        return st.one_of(st.sampled_from(IMAGES), _mutated(st.sampled_from(IMAGES)), st.binary(max_size=64))
    if field.type == _T.TYPE_ENUM:  # proto3 enums are open: unknown numbers travel too (a third of the time)
        known = st.sampled_from([v.number for v in field.enum_type.values])
        return st.one_of(known, known, st.integers(-2**31, 2**31 - 1))
    raise AssertionError(f"no strategy for {field.full_name}")


def _field_value(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    value = (st.deferred(lambda: messages(field.message_type, depth + 1)) if field.message_type is not None
             else _scalar(field))
    return st.lists(value, max_size=3) if field.is_repeated else value


def _set(message: Message, field: FieldDescriptor, value) -> None:
    if field.is_repeated:
        del getattr(message, field.name)[:]
        getattr(message, field.name).extend(value)
    elif field.message_type is not None:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


@st.composite
def _replaced(draw, message: Message, depth: int = 0) -> Message:
    """`message` with one field, at any depth of what is set, replaced by a generated value: a valid
    request with one thing wrong reaches the checks behind the first ones."""
    message = type(message).FromString(message.SerializeToString())
    if not message.DESCRIPTOR.fields:
        return message
    field = draw(st.sampled_from(list(message.DESCRIPTOR.fields)))
    inner = getattr(message, field.name) if field.message_type is not None else None
    if inner is not None and field.is_repeated:
        inner = inner[draw(st.integers(0, len(inner) - 1))] if len(inner) else None
    if inner is not None and (field.is_repeated or message.HasField(field.name)) and draw(st.booleans()):
        inner.CopyFrom(draw(_replaced(inner, depth + 1)))
    else:
        _set(message, field, draw(_field_value(field, depth)))
    return message


def messages(descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`'s type with any subset of fields set (nested ones up to depth 4)."""
    from google.protobuf import message_factory

    if descriptor.full_name == "latentd.v1.Tensor":
        return _tensor()
    cls = message_factory.GetMessageClass(descriptor)
    optional, oneofs = {}, collections.defaultdict(dict)
    for field in descriptor.fields:
        if field.message_type is not None and depth >= 4:
            continue
        value = _field_value(field, depth)
        oneof = field.containing_oneof
        if oneof is not None and not getattr(oneof, "has_presence", False) and len(oneof.fields) > 1:
            oneofs[oneof.name][field.name] = value  # one member or none: setting two keeps only the last
        else:
            optional[field.name] = value
    members = [st.one_of(st.just({}), *(st.fixed_dictionaries({name: value}) for name, value in group.items()))
               for group in oneofs.values()]

    def build(values: dict) -> Message:
        message = cls()
        for name, value in values.items():
            _set(message, descriptor.fields_by_name[name], value)
        return message
    return st.tuples(st.fixed_dictionaries({}, optional=optional), *members).map(
        lambda parts: build({key: value for part in parts for key, value in part.items()}))


# ---- requests: mutated valid ones, and raw bytes -----------------------------------------------

@st.composite
def _mutate(draw, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "duplicate", "delete"]))
        if kind == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "duplicate":
            data[at:at] = data[at:at + draw(st.integers(1, 16))]
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
    return bytes(data)


def _mutated(source: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return source.flatmap(_mutate)


def payloads(rpc: Rpc) -> st.SearchStrategy[bytes]:
    generated = messages(rpc.request_type.DESCRIPTOR).map(lambda m: m.SerializeToString())
    replaced = _replaced(rpc.valid()).map(lambda m: m.SerializeToString())
    valid = st.just(rpc.valid().SerializeToString())
    # Valid requests with one field replaced twice as often as each other kind: they reach the deepest checks.
    return st.one_of(replaced, replaced, generated, _mutated(valid), _mutated(generated), st.binary(max_size=256))


def _requests(rpc: Rpc) -> st.SearchStrategy[list[bytes]]:
    return st.lists(payloads(rpc), min_size=1, max_size=3) if rpc.request_streaming else payloads(rpc).map(
        lambda p: [p])


# ---- the property -------------------------------------------------------------------------------

def _check(rpc: Rpc, channel: grpc.Channel, requests: list[bytes]) -> None:
    EXAMPLES_RUN[rpc.method] += 1
    try:
        responses = rpc.call(channel, requests, raw=True, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        CODES[exc.code().name] += 1
        assert exc.code() not in NEVER, f"{rpc.method}: {exc.code().name}: {exc.details()}"
        return
    CODES["OK"] += 1
    for response in responses:
        if "error" in response.DESCRIPTOR.fields_by_name and response.error.code:
            CODES[f"in-band {response.error.code}"] += 1
            assert response.error.code not in {code.name for code in NEVER}, \
                f"{rpc.method}: {response.error.code}: {response.error.message}"


@pytest.mark.slow
@pytest.mark.parametrize("rpc", rpcs.EVERY, ids=lambda rpc: rpc.method.rsplit(".", 1)[-1])
def test_no_request_answers_internal_or_unknown_or_hangs(harness, rpc):
    @FUZZ
    @given(requests=_requests(rpc))
    def fuzz(requests):
        _check(rpc, harness.channel, requests)

    fuzz()
    assert_healthy(harness.channel)


@pytest.mark.slow
def test_health_watch_answers_every_request_at_once(harness):
    watch = harness.channel.unary_stream("/grpc.health.v1.Health/Watch",
                                         response_deserializer=health_pb2.HealthCheckResponse.FromString)

    @FUZZ
    @given(payload=payloads(rpcs.HEALTH_CHECK))
    def fuzz(payload):
        EXAMPLES_RUN["/grpc.health.v1.Health/Watch"] += 1
        call = watch(payload, timeout=CALL_TIMEOUT_S)
        try:
            first = next(call)  # a Watch never ends by itself: its first answer must come at once
            assert first.status in (health_pb2.HealthCheckResponse.SERVING,
                                    health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        except grpc.RpcError as exc:
            assert exc.code() not in NEVER, f"Watch: {exc.code().name}: {exc.details()}"
        finally:
            call.cancel()

    fuzz()
    assert_healthy(harness.channel)


@pytest.mark.slow
def test_the_server_is_healthy_after_the_fuzzing(harness, capsys):
    assert_healthy(harness.channel)
    with capsys.disabled():
        print(f"\nfuzz examples run: {sum(EXAMPLES_RUN.values())} ({dict(EXAMPLES_RUN)}); answers: {dict(CODES)}")
