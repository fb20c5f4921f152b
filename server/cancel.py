"""Why long work stops between its chunks: its caller left, its deadline passed, or the server is stopping."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .batcher import BatcherClosedError, BatchStoppedError, DeadlineExpiredError


class WorkCancelledError(BatchStoppedError):
    """Nobody waits for this work any more (the RPC was cancelled or failed)."""


class ServerStoppingError(BatcherClosedError):
    """The server is shutting down and stopped this work (grace period over)."""


@dataclass
class Watch:
    """One piece of work's reasons to stop: `abandoned` once its caller stops waiting, its deadline."""

    deadline: float | None = None
    abandoned: bool = False

    def check(self) -> None:
        """Raise if this work should stop now."""
        if self.abandoned:
            raise WorkCancelledError("the request was cancelled")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExpiredError(f"deadline passed {time.monotonic() - self.deadline:.3f}s ago")

    @property
    def live(self) -> bool:
        try:
            self.check()
        except (WorkCancelledError, DeadlineExpiredError):
            return False
        return True
