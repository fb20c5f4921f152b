"""`latentd bench http` end to end on a tiny model: one real server, both paths timed."""

from __future__ import annotations

import json

from latentd.client.cli import main


def test_bench_http_times_both_paths_on_one_server(model_dirs, capsys):
    code = main(["bench", "http", "--model", model_dirs["tiny"], "--size", "64", "--requests", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["size"] == 64 and report["requests"] == 2
    assert report["grpc_ms"] > 0 and report["http_ms"] > 0
    assert report["ratio"] == report["http_ms"] / report["grpc_ms"]


def test_bench_http_prints_one_row(model_dirs, capsys):
    assert main(["bench", "http", "--model", model_dirs["tiny"], "--size", "64", "--requests", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("bench http: model ") and "HTTP/gRPC" in out


def test_bench_http_refuses_zero_requests(capsys):
    assert main(["bench", "http", "--requests", "0"]) == 2
    assert "--requests must be at least 1" in capsys.readouterr().err
