"""Crash-safe file writes: a temporary file in the same folder, then an atomic rename; modes follow the umask."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux exposes it (/proc), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file."""
    return 0o666 & ~current_umask()


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file made by a writer that forces 0600 (mkstemp, safetensors) the mode the umask asks for."""
    os.chmod(path, file_mode())


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a crash never leaves a half-written file under that name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())  # mkstemp makes 0600; outputs are shared like any other file
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
