"""`latentd bench serve` end to end on a tiny model: real server processes, every phase measured."""

from __future__ import annotations

import json

import pytest

from latentd.client.cli import main


@pytest.mark.slow
def test_bench_serve_reports_every_phase(model_dirs, capsys):
    code = main(["bench", "serve", "--model", model_dirs["tiny"], "--sizes", "128", "--clients", "2",
                 "--requests", "1", "--max-batch-size", "4", "--rounds", "2",
                 "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [(row["op"], row["size"]) for row in report["rows"]] == [("encode", 128), ("decode", 128)]
    for row in report["rows"]:
        assert row["batched"]["errors"] == 0 and row["batched"]["images_per_s"] > 0
        assert row["batched"]["mean_batch"] >= 1 and row["unbatched"]["mean_batch"] == 1
        # 4 at 128x128 (1 at 256x256) over 2 rounds, at least one per client and round
        assert row["batched"]["requests"] == 4 and len(row["round_shares"]) == 2
        assert row["single"]["requests"] == 4  # two per round
        # CPU accounting: the server process (from its metrics) and the clients both did work
        assert row["batched"]["server_cpu_ms"] > 0 and row["batched"]["client_cpu_ms"] > 0
        assert row["in_process_cpu_ms"] > 0
        # model time per image, in process and inside the server's model calls (its compute-time metric)
        assert row["in_process_ms"] > 0 and row["batched"]["model_ms"] > 0
        # the sweep: every batch size up to the server's, the best one used for the rounds
        rates = {int(batch): rate for batch, rate in row["in_process_rates"].items()}
        assert sorted(rates) == [1, 2, 4] and row["in_process_batch"] == max(rates, key=rates.get)
        assert row["in_process_images_per_s"] > 0 and row["single_overhead"] is not None
        assert row["batching_gain"] > 0 and row["concurrent_share"] > 0


def test_bench_serve_rejects_bad_numbers(capsys):
    assert main(["bench", "serve", "--clients", "0"]) == 2
    assert "--clients" in capsys.readouterr().err


@pytest.mark.slow
def test_soak_reports_intervals_errors_and_memory(model_dirs, capsys):
    code = main(["bench", "serve", "--model", model_dirs["tiny"], "--sizes", "32", "--concurrency", "3",
                 "--duration", "4", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["requests"] > 10 and report["errors"] == {}
    assert report["intervals"][0]["p99_ms"] > 0 and report["peak_rss_mb"] > 50
