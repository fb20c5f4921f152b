"""Checkpoints between model calls and tiles: a caller's check stops long work there."""

from __future__ import annotations

import pytest
import torch

from latentd.vae.stopping import checkpoint, stoppable
from latentd.vae.tiling import tiled_map


class Stop(Exception):
    pass


def stop_after(calls: int):
    seen = []

    def check():
        seen.append(1)
        if len(seen) > calls:
            raise Stop
    return check, seen


def test_checkpoint_is_a_no_op_outside_stoppable_and_calls_the_check_inside():
    checkpoint()
    check, seen = stop_after(0)
    with pytest.raises(Stop), stoppable(check):
        checkpoint()
    checkpoint()  # the check ended with its block
    assert len(seen) == 1


def test_tiled_work_stops_at_the_next_tile():
    ran = []

    def fn(batch):
        ran.append(batch.shape[0])
        return batch
    check, _ = stop_after(3)
    with pytest.raises(Stop), stoppable(check):
        tiled_map(torch.zeros(1, 64, 64), fn, tile=16, overlap=4, in_scale=1, out_scale=1)
    assert len(ran) == 3  # 25 tiles; three ran before the check said stop


def test_codec_work_stops_between_model_calls():
    from latentd.vae import Codec
    from latentd.vae.codec import CodecOptions
    from tests.conftest import make_tiny_kl

    tiny_codec = Codec(make_tiny_kl(), options=CodecOptions(tile_size=32, tile_overlap=8))
    calls = []
    original = tiny_codec._decode_batch
    tiny_codec._decode_batch = lambda z, model=None: calls.append(1) or original(z, model)
    check, _ = stop_after(2)
    with pytest.raises(Stop), stoppable(check):
        tiny_codec.decode([torch.zeros(4, 40, 40)], output="tensor", tiling="on")  # 9 tiles
    assert len(calls) == 2
