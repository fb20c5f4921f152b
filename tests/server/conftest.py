"""Fixtures shared by the server's unit tests."""

from __future__ import annotations

import pytest

from latentd.server.batcher import Batcher

STOP_WAIT = 5.0  # seconds a batcher's workers may take to stop before the test counts as hung


@pytest.fixture
def make_batcher():
    """Builds Batchers (`start=True`: started at once) and always stops them, so no worker outlives its test."""
    made: list[Batcher] = []

    def make(predict, *, start: bool = False, **settings) -> Batcher:
        batcher = Batcher("test", predict, **settings)
        made.append(batcher)
        if start:
            batcher.start()
        return batcher

    yield make
    for batcher in made:
        batcher.stop(timeout=STOP_WAIT)
