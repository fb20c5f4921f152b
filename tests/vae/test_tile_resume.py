"""Recomputed tile statistics resume each tile at its last finished block: same bits, far less compute."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from latentd.vae.codec import Codec, CodecOptions
from latentd.vae.stopping import stoppable
from latentd.vae.tile_resume import SpilledTiles, resumable_blocks
from latentd.vae.tiling import tile_spans
from tests.conftest import make_tiny_dc, make_tiny_flux2, make_tiny_kl, make_tiny_vq

OPTIONS = dict(tile_size=64, tile_overlap=48, max_batch_pixels=1 << 20)


def _image(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 160, 144, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _codec(norms: str, model=None, **options) -> Codec:
    return Codec(model if model is not None else make_tiny_kl(), options=CodecOptions(tile_norms=norms,
                                                                                        **OPTIONS, **options))


@pytest.mark.parametrize("make", [make_tiny_kl, make_tiny_vq, make_tiny_flux2, make_tiny_dc],
                         ids=["kl", "vq", "flux2", "dc-ae"])
@pytest.mark.parametrize("optimize", [True, False], ids=["fast-blocks", "diffusers-blocks"])
def test_recomputed_tiles_are_bit_for_bit_the_side_by_side_ones(make, optimize):
    """Side by side every tile computes once with the image's statistics; resuming must change no bit."""
    image = _image()
    out = {}
    for norms in ("image", "image-recompute"):
        codec = _codec(norms, make(), optimize=optimize)
        latents = codec.encode(image, tiling="on")
        out[norms] = (latents, codec.decode(latents, tiling="on", output="tensor"))
    assert torch.equal(out["image"][0], out["image-recompute"][0])
    assert torch.equal(out["image"][1], out["image-recompute"][1])


def test_with_mid_block_attention_too():
    image = _image(1)
    out = [_codec(norms, make_tiny_kl(mid_block_add_attention=True)).encode(image, tiling="on")
           for norms in ("image", "image-recompute")]
    assert torch.equal(out[0], out[1])


def test_each_convolution_runs_at_most_twice_per_tile():
    """Rerunning every tile from the start once per GroupNorm layer would run the first convolutions
    once per later layer (the tiny decoder has 15 norms); resuming runs each at most twice."""
    codec = _codec("image-recompute")
    latents = codec.encode(_image(), tiling="off")
    calls: dict[str, int] = {}
    convs = {name: module for name, module in codec.model.decoder.named_modules() if isinstance(module, nn.Conv2d)}
    handles = [module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
               for name, module in convs.items()]
    try:
        codec.decode(latents, tiling="on", output="tensor")
    finally:
        for handle in handles:
            handle.remove()
    tile, overlap = 64 // codec.factor, 48 // codec.factor
    tiles = len(tile_spans(latents.shape[-2], tile, overlap)) * len(tile_spans(latents.shape[-1], tile, overlap))
    assert tiles > 1
    heavy = {name: count for name, count in calls.items() if name != "conv_in"}  # conv_in runs every pass: cheap
    assert max(heavy.values()) <= 2 * tiles, heavy
    assert calls["conv_in"] > 2 * tiles  # the reruns did happen: every pass starts at the latents


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
def test_the_spilled_blocks_are_closed_after_a_run_and_after_a_stop(monkeypatch):
    written = []
    put = SpilledTiles.put

    def recording_put(self, index, tensor):
        written.append(index)
        put(self, index, tensor)

    monkeypatch.setattr(SpilledTiles, "put", recording_put)
    codec = _codec("image-recompute")
    latents = codec.encode(_image(), tiling="off")
    before = _open_files()
    codec.decode(latents, tiling="on", output="tensor")
    assert written and _open_files() == before

    def check() -> None:  # stop the run once it has spilled a block
        if written:
            raise TimeoutError("deadline exceeded")

    written.clear()
    with pytest.raises(TimeoutError), stoppable(check):
        codec.decode(latents, tiling="on", output="tensor")
    assert written and _open_files() == before


_KILLED_CHILD = """
import sys, time, torch
from latentd.vae.codec import Codec, CodecOptions
from latentd.vae.tile_resume import SpilledTiles
from tests.conftest import make_tiny_kl
put = SpilledTiles.put
def put_then_wait(self, index, tensor):
    put(self, index, tensor)
    print("spilled", flush=True)
    time.sleep(600)
SpilledTiles.put = put_then_wait
codec = Codec(make_tiny_kl(), options=CodecOptions(tile_norms="image-recompute", tile_size=64, tile_overlap=48))
codec.decode(torch.zeros(4, 80, 72), tiling="on", output="tensor")
"""


def test_a_process_killed_midway_leaves_nothing_in_the_temporary_folder(tmp_path):
    folder = tmp_path / "tmp"
    folder.mkdir()
    env = {**os.environ, "TMPDIR": str(folder)}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD], stdout=subprocess.PIPE, env=env,
                             cwd=str(Path(__file__).resolve().parents[2]), text=True)
    try:
        assert child.stdout.readline().strip() == "spilled"
        assert not list(folder.iterdir())  # spilled, and already nothing to see
    finally:
        child.kill()
        child.wait(timeout=30)
    assert not list(folder.iterdir())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_spilled_tensor_comes_back_with_its_values_dtype_and_strides(dtype, channels_last):
    tensor = torch.randn(1, 5, 7, 9).to(dtype)
    if channels_last:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    spilled = SpilledTiles()
    try:
        spilled.put(3, tensor)
        back = spilled.get(3)
    finally:
        spilled.close()
    assert back.dtype == dtype and back.stride() == tensor.stride() and torch.equal(back, tensor)


def test_only_outermost_blocks_resume_and_outside_a_pass_nothing_changes():
    model = make_tiny_kl(mid_block_add_attention=True).eval()
    reference = make_tiny_kl(mid_block_add_attention=True).eval()
    keys = list(model.state_dict())
    count = resumable_blocks(model)
    assert count == resumable_blocks(model) > 0  # a second call wraps nothing twice
    assert list(model.state_dict()) == keys
    resnet = model.decoder.mid_block.resnets[0]
    assert type(resnet).__name__ == "ResnetBlock2D" and type(resnet) is not type(reference.decoder.mid_block.resnets[0])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(model.encode(x).latent_dist.mean, reference.encode(x).latent_dist.mean)
