"""Validation during training: PSNR, MS-SSIM, KL per channel and active units (KL) or code usage (VQ), a grid."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..codec import Codec
from ..fileio import write_atomic
from ..imageio import encode_image
from ..metrics import mean_of, ms_ssim, psnr
from .losses import kl_per_element
from .quantizer import code_usage

# Burda et al. (2016): a latent unit is active when Cov_x(E_q[z_u | x]) exceeds this.
ACTIVE_UNIT_THRESHOLD = 0.01


@dataclass
class ValidationResult:
    psnr: float | None
    ms_ssim: float | None
    kl_per_channel: list[float] = field(default_factory=list)
    active_units: int = 0
    grid: Image.Image | None = None
    perplexity: float | None = None  # VQ models: code usage over the validation latents
    codes_used: int | None = None


def validate(model: nn.Module, images: Sequence[tuple[str, np.ndarray]], *, grid_images: int = 8) -> ValidationResult:
    """Round-trip `images` at full size through a copy of `model` (posterior mean, float32)."""
    if not images:
        return ValidationResult(None, None)
    device = next(model.parameters()).device  # where training runs: a GPU validates on the GPU
    codec = Codec(copy.deepcopy(model).float(), name="validation", device=device, dtype="float32")
    pixels = [image for _, image in images]
    if codec.info.codebook_size:
        return _validate_vq(codec, pixels, grid_images)
    posteriors = codec.posterior(pixels)
    # The posterior mean is raw z: decode it as such (the model's scaling_factor is not trained yet).
    reconstructions = codec.decode([mean for mean, _ in posteriors], sizes=[p.shape[:2] for p in pixels],
                                   scaled=False)
    kl_sums = torch.zeros(codec.info.latent_channels, dtype=torch.float64)
    kl_count = 0
    means = []
    for mean, logvar in posteriors:
        kl_sums += kl_per_element(mean, logvar).double().sum(dim=(1, 2))
        kl_count += mean.shape[1] * mean.shape[2]
        means.append(mean.flatten(1).double())
    # Variance across images and positions of each channel's posterior mean.
    unit_variance = torch.cat(means, dim=1).var(dim=1)
    return ValidationResult(
        psnr=mean_of([psnr(a, b) for a, b in zip(pixels, reconstructions)]),
        ms_ssim=mean_of([ms_ssim(a, b) for a, b in zip(pixels, reconstructions)]),
        kl_per_channel=(kl_sums / kl_count).tolist(),
        active_units=int((unit_variance > ACTIVE_UNIT_THRESHOLD).sum()),
        grid=comparison_grid(pixels[:grid_images], reconstructions[:grid_images]),
    )


def _validate_vq(codec: Codec, pixels: list[np.ndarray], grid_images: int) -> ValidationResult:
    codes = codec.encode(pixels, indices=True)
    reconstructions = codec.decode(codes, sizes=[p.shape[:2] for p in pixels])
    perplexity, used = code_usage(torch.cat([c.flatten() for c in codes]), codec.info.codebook_size)
    return ValidationResult(
        psnr=mean_of([psnr(a, b) for a, b in zip(pixels, reconstructions)]),
        ms_ssim=mean_of([ms_ssim(a, b) for a, b in zip(pixels, reconstructions)]),
        grid=comparison_grid(pixels[:grid_images], reconstructions[:grid_images]),
        perplexity=float(perplexity), codes_used=used,
    )


def comparison_grid(originals: Sequence[np.ndarray], reconstructions: Sequence[np.ndarray],
                    height: int = 160) -> Image.Image:
    """Originals on the top row, their reconstructions below, each scaled to `height` pixels."""
    def thumb(image: np.ndarray) -> Image.Image:
        h, w = image.shape[:2]
        return Image.fromarray(image).resize((max(1, round(w * height / h)), height), Image.Resampling.LANCZOS)

    tops = [thumb(image) for image in originals]
    bottoms = [thumb(image) for image in reconstructions]
    width = sum(t.width for t in tops) + 4 * (len(tops) - 1)
    grid = Image.new("RGB", (max(1, width), 2 * height + 4), (255, 255, 255))
    x = 0
    for top, bottom in zip(tops, bottoms):
        grid.paste(top, (x, 0))
        grid.paste(bottom, (x, height + 4))
        x += top.width + 4
    return grid



def write_grid(result: ValidationResult, path: Path) -> None:
    if result.grid is not None:
        write_atomic(path, encode_image(result.grid))
