"""The compute lanes: which lane a call takes, the threads each lane runs with, fairness and closing."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from latentd.server.compute import SHARING_LINGER_S, ComputeLanes, LanesClosedError

pytestmark = pytest.mark.timeout(60)

WAIT = 5.0


def where() -> tuple[str, int]:
    """The lane thread a call runs on and its torch intra-op thread count."""
    return threading.current_thread().name, torch.get_num_threads()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_lanes():
    made: list[ComputeLanes] = []

    def make(split: int = 2, **kwargs) -> ComputeLanes:
        lanes = ComputeLanes(split, threads=2, **kwargs)
        made.append(lanes)
        return lanes

    yield make
    for lanes in made:
        lanes.close()


class Holder:
    """A hold entered on its own thread, kept until release(); `lane` says where its call ran."""

    def __init__(self, lanes: ComputeLanes, shareable: bool = True) -> None:
        self.entered, self._release = threading.Event(), threading.Event()
        self.lane: tuple[str, int] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._hold, args=(lanes, shareable))
        self._thread.start()

    def _hold(self, lanes: ComputeLanes, shareable: bool) -> None:
        try:
            with lanes.hold(shareable) as run:
                self.lane = run(where)
                self.entered.set()
                self._release.wait(WAIT)
        except BaseException as exc:
            self.error = exc
            self.entered.set()

    def release(self) -> None:
        self._release.set()
        self._thread.join(WAIT)


def test_a_lone_call_takes_the_wide_lane_with_every_thread(make_lanes):
    lanes = make_lanes()
    assert lanes.narrow_lanes == 2
    for shareable in (False, True):
        with lanes.hold(shareable) as run:
            assert run(where) == ("latentd-compute", 2)
    assert lanes.run(where) == ("latentd-compute", 2)
    assert lanes.submit(where).result(WAIT) == ("latentd-compute", 2)


def test_calls_that_meet_share_the_threads_on_narrow_lanes_for_a_while(make_lanes):
    clock = Clock()
    lanes = make_lanes(clock=clock)
    first = Holder(lanes)
    assert first.entered.wait(WAIT) and first.lane == ("latentd-compute", 2)
    second = Holder(lanes)  # meets the first: waits for the wide lane's threads, then takes a narrow lane
    assert not second.entered.wait(0.2)
    first.release()
    assert second.entered.wait(WAIT) and second.lane == ("latentd-compute-0", 1)
    third = Holder(lanes)  # side by side with the second
    assert third.entered.wait(WAIT) and third.lane == ("latentd-compute-1", 1)
    second.release()
    third.release()
    clock.now += SHARING_LINGER_S / 2  # calls met a moment ago: a lone shareable call still goes narrow
    with lanes.hold(True) as run:
        assert run(where) == ("latentd-compute-0", 1)
    clock.now += SHARING_LINGER_S * 2  # long since: back to every thread
    with lanes.hold(True) as run:
        assert run(where) == ("latentd-compute", 2)


def test_a_wide_call_waits_for_narrow_ones_and_holds_new_ones_back(make_lanes):
    lanes = make_lanes(clock=Clock())
    first = Holder(lanes)
    assert first.entered.wait(WAIT)
    narrow_a = Holder(lanes)
    first.release()
    assert narrow_a.entered.wait(WAIT)
    narrow_b = Holder(lanes)
    assert narrow_b.entered.wait(WAIT) and {narrow_a.lane[0], narrow_b.lane[0]} == {
        "latentd-compute-0", "latentd-compute-1"}
    wide = Holder(lanes, shareable=False)
    assert not wide.entered.wait(0.2)
    narrow_b.release()
    late = Holder(lanes)  # a narrow lane is free, but the wide call asked first
    assert not late.entered.wait(0.2) and not wide.entered.is_set()
    narrow_a.release()
    assert wide.entered.wait(WAIT) and wide.lane == ("latentd-compute", 2)
    assert not late.entered.wait(0.2)
    wide.release()
    assert late.entered.wait(WAIT) and late.lane[1] == 1
    late.release()


def test_the_lanes_never_run_more_threads_than_the_wide_lane_has(make_lanes):
    lanes = make_lanes()
    lock = threading.Lock()
    running = {"threads": 0, "most": 0}
    lanes_seen: set[str] = set()

    def work() -> None:
        with lock:
            running["threads"] += torch.get_num_threads()
            running["most"] = max(running["most"], running["threads"])
            lanes_seen.add(threading.current_thread().name)
        time.sleep(0.002)
        with lock:
            running["threads"] -= torch.get_num_threads()

    def caller(index: int) -> None:
        for call in range(25):
            with lanes.hold(shareable=(index + call) % 3 != 0) as run:
                run(work)

    callers = [threading.Thread(target=caller, args=(i,)) for i in range(5)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join(30)
    assert not any(thread.is_alive() for thread in callers)
    assert running["most"] == 2 and running["threads"] == 0
    assert "latentd-compute" in lanes_seen and len(lanes_seen) > 1


def test_failures_reach_the_caller_and_the_lane_goes_on(make_lanes):
    lanes = make_lanes()

    def fail() -> None:
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        lanes.run(fail)
    with pytest.raises(ValueError, match="bad batch"):
        lanes.submit(fail).result(WAIT)
    assert lanes.run(lambda: 7) == 7


def test_close_fails_waiting_and_later_calls_and_ends_the_lane_threads(make_lanes):
    lanes = make_lanes()
    first = Holder(lanes)
    assert first.entered.wait(WAIT)
    waiting = Holder(lanes, shareable=False)
    assert not waiting.entered.wait(0.1)
    lanes.close()
    assert waiting.entered.wait(WAIT) and isinstance(waiting.error, LanesClosedError)
    first.release()
    with pytest.raises(LanesClosedError):
        lanes.run(where)
    for lane in (lanes._wide, *lanes._narrow):
        lane._thread.join(WAIT)
        assert not lane._thread.is_alive(), f"{lane.name} outlived close()"


def test_the_process_thread_count_is_kept_for_other_threads(make_lanes):
    before = torch.get_num_threads()
    make_lanes(split=2)
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join(WAIT)
    assert torch.get_num_threads() == before and seen == [before]


def test_split_must_be_positive():
    with pytest.raises(ValueError, match="split"):
        ComputeLanes(0)
