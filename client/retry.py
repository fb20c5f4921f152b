"""Retries with exponential backoff and full jitter for idempotent calls (UNAVAILABLE, RESOURCE_EXHAUSTED only)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Attempt:
    """One try of a call: wait `wait` seconds first; `timeout()` (after the wait) is what it may take."""

    wait: float
    deadline: float | None  # time.monotonic() by which the whole call must end; None: no deadline

    def timeout(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` calls at most; waits grow as initial * multiplier**n up to `maximum` seconds, each
    drawn uniformly below that bound (full jitter), so that many clients do not retry in lockstep."""

    attempts: int = 4
    initial: float = 0.1
    multiplier: float = 2.0
    maximum: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial < 0 or self.multiplier < 1 or self.maximum < 0:
            raise ValueError("retry policy: attempts >= 1, initial >= 0, multiplier >= 1, maximum >= 0")

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The waits before attempts 2, 3, ... (attempts - 1 of them)."""
        rng = rng or random.Random()
        bound = self.initial
        for _ in range(self.attempts - 1):
            yield rng.uniform(0, min(bound, self.maximum))
            bound *= self.multiplier

    def schedule(self, budget: float | None) -> Iterator[Attempt]:
        """The attempts of one call that fit in `budget` seconds from now (None: no deadline): the
        deadline covers every attempt and the waits between them. Both clients retry through this."""
        deadline = None if budget is None else time.monotonic() + budget
        for wait in (0.0, *self.delays()):
            if deadline is not None and deadline - time.monotonic() <= wait:
                return
            yield Attempt(wait, deadline)


NO_RETRIES = RetryPolicy(attempts=1)
