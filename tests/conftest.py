"""Shared fixtures: tiny random-initialised models (diffusers tester style) and synthetic images."""

from __future__ import annotations

import numpy as np
import pytest

# A two-level AutoencoderKL: factor 2, 4 latent channels, ~0.3M parameters, milliseconds per call.
TINY_KL_CONFIG = {
    "block_out_channels": [32, 32],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 0.5,
    "shift_factor": 0.1,
}
# A two-level AutoencoderTiny (TAESD layout, narrower).
TINY_TAESD_CONFIG = {
    "encoder_block_out_channels": [8, 8],
    "decoder_block_out_channels": [8, 8],
    "num_encoder_blocks": [1, 1],
    "num_decoder_blocks": [1, 1],
    "latent_channels": 4,
}
# A two-stage AutoencoderDC (Sana's DC-AE layout, narrower): factor 2, 8 channels, deterministic.
TINY_DC_CONFIG = {
    "latent_channels": 8,
    "attention_head_dim": 8,
    "encoder_block_types": ["ResBlock", "EfficientViTBlock"],
    "decoder_block_types": ["ResBlock", "EfficientViTBlock"],
    "encoder_block_out_channels": [8, 16],
    "decoder_block_out_channels": [8, 16],
    "encoder_layers_per_block": [1, 1],
    "decoder_layers_per_block": [1, 1],
    "encoder_qkv_multiscales": [[], [5]],
    "decoder_qkv_multiscales": [[], [5]],
    "scaling_factor": 0.41407,
}
# A two-level AutoencoderKLFlux2: z of 4 channels at factor 2, in 2x2 patches: 16 channels at factor 4.
TINY_FLUX2_CONFIG = {
    "block_out_channels": [16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
}

# A two-level VQModel: factor 2, 64 codes of dimension 3 (the pre-quantisation latent channels).
TINY_VQ_CONFIG = {
    "block_out_channels": [16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "latent_channels": 4,
    "vq_embed_dim": 3,
    "num_vq_embeddings": 64,
    "norm_num_groups": 8,
    "mid_block_add_attention": False,
    "scaling_factor": 1.0,
}


def _seeded(class_name: str, config: dict, seed: int, overrides: dict):
    """A diffusers model of `class_name` from `config` with `overrides`, its weights drawn from `seed`."""
    import diffusers
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(diffusers, class_name)(**{**config, **overrides}).eval()


def make_tiny_kl(seed: int = 0, **overrides):
    return _seeded("AutoencoderKL", TINY_KL_CONFIG, seed, overrides)


def make_tiny_taesd(seed: int = 0, **overrides):
    return _seeded("AutoencoderTiny", TINY_TAESD_CONFIG, seed, overrides)


def make_tiny_dc(seed: int = 0, **overrides):
    return _seeded("AutoencoderDC", TINY_DC_CONFIG, seed, overrides)


def make_tiny_vq(seed: int = 0, **overrides):
    """With a codebook spread like its encoder's outputs (diffusers draws it from +-1/K), so images use many codes."""
    import torch

    model = _seeded("VQModel", TINY_VQ_CONFIG, seed, overrides)
    generator = torch.Generator().manual_seed(seed)
    weight = model.quantize.embedding.weight
    weight.data.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    return model


def make_tiny_flux2(seed: int = 0, **overrides):
    """With BatchNorm running statistics drawn from the seed (a fresh model's are 0 and 1)."""
    import torch

    model = _seeded("AutoencoderKLFlux2", TINY_FLUX2_CONFIG, seed, overrides)
    generator = torch.Generator().manual_seed(seed)
    stats = model.bn.running_mean.shape
    model.bn.running_mean.copy_(torch.randn(stats, generator=generator) * 0.3)
    model.bn.running_var.copy_(torch.rand(stats, generator=generator) * 2 + 0.1)
    return model


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 HWC image: bilinear-upsampled seeded colour noise plus a little texture."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(4, 4, 3))
    ys = np.linspace(0, 3, height)[:, None]
    xs = np.linspace(0, 3, width)[None, :]
    y0, x0 = np.floor(ys).astype(int).clip(0, 2), np.floor(xs).astype(int).clip(0, 2)
    fy, fx = (ys - y0)[..., None], (xs - x0)[..., None]
    top = coarse[y0, x0] * (1 - fx) + coarse[y0, x0 + 1] * fx
    bottom = coarse[y0 + 1, x0] * (1 - fx) + coarse[y0 + 1, x0 + 1] * fx
    image = top * (1 - fy) + bottom * fy + rng.normal(0, 4, size=(height, width, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@pytest.fixture
def tiny_kl():
    return make_tiny_kl()


@pytest.fixture
def tiny_codec():
    from latentd.vae import Codec

    return Codec(make_tiny_kl(), name="tiny")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A diffusers model folder (config.json + safetensors) of the tiny KL model."""
    from latentd.vae import save_model

    return save_model(make_tiny_kl(), tmp_path / "tiny-vae")


@pytest.fixture
def image():
    return smooth_image(48, 64)


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests skip where CUDA is unavailable (torch is imported only when such a test exists)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in gpu_items:
        item.add_marker(skip)
