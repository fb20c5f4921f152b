"""What every loaded model reports about itself: latent layout, scaling conventions and dtype."""

from __future__ import annotations

import math

from latentd.v1.results import ModelInfo
from torch import nn

from .errors import ModelLoadError

SUPPORTED_CLASSES = ("AutoencoderKL", "AutoencoderTiny", "AutoencoderDC", "AutoencoderKLFlux2", "VQModel")
# The classes with a Gaussian posterior (the others encode deterministically).
POSTERIOR_CLASSES = ("AutoencoderKL", "AutoencoderKLFlux2")


def latent_shape(channels: int, factor: int, height: int, width: int) -> tuple[int, int, int]:
    """The latents [C, h, w] of a height x width image: each side divided by the factor, rounded up."""
    return channels, -(-height // factor), -(-width // factor)


def model_class_name(model: nn.Module) -> str:
    """The supported diffusers class `model` is (subclasses, such as the inference rewrites, report the
    class they extend)."""
    for base in type(model).__mro__:
        if base.__name__ in SUPPORTED_CLASSES:
            return base.__name__
    return type(model).__name__


def dc_downsampling(config) -> int:
    """AutoencoderDC's factor, counted as its encoder builds it: a downsampling stem when the first
    stage has no layers, then one downsample after every stage with layers but the last (Sana's
    f32c32: six stages, five downsamples). Not 2 ** (len(block_out_channels) - 1) in general."""
    layers = list(config.encoder_layers_per_block)
    steps = (1 if layers[0] == 0 else 0) + sum(1 for count in layers[:-1] if count > 0)
    return 2**steps


def patch_size(model: nn.Module) -> int:
    """p where the model's latents travel in p x p patches (FLUX.2's pipeline patchifies its VAE's z)."""
    if model_class_name(model) != "AutoencoderKLFlux2":
        return 1
    size = model.config.patch_size
    sizes = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if len(sizes) != 2 or sizes[0] != sizes[1] or sizes[0] < 1:
        raise ModelLoadError(f"patch_size {size!r}: only square patches are supported")
    return int(sizes[0])


def latent_statistics(model: nn.Module, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of the latents, or two empty tuples: FLUX.2's from its BatchNorm's
    running statistics (mean, sqrt(var + batch_norm_eps)), as Flux2Pipeline normalises; other
    classes from `latents_mean` / `latents_std` in their config (SDXL pipelines' convention)."""
    config = model.config
    if model_class_name(model) == "AutoencoderKLFlux2":
        bn = model.bn
        mean = bn.running_mean.detach().double().cpu()
        std = (bn.running_var.detach().double().cpu() + float(config.batch_norm_eps)).sqrt()
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is None or std is None:
        return (), ()
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != channels or len(std) != channels:
        raise ModelLoadError(f"latents_mean and latents_std need {channels} values (one per latent channel), "
                             f"got {len(mean)} and {len(std)}")
    if not all(math.isfinite(v) and v > 0 for v in std) or not all(math.isfinite(v) for v in mean):
        raise ModelLoadError("latents_std must be positive and latents_mean finite")
    return mean, std


def describe_model(model: nn.Module, name: str) -> ModelInfo:
    """Read a `ModelInfo` off a diffusers AutoencoderKL, AutoencoderTiny, AutoencoderDC, AutoencoderKLFlux2 or
    VQModel."""
    config = model.config
    model_class = model_class_name(model)
    if model_class == "AutoencoderDC":
        factor = dc_downsampling(config)
    elif model_class == "AutoencoderTiny":
        factor = 2 ** (len(config.encoder_block_out_channels) - 1)
    else:
        factor = 2 ** (len(config.block_out_channels) - 1)
    patch = patch_size(model)
    channels = int(config.latent_channels) * patch * patch
    codebook_size = codebook_dim = 0
    if model_class == "VQModel":  # its latents are the quantiser's input: vq_embed_dim channels
        codebook_size, codebook_dim = model.quantize.embedding.weight.shape
        channels = int(codebook_dim)
    mean, std = latent_statistics(model, channels)
    return ModelInfo(
        name=name,
        model_class=model_class,
        latent_channels=channels,
        downsampling_factor=factor * patch,
        scaling_factor=float(getattr(config, "scaling_factor", 1.0) or 1.0),
        shift_factor=float(getattr(config, "shift_factor", None) or 0.0),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        parameters=sum(p.numel() for p in model.parameters()),
        has_posterior=model_class in POSTERIOR_CLASSES,
        latents_mean=mean,
        latents_std=std,
        patch_size=patch,
        codebook_size=int(codebook_size),
        codebook_dim=int(codebook_dim),
    )
