"""The autoencoder objectives: reconstruction + a KL or VQ latent term + optional MS-SSIM, LPIPS and GAN terms.

Scaling follows the Stable Diffusion autoencoder: the reconstruction error and the KL are both sums
per image, so `beta` means what LDM's `kl_weight` means (1e-6 there). The total is then divided by
the number of pixel values, which changes the step size but not the optimum. The VQ terms are means
over latent values (as in van den Oord et al.), scaled to the same per-image footing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import BetaConfig, LossConfig, OptimConfig
from .quantizer import code_usage


def kl_per_element(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per latent value, in nats: 0.5 (mu^2 + s^2 - log s^2 - 1)."""
    return 0.5 * (mean.square() + logvar.exp() - logvar - 1.0)


def kl_per_channel(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean KL per latent value of each channel over batch and positions: shape [C]."""
    return kl_per_element(mean, logvar).mean(dim=(0, 2, 3))


def kl_term(mean: torch.Tensor, logvar: torch.Tensor, free_bits: float = 0.0) -> torch.Tensor:
    """KL summed over the latent values of an image, averaged over the batch.

    With free bits, each channel's mean KL per value is floored at `free_bits` nats, so the
    optimiser gains nothing by pushing a channel below it (a guard against posterior collapse).
    """
    positions = mean.shape[2] * mean.shape[3]
    if free_bits > 0:
        per_channel = kl_per_channel(mean, logvar).clamp(min=free_bits)
        return per_channel.sum() * positions
    return kl_per_element(mean, logvar).sum(dim=(1, 2, 3)).mean()


def beta_at(step: int, config: BetaConfig) -> float:
    """The KL weight at `step`: constant, linear annealing from 0, or cyclical annealing."""
    if config.schedule == "constant":
        return config.value
    if config.schedule == "linear":
        return config.value * min(1.0, step / max(1, config.anneal_steps))
    position = (step % max(1, config.cycle_steps)) / max(1, config.cycle_steps)
    return config.value * min(1.0, position / max(config.cycle_ratio, 1e-9))


def lr_at(step: int, base_lr: float, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warm-up to `base_lr`, then cosine decay to `min_ratio * base_lr` at `max_steps`."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def wsd_lr_at(step: int, base_lr: float, max_steps: int, min_ratio: float, decay_ratio: float) -> float:
    """Warmup-stable-decay without its warm-up: `base_lr` until the last `decay_ratio` of `max_steps`,
    then a cosine down to `min_ratio * base_lr`. A constant rate lets one schedule run for many sessions
    and be extended without restarting; only the final stretch anneals."""
    decay_start = max_steps * (1 - decay_ratio)
    if step < decay_start:
        return base_lr
    progress = min(1.0, (step - decay_start) / max(1.0, max_steps - decay_start))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def schedule_lr(step: int, optim: OptimConfig, fresh_from: int = 0) -> float:
    """The learning rate of `optim.schedule` at `step`; the warm-up counts from `fresh_from`, the step at
    which the optimizer's moments started from zero (0, or where a run continued from exported weights)."""
    if optim.schedule == "cosine" and fresh_from == 0:
        return lr_at(step, optim.lr, optim.warmup_steps, optim.max_steps, optim.min_lr_ratio)
    if optim.schedule == "cosine":
        base = lr_at(step, optim.lr, 0, optim.max_steps, optim.min_lr_ratio)
    else:
        base = wsd_lr_at(step, optim.lr, optim.max_steps, optim.min_lr_ratio, optim.decay_ratio)
    warm = min(1.0, (step - fresh_from + 1) / optim.warmup_steps) if optim.warmup_steps > 0 else 1.0
    return base * max(warm, 0.0)


def reconstruction_sum(x: torch.Tensor, reconstruction: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-image sum of |x - x'| or (x - x')^2 over pixel values, averaged over the batch."""
    error = (reconstruction - x).abs() if kind == "l1" else (reconstruction - x).square()
    return error.sum(dim=(1, 2, 3)).mean()


def ms_ssim_loss(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """1 - MS-SSIM on images in [-1, 1] (pytorch-msssim).

    pytorch-msssim needs the smaller side above (window - 1) * 16 for its five scales, so training
    crops get the largest odd window that fits (11 from 161 px, 7 at 128 px); crops too small for
    any window use single-scale SSIM.
    """
    from pytorch_msssim import ms_ssim, ssim

    side = min(x.shape[-2:])
    a, b = (x.float() + 1) / 2, (reconstruction.float().clamp(-1, 1) + 1) / 2
    window = next((w for w in (11, 9, 7, 5, 3) if side > (w - 1) * 16), None)
    if window is not None:
        return 1 - ms_ssim(a, b, data_range=1.0, size_average=True, win_size=window)
    return 1 - ssim(a, b, data_range=1.0, size_average=True, win_size=min(11, side - 1 + side % 2))


class PatchDiscriminator(nn.Module):
    """The PatchGAN discriminator of pix2pix and the LDM autoencoder (`NLayerDiscriminator`)."""

    def __init__(self, layers: int = 3, channels: int = 64, in_channels: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2**n, 8)
            stride = 2 if n < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||grad rec|| / ||grad gan|| at the decoder's last layer (Esser et al.), clamped to [0, 1e4]."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


@dataclass
class LossParts:
    """The terms of one generator step, for logging; `total` is what is minimised."""

    total: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor | None = None  # KL models
    beta: float | None = None
    ms_ssim: torch.Tensor | None = None
    lpips: torch.Tensor | None = None
    gan: torch.Tensor | None = None
    gan_weight: torch.Tensor | None = None
    codebook: torch.Tensor | None = None  # VQ models: the codebook and commitment losses, code usage
    commitment: torch.Tensor | None = None
    perplexity: torch.Tensor | None = None
    codes_used: int | None = None


def generator_loss(
    x: torch.Tensor,
    reconstruction: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    *,
    step: int,
    config: LossConfig,
    lpips: nn.Module | None = None,
    discriminator: nn.Module | None = None,
    last_layer: torch.Tensor | None = None,
) -> LossParts:
    """The KL-VAE's objective: reconstruction + beta * KL (+ the optional terms)."""
    beta = beta_at(step, config.beta)
    kl = kl_term(mean, logvar, config.free_bits)
    parts = LossParts(total=kl, reconstruction=kl, kl=kl, beta=beta)
    return complete_loss(x, reconstruction, beta * kl, parts, step=step, config=config, lpips=lpips,
                         discriminator=discriminator, last_layer=last_layer)


def complete_loss(
    x: torch.Tensor,
    reconstruction: torch.Tensor,
    penalty: torch.Tensor,
    parts: LossParts,
    *,
    step: int,
    config: LossConfig,
    lpips: nn.Module | None = None,
    discriminator: nn.Module | None = None,
    last_layer: torch.Tensor | None = None,
) -> LossParts:
    """Reconstruction (per-image sum) + the latent `penalty` (on the same scale) + MS-SSIM, LPIPS and the
    adaptive GAN term, divided by the values per image; fills in `parts` and returns it."""
    values = x[0].numel()
    rec = reconstruction_sum(x, reconstruction, config.reconstruction)
    nll = rec
    parts.reconstruction = rec / values
    if config.ms_ssim_weight > 0:
        parts.ms_ssim = ms_ssim_loss(x, reconstruction)
        nll = nll + config.ms_ssim_weight * parts.ms_ssim * values
    if lpips is not None and config.lpips_weight > 0:
        parts.lpips = lpips(x, reconstruction).mean()
        nll = nll + config.lpips_weight * parts.lpips * values
    total = nll + penalty
    disc = config.discriminator
    if discriminator is not None and disc.enabled and step >= disc.start_step and last_layer is not None:
        parts.gan = -discriminator(reconstruction).mean()
        parts.gan_weight = adaptive_gan_weight(nll, parts.gan, last_layer) * disc.weight
        total = total + parts.gan_weight * parts.gan
    parts.total = total / values
    return parts


def vq_generator_loss(
    x: torch.Tensor,
    reconstruction: torch.Tensor,
    codebook: torch.Tensor,
    commitment: torch.Tensor,
    indices: torch.Tensor,
    codebook_size: int,
    *,
    step: int,
    config: LossConfig,
    lpips: nn.Module | None = None,
    discriminator: nn.Module | None = None,
    last_layer: torch.Tensor | None = None,
) -> LossParts:
    """The VQ-VAE's objective: reconstruction + codebook loss (unless the codebook follows an EMA) +
    beta * commitment loss, the latter two means over latent values as in van den Oord et al., so
    scaled by the values per image to sit beside the per-image reconstruction sum."""
    values = x[0].numel()
    vq = config.vq
    penalty = commitment * vq.commitment if vq.ema else codebook + commitment * vq.commitment
    perplexity, used = code_usage(indices.detach(), codebook_size)
    parts = LossParts(total=penalty, reconstruction=penalty, codebook=codebook, commitment=commitment,
                      perplexity=perplexity, codes_used=used)
    return complete_loss(x, reconstruction, penalty * values, parts, step=step, config=config, lpips=lpips,
                         discriminator=discriminator, last_layer=last_layer)
