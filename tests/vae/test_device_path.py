"""The codec's device path (uint8 transfers, device-side tiles, OOM split, memory-sized passes, CUDA switches),
run on the CPU: the same code as on CUDA but for pinning and the asynchronous copies."""

from __future__ import annotations

import dataclasses
import itertools
import shutil

import numpy as np
import pytest
import torch
from latentd.vae import Codec, CodecOptions, InvalidInputError
from latentd.vae.convert import tensor_to_uint8
from latentd.vae.device_io import denormalise, normalise
from latentd.vae.devices import Placement, configure_cuda
from latentd.vae.pass_limits import PassLimits, activation_bytes_per_pixel, plan_passes

from tests.conftest import make_tiny_kl, make_tiny_taesd, smooth_image

TILED = {"tile_size": 32, "tile_overlap": 8, "tile_threshold": 48}


def codec_pair(make=make_tiny_kl, **options) -> tuple[Codec, Codec]:
    """The host path and the device path (forced on the CPU) over the same weights."""
    host = Codec(make(), name="host", options=CodecOptions(**options))
    device = Codec(make(), name="device", options=CodecOptions(**options))
    device._device_pixels = True
    return host, device


def test_normalise_and_denormalise_are_the_host_conversions_to_the_bit():
    pixels = torch.arange(256, dtype=torch.uint8).repeat(3, 2, 1)
    host = torch.as_tensor(pixels.numpy()).float().div_(127.5).sub_(1.0)  # convert.py's expression
    assert torch.equal(normalise(pixels), host)
    images = torch.linspace(-1.3, 1.3, 3 * 40 * 50).reshape(3, 40, 50)
    assert np.array_equal(tensor_to_uint8(denormalise(images)), tensor_to_uint8(images))
    assert np.array_equal(tensor_to_uint8(denormalise(images.half())), tensor_to_uint8(images.half()))


