"""The dynamic batcher: gather_batch over a plain queue, grouping, and a Batcher with fake predict functions."""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time

import pytest

from latentd.server.batcher import (
    Batcher,
    BatcherClosedError,
    BatchSizeMismatchError,
    BatchStoppedError,
    BatchStats,
    DeadlineExpiredError,
    QueueFullError,
    WorkItem,
    gather_batch,
    group_by_key,
)

# Nothing here should take more than a fraction of a second; a hang fails fast instead of stalling the suite.
pytestmark = pytest.mark.timeout(30)

WAIT = 5.0  # seconds any blocking call in these tests may take before the test counts as hung


class FakeClock:
    """A monotonic clock the test moves by hand; optionally advances `step` on every reading."""

    def __init__(self, now: float = 0.0, step: float = 0.0) -> None:
        self.now = now
        self.step = step

    def __call__(self) -> float:
        value = self.now
        self.now += self.step
        return value


def item(key="k", payload=None) -> WorkItem:
    return WorkItem(key, payload, concurrent.futures.Future())


def queue_of(*entries) -> queue.Queue:
    source: queue.Queue = queue.Queue()
    for entry in entries:
        source.put(entry)
    return source


def doubling(sizes: list[int]):
    def predict(key, payloads):
        sizes.append(len(payloads))
        return [p * 2 for p in payloads]

    return predict


# -- gather_batch ------------------------------------------------------------------------------------


def test_gather_returns_at_max_items_without_waiting():
    items = [item(payload=i) for i in range(5)]
    source = queue_of(*items)
    started = time.monotonic()
    batch = gather_batch(source, max_items=3, max_delay_s=10.0)
    assert time.monotonic() - started < 1.0
    assert batch == items[:3]
    assert source.qsize() == 2


def test_gather_deadline_comes_from_the_clock():
    # The fake clock jumps far past max_delay_s after the first item, so gather must not wait the 10 s.
    first = item()
    started = time.monotonic()
    batch = gather_batch(queue_of(first), max_items=8, max_delay_s=10.0, clock=FakeClock(step=100.0))
    assert time.monotonic() - started < 1.0
    assert batch == [first]


def test_gather_returns_fewer_items_after_max_delay():
    first, late = item(payload=1), item(payload=2)
    source = queue_of(first)
    timer = threading.Timer(0.5, source.put, args=(late,))
    timer.start()
    try:
        started = time.monotonic()
        batch = gather_batch(source, max_items=8, max_delay_s=0.02)
        assert time.monotonic() - started < 0.4
        assert batch == [first]
    finally:
        timer.cancel()


def test_gather_waits_for_items_within_max_delay():
    first, second = item(payload=1), item(payload=2)
    source = queue_of(first)
    timer = threading.Timer(0.01, source.put, args=(second,))
    timer.start()
    try:
        assert gather_batch(source, max_items=2, max_delay_s=WAIT) == [first, second]
    finally:
        timer.cancel()


def test_gather_takes_already_queued_items_even_with_zero_delay():
    items = [item(payload=i) for i in range(3)]
    assert gather_batch(queue_of(*items), max_items=8, max_delay_s=0.0) == items


def test_gather_returns_empty_list_after_poll():
    started = time.monotonic()
    assert gather_batch(queue_of(), max_items=8, max_delay_s=1.0, poll_s=0.01) == []
    assert time.monotonic() - started < 1.0


def test_gather_sentinel_alone_means_stop():
    assert gather_batch(queue_of(None), max_items=8, max_delay_s=1.0) is None


def test_gather_sentinel_after_items_returns_them_then_stop():
    a, b, c = item(payload="a"), item(payload="b"), item(payload="c")
    source = queue_of(a, b, None)
    assert gather_batch(source, max_items=8, max_delay_s=WAIT) == [a, b]
    assert gather_batch(source, max_items=8, max_delay_s=WAIT) is None
    # The sentinel stops gathering even when max_items would allow more.
    assert gather_batch(queue_of(c, None), max_items=2, max_delay_s=WAIT) == [c]


def test_gather_asks_delay_for_when_the_first_item_comes():
    asked: list[float] = []
    clock = FakeClock(now=10.0)
    source = queue_of(item(), item())
    batch = gather_batch(source, 8, max_delay_s=60.0, clock=clock, delay_for=lambda: asked.append(clock.now) or 0.0)
    assert len(batch) == 2 and asked == [10.0]  # a delay of 0: only what is already queued joins


