"""What every loaded model reports about itself: latent layout, scaling conventions and dtype."""

from __future__ import annotations

from latentd.v1.results import ModelInfo

from torch import nn

SUPPORTED_CLASSES = ("AutoencoderKL", "AutoencoderTiny")




def latent_shape(channels: int, factor: int, height: int, width: int) -> tuple[int, int, int]:
    """The latents [C, h, w] of a height x width image: each side divided by the factor, rounded up."""
    return channels, -(-height // factor), -(-width // factor)


def describe_model(model: nn.Module, name: str) -> ModelInfo:
    """Read a `ModelInfo` off a diffusers `AutoencoderKL` or `AutoencoderTiny`."""
    config = model.config
    model_class = type(model).__name__
    # Subclasses (such as the inference rewrites) report the diffusers class they extend.
    for base in type(model).__mro__:
        if base.__name__ in SUPPORTED_CLASSES:
            model_class = base.__name__
            break
    return ModelInfo(
        name=name,
        model_class=model_class,
        latent_channels=int(config.latent_channels),
        downsampling_factor=2 ** (len(config.block_out_channels) - 1),
        scaling_factor=float(getattr(config, "scaling_factor", 1.0) or 1.0),
        shift_factor=float(getattr(config, "shift_factor", None) or 0.0),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        parameters=sum(p.numel() for p in model.parameters()),
        has_posterior=model_class == "AutoencoderKL",
    )
