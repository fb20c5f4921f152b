"""The registry's public VAEs: each entry's conventions (channels, factor, scaling, shift, per-channel
statistics, patches) held against values written out here from the models' published configs, on
tiny models of the entry's class that carry the entry's conventions (the real weights need the
internet), and the full architectures' layouts built on the meta device (no memory)."""

from __future__ import annotations

import pytest
import torch
from latentd.vae import Codec
from latentd.vae.loading import _CLASSES
from latentd.vae.model_info import describe_model
from latentd.vae.registry import MODELS, get_spec

from tests.conftest import TINY_DC_CONFIG, TINY_FLUX2_CONFIG, TINY_KL_CONFIG, TINY_TAESD_CONFIG, smooth_image

# name: (class, hub id, latent channels, factor, scaling, shift, latents_mean, latents_std, patch size)
PLAYGROUND = ((-1.6574, 1.886, -1.383, 2.5155), (8.4927, 5.9022, 6.5498, 5.2299))
EXPECTED = {
    "sd": ("AutoencoderKL", "stabilityai/sd-vae-ft-mse", 4, 8, 0.18215, 0.0, (), (), 1),
    "sdxl": ("AutoencoderKL", "stabilityai/sdxl-vae", 4, 8, 0.13025, 0.0, (), (), 1),
    "sdxl-fp16-fix": ("AutoencoderKL", "madebyollin/sdxl-vae-fp16-fix", 4, 8, 0.13025, 0.0, (), (), 1),
    "playground-v2.5": ("AutoencoderKL", "playgroundai/playground-v2.5-1024px-aesthetic", 4, 8, 0.5, 0.0,
                        *PLAYGROUND, 1),
    "sd3": ("AutoencoderKL", "stabilityai/stable-diffusion-3-medium-diffusers", 16, 8, 1.5305, 0.0609, (), (), 1),
    "flux1": ("AutoencoderKL", "black-forest-labs/FLUX.1-dev", 16, 8, 0.3611, 0.1159, (), (), 1),
    # 32 channels at f8 in 2x2 patches; the statistics are the BatchNorm's (0 and 1 + eps when random).
    "flux2": ("AutoencoderKLFlux2", "black-forest-labs/FLUX.2-dev", 128, 16, 1.0, 0.0, None, None, 2),
    "sana": ("AutoencoderDC", "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers", 32, 32, 0.41407, 0.0, (), (), 1),
    "taesd": ("AutoencoderTiny", "madebyollin/taesd", 4, 8, 1.0, 0.0, (), (), 1),
    "taesdxl": ("AutoencoderTiny", "madebyollin/taesdxl", 4, 8, 1.0, 0.0, (), (), 1),
    "taesd3": ("AutoencoderTiny", "madebyollin/taesd3", 16, 8, 1.0, 0.0, (), (), 1),
    "taef1": ("AutoencoderTiny", "madebyollin/taef1", 16, 8, 1.0, 0.0, (), (), 1),
}
CONVENTIONS = ("latent_channels", "scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast",
               "use_quant_conv", "use_post_quant_conv", "patch_size", "batch_norm_eps")
TINY = {"AutoencoderKL": TINY_KL_CONFIG, "AutoencoderTiny": TINY_TAESD_CONFIG, "AutoencoderDC": TINY_DC_CONFIG,
        "AutoencoderKLFlux2": TINY_FLUX2_CONFIG}


def tiny_of(name: str, seed: int = 0):
    """A small model of the entry's class carrying the entry's conventions (other keys: class defaults)."""
    spec = get_spec(name)
    config = {key: value for key, value in TINY[spec.model_class].items() if key not in CONVENTIONS}
    config.update({key: value for key, value in spec.config.items() if key in CONVENTIONS})
    if spec.model_class == "AutoencoderDC":  # its shortcuts need the last stage at least as wide as the latents
        config["encoder_block_out_channels"] = config["decoder_block_out_channels"] = [8, 32]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _CLASSES[spec.model_class].from_config(config).eval()


def test_every_public_entry_is_listed_with_its_hub_id():
    hub = {spec.name: spec.hub_id for spec in MODELS if spec.hub_id}
    assert hub == {name: expected[1] for name, expected in EXPECTED.items()}
    subfolders = {spec.name for spec in MODELS if spec.hub_subfolder == "vae"}
    assert subfolders == {"playground-v2.5", "sd3", "flux1", "flux2"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_entry_conventions_on_a_tiny_model(name):
    model_class, _, channels, _, scaling, shift, mean, std, patch = EXPECTED[name]
    codec = Codec(tiny_of(name), name=name)
    info = codec.info
    assert (info.model_class, info.scaling_factor, info.shift_factor, info.patch_size) == \
        (model_class, pytest.approx(scaling), pytest.approx(shift), patch)
    assert info.latent_channels == channels  # the tiny layouts differ in factor only
    if mean is not None:
        assert (info.latents_mean, info.latents_std) == (mean, std)
    image = smooth_image(4 * codec.factor, 4 * codec.factor)
    latents = codec.encode(image)
    assert latents.shape == (channels, 4, 4)
    torch.testing.assert_close(codec.unscale(latents), codec.encode(image, scaled=False), rtol=1e-5, atol=1e-5)
    assert codec.decode(latents).shape == image.shape


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_full_architecture_layout(name):
    """The entry's own config at full size, on the meta device: channels and downsampling factor."""
    spec = get_spec(name)
    model_class, _, channels, factor, *_ = EXPECTED[name]
    with torch.device("meta"):
        model = _CLASSES[spec.model_class].from_config(dict(spec.config))
    if model_class == "AutoencoderKLFlux2":  # its statistics are buffers: give them memory
        model.bn.to_empty(device="cpu").reset_running_stats()
    info = describe_model(model, name)
    assert (info.model_class, info.latent_channels, info.downsampling_factor) == (model_class, channels, factor)


def test_force_upcast_follows_the_entry():
    assert Codec(tiny_of("sdxl"), dtype="float16").placement.dtype == torch.float32
    assert Codec(tiny_of("sdxl-fp16-fix"), dtype="float16").placement.dtype == torch.float16


def test_tiny_autoencoders_share_their_large_models_latent_space():
    """A TAE's latents are its large model's scaled latents: same channels and factor, scaling 1."""
    for tiny, large in (("taesd", "sd"), ("taesdxl", "sdxl"), ("taesd3", "sd3"), ("taef1", "flux1")):
        assert EXPECTED[tiny][2:4] == EXPECTED[large][2:4] and EXPECTED[tiny][4:6] == (1.0, 0.0)
