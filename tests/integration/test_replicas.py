"""One client over two real server processes: calls spread over both, and a SIGKILLed replica loses nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from latentd.client import LatentClient, RetryPolicy
from latentd.client.channel import channel_target
from tests.conftest import smooth_image


def _start(model_dir: str) -> tuple[subprocess.Popen, int, int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "latentd.client.cli", "serve", "--port", "0", "--metrics-port", "0", "--model",
         f"tiny={model_dir}"], stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "LATENTD_LOG_REQUESTS": "false"})
    ports = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        found = re.search(r"listening on 127\.0\.0\.1:(\d+), metrics on :(\d+)", line)
        ports = (int(found.group(1)), int(found.group(2))) if found else ports
        if "serving tiny" in line:
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return process, *ports
    process.kill()
    raise AssertionError("server did not start")


def _encodes(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    found = re.search(r'latentd_requests_total\{code="OK",rpc="Encode"\} ([0-9.e+]+)', text)
    return float(found.group(1)) if found else 0.0


def test_replica_targets():
    assert channel_target("localhost:1") == "localhost:1"
    assert channel_target(["127.0.0.1:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target(["[::1]:5"]) == "ipv6:[::1]:5"
    with pytest.raises(ValueError):
        channel_target(["no-port"])


@pytest.mark.slow
def test_calls_spread_over_replicas_and_survive_a_sigkill(model_dirs):
    servers = [_start(model_dirs["tiny"]) for _ in range(2)]
    try:
        client = LatentClient([f"127.0.0.1:{port}" for _, port, _ in servers], timeout=60,
                              retries=RetryPolicy(attempts=8, initial=0.05, maximum=0.5))
        image = smooth_image(16, 16)
        expected = client.encode(image, dtype="float32")
        results, errors = [], []
        lock = threading.Lock()

        def worker(count: int) -> None:
            for _ in range(count):
                try:
                    latents = client.encode(image, dtype="float32")
                    with lock:
                        results.append(latents)
                except Exception as exc:  # noqa: BLE001 - counted and reported below
                    with lock:
                        errors.append(exc)

        threads = [threading.Thread(target=worker, args=(50,)) for _ in range(6)]
        for thread in threads:
            thread.start()
        while len(results) < 100:
            time.sleep(0.01)
        before_kill = _encodes(servers[0][2])
        servers[0][0].kill()  # SIGKILL: no draining, in-flight calls die with the process
        for thread in threads:
            thread.join(120)
        assert not errors, errors[:3]
        assert len(results) == 300  # every call answered exactly once
        # Batched with other calls, convolutions may differ in the last bits from a call alone.
        assert all(np.allclose(r, expected, atol=1e-4) for r in results)
        assert before_kill > 10 and _encodes(servers[1][2]) > 10  # both replicas served calls
        assert servers[0][0].poll() is not None and servers[1][0].poll() is None
    finally:
        for process, _, _ in servers:
            if process.poll() is None:
                process.terminate()
                process.wait(30)
