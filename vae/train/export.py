"""Export a training checkpoint: EMA weights in diffusers format (KL models with measured latent scale and shift)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..devices import parse_dtype
from ..errors import InvalidInputError
from ..loading import save_model
from .checkpoint import CONFIG_FILE, EMA_FILE, EXPORTED_STATE_FILE, STATE_FILE, ema_weights, list_checkpoints
from .config import TrainConfig, load_config
from .data import CropDataset, EpochSampler, scan_images


@dataclass
class ExportResult:
    directory: Path
    step: int
    scaling_factor: float
    shift_factor: float
    used_ema: bool
    latents_mean: tuple[float, ...] = ()  # with per-channel statistics (else empty)
    latents_std: tuple[float, ...] = ()


@dataclass
class LatentStatistics:
    """Of posterior samples: the mean and standard deviation over all values, and per channel."""

    mean: float
    std: float
    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]


def resolve_export_source(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its newest checkpoint)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise InvalidInputError(f"{path} is neither a checkpoint nor a run folder with checkpoints", field="checkpoint")
    return found[-1]


def _trained_model(checkpoint: Path, config: TrainConfig) -> tuple[nn.Module, bool]:
    """The checkpoint's AutoencoderKL or VQModel with its EMA weights (or the raw weights when it has no EMA)."""
    from diffusers import AutoencoderKL, VQModel
    from safetensors.torch import load_file

    model = (VQModel if config.model.type == "vq" else AutoencoderKL)(**config.model.architecture)
    if (checkpoint / EMA_FILE).is_file():
        names = [name for name, _ in model.named_parameters()]
        weights = {**model.state_dict(), **ema_weights(checkpoint / EMA_FILE, names)}
        used_ema = True
    else:
        raw = load_file(str(checkpoint / "model.safetensors"))
        # The training wrapper's own state (a VQ codebook's statistics) is not part of the model.
        weights = {key.removeprefix("vae."): value for key, value in raw.items() if key.startswith("vae.")}
        used_ema = False
    model.load_state_dict(weights, strict=True)
    return model.eval(), used_ema


@torch.inference_mode()
def latent_statistics(model: nn.Module, files: list[Path], *, count: int, crop: int,
                      seed: int = 0) -> LatentStatistics:
    """Mean and standard deviation of posterior samples over `count` random training crops, overall and per
    channel.

    Stable Diffusion measured its 0.18215 the same way: 1 / std of z ~ q(z|x) on training data.
    """
    dataset = CropDataset(files, crop, hflip=False, seed=seed)
    sampler = iter(EpochSampler(len(dataset), seed=seed))
    generator = torch.Generator().manual_seed(seed)
    total = total_sq = None
    values = 0
    for _ in range(count):
        try:
            key = next(sampler)
        except StopIteration:
            sampler = iter(EpochSampler(len(dataset), seed=seed + values + 1))
            key = next(sampler)
        x, _ = dataset[key]
        dist = model.encode(x[None]).latent_dist
        z = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)).double()
        sums, squares = z.sum(dim=(0, 2, 3)), z.square().sum(dim=(0, 2, 3))
        total = sums if total is None else total + sums
        total_sq = squares if total_sq is None else total_sq + squares
        values += z.numel()
    per_channel = values // len(total)
    channel_mean = total / per_channel
    channel_std = (total_sq / per_channel - channel_mean.square()).clamp_min(1e-12).sqrt()
    mean = float(total.sum()) / values
    std = max(float(total_sq.sum()) / values - mean * mean, 1e-12) ** 0.5
    return LatentStatistics(mean, std, tuple(map(float, channel_mean)), tuple(map(float, channel_std)))


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, stat_images: int | None = None,
                      dtype: str | None = None, data_dirs: list[str] | None = None,
                      latent_stats: str | None = None) -> ExportResult:
    """Write the checkpoint's EMA weights to `output` as a diffusers AutoencoderKL or VQModel folder.

    KL models get the scaling and shift that give their latents zero mean and unit variance; with
    `latent_stats` "per-channel" (default: the config's `export.latent_stats`) also `latents_mean` and
    `latents_std`, so that `(z - latents_mean) * scaling_factor / latents_std` has zero mean and unit
    variance in every channel (pipelines that read only the scaling and shift still get the overall
    unit variance). VQ models keep scaling 1 (as LDM's VQ autoencoders), since their latents are what
    the codebook quantises."""
    from .config import LATENT_STATS

    source = resolve_export_source(checkpoint)
    config = load_config(source / CONFIG_FILE)
    latent_stats = latent_stats or config.export.latent_stats
    if latent_stats not in LATENT_STATS:
        raise InvalidInputError(f"latent statistics {latent_stats!r} are not {' or '.join(LATENT_STATS)}",
                                field="latent_stats")
    model, used_ema = _trained_model(source, config)
    scaling, shift, means, stds = 1.0, 0.0, (), ()
    if config.model.type == "kl":
        count = config.export.stat_images if stat_images is None else stat_images
        dirs = data_dirs or config.data.train_dirs
        stats = latent_statistics(model, scan_images(dirs).files, count=max(1, count),
                                  crop=max(config.data.crop_size, 256), seed=config.runtime.seed)
        scaling, shift = 1.0 / stats.std, stats.mean
        if latent_stats == "per-channel":
            means, stds = stats.channel_mean, tuple(std * scaling for std in stats.channel_std)
        model.register_to_config(scaling_factor=scaling, shift_factor=shift, latents_mean=list(means) or None,
                                 latents_std=list(stds) or None)
    else:
        model.register_to_config(scaling_factor=scaling)
    target_dtype = parse_dtype(dtype or config.export.dtype)
    step = json.loads((source / STATE_FILE).read_text())["step"]
    record = json.dumps({"step": step, "schedule": config.optim.schedule, "max_steps": config.optim.max_steps})
    output = save_model(nn.Module.to(model, dtype=target_dtype), output, extras={EXPORTED_STATE_FILE: record})
    return ExportResult(output, step, scaling, shift, used_ema, means, stds)
