"""Whether a Hugging Face Hub model can be had here: in the local cache, or from a Hub this machine reaches."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0


def cached(repo: str, subfolder: str | None = None) -> bool:
    """Whether the model's config is in the local Hub cache (so loading needs no network)."""
    from huggingface_hub import try_to_load_from_cache

    filename = f"{subfolder}/config.json" if subfolder else "config.json"
    return isinstance(try_to_load_from_cache(repo, filename), str)


def reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the Hub's endpoint accepts a TCP connection within `timeout` (False when HF_HUB_OFFLINE is set).

    One connection attempt answers at once on a machine without internet, where the Hub client
    would retry each file for half a minute before failing."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    parts = urlsplit(constants.ENDPOINT)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def availability(repo: str, subfolder: str | None = None) -> str:
    """`cached`, `online` (not cached, the Hub reachable) or `unavailable`."""
    if cached(repo, subfolder):
        return "cached"
    return "online" if reachable() else "unavailable"