def test_gather_limit_for_the_first_key_stops_early_without_waiting():
    big, small = item("big", 1), item("small", 2)
    source = queue_of(big, small)
    started = time.monotonic()
    # One item of key "big" per call: the batch leaves at once, though max_delay_s is long.
    assert gather_batch(source, max_items=8, max_delay_s=10.0, limit_for=lambda key: 1 if key == "big" else 8) == [big]
    assert time.monotonic() - started < 1.0
    assert gather_batch(source, max_items=8, max_delay_s=0.0, limit_for=lambda key: 1 if key == "big" else 8) == [small]


# -- group_by_key -------------------------------------------------------------------------------------


def test_group_by_key_is_stable():
    a1, b1, a2, c1, b2 = item("a", 1), item("b", 1), item("a", 2), item("c", 1), item("b", 2)
    assert group_by_key([a1, b1, a2, c1, b2]) == [[a1, a2], [b1, b2], [c1]]
    assert group_by_key([]) == []


def test_group_by_key_uses_structured_keys():
    first, second = item(("encode", (1, 3, 64, 64), "float16"), 1), item(("encode", (1, 3, 64, 64), "float16"), 2)
    other = item(("encode", (1, 3, 32, 32), "float16"), 3)
    assert group_by_key([first, other, second]) == [[first, second], [other]]


# -- Batcher ----------------------------------------------------------------------------------------------


def test_items_per_call_splits_a_group_into_calls_of_its_key(make_batcher):
    calls: list[tuple[str, int]] = []
    gate = threading.Event()

    def predict(key, payloads):
        gate.wait(WAIT)
        calls.append((key, len(payloads)))
        return [p * 2 for p in payloads]

    limits = {"big": 2, "small": 8, "broken": None}  # int(None) raises: the policy's bug costs batching only
    batcher = make_batcher(predict, max_batch_size=8, max_delay_s=0.05, items_per_call=lambda key: limits[key])
    batcher.start()
    blocker = batcher.submit("small", -1)  # occupies the worker until the gate opens, so the rest queue up
    futures = [batcher.submit(key, i) for i, key in enumerate(["small"] * 2 + ["big"] * 5 + ["broken"] * 2)]
    gate.set()
    assert blocker.result(timeout=WAIT) == -2
    assert [f.result(timeout=WAIT) for f in futures] == [2 * i for i in range(9)]
    assert ("big", 2) in calls and all(size <= 2 for key, size in calls if key == "big")
    assert all(size == 1 for key, size in calls if key == "broken")
    assert sum(size for key, size in calls if key == "big") == 5


def test_concurrent_submits_are_batched_and_each_caller_gets_its_own_result(make_batcher):
    sizes: list[int] = []
    gate = threading.Event()

    def predict(key, payloads):
        gate.wait(WAIT)  # hold the first batch until every thread has submitted, so the rest queue up
        sizes.append(len(payloads))
        return [p * 2 for p in payloads]

    batcher = make_batcher(predict, max_batch_size=8, max_delay_s=0.01)
    batcher.start()
    assert batcher.running
    assert any(t.name == "batcher-test" and t.daemon for t in threading.enumerate())

    futures: dict[int, concurrent.futures.Future] = {}
    barrier = threading.Barrier(6)

    def client(index: int) -> None:
        barrier.wait(WAIT)
        for j in range(3):
            payload = index * 100 + j
            futures[payload] = batcher.submit("k", payload)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    gate.set()

    assert len(futures) == 18
    for payload, future in futures.items():
        assert future.result(timeout=WAIT) == payload * 2
    assert sum(sizes) == 18
    assert max(sizes) > 1
    assert max(sizes) <= 8


def test_different_keys_go_to_separate_predict_calls(make_batcher):
    calls: list[tuple] = []

    def predict(key, payloads):
        calls.append((key, list(payloads)))
        return [f"{key}:{p}" for p in payloads]

    batcher = make_batcher(predict)
    futures = [batcher.submit(key, p) for key, p in [("a", 1), ("b", 2), ("a", 3)]]
    batcher.start()  # submitted before start, so all three are gathered in one batch
    assert [f.result(timeout=WAIT) for f in futures] == ["a:1", "b:2", "a:3"]
    assert calls == [("a", [1, 3]), ("b", [2])]


