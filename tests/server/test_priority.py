"""Priorities in the batcher: interactive work first, bulk work never starved (PriorityQueues' rule)."""

from __future__ import annotations

import concurrent.futures
import queue
import threading

import pytest

from latentd.server.batcher import BULK, INTERACTIVE, Batcher, PriorityQueues, WorkItem, gather_batch

pytestmark = pytest.mark.timeout(30)
WAIT = 5.0


def item(name: str, priority: str, key: str = "k") -> WorkItem:
    return WorkItem(key, name, concurrent.futures.Future(), priority=priority)


def leads(queues: PriorityQueues, count: int) -> list[str]:
    """The first items of `count` one-item batches."""
    return [queues.get_nowait().payload for _ in range(count)]


def test_interactive_leads_and_every_fifth_batch_is_bulk_while_bulk_waits():
    queues = PriorityQueues(bulk_every=4)
    for n in range(3):
        queues.put(item(f"b{n}", BULK))
    for n in range(10):
        queues.put(item(f"i{n}", INTERACTIVE))
    assert leads(queues, 13) == ["i0", "i1", "i2", "i3", "b0", "i4", "i5", "i6", "i7", "b1", "i8", "i9", "b2"]
    with pytest.raises(queue.Empty):
        queues.get_nowait()


def test_bulk_is_never_starved_by_a_flood_of_interactive_work():
    queues = PriorityQueues(bulk_every=3)
    for n in range(5):
        queues.put(item(f"b{n}", BULK))
    taken = []
    for n in range(40):
        queues.put(item(f"i{n}", INTERACTIVE))  # a new interactive item keeps arriving
        taken.append(queues.get_nowait().payload)
    bulk_places = [place for place, name in enumerate(taken) if name.startswith("b")]
    assert [taken[place] for place in bulk_places] == ["b0", "b1", "b2", "b3", "b4"]  # in their order
    # The bound: at most bulk_every interactive-led batches between two bulk ones.
    gaps = [later - earlier - 1 for earlier, later in zip([-1, *bulk_places], bulk_places)]
    assert max(gaps) <= 3


def test_interactive_work_alone_or_bulk_alone_just_flows_in_order():
    queues = PriorityQueues(bulk_every=1)
    for n in range(4):
        queues.put(item(f"i{n}", INTERACTIVE))
    assert leads(queues, 4) == ["i0", "i1", "i2", "i3"]
    for n in range(4):
        queues.put(item(f"b{n}", BULK))
    assert leads(queues, 4) == ["b0", "b1", "b2", "b3"]


def test_an_interactive_batch_leaves_bulk_items_behind_and_a_bulk_batch_takes_interactive_ones_first():
    queues = PriorityQueues(bulk_every=1)
    for name, priority in [("b0", BULK), ("i0", INTERACTIVE), ("b1", BULK), ("i1", INTERACTIVE)]:
        queues.put(item(name, priority))
    batch = gather_batch(queues, max_items=8, max_delay_s=0.0)
    assert [entry.payload for entry in batch] == ["i0", "i1"]
    queues.put(item("i2", INTERACTIVE))
    batch = gather_batch(queues, max_items=8, max_delay_s=0.0)  # bulk's turn (bulk_every=1)
    assert [entry.payload for entry in batch] == ["b0", "i2", "b1"]


def test_the_stop_sentinel_comes_after_the_queued_work():
    queues = PriorityQueues()
    queues.put(item("b0", BULK))
    queues.put(None)
    queues.put(item("i0", INTERACTIVE))
    assert leads(queues, 2) == ["i0", "b0"]
    assert queues.get_nowait() is None
    with pytest.raises(queue.Empty):
        queues.get(timeout=0.01)


def test_a_bad_rule_or_priority_is_refused():
    with pytest.raises(ValueError, match="bulk_every"):
        PriorityQueues(bulk_every=0)
    batcher = Batcher("test", lambda key, payloads: payloads)
    with pytest.raises(ValueError, match="priority"):
        batcher.submit("k", 1, priority="urgent")


