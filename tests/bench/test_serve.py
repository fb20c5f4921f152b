"""bench serve's bookkeeping: requests per round, phases merged over rounds, shares per round."""

from __future__ import annotations

import os

from latentd.bench.results import Phase, Row, ServerCounters
from latentd.bench.serve import cores_time, requests_for


def test_requests_are_split_over_rounds_but_keep_every_client_busy():
    assert requests_for(256, 64, clients=16, rounds=1) == 64
    assert requests_for(64, 64, clients=16, rounds=3) == 342  # 1024 over 3 rounds, rounded up
    assert requests_for(512, 64, clients=16, rounds=3) == 16  # 16 at 512x512 would be 6 a round


def test_rounds_merge_into_one_phase_with_the_overall_mean_batch():
    row = Row("encode", 64)
    first = Phase("batched", "encode", 64, 2, 4, seconds=1.0, latencies_ms=[10, 20, 30, 40],
                  server=ServerCounters(4, 1, 2.5, 0.5) - ServerCounters(0, 0, 2.0, 0.1), client_cpu_seconds=0.1,
                  cores_idle_seconds=0.2, cores_seconds=2.0)
    second = Phase("batched", "encode", 64, 2, 4, seconds=3.0, latencies_ms=[50, 60], errors=2,
                   server=ServerCounters(6, 3, 3.0, 0.9) - ServerCounters(4, 1, 2.5, 0.5), client_cpu_seconds=0.2,
                   cores_idle_seconds=1.0, cores_seconds=6.0)
    row.add("batched", first)
    row.add("batched", second)
    merged = row.batched
    assert (merged.requests, merged.errors, merged.seconds) == (8, 2, 4.0)
    assert merged.images_per_s == 6 / 4.0 and merged.mean_batch == 6 / 3
    assert merged.latencies_ms == [10, 20, 30, 40, 50, 60]
    # CPU per answered request: 1.0 s of the server and 0.3 s of the clients over 6
    assert abs(merged.server_cpu_ms - 1000 / 6) < 1e-9 and abs(merged.client_cpu_ms - 300 / 6) < 1e-9
    # model calls running at once: 0.8 s inside model calls over the phase's 4 s
    assert abs(merged.calls_running - 0.8 / 4.0) < 1e-9
    # idle core time over both rounds' core time, not the mean of the rounds' shares
    assert abs(merged.cores_idle - 1.2 / 8.0) < 1e-9
    assert Phase("floor", "encode", 64, 2, 4).cores_idle is None  # not measured (not Linux)


def test_cores_time_reads_idle_and_all_core_time_from_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user already)
    stat.write_text("cpu  100 5 20 300 10 1 2 3 50 0\ncpu0 50 2 10 150 5 0 1 1 25 0\n")
    ticks = os.sysconf("SC_CLK_TCK")
    assert cores_time(str(stat)) == (310 / ticks, 441 / ticks)
    assert cores_time(str(tmp_path / "missing")) is None
    for text in ("not a stat line\n", "cpu  1 2 3\n"):
        stat.write_text(text)
        assert cores_time(str(stat)) is None


def test_shares_compare_totals_and_the_single_client_uses_medians():
    row = Row("decode", 512, in_process_images=10, in_process_seconds=5.0, in_process_cpu_seconds=9.0,
              in_process_single=[100, 300, 200])
    row.add("batched", Phase("batched", "decode", 512, 16, 8, seconds=8.0))
    row.add("single", Phase("single", "decode", 512, 1, 3, latencies_ms=[210, 230, 220]))
    assert row.concurrent_share == (8 / 8.0) / (10 / 5.0)
    assert abs(row.single_overhead - 0.10) < 1e-9
    assert row.in_process_cpu_ms == 900.0
    assert Phase("unbatched", "decode", 512, 16, 8).mean_batch is None  # no metrics (--target)


def test_the_rounds_use_the_fastest_batch_of_the_sweep():
    assert Row("encode", 512).in_process_batch == 1  # before the sweep
    assert Row("encode", 512, in_process_rates={1: 4.6, 2: 4.8, 4: 4.7}).in_process_batch == 2
