"""Dynamic batcher: gathers concurrent requests with equal keys into one `predict` call on a worker thread."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BULK",
    "BULK_EVERY",
    "INTERACTIVE",
    "PRIORITIES",
    "BatchSizeMismatchError",
    "BatchStoppedError",
    "BatchStats",
    "Batcher",
    "BatcherClosedError",
    "DeadlineExpiredError",
    "PriorityQueues",
    "QueueFullError",
    "WorkItem",
    "gather_batch",
    "group_by_key",
]

logger = logging.getLogger(__name__)

Predict = Callable[[Hashable, list[Any]], list[Any]]
# Host work around predict (see Batcher): prepare(key, payloads) -> what predict takes, one per payload;
# finish(key, payloads, outputs) -> each item's result. An Exception in either list fails that item alone.
Prepare = Callable[[Hashable, list[Any]], list[Any]]
Finish = Callable[[Hashable, list[Any], list[Any]], list[Any]]
ItemsPerCall = Callable[[Hashable], int]
# The compute slot for a call of a key: entered (perhaps waiting) before the call's items are admitted;
# yields run(fn, *args), through which the call's predict runs (see models.ModelPool._hold).
Hold = Callable[[Hashable], contextlib.AbstractContextManager[Callable[..., Any]]]

# Marks "nothing came" in gather_batch, distinct from the None stop sentinel.
_EMPTY: Any = object()

# Which queue an item waits in (the proto's Priority, by name).
INTERACTIVE, BULK = "interactive", "bulk"
PRIORITIES = (INTERACTIVE, BULK)
# The starvation bound: while bulk items wait, at most this many interactive-led batches in a row.
BULK_EVERY = 4


class QueueFullError(Exception):
    """submit() found queue_limit items already waiting."""


class BatcherClosedError(Exception):
    """submit() after stop() began, or the item was still queued when the batcher could not run it."""


class DeadlineExpiredError(Exception):
    """The item's deadline passed before its batch was computed."""


class BatchStoppedError(Exception):
    """predict stopped the batch as a whole (nobody waits for it, the server stops): every item fails
    with it at once, never retried in halves."""


class BatchSizeMismatchError(Exception):
    """predict returned a different number of outputs than it was given inputs."""


