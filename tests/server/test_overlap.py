"""The batcher's pipeline (overlap): a batch's host stages run while another batch holds the compute slot."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

from latentd.server.batcher import BatchSizeMismatchError, BatchStats

pytestmark = pytest.mark.timeout(30)

WAIT = 5.0


class ExclusiveSlot:
    """The compute slot as a GPU's one lane gives it: held by one call at a time, calls run on its own
    thread (like a compute lane)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.lane = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fake-lane")

    def __call__(self, key):
        slot = self

        class Held:
            def __enter__(self):
                slot._lock.acquire()
                return lambda fn, *args: slot.lane.submit(fn, *args).result()

            def __exit__(self, *exc):
                slot._lock.release()
                return False
        return Held()


class FakeDevice:
    """A model whose 'device' stage blocks until the test releases that payload's batch; prepare and
    finish record what ran and set an event per payload, so the test can order them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.computing = {name: threading.Event() for name in "abc"}
        self.release = {name: threading.Event() for name in "abc"}
        self.prepared = {name: threading.Event() for name in "abc"}
        self.finished = {name: threading.Event() for name in "abc"}
        self.threads: dict[str, set[str]] = {"prepare": set(), "predict": set(), "finish": set()}
        self._lock = threading.Lock()

    def _note(self, stage: str, payload) -> None:
        with self._lock:
            self.events.append((stage, payload))
            self.threads[stage].add(threading.current_thread().name)

    def prepare(self, key, payloads):
        for payload in payloads:
            self._note("prepare", payload)
            self.prepared[payload].set()
        return [("prepared", payload) for payload in payloads]

    def predict(self, key, batch):
        for _, payload in batch:
            self._note("predict", payload)
            self.computing[payload].set()
            assert self.release[payload].wait(WAIT)
        return [("computed", payload) for _, payload in batch]

    def finish(self, key, payloads, outputs):
        assert [output for _, output in outputs] == payloads
        for payload in payloads:
            self._note("finish", payload)
            self.finished[payload].set()
        return [payload.upper() for payload in payloads]


def _b_prepared_while_a_computes(make_batcher):
    """(device, batcher, a, b): an overlapping batcher of one item per batch, `a` computing on the device and
    `b`, submitted after it, already prepared."""
    device, slot = FakeDevice(), ExclusiveSlot()
    batcher = make_batcher(device.predict, start=True, prepare=device.prepare, finish=device.finish, overlap=True,
                           workers=2, max_batch_size=1, max_delay_s=0.0, hold=slot)
    a = batcher.submit("k", "a")
    assert device.computing["a"].wait(WAIT)
    b = batcher.submit("k", "b")
    assert device.prepared["b"].wait(WAIT)
    return device, batcher, a, b


def test_the_next_batch_is_prepared_and_the_last_finished_while_a_batch_computes(make_batcher):
    # Batch N+1 (b) is prepared while batch N (a) still holds the device.
    device, batcher, a, b = _b_prepared_while_a_computes(make_batcher)
    assert not device.release["a"].is_set() and not device.computing["b"].is_set()
    device.release["a"].set()
    assert device.computing["b"].wait(WAIT)
    # Batch N-1 (a) is finished, and batch N+1 (c) prepared, while batch N (b) computes.
    assert device.finished["a"].wait(WAIT)
    c = batcher.submit("k", "c")
    assert device.prepared["c"].wait(WAIT)
    assert not device.release["b"].is_set() and not device.computing["c"].is_set()
    device.release["b"].set()
    device.release["c"].set()
    assert [future.result(timeout=WAIT) for future in (a, b, c)] == ["A", "B", "C"]
    # Only the device stage ran on the slot's thread; the host stages on the batcher's workers.
    assert all(name.startswith("fake-lane") for name in device.threads["predict"])
    assert not any(name.startswith("fake-lane") for name in device.threads["prepare"] | device.threads["finish"])


def test_without_overlap_every_stage_runs_in_the_slot_in_order(make_batcher):
    device, slot = FakeDevice(), ExclusiveSlot()
    for event in device.release.values():
        event.set()
    batcher = make_batcher(device.predict, start=True, prepare=device.prepare, finish=device.finish,
                           max_batch_size=1, max_delay_s=0.0, hold=slot)
    futures = [batcher.submit("k", payload) for payload in "ab"]
    assert [future.result(timeout=WAIT) for future in futures] == ["A", "B"]
    assert device.events == [("prepare", "a"), ("predict", "a"), ("finish", "a"),
                             ("prepare", "b"), ("predict", "b"), ("finish", "b")]
    assert all(name.startswith("fake-lane") for names in device.threads.values() for name in names)


@pytest.mark.parametrize("overlap", [False, True])
def test_an_item_its_prepare_or_finish_fails_fails_alone(make_batcher, overlap):
    seen: list = []

    def prepare(key, payloads):
        return [ValueError(f"cannot read {p}") if p == "bad-in" else p for p in payloads]

    def predict(key, payloads):
        seen.append(list(payloads))
        return payloads

    def finish(key, payloads, outputs):
        return [ValueError(f"cannot write {o}") if o == "bad-out" else o.upper() for o in outputs]

    stats: list[BatchStats] = []
    batcher = make_batcher(predict, start=True, prepare=prepare, finish=finish, overlap=overlap, workers=2 if overlap else 1,
                           max_batch_size=4, max_delay_s=0.2, on_batch=stats.append)
    futures = {p: batcher.submit("k", p) for p in ("x", "bad-in", "bad-out", "y")}
    assert futures["x"].result(timeout=WAIT) == "X" and futures["y"].result(timeout=WAIT) == "Y"
    with pytest.raises(ValueError, match="cannot read bad-in"):
        futures["bad-in"].result(timeout=WAIT)
    with pytest.raises(ValueError, match="cannot write bad-out"):
        futures["bad-out"].result(timeout=WAIT)
    assert "bad-in" not in [p for call in seen for p in call]
    batcher.stop(timeout=WAIT)
    assert sum(s.size - s.failed for s in stats) == 2  # the two good items, counted as processed


@pytest.mark.parametrize("overlap", [False, True])
def test_a_stage_that_returns_the_wrong_count_fails_its_call(make_batcher, overlap):
    batcher = make_batcher(lambda key, payloads: payloads, start=True, prepare=lambda key, payloads: payloads[:1],
                           overlap=overlap, max_batch_size=2, max_delay_s=0.2)
    futures = [batcher.submit("k", p) for p in (1, 2)]
    for future in futures:
        with pytest.raises(BatchSizeMismatchError, match="prepare returned 1 outputs for 2 inputs"):
            future.result(timeout=WAIT)
    assert batcher.submit("k", 3).result(timeout=WAIT) == 3  # alone, one output for one input: the worker goes on


def test_overlapped_predict_that_raises_splits_so_only_the_poison_item_fails(make_batcher):
    calls: list[list] = []

    def predict(key, payloads):
        calls.append(list(payloads))
        if "poison" in payloads:
            raise RuntimeError("out of memory")
        return payloads

    batcher = make_batcher(predict, start=True, prepare=lambda key, payloads: payloads,
                           finish=lambda key, payloads, outputs: [o * 2 for o in outputs],
                           overlap=True, workers=2, max_batch_size=4, max_delay_s=0.2)
    futures = {p: batcher.submit("k", p) for p in ("a", "b", "poison", "c")}
    for payload, future in futures.items():
        if payload == "poison":
            with pytest.raises(RuntimeError, match="out of memory"):
                future.result(timeout=WAIT)
        else:
            assert future.result(timeout=WAIT) == payload * 2
    assert ["poison"] in calls


def test_cancelled_items_are_prepared_but_never_computed(make_batcher):
    """Overlap prepares before the slot is held; admission still drops what nobody waits for."""
    device, batcher, a, b = _b_prepared_while_a_computes(make_batcher)
    assert b.cancel()
    device.release["a"].set()
    device.release["c"].set()
    assert a.result(timeout=WAIT) == "A"
    assert batcher.submit("k", "c").result(timeout=WAIT) == "C"
    assert ("predict", "b") not in device.events
