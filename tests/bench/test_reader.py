"""`latentd bench reader`: prints a row per layout and worker count (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import re

from latentd.client.cli import main


def test_bench_reader_prints_the_archive_and_the_anchor(capsys):
    assert main(["bench", "reader", "--items", "12", "--side", "4", "--batch-size", "4", "--workers", "0", "2"]) == 0
    out = capsys.readouterr().out
    assert "bench reader: 12 latents of [4, 4, 4], batch 4" in out
    for layout in (r"archive \(float16\)", r"archive \(float16\) batched", "npz per image"):
        for workers in (0, 2):
            assert re.search(rf"^{layout}\s+{workers}\s+12\s+\d+\s+[\d.]+x$", out, re.MULTILINE), out
    assert main(["bench", "reader", "--items", "0"]) == 2