class _BadOutputs(Exception):
    """A stage returned something other than one output per input: the call fails as a whole, unsplit."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class WorkItem:
    key: Hashable
    payload: Any
    future: concurrent.futures.Future
    deadline: float | None = None
    enqueued: float = 0.0
    priority: str = INTERACTIVE


@dataclass
class _Call:
    """One predict call that returned an output per item: what is left is finishing and delivering them."""

    items: list[WorkItem]
    outputs: list[Any]
    start: float
    seconds: float


@dataclass(frozen=True)
class BatchStats:
    key: Hashable
    size: int
    queue_seconds: tuple[float, ...]
    compute_seconds: float
    failed: int
    priorities: tuple[str, ...] = field(default=(), compare=False)  # of each item, beside queue_seconds


class PriorityQueues:
    """The batcher's queue: one FIFO per priority, with `queue.Queue`'s get/get_nowait/put (None is
    the stop sentinel, handed out only once both queues are empty, so queued work is computed first).

    The rule, per batch (`get` takes a batch's first item, `joiners(first)` the rest):
    - a batch is led by an interactive item whenever one waits, unless `bulk_every` interactive-led
      batches in a row have already gone while bulk items waited: then the oldest bulk item leads
      the next batch. So bulk work gets at least one batch in every `bulk_every + 1` (it never
      starves) and, with no bulk waiting, interactive work is all there is;
    - an interactive-led batch gathers interactive items only (bulk items would lengthen its compute);
      a bulk-led batch takes waiting interactive items first, then bulk ones (they go no later so),
      at most `bulk_batch_size` items (None: as many as any batch): what an interactive item arriving
      meanwhile may have to wait for.
    """

    def __init__(self, bulk_every: int = BULK_EVERY, bulk_batch_size: int | None = None) -> None:
        if bulk_every < 1:
            raise ValueError(f"bulk_every must be >= 1, got {bulk_every}")
        if bulk_batch_size is not None and bulk_batch_size < 1:
            raise ValueError(f"bulk_batch_size must be >= 1, got {bulk_batch_size}")
        self.bulk_every = bulk_every
        self.bulk_batch_size = bulk_batch_size
        self._ready = threading.Condition()
        self._queues: dict[str, deque[WorkItem]] = {name: deque() for name in PRIORITIES}
        self._stops = 0
        self._interactive_run = 0  # interactive-led batches in a row while bulk waited

    def depth(self, priority: str) -> int:
        with self._ready:
            return len(self._queues[priority])

    def put(self, item: WorkItem | None) -> None:
        with self._ready:
            if item is None:
                self._stops += 1
            else:
                self._queues[item.priority if item.priority in self._queues else INTERACTIVE].append(item)
            self._ready.notify_all()

    def get(self, timeout: float | None = None) -> WorkItem | None:
        """A batch's first item by the rule above (waiting up to `timeout`); queue.Empty if none came."""
        return self._wait(self._lead, timeout)

    def get_nowait(self) -> WorkItem | None:
        return self._wait(self._lead, 0)

    def joiners(self, first: WorkItem) -> "_Joiners":
        """What gather_batch reads after `first`: items allowed into the batch it leads."""
        if first.priority == INTERACTIVE:
            return _Joiners(self, (INTERACTIVE,), None)
        return _Joiners(self, (INTERACTIVE, BULK), self.bulk_batch_size)

    def _lead(self) -> WorkItem | None | Any:
        interactive, bulk = self._queues[INTERACTIVE], self._queues[BULK]
        if interactive and not (bulk and self._interactive_run >= self.bulk_every):
            self._interactive_run = self._interactive_run + 1 if bulk else 0
            return interactive.popleft()
        if bulk:
            self._interactive_run = 0
            return bulk.popleft()
        return self._stop()

    def _stop(self) -> None | Any:
        if self._stops:
            self._stops -= 1
            return None
        return _EMPTY

    def _take(self, order: tuple[str, ...]) -> WorkItem | None | Any:
        for name in order:
            if self._queues[name]:
                return self._queues[name].popleft()
        if any(self._queues.values()):
            return _EMPTY  # only items that may not join: the batch leaves without them
        return self._stop()

    def _wait(self, take: Callable[[], Any], timeout: float | None) -> WorkItem | None:
        ends = None if timeout is None else time.monotonic() + timeout
        with self._ready:
            while True:
                got = take()
                if got is not _EMPTY:
                    return got
                remaining = None if ends is None else ends - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise queue.Empty
                self._ready.wait(remaining)


class _Joiners:
    """PriorityQueues seen from inside a batch being gathered: get/get_nowait over the allowed queues;
    `limit`: the most items of the batch (None: no limit of its own)."""

    def __init__(self, queues: PriorityQueues, order: tuple[str, ...], limit: int | None) -> None:
        self._queues, self._order, self.limit = queues, order, limit

    def get(self, timeout: float | None = None) -> WorkItem | None:
        return self._queues._wait(lambda: self._queues._take(self._order), timeout)

    def get_nowait(self) -> WorkItem | None:
        return self.get(0)


def gather_batch(
    source: queue.Queue[WorkItem | None],
    max_items: int,
    max_delay_s: float,
    *,
    poll_s: float = 0.1,
    clock: Callable[[], float] = time.monotonic,
    limit_for: Callable[[Hashable], int] | None = None,
    delay_for: Callable[[], float] | None = None,
) -> list[WorkItem] | None:
    """Take up to max_items from source, waiting at most max_delay_s after the first; None means stop.

    `limit_for(key)` can lower max_items for the first item's key: when it allows one item, the
    batch leaves at once instead of waiting for company it could not use. `delay_for()`, asked when
    the first item arrives, replaces max_delay_s (a delay that depends on what else is running then).
    """
    try:
        first = source.get(timeout=poll_s)
    except queue.Empty:
        return []
    if first is None:
        return None
    batch = [first]
    limit = min(max_items, limit_for(first.key)) if limit_for is not None else max_items
    deadline = clock() + (delay_for() if delay_for is not None else max_delay_s)
    # A PriorityQueues says which items may join the batch `first` leads, and how many; a plain queue: any.
    joiners = source.joiners(first) if hasattr(source, "joiners") else source
    limit = min(limit, getattr(joiners, "limit", None) or limit)
    while len(batch) < limit:
        item = _next_item(joiners, deadline - clock())
        if item is _EMPTY:
            break
        if item is None:
            # Put the sentinel back so the caller's next call returns None and the worker stops.
            source.put(None)
            break
        batch.append(item)
    return batch


def _next_item(source: Any, remaining_s: float) -> Any:
    """The next queued entry, waiting up to remaining_s; _EMPTY if none came."""
    try:
        if remaining_s > 0:
            return source.get(timeout=remaining_s)
        # Past the deadline we no longer wait, but items already queued still join the batch for free.
        return source.get_nowait()
    except queue.Empty:
        return _EMPTY


def group_by_key(items: list[WorkItem]) -> list[list[WorkItem]]:
    """Split a gathered batch into groups of equal key, in order of first appearance (stable)."""
    groups: dict[Hashable, list[WorkItem]] = {}
    for item in items:
        groups.setdefault(item.key, []).append(item)
    return list(groups.values())


def _claim(future: concurrent.futures.Future) -> bool:
    """Mark a future running; False if its caller cancelled it (or it is already complete)."""
    try:
        return future.set_running_or_notify_cancel()
    except RuntimeError:  # already running or finished: somebody else owns its outcome
        return False


def _settle(future: concurrent.futures.Future, *, result: Any = None, error: BaseException | None = None) -> None:
    """Set a future's outcome, tolerating one that somebody else already completed."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class Batcher:
    """Worker threads (one unless `workers` says more) that call predict(key, payloads) on batches of
    submitted items with equal keys. Several workers gather and compute batches side by side, for a
    predict that can run more than one batch at a time (see compute.ComputeLanes)."""

    def __init__(
        self,
        name: str,
        predict: Predict,
        *,
        max_batch_size: int = 8,
        max_delay_s: float = 0.005,
        queue_limit: int = 256,
        on_batch: Callable[[BatchStats], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        items_per_call: ItemsPerCall | None = None,
        workers: int = 1,
        hold: Hold | None = None,
        busy_delay_s: float | None = None,
        bulk_every: int = BULK_EVERY,
        bulk_batch_size: int | None = None,
        prepare: Prepare | None = None,
        finish: Finish | None = None,
        overlap: bool = False,
    ) -> None:
        """`items_per_call(key)` caps the items of one key in one predict call below max_batch_size
        (for example by pixels: on a CPU, big images gain nothing from sharing a call). `hold(key)` is
        the compute slot each call waits for: items are admitted (deadline, cancellation) once it
        is held, so nothing expires between that check and the model. `busy_delay_s` (default:
        max_delay_s) is how long a batch waits for company while another worker's batch computes.
        Items wait by priority (`submit(..., priority=)`; see PriorityQueues, whose starvation bound
        is `bulk_every`; `bulk_batch_size` caps the batches bulk work leads).

        `prepare` and `finish` are a call's host work before and after predict. Without `overlap`
        they run with predict, in its compute slot. With `overlap`, a worker prepares its batch
        before it waits for the slot and finishes it after leaving the slot, so that with two
        workers one batch's host work runs while the other's predict holds the slot: a pipeline
        that keeps a device busy (see models.ModelPool)."""
        _check_settings(max_batch_size, max_delay_s, queue_limit, busy_delay_s, workers)
        self._busy_delay_s = max_delay_s if busy_delay_s is None else busy_delay_s
        self._workers = workers
        self._hold = hold or (lambda key: contextlib.nullcontext(_call_here))
        self.name = name
        self._predict = predict
        self._prepare = prepare
        self._finish = finish
        self._overlap = overlap
        self._max_batch_size = max_batch_size
        self._items_per_call = items_per_call
        self._max_delay_s = max_delay_s
        self._queue_limit = queue_limit
        self._on_batch = on_batch
        self._clock = clock
        # Unbounded, with our own count: the stop sentinel must fit even when queue_limit items wait.
        self._queue = PriorityQueues(bulk_every, bulk_batch_size)
        self._lock = threading.Lock()
        self._gathering = threading.Lock()
        self._waiting = 0
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._workers_left = 0
        self._computing = 0  # workers between gathering a batch and finishing it

    @property
    def depth(self) -> int:
        """Items submitted and not yet taken by the worker."""
        with self._lock:
            return self._waiting

    def depth_of(self, priority: str) -> int:
        """Items of one priority submitted and not yet taken by a worker."""
        return self._queue.depth(priority)

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def start(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"batcher {self.name!r} is stopped and cannot be restarted")
            if self._threads:
                return
            names = [f"batcher-{self.name}" + (f"-{i}" if self._workers > 1 else "") for i in range(self._workers)]
            self._threads = [threading.Thread(target=self._run, name=name, daemon=True) for name in names]
            self._workers_left = self._workers
        for thread in self._threads:
            thread.start()

    def submit(self, key: Hashable, payload: Any, *, deadline: float | None = None,
               priority: str = INTERACTIVE) -> concurrent.futures.Future:
        hash(key)  # an unhashable key is the caller's error, raised here rather than in the worker
        if priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        item = WorkItem(key, payload, future, deadline, self._clock(), priority)
        # Check and put under one lock so nothing can land behind the stop sentinel.
        with self._lock:
            if self._closed:
                raise BatcherClosedError(f"batcher {self.name!r} is stopped")
            if self._waiting >= self._queue_limit:
                raise QueueFullError(f"batcher {self.name!r} has {self._waiting} items waiting (queue_limit)")
            self._waiting += 1
            self._queue.put(item)
        return future

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new items, let the workers compute what is queued, then join them (up to timeout in all)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
            threads = list(self._threads)
        if not threads:
            self._fail_leftovers()  # never started: nobody will compute these
        ends = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            if thread is not threading.current_thread():  # stop() from inside predict must not join itself
                thread.join(None if ends is None else max(0.0, ends - time.monotonic()))

    # -- worker -----------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                # One worker gathers at a time: two gathering at once would share out the arrivals
                # and both leave with half a batch.
                with self._gathering:
                    batch = gather_batch(self._queue, self._max_batch_size, self._max_delay_s, clock=self._clock,
                                         limit_for=self._limit, delay_for=self._delay)
                    if batch:
                        self._computing_changed(+1)  # before the next worker gathers: it sees this one busy
            except Exception:  # gather over a plain queue should not fail, but the worker must not die
                logger.exception("batcher %s: gathering failed", self.name)
                continue
            if batch is None:
                self._queue.put(None)  # the stop sentinel, for the other workers
                break
            if not batch:
                continue
            self._taken(len(batch))
            try:
                for group in self._groups(batch):
                    self._run_group(group)
            finally:
                self._computing_changed(-1)
        with self._lock:
            self._workers_left -= 1
            last = self._workers_left == 0
        if last:
            self._fail_leftovers()

    def _computing_changed(self, change: int) -> None:
        with self._lock:
            self._computing += change

    def _delay(self) -> float:
        """How long a batch whose first item just came waits for company: longer while another
        worker's batch computes, when leaving early would only start a smaller batch beside it."""
        with self._lock:
            return self._busy_delay_s if self._computing else self._max_delay_s

    def _groups(self, batch: list[WorkItem]) -> list[list[WorkItem]]:
        """The batch's groups of equal key, those holding interactive items first (a bulk-led batch
        may have gathered interactive items of another key)."""
        try:
            return sorted(group_by_key(batch), key=lambda group: all(item.priority == BULK for item in group))
        except Exception:  # a key whose __eq__/__hash__ raises: run each item alone rather than die
            logger.exception("batcher %s: grouping failed", self.name)
            return [[item] for item in batch]

    def _limit(self, key: Hashable) -> int:
        """Items of `key` per predict call: 1..max_batch_size, whatever items_per_call does."""
        if self._items_per_call is None:
            return self._max_batch_size
        try:
            return max(1, min(self._max_batch_size, int(self._items_per_call(key))))
        except Exception:  # a failing policy must not lose the item being gathered
            logger.exception("batcher %s: items_per_call failed for %r", self.name, key)
            return 1

    def _taken(self, count: int) -> None:
        with self._lock:
            self._waiting -= count

    def _run_group(self, group: list[WorkItem]) -> None:
        try:
            limit = self._limit(group[0].key)
            for start in range(0, len(group), limit):
                self._run_call(group[0].key, group[start:start + limit])
        except BatcherClosedError as exc:  # the compute slot closed (shutdown): expected, no traceback
            for item in group:
                if not item.future.done():
                    _settle(item.future, error=exc)
        except Exception as exc:  # a bug here fails this group only; the loop goes on
            logger.exception("batcher %s: unexpected error", self.name)
            for item in group:
                if not item.future.done():
                    _settle(item.future, error=exc)

    def _run_call(self, key: Hashable, chunk: list[WorkItem]) -> None:
        """One predict call's items: admitted once its compute slot is held (so a deadline that
        passes while an earlier call runs still counts), computed there, then delivered."""
        if not self._overlap:
            with self._hold(key) as run:
                live = self._admit(chunk)
                if live:
                    self._compute(key, [(item, item.payload) for item in live], run, self._whole, self._delivered)
            return
        prepared = self._prepared(key, chunk)  # while another worker's batch holds the slot
        with self._hold(key) as run:
            live = {id(item) for item in self._admit(chunk)}
            admitted = [(item, made) for item, made in zip(chunk, prepared) if id(item) in live]
            failed = [(item, made) for item, made in admitted if isinstance(made, Exception)]
            ready = [(item, made) for item, made in admitted if not isinstance(made, Exception)]
            calls: list[_Call] = []
            if ready:
                self._compute(key, ready, run, self._predict, lambda key, call: calls.append(call))
        for item, error in failed:
            _settle(item.future, error=error)
        for call in calls:  # the slot is free: the next batch computes meanwhile
            call.outputs = self._finished(key, call.items, call.outputs)
            self._delivered(key, call)

    def _delivered(self, key: Hashable, call: _Call) -> None:
        self._report(key, call, failed=self._deliver(call.items, call.outputs))

    def _prepared(self, key: Hashable, chunk: list[WorkItem]) -> list[Any]:
        """What predict takes for each item, or the Exception that fails it."""
        try:
            return self._stage_outputs("prepare", self._prepare, key, [item.payload for item in chunk], len(chunk))
        except _BadOutputs as exc:
            return [exc.error] * len(chunk)
        except Exception as exc:  # a failing prepare fails its call's items, not the worker
            return [exc] * len(chunk)

    def _finished(self, key: Hashable, items: list[WorkItem], outputs: list[Any]) -> list[Any]:
        """Each item's result from its output, or the Exception that fails it."""
        good = [i for i, output in enumerate(outputs) if not isinstance(output, Exception)]
        results = list(outputs)
        try:
            done = self._stage_outputs("finish", self._finish, key, [items[i].payload for i in good],
                                       len(good), [outputs[i] for i in good])
        except _BadOutputs as exc:
            done = [exc.error] * len(good)
        except Exception as exc:
            done = [exc] * len(good)
        for i, result in zip(good, done):
            results[i] = result
        return results

    @staticmethod
    def _stage_outputs(name: str, stage: Callable[..., Any] | None, key: Hashable, payloads: list[Any],
                       count: int, *outputs: list[Any]) -> list[Any]:
        """stage(key, payloads, *outputs), checked to give one result per item (no stage: the last given)."""
        if stage is None:
            return list(outputs[0] if outputs else payloads)
        if not count:
            return []
        results = stage(key, payloads, *outputs)
        error = _outputs_error(name, results, count)
        if error is not None:
            raise _BadOutputs(error)
        return list(results)

    def _whole(self, key: Hashable, payloads: list[Any]) -> list[Any]:
        """prepare, predict and finish as one call, in the compute slot (no overlap)."""
        if self._prepare is None and self._finish is None:
            return self._predict(key, payloads)
        prepared = self._stage_outputs("prepare", self._prepare, key, payloads, len(payloads))
        good = [i for i, made in enumerate(prepared) if not isinstance(made, Exception)]
        outputs = self._predict(key, [prepared[i] for i in good]) if good else []
        error = _outputs_error("predict", outputs, len(good))
        if error is not None:
            raise _BadOutputs(error)
        done = self._stage_outputs("finish", self._finish, key, [payloads[i] for i in good], len(good),
                                   list(outputs))
        for i, result in zip(good, done):
            prepared[i] = result
        return prepared

    def _admit(self, group: list[WorkItem]) -> list[WorkItem]:
        """Drop cancelled items and fail expired ones, so predict never spends time on them."""
        now = self._clock()
        live = []
        for item in group:
            if not _claim(item.future):
                continue
            if item.deadline is not None and item.deadline < now:
                _settle(item.future, error=DeadlineExpiredError(f"deadline passed {now - item.deadline:.3f}s ago"))
                continue
            live.append(item)
        return live

    def _compute(self, key: Hashable, pairs: list[tuple[WorkItem, Any]], run: Callable[..., Any],
                 fn: Callable[[Hashable, list[Any]], list[Any]], done: Callable[..., None]) -> None:
        """fn(key, payloads) on the (item, payload) pairs through `run`; if it raises for several, retry
        each half so a bad item fails alone. Each call that returned an output per item goes to
        `done(key, call)` at once (the items' results, unless they still need finishing)."""
        items = [item for item, _ in pairs]
        start = self._clock()
        try:
            outputs = run(fn, key, [payload for _, payload in pairs])
        except _BadOutputs as exc:
            self._report(key, _Call(items, [], start, self._clock() - start), failed=self._fail_all(items, exc.error))
            return
        except Exception as exc:
            call = _Call(items, [], start, self._clock() - start)
            if len(items) == 1 or isinstance(exc, (BatchStoppedError, BatcherClosedError, DeadlineExpiredError)):
                self._report(key, call, failed=self._fail_all(items, exc))
                return
            # failed=0: these items are not finished; the retries report how each of them ends.
            self._report(key, call, failed=0)
            middle = len(pairs) // 2
            self._compute(key, pairs[:middle], run, fn, done)
            self._compute(key, pairs[middle:], run, fn, done)
            return
        call = _Call(items, outputs, start, self._clock() - start)
        error = _outputs_error("predict", outputs, len(items))
        if error is not None:
            self._report(key, call, failed=self._fail_all(items, error))
            return
        call.outputs = list(outputs)
        done(key, call)

    def _deliver(self, items: list[WorkItem], outputs: list[Any]) -> int:
        """Hand each item its output; returns how many items ended with an exception."""
        failed = 0
        for item, output in zip(items, outputs):
            if isinstance(output, Exception):
                _settle(item.future, error=output)
                failed += 1
            else:
                _settle(item.future, result=output)
        return failed

    @staticmethod
    def _fail_all(items: list[WorkItem], error: Exception) -> int:
        for item in items:
            _settle(item.future, error=error)
        return len(items)

    def _report(self, key: Hashable, call: _Call, *, failed: int) -> None:
        if self._on_batch is None:
            return
        stats = BatchStats(
            key=key,
            size=len(call.items),
            queue_seconds=tuple(call.start - item.enqueued for item in call.items),
            compute_seconds=call.seconds,
            failed=failed,
            priorities=tuple(item.priority for item in call.items),
        )
        try:
            self._on_batch(stats)
        except Exception:  # metrics must never take the service down
            logger.exception("batcher %s: on_batch callback failed", self.name)

    def _fail_leftovers(self) -> None:
        """Fail anything still queued once no worker will run it (the worker drains first, so normally none)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is None:
                continue
            self._taken(1)
            if _claim(item.future):
                _settle(item.future, error=BatcherClosedError(f"batcher {self.name!r} stopped"))


def _outputs_error(stage: str, outputs: Any, count: int) -> Exception | None:
    """Why `outputs` is not one output per input of a stage's call, or None."""
    if not isinstance(outputs, (list, tuple)):
        return TypeError(f"{stage} must return a list, got {type(outputs).__name__}")
    if len(outputs) != count:
        return BatchSizeMismatchError(f"{stage} returned {len(outputs)} outputs for {count} inputs")
    return None


def _call_here(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _check_settings(max_batch_size: int, max_delay_s: float, queue_limit: int, busy_delay_s: float | None,
                    workers: int) -> None:
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    if not max_delay_s >= 0:  # `not >=` also rejects NaN
        raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
    if queue_limit < 1:
        raise ValueError(f"queue_limit must be >= 1, got {queue_limit}")
    if busy_delay_s is not None and not busy_delay_s >= 0:
        raise ValueError(f"busy_delay_s must be >= 0, got {busy_delay_s}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