def run_held(first: tuple[str, str, str], then: list[tuple[str, str, str]], **settings) -> list[tuple[str, list]]:
    """Submit `first` (key, payload, priority), and `then` while the worker holds it inside predict; the
    (key, payloads) of every predict call, in order."""
    entered, release = threading.Event(), threading.Event()
    order: list[tuple[str, list]] = []

    def predict(key, payloads):
        order.append((key, list(payloads)))
        entered.set()
        release.wait(WAIT)
        return payloads

    batcher = Batcher("test", predict, max_delay_s=0.0, **settings)
    batcher.start()
    try:
        futures = [batcher.submit(first[0], first[1], priority=first[2])]
        assert entered.wait(WAIT)  # the worker is busy; everything below waits
        futures += [batcher.submit(key, payload, priority=priority) for key, payload, priority in then]
        waiting = {name: sum(1 for *_, priority in then if priority == name) for name in (BULK, INTERACTIVE)}
        assert {name: batcher.depth_of(name) for name in waiting} == waiting
    finally:
        release.set()
    assert [f.result(timeout=WAIT) for f in futures]
    batcher.stop(timeout=WAIT)
    return order


def test_the_batcher_computes_waiting_interactive_work_before_bulk_work():
    then = [("k", f"b{n}", BULK) for n in range(4)] + [("k", f"i{n}", INTERACTIVE) for n in range(6)]
    order = run_held(("k", "b-first", BULK), then, max_batch_size=2, bulk_every=2)
    # Two interactive batches, then bulk's turn (bulk_every=2), which takes a waiting interactive item
    # first; then the last interactive item, then the rest of the bulk work.
    assert [payloads for _, payloads in order] == [["b-first"], ["i0", "i1"], ["i2", "i3"], ["b0", "i4"], ["i5"],
                                                   ["b1", "b2"], ["b3"]]


def test_batch_stats_carry_each_items_priority():
    stats = []
    batcher = Batcher("test", lambda key, payloads: payloads, on_batch=stats.append)
    batcher.start()
    try:
        assert batcher.submit("k", 1, priority=BULK).result(timeout=WAIT) == 1
    finally:
        batcher.stop(timeout=WAIT)
    assert stats[0].priorities == (BULK,)


def test_in_a_bulk_led_batch_the_interactive_items_of_another_key_compute_first():
    then = [("a", f"i{n}", INTERACTIVE) for n in range(3)] + [("b", f"b{n}", BULK) for n in range(2)]
    order = run_held(("warm", "w", INTERACTIVE), then, max_batch_size=2, bulk_every=1)
    # i0 leads (with i1), then bulk's turn (bulk_every=1): b0 leads and takes i2 first, whose group
    # computes before b0's; then b1.
    assert order == [("warm", ["w"]), ("a", ["i0", "i1"]), ("a", ["i2"]), ("b", ["b0"]), ("b", ["b1"])]


def test_bulk_batch_size_caps_the_batches_bulk_work_leads_only():
    queues = PriorityQueues(bulk_every=1, bulk_batch_size=2)
    for n in range(4):
        queues.put(item(f"b{n}", BULK))
    assert [entry.payload for entry in gather_batch(queues, max_items=8, max_delay_s=0.0)] == ["b0", "b1"]
    for n in range(4):
        queues.put(item(f"i{n}", INTERACTIVE))
    assert [entry.payload for entry in gather_batch(queues, max_items=8, max_delay_s=0.0)] == [
        "i0", "i1", "i2", "i3"]
    with pytest.raises(ValueError, match="bulk_batch_size"):
        PriorityQueues(bulk_batch_size=0)
    with pytest.raises(ValueError, match="bulk_batch_size"):
        Batcher("test", lambda key, payloads: payloads, bulk_batch_size=0)
