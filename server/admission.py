"""Server-wide admission: a budget of bytes held by requests, taken before their work and given back after."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import AsyncIterator


class OverloadedError(Exception):
    """No room in the memory budget within the admission wait: retry later (RESOURCE_EXHAUSTED)."""


class MemoryBudget:
    """Bytes held by requests at once, at most `capacity`. A request takes its share before it
    decodes or computes anything and gives it back when its answer is built; one that finds no room
    waits up to `wait_s`, first come first served (a big request is not starved by small ones), then
    fails with OverloadedError. Used from one event loop."""

    def __init__(self, capacity: int, wait_s: float) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.wait_s = wait_s
        self.held = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        await self.acquire(nbytes)
        try:
            yield
        finally:
            self.release(nbytes)

    async def acquire(self, nbytes: int) -> None:
        if nbytes > self.capacity:  # costs.check refuses these first, as INVALID_ARGUMENT
            raise ValueError(f"{nbytes} bytes can never fit a budget of {self.capacity}")
        if not self._waiters and self.held + nbytes <= self.capacity:
            self.held += nbytes
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiters.append((nbytes, granted))
        try:
            await asyncio.wait_for(asyncio.shield(granted), self.wait_s)
        except asyncio.TimeoutError:
            if self._granted(granted):
                return  # room came just as the wait ran out
            self._withdraw(granted)
            raise OverloadedError(f"the server is busy: no room for this request's {nbytes} bytes in its "
                                  f"memory budget ({self.held} of {self.capacity} held) within "
                                  f"{self.wait_s:g} s; retry later") from None
        except asyncio.CancelledError:
            if self._granted(granted):
                self.release(nbytes)
            else:
                self._withdraw(granted)
            raise

    def release(self, nbytes: int) -> None:
        self.held -= nbytes
        self._wake()

    @staticmethod
    def _granted(future: asyncio.Future) -> bool:
        return future.done() and not future.cancelled()

    def _withdraw(self, future: asyncio.Future) -> None:
        future.cancel()
        self._wake()  # a withdrawn head may have held back smaller requests behind it

    def _wake(self) -> None:
        """Grant waiters in arrival order while the first of them fits."""
        while self._waiters:
            nbytes, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self.held + nbytes > self.capacity:
                return
            self._waiters.popleft()
            self.held += nbytes
            future.set_result(None)
