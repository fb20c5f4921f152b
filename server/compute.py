"""Where the server's torch work runs: one lane with every intra-op thread, or narrower lanes side by side."""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import threading
import time
from typing import Any, Callable, Iterator

import torch

from .batcher import BatcherClosedError

# How long after two calls last met (one ready while another ran or waited) shareable calls keep
# taking narrow lanes, so that two batcher workers finishing together do not fall back to taking
# turns on the wide lane. A lone client's calls never meet another, so they keep the wide lane.
SHARING_LINGER_S = 0.5


class LanesClosedError(BatcherClosedError):
    """A call asked for a lane after close() (the server is stopping: UNAVAILABLE, like a closed batcher)."""


class _Lane:
    """One thread with a fixed number of intra-op threads, running the calls it is given in order."""

    def __init__(self, name: str, threads: int, started: threading.Barrier) -> None:
        self.name = name
        self.threads = threads
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, args=(started,), name=name, daemon=True)
        self._thread.start()

    def _serve(self, started: threading.Barrier) -> None:
        # torch sets a thread's count from the process's on its first parallel work; make that happen
        # now, so the count set below stays when ComputeLanes puts the process's count back.
        torch.get_num_threads()
        # Once per thread: torch.set_num_threads also empties oneDNN's cache of compiled kernels.
        torch.set_num_threads(self.threads)
        started.wait()
        while (call := self._calls.get()) is not None:
            future, fn, args = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # the caller gets every failure, as from an executor
                future.set_exception(exc)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on this lane's thread, waiting for its result (or exception)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:  # nothing may land behind the stop sentinel, where nobody would run it
            if self._closed:
                raise LanesClosedError(f"compute lane {self.name} is closed")
            self._calls.put((future, fn, args))
        return future.result()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._calls.put(None)

    def join(self, timeout: float | None) -> bool:
        """Wait for the thread to end (after its current call); True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


class ComputeLanes:
    """The server's torch work on lanes: one wide lane with all of this process's intra-op threads
    and, when `split` > 1, `split` narrow lanes with an equal share of them each.

    A caller holds a lane (`hold`) and runs its work there through what `hold` yields; the wide
    lane is held alone, the narrow lanes side by side, so the cores are never asked for more
    threads than the wide lane has. A `shareable` hold (a batch on a CPU) takes a narrow lane when
    another hold is running or waiting, or when holds last met less than SHARING_LINGER_S ago;
    every other hold takes the wide lane, and while one waits, no narrow hold starts (no starving).

    Why: a model call on small images parallelizes badly (on 2 cores, 64x64 encode batches of 8 side
    by side on one thread each ran 1.2-1.6x the images/s of the same batches one after the other on
    two threads), while a lone large image needs every core for its latency. Why a thread per lane:
    torch keeps an intra-op thread count per thread, and torch.set_num_threads empties oneDNN's
    kernel cache, so each thread keeps one count for good.
    """

    def __init__(self, split: int = 1, *, threads: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`threads`: the wide lane's intra-op threads; None: this process's count."""
        if split < 1:
            raise ValueError(f"split must be >= 1, got {split}")
        process_threads = torch.get_num_threads()
        self.threads = threads or process_threads
        share = self.threads // split
        lanes = split if split > 1 and share >= 1 else 0
        started = threading.Barrier(2 + lanes)
        self._wide = _Lane("latentd-compute", self.threads, started)
        self._narrow = [_Lane(f"latentd-compute-{i}", share, started) for i in range(lanes)]
        started.wait()
        # The lanes' set_num_threads calls also set the count that threads starting torch work later
        # start from; put back this process's count for them.
        torch.set_num_threads(process_threads)
        self._clock = clock
        self._cond = threading.Condition()
        self._held: set[_Lane] = set()
        self._waiting = 0
        self._wide_waiting = 0
        self._met_at = -float("inf")
        self._closed = False
        # Async callers (submit) wait for a lane on this thread, never on a lane's own thread.
        self._dispatch = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="latentd-dispatch")

    @property
    def narrow_lanes(self) -> int:
        return len(self._narrow)

    @contextlib.contextmanager
    def hold(self, shareable: bool = False) -> Iterator[Callable[..., Any]]:
        """Wait for a lane, hold it, and yield `run(fn, *args)`, which calls fn on the held lane."""
        lane = self._take(shareable)
        try:
            yield lane.call
        finally:
            with self._cond:
                self._held.discard(lane)
                self._cond.notify_all()

    def _take(self, shareable: bool) -> _Lane:
        with self._cond:
            self._waiting += 1
            try:
                while not self._closed:
                    now = self._clock()
                    met = bool(self._held) or self._waiting > 1
                    if shareable and met:
                        self._met_at = now
                    if shareable and self._narrow and now - self._met_at < SHARING_LINGER_S:
                        free = [lane for lane in self._narrow if lane not in self._held]
                        if free and self._wide not in self._held and not self._wide_waiting:
                            self._held.add(free[0])
                            return free[0]
                    elif not self._held:
                        self._held.add(self._wide)
                        return self._wide
                    else:
                        self._wait_for_wide()
                        continue
                    self._cond.wait()
                raise LanesClosedError("the server's compute lanes are closed")
            finally:
                self._waiting -= 1

    def _wait_for_wide(self) -> None:
        """Wait (holding the condition) while announcing it, so that no narrow hold starts meanwhile."""
        self._wide_waiting += 1
        try:
            self._cond.wait()
        finally:
            self._wide_waiting -= 1

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the wide lane, waiting for its result (or exception)."""
        with self.hold() as call:
            return call(fn, *args)

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """fn(*args) on the wide lane; the future of its result (for callers that must not block)."""
        return self._dispatch.submit(self.run, fn, *args)

    def close(self, wait_s: float | None = 0) -> bool:
        """Refuse new holds, cancel submitted work not started, and end the lanes' threads after the
        calls they are running, waiting up to `wait_s` for those (None: as long as they take).
        True if every lane ended."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._dispatch.shutdown(wait=False, cancel_futures=True)
        lanes = (self._wide, *self._narrow)
        for lane in lanes:
            lane.close()
        ends = None if wait_s is None else time.monotonic() + wait_s
        return all([lane.join(None if ends is None else max(0.0, ends - time.monotonic())) for lane in lanes])
