"""Tensor messages: every wire dtype round-trips, bfloat16 rounds as torch does, bad messages name the field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentd.v1.tensors import DTYPES, TensorError, from_tensor, to_tensor
from latentd.v1 import latentd_pb2 as pb


@pytest.mark.parametrize("dtype", ["uint8", "float16", "float32"])
def test_exact_dtypes_round_trip(dtype):
    array = (np.arange(24).reshape(2, 3, 4) * 3).astype(dtype)
    message = to_tensor(array)
    assert list(message.shape) == [2, 3, 4] and len(message.data) == array.nbytes
    back = from_tensor(message, "latents")
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_bfloat16_rounds_like_torch_and_widens_to_float32():
    values = np.random.default_rng(0).normal(size=(4, 8, 8)).astype(np.float32) * 100
    values[0, 0, :3] = [np.inf, -np.inf, 0.0]
    message = to_tensor(values, "bfloat16")
    assert message.dtype == pb.BFLOAT16 and len(message.data) == values.size * 2
    expected = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    assert np.array_equal(from_tensor(message, "latents"), expected)
    assert np.isnan(from_tensor(to_tensor(np.array([np.nan], np.float32), "bfloat16"), "x")).all()


def test_big_endian_arrays_travel_little_endian():
    array = np.arange(6, dtype=">f4").reshape(2, 3)
    message = to_tensor(array)
    assert message.data == np.arange(6, dtype="<f4").tobytes()
    assert np.array_equal(from_tensor(message, "x"), array)


def test_every_table_row_is_a_distinct_proto_value():
    assert len({d.proto for d in DTYPES}) == len(DTYPES) == len(pb.DType.values()) - 1


@pytest.mark.parametrize("message, field", [
    (pb.Tensor(shape=[1], data=b"\0"), "items[0].latents.dtype"),
    (pb.Tensor(dtype=99, shape=[1], data=b"\0"), "items[0].latents.dtype"),
    (pb.Tensor(dtype=pb.FLOAT32, shape=[], data=b""), "items[0].latents.shape"),
    (pb.Tensor(dtype=pb.FLOAT32, shape=[2, -1], data=b""), "items[0].latents.shape"),
    (pb.Tensor(dtype=pb.FLOAT32, shape=[4, 8, 8], data=b"\0" * 10), "items[0].latents.data"),
])
def test_bad_messages_name_the_field(message, field):
    with pytest.raises(TensorError) as raised:
        from_tensor(message, "items[0].latents")
    assert raised.value.field == field and field in str(raised.value)


def test_unknown_dtype_names_are_refused():
    with pytest.raises(TensorError, match="unknown dtype"):
        to_tensor(np.zeros(2, np.int64))