def test_exception_output_fails_only_that_item(make_batcher):
    sizes: list[int] = []

    def predict(key, payloads):
        sizes.append(len(payloads))
        return [ValueError(f"bad {p}") if p < 0 else p + 1 for p in payloads]

    batcher = make_batcher(predict)
    good1, bad, good2 = (batcher.submit("k", p) for p in (1, -1, 2))
    batcher.start()
    assert good1.result(timeout=WAIT) == 2
    assert good2.result(timeout=WAIT) == 3
    with pytest.raises(ValueError, match="bad -1"):
        bad.result(timeout=WAIT)
    assert sizes == [3]


def test_a_batch_stopped_as_a_whole_fails_every_item_once_without_splitting(make_batcher):
    calls: list[list] = []

    def predict(key, payloads):
        calls.append(list(payloads))
        raise BatchStoppedError("no request waits for this batch")

    batcher = make_batcher(predict, max_batch_size=4)
    futures = [batcher.submit("k", p) for p in range(4)]
    batcher.start()
    for future in futures:
        with pytest.raises(BatchStoppedError):
            future.result(timeout=WAIT)
    assert calls == [[0, 1, 2, 3]]


def test_a_closed_compute_slot_fails_the_group_without_a_traceback(make_batcher, caplog):
    import contextlib

    @contextlib.contextmanager
    def closed(key):
        raise BatcherClosedError("compute lanes closed")
        yield  # pragma: no cover

    batcher = make_batcher(lambda key, payloads: payloads, hold=closed)
    future = batcher.submit("k", 1)
    with caplog.at_level(logging.ERROR, logger="latentd.server.batcher"):
        batcher.start()
        with pytest.raises(BatcherClosedError):
            future.result(timeout=WAIT)
    assert not caplog.records


def test_raising_predict_splits_so_only_the_poison_item_fails(make_batcher):
    calls: list[list] = []
    stats: list[BatchStats] = []

    def predict(key, payloads):
        calls.append(list(payloads))
        if "poison" in payloads:
            raise RuntimeError("out of memory")
        return [p * 10 for p in payloads]

    batcher = make_batcher(predict, max_batch_size=8, on_batch=stats.append)
    payloads = [1, 2, "poison", 4, 5, 6, 7, 8]
    futures = [batcher.submit("k", p) for p in payloads]
    batcher.start()

    for payload, future in zip(payloads, futures):
        if payload == "poison":
            with pytest.raises(RuntimeError, match="out of memory"):
                future.result(timeout=WAIT)
        else:
            assert future.result(timeout=WAIT) == payload * 10
    assert calls == [
        payloads,
        [1, 2, "poison", 4],
        [1, 2],
        ["poison", 4],
        ["poison"],
        [4],
        [5, 6, 7, 8],
    ]
    batcher.stop(timeout=WAIT)  # join, so every on_batch call has happened
    assert [s.size for s in stats] == [len(c) for c in calls]
    # Split calls report failed=0; the single poisoned call reports the one failure.
    assert sum(s.failed for s in stats) == 1


def test_output_count_mismatch_fails_the_whole_group(make_batcher):
    def predict(key, payloads):
        return payloads[:-1] if key == "short" else payloads

    batcher = make_batcher(predict)
    short = [batcher.submit("short", p) for p in (1, 2, 3)]
    fine = batcher.submit("fine", 9)
    batcher.start()
    for future in short:
        with pytest.raises(BatchSizeMismatchError, match=r"2 outputs for 3 inputs"):
            future.result(timeout=WAIT)
    assert fine.result(timeout=WAIT) == 9


def test_non_list_output_fails_the_group(make_batcher):
    batcher = make_batcher(lambda key, payloads: None)
    future = batcher.submit("k", 1)
    batcher.start()
    with pytest.raises(TypeError, match="must return a list"):
        future.result(timeout=WAIT)


def test_cancelled_and_expired_items_never_reach_predict(make_batcher):
    seen: list = []

    def predict(key, payloads):
        seen.extend(payloads)
        return payloads

    batcher = make_batcher(predict)
    now = time.monotonic()
    kept = batcher.submit("k", "kept")
    cancelled = batcher.submit("k", "cancelled")
    expired = batcher.submit("k", "expired", deadline=now - 1.0)
    in_time = batcher.submit("k", "in_time", deadline=now + 60.0)
    assert cancelled.cancel()
    batcher.start()

    assert kept.result(timeout=WAIT) == "kept"
    assert in_time.result(timeout=WAIT) == "in_time"
    with pytest.raises(DeadlineExpiredError):
        expired.result(timeout=WAIT)
    assert cancelled.cancelled()
    assert seen == ["kept", "in_time"]


