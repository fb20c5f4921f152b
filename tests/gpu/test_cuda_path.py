"""The codec's CUDA path on SD-, SDXL- and FLUX-shaped tiny models: numerics in each dtype against plain
diffusers, the uint8 transfers, tiles on the device, the OOM split, memory-sized passes, torch.compile.
Marked `gpu`: skipped where CUDA is unavailable (tests/conftest.py)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_kl, smooth_image

pytestmark = pytest.mark.gpu

# Relative L2 error allowed against diffusers in float32 on the same device, by latentd's compute dtype.
TOLERANCE = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
# The families' conventions on the tiny architecture: SD, SDXL (float16 overflows: force_upcast), FLUX.1
# (16 channels, a shift, no quant convolutions).
FAMILIES = {
    "sd": {"force_upcast": False},
    "sdxl": {"force_upcast": True, "scaling_factor": 0.13025, "shift_factor": None},
    "flux": {"latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
             "use_post_quant_conv": False, "force_upcast": False},
}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def images() -> list[np.ndarray]:
    return [smooth_image(64, 96, seed=seed) for seed in range(3)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_families_agree_with_diffusers(family, dtype):
    from latentd.vae import Codec
    from latentd.vae.convert import tensor_to_uint8

    model = make_tiny_kl(**FAMILIES[family])
    reference = copy.deepcopy(model).to("cuda")
    codec = Codec(model, name=family, device="cuda", dtype=dtype)
    if family == "sdxl" and dtype == "float16":
        assert codec.placement.dtype in (torch.bfloat16, torch.float32)  # chosen up front, no retry
    pixels = torch.from_numpy(np.stack(images())).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    with torch.no_grad():
        expected = reference.encode(pixels.to("cuda")).latent_dist.mode().float().cpu()
        decoded = reference.decode(expected.to("cuda")).sample.float().cpu()
    ours = torch.stack(codec.encode(images(), scaled=False))
    assert ours.device.type == "cpu" and ours.dtype == torch.float32
    tolerance = TOLERANCE[codec.placement.dtype]
    assert relative_error(ours, expected) < tolerance
    floats = codec.decode(expected, scaled=False, output="tensor")
    assert relative_error(floats.clamp(-1, 1), decoded.clamp(-1, 1)) < tolerance
    # uint8 from the device: the host's rounding of the same floats, to the bit.
    for image, tensor in zip(codec.decode(expected, scaled=False), floats):
        assert image.dtype == np.uint8 and np.array_equal(image, tensor_to_uint8(tensor))


def test_overflow_retry_on_the_uint8_path():
    from latentd.vae import Codec

    model = make_tiny_kl(force_upcast=False)
    with torch.no_grad():
        model.decoder.conv_out.bias.fill_(1e5)  # inf in float16; 1 after the clamp in float32
    codec = Codec(model, name="overflow", device="cuda", dtype="float16")
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    first = codec.decode(latents, scaled=False)
    assert codec._fp32_for_good and all((image == 255).all() for image in first)


@pytest.mark.parametrize("norms", ["tile", "image"])
def test_tiles_on_the_device_agree_with_the_host_tiler(norms):
    """Tiles cut, batched and blended on the device give the host path's tiles (float32 without TF32); with
    image statistics both equal the untiled pass (a model without attention)."""
    from latentd.vae import Codec, CodecOptions

    model = make_tiny_kl(mid_block_add_attention=False, force_upcast=False)
    options = CodecOptions(tile_size=64, tile_overlap=48, tile_norms=norms, tf32=False)
    host = Codec(copy.deepcopy(model), name="host", options=dataclasses.replace(options, optimize=False))
    codec = Codec(copy.deepcopy(model), name="device", device="cuda", dtype="float32", options=options)
    codec.limits = dataclasses.replace(codec.limits, tile_size=64, tiles_per_pass=6)
    image = smooth_image(160, 144)
    latents = host.encode(image, tiling="off")
    assert relative_error(codec.encode(image, tiling="on"), host.encode(image, tiling="on")) < 1e-4
    tiled = codec.decode(latents, tiling="on", output="tensor")
    assert relative_error(tiled, host.decode(latents, tiling="on", output="tensor")) < 1e-4
    if norms == "image":
        assert relative_error(tiled, codec.decode(latents, tiling="off", output="tensor")) < 1e-4


def test_a_batch_out_of_device_memory_runs_in_halves():
    from latentd.vae import Codec

    codec = Codec(make_tiny_kl(), name="oom", device="cuda", dtype="float32")
    batch = images() * 2
    expected = codec.encode(batch)
    original, seen = codec._encode_batch, []

    def tight(x, model=None):
        seen.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(x, model)

    codec._encode_batch = tight
    for a, b in zip(codec.encode(batch), expected):
        torch.testing.assert_close(a, b)
    assert seen == [6, 3, 2, 1, 3, 2, 1]  # halves until each fits


def test_passes_sized_by_free_memory_and_the_estimate_holds_for_sd():
    """The SD architecture's measured peak per pixel stays within the estimate that sizes passes."""
    from latentd.vae import Codec
    from latentd.vae.loading import load_model
    from latentd.vae.pass_limits import activation_bytes_per_pixel

    model = load_model("sd", random_seed=0).model
    codec = Codec(model, name="sd", device="cuda", dtype="bfloat16")
    assert codec.limits.tile_above_pixels == codec.limits.max_batch_pixels > 4 * 512 * 512
    estimate = activation_bytes_per_pixel(codec.model, torch.bfloat16)
    side = 512
    latents = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(0))
    codec.decode(latents)  # cuDNN's choices and workspaces settle
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    codec.decode(latents)
    peak = torch.cuda.max_memory_allocated() - base
    print(f"SD decode {side}px bf16: {peak / side ** 2:.0f} bytes per pixel, estimate {estimate}")
    assert peak / side ** 2 <= estimate


def test_compiled_codec_with_cuda_graphs_decodes_as_the_plain_one():
    from latentd.vae import Codec, CodecOptions

    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = Codec(make_tiny_kl(), name="plain", device="cuda", dtype="float32")
    compiled = Codec(make_tiny_kl(), name="graphs", device="cuda", dtype="float32",
                     options=CodecOptions(compile="reduce-overhead"))
    expected = plain.decode(latents, output="tensor")
    for _ in range(3):  # warm-up, recording, replay
        torch.testing.assert_close(compiled.decode(latents, output="tensor"), expected, rtol=1e-3, atol=1e-3)
