"""Client-supplied strings made safe to echo in statuses and logs: bounded in length, escaped to one line."""

from __future__ import annotations

import re

ECHO_CHARS = 64  # of a client string quoted in a status message or a log line
STATUS_CHARS = 1024  # of a whole status message (gRPC clients refuse trailers over 8-16 KiB)
_BARE = re.compile(r"[A-Za-z0-9._:/@+-]*")  # log values that need no quotes (logfmt)


def quoted(text: str, limit: int = ECHO_CHARS) -> str:
    """`text` as a Python literal on one line (control characters escaped), cut at `limit` characters
    with the full length said."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def log_value(text: str, limit: int = ECHO_CHARS) -> str:
    """A value for a `key=value` log line: bare when it is a plain token, else quoted, so a client
    cannot end the line, nor add keys to it."""
    return text if len(text) <= limit and _BARE.fullmatch(text) else quoted(text, limit)


def bounded(message: str, limit: int = STATUS_CHARS) -> str:
    """A status message cut to `limit` characters."""
    return message if len(message) <= limit else message[:limit - 30] + f"... ({len(message)} characters)"