def test_group_of_only_dead_items_skips_predict(make_batcher):
    calls: list = []
    batcher = make_batcher(lambda key, payloads: calls.append(payloads) or payloads)
    expired = batcher.submit("k", 1, deadline=time.monotonic() - 1.0)
    batcher.start()
    with pytest.raises(DeadlineExpiredError):
        expired.result(timeout=WAIT)
    batcher.stop(timeout=WAIT)
    assert calls == []


def test_queue_full_then_recovers(make_batcher):
    entered, release = threading.Event(), threading.Event()

    def predict(key, payloads):
        entered.set()
        release.wait(WAIT)
        return payloads

    batcher = make_batcher(predict, max_batch_size=1, queue_limit=2)
    batcher.start()
    try:
        first = batcher.submit("k", 0)
        assert entered.wait(WAIT)  # the worker holds item 0 inside predict; it no longer counts as waiting
        queued = [batcher.submit("k", 1), batcher.submit("k", 2)]
        assert batcher.depth == 2
        with pytest.raises(QueueFullError):
            batcher.submit("k", 3)
    finally:
        release.set()
    assert first.result(timeout=WAIT) == 0
    assert [f.result(timeout=WAIT) for f in queued] == [1, 2]
    assert batcher.depth == 0
    assert batcher.submit("k", 4).result(timeout=WAIT) == 4


def test_submit_after_stop_is_refused_and_stop_is_idempotent(make_batcher):
    batcher = make_batcher(doubling([]))
    batcher.start()
    assert batcher.submit("k", 1).result(timeout=WAIT) == 2
    batcher.stop(timeout=WAIT)
    batcher.stop(timeout=WAIT)
    assert not batcher.running
    with pytest.raises(BatcherClosedError):
        batcher.submit("k", 2)
    with pytest.raises(RuntimeError):
        batcher.start()


@pytest.mark.parametrize("workers", [1, 3])
def test_stop_computes_everything_already_queued(make_batcher, workers):
    entered, release = threading.Event(), threading.Event()

    def predict(key, payloads):
        entered.set()
        release.wait(WAIT)
        return [p * 2 for p in payloads]

    batcher = make_batcher(predict, max_batch_size=2, workers=workers)
    batcher.start()
    futures = [batcher.submit("k", 0)]
    assert entered.wait(WAIT)
    futures += [batcher.submit("k", p) for p in range(1, 6)]

    stopper = threading.Thread(target=batcher.stop, kwargs={"timeout": WAIT})
    stopper.start()
    try:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:  # stop() marks the batcher closed before it joins
            try:
                batcher.submit("k", 99).cancel()
            except BatcherClosedError:
                break
            time.sleep(0.001)
        else:
            pytest.fail("submit was still accepted after stop()")
    finally:
        release.set()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert not batcher.running
    assert [f.result(timeout=0) for f in futures] == [0, 2, 4, 6, 8, 10]


def test_stop_without_start_fails_queued_items(make_batcher):
    batcher = make_batcher(doubling([]))
    future = batcher.submit("k", 1)
    batcher.stop(timeout=WAIT)
    with pytest.raises(BatcherClosedError):
        future.result(timeout=WAIT)
    assert batcher.depth == 0


def test_on_batch_receives_stats_from_the_injected_clock(make_batcher):
    clock = FakeClock(now=1.0)
    stats: list[BatchStats] = []

    def predict(key, payloads):
        clock.now += 0.5  # compute "takes" half a second
        return payloads

    batcher = make_batcher(predict, max_delay_s=0.0, on_batch=stats.append, clock=clock)
    futures = [batcher.submit("k", p) for p in (1, 2)]  # enqueued at t=1
    clock.now = 3.0  # compute starts at t=3
    batcher.start()
    assert [f.result(timeout=WAIT) for f in futures] == [1, 2]
    batcher.stop(timeout=WAIT)
    assert stats == [BatchStats(key="k", size=2, queue_seconds=(2.0, 2.0), compute_seconds=0.5, failed=0)]


def test_raising_on_batch_does_not_stop_the_worker(make_batcher, caplog):
    def on_batch(stats: BatchStats) -> None:
        raise RuntimeError("metrics broke")

    batcher = make_batcher(doubling([]), on_batch=on_batch)
    batcher.start()
    with caplog.at_level(logging.ERROR, logger="latentd.server.batcher"):
        assert batcher.submit("k", 1).result(timeout=WAIT) == 2
        assert batcher.submit("k", 2).result(timeout=WAIT) == 4
        batcher.stop(timeout=WAIT)
    assert "on_batch callback failed" in caplog.text


