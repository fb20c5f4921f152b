"""Archives named on the command line: one that cannot be opened as an archive is bad input (exit 2)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from .common import EXIT_USAGE, CommandError, one_line


@contextmanager
def archive_input() -> Iterator[None]:
    """Around opening an archive: a missing folder, no manifest or a manifest that is not one exits 2."""
    from latentd.archive.manifest import ArchiveError

    try:
        yield
    except (FileNotFoundError, NotADirectoryError, ArchiveError) as exc:
        raise CommandError(one_line(exc), EXIT_USAGE) from exc
