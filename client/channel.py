"""Channel settings both clients share: options (keepalive, message sizes), TLS credentials, auth metadata."""

from __future__ import annotations

import os
from typing import Any

import grpc

MAX_MESSAGE_BYTES = 256 * 1024 * 1024

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Ping an idle connection every 30 s so a dead server or NAT drop is noticed before the next call.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    # Retries are the client's own (typed errors, jitter, idempotent calls only).
    ("grpc.enable_retries", 0),
)

TLS = bool | str | os.PathLike | bytes | grpc.ChannelCredentials | None


def credentials(tls: TLS) -> grpc.ChannelCredentials | None:
    """None/False: plaintext; True: TLS with the system roots; a path or PEM bytes: TLS trusting that CA;
    or ready-made channel credentials (for mutual TLS: `grpc.ssl_channel_credentials(ca, key, cert)`)."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if isinstance(tls, bytes):
        return grpc.ssl_channel_credentials(tls)
    with open(tls, "rb") as handle:
        return grpc.ssl_channel_credentials(handle.read())


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    # Sent as plain metadata rather than call credentials, so it works on plaintext channels too
    # (loopback, a service mesh that terminates TLS).
    return (("authorization", f"Bearer {token}"),) if token else ()
