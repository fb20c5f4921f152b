"""Checkpoints between the chunks of long work (model calls, tiles), where a caller's check may stop it."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

# The check of the work running in this thread (or task): raises to stop it, returns to go on.
_check: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("latentd_stop_check",
                                                                                 default=None)


@contextlib.contextmanager
def stoppable(check: Callable[[], None]) -> Iterator[None]:
    """Run the body with `check` called at every checkpoint in it (between model calls and tiles);
    whatever `check` raises ends the work there."""
    token = _check.set(check)
    try:
        yield
    finally:
        _check.reset(token)


def checkpoint() -> None:
    """Call the current work's check, if any (a no-op outside `stoppable`)."""
    check = _check.get()
    if check is not None:
        check()
