"""Request building without a server: priorities on the wire, float16 pixels kept as float16."""

from __future__ import annotations

import numpy as np
import pytest

from latentd.client import calls
from latentd.client.errors import InvalidInputError
from latentd.v1 import latentd_pb2 as pb


def test_priorities_map_to_the_wire_enum_and_unknown_names_are_refused_by_name():
    call = calls.encode_call(np.zeros((8, 8, 3), np.uint8), model=None, sample=False, seed=None, scaled=True,
                             dtype="float16", tiling="auto", output="numpy")
    assert call.request.priority == pb.INTERACTIVE
    assert calls.prioritized(call, "bulk").request.priority == pb.BULK
    with pytest.raises(InvalidInputError, match="priority must be one of interactive, bulk, got 'urgent'"):
        calls.priority_value("urgent")


@pytest.mark.parametrize("dtype, wire", [(np.float16, pb.FLOAT16), (np.float32, pb.FLOAT32), (np.float64, pb.FLOAT32)])
def test_float_pixels_travel_as_float16_only_when_given_so(dtype, wire):
    prepared = calls.prepare_images(np.zeros((3, 8, 8), dtype))
    assert prepared.messages[0].pixels.dtype == wire
