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



def _derived(base: Mapping[str, Any], **changes: Any) -> Mapping[str, Any]:
    return MappingProxyType({**base, **changes})


# SDXL's VAE: the SD architecture, retrained; float16 overflows in it (hence force_upcast).
SDXL_CONFIG = _derived(SD_CONFIG, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
# SD3 and FLUX.1: the SD architecture with 16 latent channels and no quant convolutions.
SD3_CONFIG = _derived(SD_CONFIG, latent_channels=16, sample_size=1024, use_quant_conv=False,
                      use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
FLUX1_CONFIG = _derived(SD3_CONFIG, scaling_factor=0.3611, shift_factor=0.1159)
# Sana's DC-AE f32c32 (EfficientViT's dc-ae-f32c32-sana-1.0/1.1 in diffusers' terms): six stages, five
# downsamples, linear attention in the last three.
SANA_DC_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "latent_channels": 32,
        "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
        "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
        "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
        "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
        "encoder_layers_per_block": [2, 2, 2, 3, 3, 3],
        "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
        "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
        "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
        "downsample_block_type": "Conv",
        "upsample_block_type": "interpolate",
        "decoder_norm_types": "rms_norm",
        "decoder_act_fns": "silu",
        "scaling_factor": 0.41407,
    }
)
# The TAESD family: AutoencoderTiny's defaults are TAESD's architecture. Their latents are the large
# VAE's *scaled* latents (they were trained on them), so their own scaling is 1 and shift 0.
TAESD_CONFIG: Mapping[str, Any] = MappingProxyType({})
TAESD16_CONFIG: Mapping[str, Any] = MappingProxyType({"latent_channels": 16})


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
        name="sdxl",
        description="SDXL's KL-VAE (f8, 4 channels, scaling 0.13025; float16 overflows: force_upcast)",
        config=SDXL_CONFIG,
        hub_id="stabilityai/sdxl-vae",
    ),
    ModelSpec(
        name="sdxl-fp16-fix",
        description="SDXL's VAE fine-tuned to run in float16 (same latents as sdxl, within its error)",
        config=_derived(SDXL_CONFIG, force_upcast=False),
        hub_id="madebyollin/sdxl-vae-fp16-fix",
    ),
    ModelSpec(
        name="playground-v2.5",
        description="Playground v2.5's SDXL-architecture VAE with per-channel latents_mean / latents_std",
        config=_derived(SDXL_CONFIG, scaling_factor=0.5, latents_mean=[-1.6574, 1.886, -1.383, 2.5155],
                        latents_std=[8.4927, 5.9022, 6.5498, 5.2299]),
        hub_id="playgroundai/playground-v2.5-1024px-aesthetic",
        hub_subfolder="vae",
    ),
    ModelSpec(
        name="sd3",
        description="Stable Diffusion 3's KL-VAE (f8, 16 channels, scaling 1.5305, shift 0.0609)",
        config=SD3_CONFIG,
        hub_id="stabilityai/stable-diffusion-3-medium-diffusers",
        hub_subfolder="vae",
        notes=("gated on the Hub: accept the licence and log in (huggingface-cli login) first",),
    ),
    ModelSpec(
        name="flux1",
        description="FLUX.1's KL-VAE (f8, 16 channels, scaling 0.3611, shift 0.1159; packed latents on request)",
        config=FLUX1_CONFIG,
        hub_id="black-forest-labs/FLUX.1-dev",
        hub_subfolder="vae",
        notes=("gated on the Hub: accept the licence and log in first; FLUX.1-schnell holds the same VAE",),
    ),
    ModelSpec(
        name="flux2",
        description="FLUX.2's KL-VAE (32 channels at f8, served as 2x2 patches: 128 channels at f16, "
                    "normalised by its BatchNorm statistics)",
        model_class="AutoencoderKLFlux2",
        config=MappingProxyType({}),  # AutoencoderKLFlux2's defaults are FLUX.2's architecture
        hub_id="black-forest-labs/FLUX.2-dev",
        hub_subfolder="vae",
        notes=("gated on the Hub: accept the licence and log in first",
               "random weights have BatchNorm statistics 0 and 1; the real ones come with the weights"),
    ),
    ModelSpec(
        name="sana",
        description="Sana's deep-compression autoencoder DC-AE f32c32 (32 channels, scaling 0.41407; deterministic)",
        model_class="AutoencoderDC",
        config=SANA_DC_CONFIG,
        hub_id="mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers",
    ),
    ModelSpec(
        name="taesd",
        description="Tiny AutoEncoder for Stable Diffusion (TAESD): fast, approximate previews of SD latents",
        model_class="AutoencoderTiny",
        config=TAESD_CONFIG,
        hub_id="madebyollin/taesd",
    ),
    ModelSpec(
        name="taesdxl",
        description="TAESD for SDXL: its latents are sdxl's scaled latents",
        model_class="AutoencoderTiny",
        config=TAESD_CONFIG,
        hub_id="madebyollin/taesdxl",
    ),
    ModelSpec(
        name="taesd3",
        description="TAESD for SD3 (16 channels): its latents are sd3's scaled latents",
        model_class="AutoencoderTiny",
        config=TAESD16_CONFIG,
        hub_id="madebyollin/taesd3",
    ),
    ModelSpec(
        name="taef1",
        description="TAESD for FLUX.1 (16 channels): its latents are flux1's scaled latents",
        model_class="AutoencoderTiny",
        config=TAESD16_CONFIG,
        hub_id="madebyollin/taef1",
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
