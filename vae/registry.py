"""The one table of named models: architecture, where the weights live, and what the model is for."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from .errors import ModelNotFoundError

# Stable Diffusion 1.x autoencoder (the `first_stage_config` of v1-inference.yaml in diffusers form).
SD_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }
)


@dataclass(frozen=True)
class ModelSpec:
    """A named model: its diffusers class and config, and where its pretrained weights come from."""

    name: str
    description: str
    model_class: str = "AutoencoderKL"
    # Architecture for random initialisation and for single-file checkpoints; None: read from the weights.
    config: Mapping[str, Any] | None = None
    # Folder under `latentd/vae/weights/` holding packaged diffusers-format weights.
    packaged: str | None = None
    # Hugging Face Hub repository (and subfolder) with pretrained weights, for machines with internet.
    hub_id: str | None = None
    hub_subfolder: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def packaged_path(self) -> Path | None:
        """The packaged weights folder, or None when this model ships none or they are not installed."""
        if self.packaged is None:
            return None
        path = Path(str(resources.files("latentd.vae").joinpath("weights", self.packaged)))
        return path if (path / "config.json").is_file() else None


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="default",
        description="latentd's own f8 / 4-channel KL-VAE, trained with `latentd train`, sized to serve on CPU",
        packaged="default",
        notes=("trained with vae/train/configs/default.yaml; figures in vae/MODEL_CARD.md",),
    ),
    ModelSpec(
        name="sd",
        description="Stable Diffusion 1.x KL-VAE architecture (f8, 4 channels, 83.7M parameters)",
        config=SD_CONFIG,
        hub_id="stabilityai/sd-vae-ft-mse",
    ),
    ModelSpec(
        name="taesd",
        description="Tiny AutoEncoder for Stable Diffusion (TAESD): fast, approximate previews of SD latents",
        model_class="AutoencoderTiny",
        config=MappingProxyType({}),  # AutoencoderTiny's defaults are the TAESD architecture
        hub_id="madebyollin/taesd",
    ),
)


def get_spec(name: str) -> ModelSpec:
    """The registry entry called `name`; ModelNotFoundError lists the known names otherwise."""
    for spec in MODELS:
        if spec.name == name:
            return spec
    known = ", ".join(spec.name for spec in MODELS)
    raise ModelNotFoundError(f"unknown model name {name!r}; registered models: {known}")


def is_registered(name: str) -> bool:
    return any(spec.name == name for spec in MODELS)
