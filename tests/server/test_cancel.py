"""A batch stops between its chunks once none of its jobs is wanted, or once the server stops."""

from __future__ import annotations

import time

import pytest
import torch

from latentd.server.batcher import DeadlineExpiredError
from latentd.server.cancel import ServerStoppingError, Watch, WorkCancelledError
from latentd.server.jobs import DECODE, BatchKey, Job, predict
from latentd.server.wire import DecodeItem

KEY = BatchKey(DECODE, 40, 40, "on", kind=4)  # an 80x80 image in 32x32 tiles: 9 of them (see `codec`)


@pytest.fixture
def codec():
    from latentd.vae import Codec
    from latentd.vae.codec import CodecOptions
    from tests.conftest import make_tiny_kl

    return Codec(make_tiny_kl(), name="tiny", options=CodecOptions(tile_size=32, tile_overlap=8))


def test_watch_reasons():
    Watch().check()
    with pytest.raises(WorkCancelledError):
        Watch(abandoned=True).check()
    with pytest.raises(DeadlineExpiredError):
        Watch(deadline=time.monotonic() - 1).check()
    assert Watch(deadline=time.monotonic() + 60).live and not Watch(abandoned=True).live


def counting(codec):
    calls = []
    original = codec._decode_batch
    codec._decode_batch = lambda z, model=None: calls.append(1) or original(z, model)
    return calls


def job() -> Job:
    return Job(DecodeItem(torch.zeros(4, 40, 40), (80, 80)))


def test_a_batch_nobody_waits_for_stops_at_its_next_tile(codec):
    calls = counting(codec)
    jobs = [job(), job()]
    jobs[0].watch.abandoned = True

    def leave_after_three_tiles():
        if len(calls) >= 3:
            jobs[1].watch.abandoned = True
    with pytest.raises(WorkCancelledError):
        predict(codec, KEY, jobs, running=leave_after_three_tiles)
    assert len(calls) == 3


def test_one_wanted_job_keeps_the_batch_going(codec):
    calls = counting(codec)
    jobs = [job(), job()]
    jobs[0].watch.abandoned = True
    assert len(predict(codec, KEY, jobs)) == 2 and len(calls) == 18


def test_expired_jobs_stop_with_their_deadline(codec):
    jobs = [Job(job().data, watch=Watch(deadline=time.monotonic() - 1))]
    with pytest.raises(DeadlineExpiredError):
        predict(codec, KEY, jobs)


def test_a_stopping_server_stops_the_batch(codec):
    calls = counting(codec)

    def running():
        if calls:
            raise ServerStoppingError("the server is stopping")
    with pytest.raises(ServerStoppingError):
        predict(codec, KEY, [job()], running=running)
    assert len(calls) == 1
