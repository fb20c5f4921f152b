"""Archive strings as single printable lines (a manifest may hold anything)."""

from __future__ import annotations

from typing import Any


def shown(text: Any, limit: int = 200) -> str:
    """A string from an archive, safe to print on one line: control characters escaped, length bounded."""
    text = str(text)
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[:limit])
    return escaped + (f"... ({len(text)} characters)" if len(text) > limit else "")
