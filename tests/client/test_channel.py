"""Server addresses: HOST[:PORT] on port 50051 by default, ports 1-65535, gRPC scheme targets as they are."""

from __future__ import annotations

import pytest

from latentd.client.channel import channel_target, server_target


@pytest.mark.parametrize("text, target", [
    ("localhost", "localhost:50051"),
    ("localhost:8080", "localhost:8080"),
    ("127.0.0.1", "127.0.0.1:50051"),
    ("10.0.0.7:1", "10.0.0.7:1"),
    ("latentd.ml.svc.cluster.local:65535", "latentd.ml.svc.cluster.local:65535"),
    ("::1", "[::1]:50051"),
    ("[::1]", "[::1]:50051"),
    ("[fe80::1]:9000", "[fe80::1]:9000"),
    (" host:007 ", "host:7"),
    ("dns:///latentd.ml:50051", "dns:///latentd.ml:50051"),
    ("ipv4:10.0.0.1:5,10.0.0.2:5", "ipv4:10.0.0.1:5,10.0.0.2:5"),
    ("unix:/run/latentd.sock", "unix:/run/latentd.sock"),
])
def test_addresses_become_targets(text, target):
    assert server_target(text) == target
    assert channel_target(text) == target


@pytest.mark.parametrize("text, says", [
    ("127.0.0.1:99999", "1-65535"),
    ("127.0.0.1:65536", "1-65535"),
    ("127.0.0.1:0", "1-65535"),
    ("host:", "1-65535"),
    ("host:-1", "1-65535"),
    ("host:5x", "1-65535"),
    ("host:\u0661\u0662", "1-65535"),  # Arabic-Indic digits: isdigit() but no port
    ("", "host name"),
    ("bad host:1", "host name"),
    ("-host:1", "host name"),
    ("a..b:1", "host name"),
    ("x" * 64 + ".com:1", "host name"),  # a label longer than 63
    ("[zz]:1", "IPv6"),
    ("[::1]:x", "1-65535"),
])
def test_bad_addresses_say_what_is_wrong(text, says):
    with pytest.raises(ValueError, match=says):
        server_target(text)
