"""`latentd bench priority` end to end on a tiny model (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from latentd.client.cli import main


@pytest.mark.slow
def test_bench_priority_prints_its_row(model_dirs, capsys):
    code = main(["bench", "priority", "--model", model_dirs["tiny"], "--size", "32", "--bulk-streams", "2",
                 "--requests", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "interactive, idle" in out and "interactive, bulk flood" in out
    assert "p99 loaded/idle" in out and "target <= 2x" in out


@pytest.mark.slow
def test_bench_priority_json_has_every_phase(model_dirs, capsys):
    code = main(["bench", "priority", "--model", model_dirs["tiny"], "--op", "decode", "--size", "32",
                 "--bulk-streams", "1", "--requests", "2", "--bulk-max-batch-size", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["errors"] == 0
    for phase in ("idle", "loaded", "unprioritized"):
        assert report[f"{phase}_p99_ms"] > 0
    assert report["ratio"] > 0 and report["bulk_images_per_s"] > 0


def test_bench_priority_rejects_bad_numbers(capsys):
    assert main(["bench", "priority", "--bulk-streams", "0"]) == 2
    assert "--bulk-streams" in capsys.readouterr().err