def test_unhashable_key_is_refused_at_submit(make_batcher):
    batcher = make_batcher(doubling([]))
    with pytest.raises(TypeError):
        batcher.submit(["not", "hashable"], 1)
    assert batcher.depth == 0


@pytest.mark.parametrize(
    "setting, value",
    [("max_batch_size", 0), ("max_delay_s", -0.001), ("max_delay_s", float("nan")), ("queue_limit", 0),
     ("workers", 0), ("busy_delay_s", -1.0)],
)
def test_constructor_rejects_bad_settings(setting, value):
    with pytest.raises(ValueError, match=setting):
        Batcher("bad", doubling([]), **{setting: value})


# -- several workers and a compute slot ----------------------------------------------------------------


def test_workers_compute_batches_side_by_side(make_batcher):
    both_in = threading.Barrier(2, timeout=WAIT)  # broken, and the items failed, if the calls take turns

    def predict(key, payloads):
        both_in.wait()
        return payloads

    batcher = make_batcher(predict, max_batch_size=1, workers=2)
    batcher.start()
    assert sorted(t.name for t in threading.enumerate() if t.name.startswith("batcher-test")) == [
        "batcher-test-0", "batcher-test-1"]
    futures = [batcher.submit("k", i) for i in range(2)]
    assert [f.result(timeout=WAIT) for f in futures] == [0, 1]


def test_one_worker_gathers_at_a_time_so_a_burst_is_one_batch(make_batcher):
    sizes: list[int] = []
    batcher = make_batcher(doubling(sizes), max_batch_size=8, max_delay_s=0.5, workers=2)
    batcher.start()
    futures = [batcher.submit("k", i) for i in range(8)]
    assert [f.result(timeout=WAIT) for f in futures] == [2 * i for i in range(8)]
    assert sizes == [8]  # two workers gathering at once would have shared the burst out


def test_items_are_admitted_once_the_compute_slot_is_held(make_batcher):
    """A deadline that passes while the call waits for its slot is not computed; predict runs through
    what the slot yields."""
    slot_free = threading.Event()
    ran_through_slot: list[int] = []

    class Slot:
        def __init__(self, key):
            assert key == "k"

        def __enter__(self):
            assert slot_free.wait(WAIT)
            return lambda fn, *args: ran_through_slot.append(1) or fn(*args)

        def __exit__(self, *exc):
            return False

    seen: list = []
    batcher = make_batcher(lambda key, payloads: seen.extend(payloads) or payloads, hold=Slot)
    batcher.start()
    expiring = batcher.submit("k", "late", deadline=time.monotonic() + 0.05)
    time.sleep(0.2)  # the worker has gathered the item and waits for the slot while its deadline passes
    slot_free.set()
    with pytest.raises(DeadlineExpiredError):
        expiring.result(timeout=WAIT)
    assert batcher.submit("k", "on time").result(timeout=WAIT) == "on time"
    assert seen == ["on time"] and ran_through_slot == [1]


def test_a_batch_waits_longer_for_company_while_another_computes(make_batcher):
    sizes: list[int] = []
    first_in, release = threading.Event(), threading.Event()

    def predict(key, payloads):
        sizes.append(len(payloads))
        if len(sizes) == 1:
            first_in.set()
            assert release.wait(WAIT)
        return payloads

    batcher = make_batcher(predict, max_batch_size=8, max_delay_s=0.0, busy_delay_s=0.5, workers=2)
    batcher.start()
    first = batcher.submit("k", 0)  # alone: leaves at once (max_delay_s 0)
    assert first_in.wait(WAIT)
    second = batcher.submit("k", 1)  # while the first computes: waits up to busy_delay_s for company
    time.sleep(0.1)
    third = batcher.submit("k", 2)
    release.set()
    assert [f.result(timeout=WAIT) for f in (first, second, third)] == [0, 1, 2]
    assert sizes == [1, 2]
    # Nothing computing any more: a lone item leaves at once again (waiting busy_delay_s, it would
    # have taken the next one along), whichever worker takes it.
    fourth = batcher.submit("k", 3)
    time.sleep(0.2)
    fifth = batcher.submit("k", 4)
    assert [f.result(timeout=WAIT) for f in (fourth, fifth)] == [3, 4]
    assert sizes == [1, 2, 1, 1]
