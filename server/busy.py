"""`BusyMeter`: how much of the wall time some work was running, in all and over a recent window."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from typing import Callable, Iterator

# The window of `BusyMeter.fraction`: long enough to span many batches, short enough to show a change
# of load within one scrape interval. Prometheus's rate() of the busy seconds serves other windows.
BUSY_WINDOW_S = 10.0


class BusyMeter:
    """Wall time during which at least one piece of work was running: overlapping work (two batches
    on two CPU lanes) counts once, so the fraction never exceeds 1. Thread-safe."""

    def __init__(self, window_s: float = BUSY_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._created = clock()
        self._running = 0
        self._since = 0.0  # when the current busy span began (while _running)
        self._spans: deque[tuple[float, float]] = deque()  # closed spans that end within the window
        self._closed_seconds = 0.0

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Count the body's wall time as busy."""
        self.begin()
        try:
            yield
        finally:
            self.end()

    def begin(self) -> None:
        with self._lock:
            if not self._running:
                self._since = self._clock()
            self._running += 1

    def end(self) -> None:
        with self._lock:
            if self._running <= 0:
                raise RuntimeError("BusyMeter.end() without a begin()")
            self._running -= 1
            if not self._running:
                now = self._clock()
                self._closed_seconds += now - self._since
                self._spans.append((self._since, now))
                self._forget(now)

    def seconds(self) -> float:
        """Busy seconds since the meter was made (the span running now included)."""
        with self._lock:
            return self._closed_seconds + (self._clock() - self._since if self._running else 0.0)

    def fraction(self) -> float:
        """The busy share of the last `window_s` seconds (of the meter's life, while it is younger), 0..1."""
        with self._lock:
            now = self._clock()
            start = max(now - self.window_s, self._created)
            self._forget(now)
            busy = sum(min(end, now) - max(begin, start) for begin, end in self._spans if end > start)
            if self._running:
                busy += now - max(self._since, start)
            length = now - start
            if length <= 0:
                return 1.0 if self._running else 0.0
            return min(1.0, max(0.0, busy / length))

    def _forget(self, now: float) -> None:
        while self._spans and self._spans[0][1] <= now - self.window_s:
            self._spans.popleft()
