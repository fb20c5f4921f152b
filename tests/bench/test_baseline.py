"""The codec bench's separate diffusers process: same weights as here, its failures reported, never left behind."""

from __future__ import annotations

import pytest
import torch

from latentd.bench.baseline import BaselineProcess, diffusers_call, load_for_bench


def test_the_separate_process_computes_what_diffusers_computes_here(tiny_model_dir):
    model = load_for_bench(str(tiny_model_dir), seed=0)
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with BaselineProcess(str(tiny_model_dir), 0, torch.device("cpu")) as separate:
        seconds, latents = separate.run("encode", images)
        process = separate._process
    assert seconds > 0
    torch.testing.assert_close(latents, diffusers_call(model, "encode", images, torch.device("cpu")))
    assert not process.is_alive()


def test_a_model_the_child_cannot_load_is_an_error_with_its_reason(tmp_path):
    with pytest.raises(RuntimeError, match="baseline process: .*") as failure:
        with BaselineProcess(str(tmp_path / "missing"), 0, torch.device("cpu")):
            pass
    assert "missing" in str(failure.value)