@pytest.mark.parametrize("norms", ["tile", "image"])
def test_device_path_gives_the_host_path_results_to_the_bit(norms):
    host, device = codec_pair(tile_norms=norms, **TILED)
    # Sizes that need padding, a tiled one, a float tensor beside uint8 arrays.
    images = [smooth_image(37, 45, seed=1), smooth_image(64, 80, seed=2), smooth_image(37, 45, seed=3)]
    floats = torch.rand(1, 3, 24, 30, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for inputs in (images, floats, images[0]):
        expected = host.encode(inputs)
        ours = device.encode(inputs)
        assert all(torch.equal(a, b) for a, b in zip(expected, ours)) if isinstance(expected, list) \
            else torch.equal(expected, ours)
    latents = host.encode(images)
    for output in ("numpy", "tensor"):
        expected = host.decode(latents, output=output, sizes=[(37, 45), (64, 80), (37, 45)])
        ours = device.decode(latents, output=output, sizes=[(37, 45), (64, 80), (37, 45)])
        for a, b in zip(expected, ours):
            assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(host.roundtrip(images), device.roundtrip(images)):
        assert np.array_equal(a, b)
    assert host.anomaly_score(images) == device.anomaly_score(images)


def test_deterministic_model_on_the_device_path():
    host, device = codec_pair(make_tiny_taesd)
    image = smooth_image(40, 56)
    assert torch.equal(host.encode(image), device.encode(image))
    assert np.array_equal(host.roundtrip(image, output="pil"), device.roundtrip(image, output="pil"))


def test_tiles_batched_per_pass_agree_with_one_tile_per_pass():
    host, device = codec_pair(**TILED)
    device.limits = dataclasses.replace(device.limits, tiles_per_pass=4)
    image = smooth_image(96, 112)
    latents = host.encode(image)
    # Batched convolutions may round differently from single ones; the blend itself is the same.
    torch.testing.assert_close(device.encode(image), latents, rtol=1e-4, atol=1e-5)
    expected = host.decode(latents, output="tensor")
    torch.testing.assert_close(device.decode(latents, output="tensor"), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pixels", [False, True])
def test_a_batch_out_of_memory_runs_again_in_halves(pixels, caplog):
    codec = Codec(make_tiny_kl(), name="tiny")
    codec._device_pixels = pixels
    images = [smooth_image(32, 32, seed=seed) for seed in range(5)]
    expected = codec.encode(images)
    original, seen = codec._encode_batch, []

    def tight(batch, model=None):
        seen.append(batch.shape[0])
        if batch.shape[0] > 2 or batch.shape[-1] > 40:  # as if more than 2 images, or a large one, did not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(batch, model)

    codec._encode_batch = tight
    with caplog.at_level("WARNING", logger="latentd.vae"):
        ours = codec.encode(images)
    assert seen == [5, 3, 2, 1, 2] and "in halves" in caplog.text
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(torch.OutOfMemoryError):  # one image that does not fit is the caller's error
        codec.encode(smooth_image(48, 48))


def test_an_image_out_of_memory_alone_runs_tiled_under_auto(caplog):
    codec = Codec(make_tiny_kl(), name="tiny", options=CodecOptions(**TILED))
    latents = torch.randn(4, 24, 24, generator=torch.Generator().manual_seed(0))  # 48 px: untiled by auto
    tiled = codec.decode(latents, tiling="on", output="tensor")
    original = codec._decode_batch

    def tight(z, model=None):
        if z.shape[-1] == 24:  # the whole latent does not fit; its tiles (16 of 24 each way) do
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(z, model)

    codec._decode_batch = tight
    with caplog.at_level("WARNING", logger="latentd.vae"):
        assert torch.equal(codec.decode(latents, output="tensor"), tiled)
    assert "tiling them" in caplog.text
    with pytest.raises(torch.OutOfMemoryError):  # tiling="off" is what the caller asked for
        codec.decode(latents, tiling="off")


# ---- sizing passes by free memory ---------------------------------------------------------------

class Config:
    def __init__(self, **values):
        self.__dict__.update(values)


class Model:
    def __init__(self, **config):
        self.config = Config(**config)


SD = Model(block_out_channels=[128, 256, 512, 512])


def test_activation_estimate_follows_the_widest_level_and_dtype():
    assert activation_bytes_per_pixel(SD, torch.float16) == 256 * 8 * 2  # 256 channels at full size
    assert activation_bytes_per_pixel(SD, torch.float32) == 256 * 8 * 4
    assert activation_bytes_per_pixel(Model(decoder_block_out_channels=[64, 64, 64, 64]), torch.bfloat16) == 64 * 16
    assert activation_bytes_per_pixel(Model(), torch.float16) == 512 * 16  # widths unknown: generous


@pytest.mark.parametrize("free_gib", [1, 8, 24, 80, 139])
def test_passes_and_tiles_from_free_memory(free_gib):
    free = free_gib << 30
    per_pixel = activation_bytes_per_pixel(SD, torch.bfloat16)
    limits = plan_passes(free, per_pixel, fraction=0.8, factor=8, overlap=128)
    assert limits.max_batch_pixels == int(free * 0.8) // per_pixel
    assert limits.max_batch_pixels * per_pixel <= free * 0.8  # the estimate fits the share
    assert limits.tile_size % 64 == 0 and limits.tile_size > 128
    assert limits.tiles_per_pass >= 4 and limits.tiles_per_pass * limits.tile_size ** 2 <= limits.max_batch_pixels
    side = int(limits.max_batch_pixels ** 0.5)
    assert not limits.tiles(side, side) and limits.tiles(side + 1, side + 1)


def test_more_free_memory_never_gives_smaller_passes():
    per_pixel = activation_bytes_per_pixel(SD, torch.float16)
    plans = [plan_passes(gib << 30, per_pixel, fraction=0.8, factor=8, overlap=128) for gib in range(1, 160, 7)]
    assert all(a.max_batch_pixels <= b.max_batch_pixels and a.tile_size <= b.tile_size
               for a, b in itertools.pairwise(plans))


def test_little_free_memory_still_gives_one_small_tile_per_pass():
    limits = plan_passes(1 << 20, 4096, fraction=0.8, factor=8, overlap=128)
    assert limits.max_batch_pixels == 128 * 128
    assert limits.tile_size == 192 and limits.tiles_per_pass == 1  # above the overlap by one aligned step
    with pytest.raises(ValueError):
        plan_passes(1 << 30, 4096, fraction=0.0, factor=8, overlap=128)


def test_cpu_limits_are_the_options():
    limits = Codec(make_tiny_kl(), options=CodecOptions(max_batch_pixels=1000, tile_size=256)).limits
    assert limits == PassLimits(max_batch_pixels=1000, tile_size=256, tiles_per_pass=1, tile_threshold=1024)
    assert limits.tiles(100, 1025) and not limits.tiles(1024, 1024)


def test_a_cuda_codec_sizes_its_passes_by_the_free_memory(monkeypatch):
    codec = Codec(make_tiny_kl(), name="tiny")
    codec.placement = Placement(torch.device("cuda", 1), torch.float16)
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (8 << 30, 16 << 30))
    limits = codec._pass_limits(codec.model)
    assert asked == [torch.device("cuda", 1)]  # the codec's own device
    assert limits == plan_passes(8 << 30, activation_bytes_per_pixel(codec.model, torch.float16), fraction=0.8,
                                 factor=2, overlap=128)
    codec.options = CodecOptions(device_memory_fraction=0)
    assert codec._pass_limits(codec.model).max_batch_pixels == CodecOptions().max_batch_pixels


def test_gpu_limits_tile_by_pixels_and_cost_by_their_tiles():
    codec = Codec(make_tiny_kl(), name="tiny", options=CodecOptions(tile_overlap=8))
    codec.limits = plan_passes(1 << 20, 16, fraction=1.0, factor=2, overlap=8)  # 65536 pixels per pass
    assert codec.limits.max_batch_pixels == 65536 and codec.limits.tile_size == 128
    assert codec.model_calls(256, 256, decode=False) == {65536: 1}  # fits one pass: not tiled
    calls = codec.model_calls(256, 258, decode=False)
    assert sum(calls.values()) == 9 and max(calls) == 128 * 128  # 3 x 3 tiles of 128 px


# ---- CUDA switches and options ----------------------------------------------------------------

def test_configure_cuda_sets_benchmark_and_tf32():
    backends = torch.backends
    saved = (backends.cudnn.benchmark, backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision)
    try:
        configure_cuda(benchmark=True, tf32=True)
        assert backends.cudnn.benchmark and backends.cuda.matmul.fp32_precision == "tf32"
        assert backends.cudnn.conv.fp32_precision == "tf32"
        configure_cuda(benchmark=False, tf32=False)
        assert not backends.cudnn.benchmark and backends.cuda.matmul.fp32_precision == "ieee"
        assert backends.cudnn.conv.fp32_precision == "ieee"
    finally:
        backends.cudnn.benchmark = saved[0]
        backends.cuda.matmul.fp32_precision, backends.cudnn.conv.fp32_precision = saved[1:]


def test_a_cpu_codec_leaves_the_cuda_switches_alone():
    before = torch.backends.cudnn.benchmark
    Codec(make_tiny_kl(), options=CodecOptions(cudnn_benchmark=not before))
    assert torch.backends.cudnn.benchmark == before


@pytest.mark.parametrize("options, field", [
    ({"device_memory_fraction": 1.5}, "device_memory_fraction"),
    ({"device_memory_fraction": -0.1}, "device_memory_fraction"),
    ({"compile": "fast"}, "compile"),
    ({"compile": "default", "tile_norms": "image"}, "compile"),
])
def test_bad_gpu_options_are_refused_by_name(options, field):
    with pytest.raises(InvalidInputError) as caught:
        Codec(make_tiny_kl(), options=CodecOptions(**options))
    assert caught.value.field == field


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile needs a C compiler")
def test_compiled_codec_decodes_as_the_plain_one():
    pytest.importorskip("torch._inductor")
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python")
    latents = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(0))
    plain = Codec(make_tiny_kl(), name="plain").decode(latents, output="tensor")
    compiled = Codec(make_tiny_kl(), name="compiled", options=CodecOptions(compile="default"))
    torch.testing.assert_close(compiled.decode(latents, output="tensor"), plain, rtol=1e-4, atol=1e-5)
    assert set(compiled.model.state_dict()) == set(make_tiny_kl().state_dict())  # compiled in place
