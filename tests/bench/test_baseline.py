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


def test_diffusers_runs_in_the_dtype_latentd_runs(tiny_model_dir):
    """Like for like in half precision: the baseline is cast to latentd's compute dtype, float32 comes out, and
    the agreement is judged by that dtype's tolerance."""
    from latentd.bench.codec import AGREEMENT_TOLERANCE, bench_codec

    model = torch.nn.Module.to(load_for_bench(str(tiny_model_dir), seed=0), dtype=torch.bfloat16)
    latents = diffusers_call(model, "encode", torch.rand(1, 3, 16, 16) * 2 - 1, torch.device("cpu"))
    assert latents.dtype == torch.float32
    result = bench_codec(str(tiny_model_dir), size=16, runs=1, warmup=0, device="cpu", dtype="bfloat16", alone=False)
    assert result.dtype == "bfloat16" and result.tolerance > AGREEMENT_TOLERANCE
    assert result.agrees, (result.latent_rel_error, result.image_rel_error)
    assert bench_codec(str(tiny_model_dir), size=16, runs=1, warmup=0, alone=False).tolerance == AGREEMENT_TOLERANCE
