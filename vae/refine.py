"""Encode-time refinement: a latent optimised for a few steps against the frozen decoder, for offline use.

The encoder amortises the inverse of the decoder over all images and leaves quality behind on any
one of them; a few Adam steps on the latent itself, through the decoder, recover part of it at the
price of a decode and its backward pass per step. The decoder is not changed, so refined latents
decode with the same model anywhere.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .errors import InvalidInputError
from .stopping import checkpoint

MAX_REFINE_STEPS = 200
# Adam's step on the raw latent; latents of the VAEs here have a standard deviation of about 1-5.
REFINE_LR = 0.05


def check_refine_steps(steps: int) -> None:
    if not 0 <= steps <= MAX_REFINE_STEPS:
        raise InvalidInputError(f"refine must be 0-{MAX_REFINE_STEPS} steps, got {steps}", field="refine")


def refine_latent(decode: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor, z: torch.Tensor,
                  steps: int, lr: float | None = None) -> torch.Tensor:
    """`z` [C, h, w] after `steps` Adam steps on the mean squared error between `decode(z[None])`
    (cropped to the target) and `target` [3, H, W] in [-1, 1]; the best latent seen is returned, so
    refinement never ends worse than it began."""
    check_refine_steps(steps)
    if steps == 0:
        return z
    height, width = target.shape[-2:]
    goal = target[None].float()
    latent = z.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.Adam([latent], lr=REFINE_LR if lr is None else lr)
    best, best_loss = z, float("inf")
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(steps + 1):  # the last pass only measures the last step's result
            checkpoint()
            optimizer.zero_grad(set_to_none=True)
            image = decode(latent[None])[..., :height, :width].float()
            loss = F.mse_loss(image.clamp(-1.0, 1.0), goal)  # what the clamped uint8 output will show
            if loss.item() < best_loss:
                best, best_loss = latent.detach().clone(), loss.item()
            if step == steps:
                break
            loss.backward()
            optimizer.step()
    return best
