"""`latentd serve` as a subprocess for benchmarks: start on free ports, read its counters, stop it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

from .results import Counters, ServerCounters


class ServerProcess:
    """`latentd serve` in a subprocess on a free port, with metrics, stopped with SIGTERM (or, with
    `floor`, the bare gRPC server of floor_server.py: the same start-up lines and process metrics)."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.process: subprocess.Popen | None = None
        self.port = self.metrics_port = self.http_port = 0  # http_port: with --http-port only
        self.log: list[str] = []  # its stderr lines so far

    @classmethod
    def latentd(cls, model: str, source: str, max_batch_size: int, extra: tuple[str, ...] = ()) -> "ServerProcess":
        """`latentd serve` with one model, SOURCE served as MODEL."""
        return cls([sys.executable, "-m", "latentd.client.cli", "serve", "--port", "0", "--metrics-port", "0",
                    "--model", f"{model}={source}", "--max-batch-size", str(max_batch_size), *extra])

    @classmethod
    def floor(cls, factor: int, channels: int) -> "ServerProcess":
        """The floor server for a model of this factor and latent channels."""
        return cls([sys.executable, "-m", "latentd.bench.floor_server", "--factor", str(factor),
                    "--channels", str(channels)])

    def __enter__(self) -> "ServerProcess":
        # The start-up lines give the ports; the per-request lines would only cost time here.
        env = {**os.environ, "LATENTD_LOG_REQUESTS": "false"}
        self.process = subprocess.Popen(self.args, stderr=subprocess.PIPE, text=True, env=env)
        lines = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                raise RuntimeError("server exited during start-up: " + "".join(lines[-5:]))
            lines.append(line)
            listening = re.search(r"listening on [^:]+:(\d+)(?:, HTTP \(Remote VAE\) on :(\d+))?, metrics on :(\d+)",
                                  line)
            if listening:
                self.port, self.metrics_port = int(listening.group(1)), int(listening.group(3))
                self.http_port = int(listening.group(2) or 0)
            if line and "serving " in line:
                break
        self.log = lines
        threading.Thread(target=self._keep_log, daemon=True).start()  # keep the pipe drained
        return self

    def _keep_log(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metric(self, name: str) -> float:
        """One unlabelled value from this server's Prometheus endpoint (0 when absent)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        found = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def counters(self, op: str) -> Counters:
        """A reader of this server's counters for `op` (its Prometheus endpoint)."""
        def read() -> ServerCounters:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()

            def value(pattern: str) -> float:
                found = re.search(pattern + r" ([0-9.e+]+)", text)
                return float(found.group(1)) if found else 0.0
            labels = rf'\{{[^}}]*op="{op}"[^}}]*\}}'
            return ServerCounters(value("latentd_batch_size_sum" + labels), value("latentd_batch_size_count" + labels),
                                  value("process_cpu_seconds_total"), value("latentd_compute_seconds_sum" + labels))
        return read

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
