"""Channel settings both clients share: options (keepalive, message sizes), TLS credentials, auth metadata."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from typing import Any, Sequence

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
    # Spread calls over every address a target resolves to (replicas, a headless Service's records);
    # a replica that dies drops out of the rotation and the client's retry lands on a live one.
    ("grpc.lb_policy_name", "round_robin"),
)

TLS = bool | str | os.PathLike | bytes | grpc.ChannelCredentials | None

DEFAULT_PORT = 50051
# gRPC's own target schemes pass through as they are (replica lists, DNS re-resolution, sockets).
_GRPC_SCHEMES = re.compile(r"(dns|ipv4|ipv6|unix|unix-abstract|vsock):(?!\d+$)")
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?")


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


def server_target(text: str) -> str:
    """One server's address as a gRPC target: HOST, HOST:PORT, [IPv6]:PORT or a bare IPv6 address, on
    port 50051 unless given (gRPC's own default would be 443); a target with a gRPC scheme
    (dns:///name:port, unix:/path, ipv4:a:p,b:p) passes as it is. ValueError says what is wrong."""
    text = text.strip()
    if _GRPC_SCHEMES.match(text):
        return text
    try:
        return f"[{ipaddress.IPv6Address(text)}]:{DEFAULT_PORT}"
    except ValueError:
        pass
    bracketed = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", text)
    if bracketed:
        host, port = bracketed.group(1), bracketed.group(2)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
        host = f"[{host}]"
    else:
        host, sep, port = text.partition(":")
        port = port if sep else None
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"{text!r}: {host!r} is not a host name or address (HOST:PORT)")
    if port is None:
        return f"{host}:{DEFAULT_PORT}"
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{text!r}: the port must be a number 1-65535, got {port!r}")
    return f"{host}:{int(port)}"


def channel_target(target: str | Sequence[str]) -> str:
    """One gRPC target for one address or a list of replicas.

    A string is one server (see `server_target`; `dns:///name:port` follows a DNS name's records). A
    list of `host:port` becomes an `ipv4:`/`ipv6:` address list; host names in it are resolved once,
    here, to all their addresses.
    """
    if isinstance(target, str):
        return server_target(target)
    if not target:
        raise ValueError("no server addresses given")
    v4, v6 = [], []
    for entry in target:
        host, sep, port = entry.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"{entry!r}: expected HOST:PORT")
        host = host.strip("[]")
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            addresses = sorted({ipaddress.ip_address(info[4][0]) for info in
                                socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)}, key=str)
        for address in addresses:
            (v4 if address.version == 4 else v6).append(
                f"{address}:{port}" if address.version == 4 else f"[{address}]:{port}")
    if v4 and v6:
        raise ValueError("mix of IPv4 and IPv6 replicas: give one family")
    return ("ipv4:" + ",".join(v4)) if v4 else ("ipv6:" + ",".join(v6))


def open_channel(target: str | Sequence[str], tls: TLS, options: Sequence[tuple[str, Any]] = (), *,
                 aio: bool = False):
    """The channel both clients use: replicas resolved, TLS or plaintext, latentd's options first."""
    module = grpc.aio if aio else grpc
    address, merged, creds = channel_target(target), [*CHANNEL_OPTIONS, *options], credentials(tls)
    if creds is not None:
        return module.secure_channel(address, creds, options=merged)
    return module.insecure_channel(address, options=merged)
