"""`latentd bench serve` end to end on a tiny model: real server processes, every phase measured."""

from __future__ import annotations

import json
import sys

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
        # the server's model calls running at once (its compute-time metric over the phase)
        assert row["batched"]["calls_running"] > 0
        # the machine's idle core time while the batched server ran: a share on Linux, None elsewhere
        idle = row["batched"]["cores_idle"]
        assert 0 <= idle < 1 if sys.platform == "linux" else idle is None
        # the floor server answered every request of both rounds (its CPU: test_floor_server_...)
        assert row["floor"]["requests"] == 4 and row["floor"]["errors"] == 0 and row["floor"]["mean_batch"] is None
        # the sweep: every batch size up to the server's, the best one used for the rounds
        rates = {int(batch): rate for batch, rate in row["in_process_rates"].items()}
        assert sorted(rates) == [1, 2, 4] and row["in_process_batch"] == max(rates, key=rates.get)
        assert row["in_process_images_per_s"] > 0 and row["single_overhead"] is not None
        assert row["batching_gain"] > 0 and row["concurrent_share"] > 0


def test_floor_server_answers_with_the_real_shapes_and_reports_its_cpu():
    """The floor server (gRPC alone) sends messages of the sizes the real server sends, and its process
    CPU is read from its metrics like the real server's."""
    import grpc
    import numpy as np

    from latentd.v1.tensors import from_tensor, to_tensor
    from latentd.bench.serve import Workload, drive
    from latentd.bench.server_process import ServerProcess
    from latentd.v1 import latentd_pb2 as pb
    from latentd.v1 import latentd_pb2_grpc as pb_grpc

    image = np.zeros((40, 64, 3), np.uint8)
    encode = pb.EncodeRequest(images=[pb.Image(pixels=to_tensor(image))])
    with ServerProcess.floor(factor=8, channels=4) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.LatentdStub(channel)
            latents = stub.Encode(encode, timeout=30).items[0].latents
            assert from_tensor(latents, "latents").shape == (4, 5, 8) and latents.dtype == pb.FLOAT32
            decoded = stub.Decode(pb.DecodeRequest(items=[pb.Latents(latents=latents)]), timeout=30).images[0]
            assert from_tensor(decoded.pixels, "pixels").shape == (40, 64, 3)
        phase = drive(server.target, Workload("encode", 64, encode, image), clients=4, requests=400, name="floor",
                      counters=server.counters("encode"))
    assert phase.errors == 0 and phase.requests == 400
    assert phase.server.cpu_seconds > 0 and phase.server.batch_calls == 0


def test_bench_serve_rejects_bad_numbers(capsys):
    assert main(["bench", "serve", "--clients", "0"]) == 2
    assert "--clients" in capsys.readouterr().err


@pytest.mark.slow
def test_soak_reports_intervals_errors_and_memory(model_dirs, capsys):
    code = main(["bench", "serve", "--model", model_dirs["tiny"], "--sizes", "32", "--concurrency", "3",
                 "--duration", "4", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["requests"] > 0 and report["errors"] == {}
    assert report["intervals"][0]["p99_ms"] > 0 and report["peak_rss_mb"] > 50
