"""`RemoteAutoencoderKL`: a diffusers pipeline's `vae` whose encode and decode run on a latentd server.

    from latentd.client.diffusers import RemoteAutoencoderKL
    pipe.vae = RemoteAutoencoderKL("vae-host:50051", model="default")

Needs torch and diffusers (the pipeline has them anyway); the rest of `latentd.client` does not.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from .channel import TLS
from .sync import LatentClient


class RemoteConfig(SimpleNamespace):
    """The config attributes pipelines read from `vae.config`, also reachable as `config["name"]`."""

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)


class RemoteAutoencoderKL:
    """Stands in for diffusers' `AutoencoderKL` in a pipeline: `config.scaling_factor`,
    `config.shift_factor`, `config.latent_channels`, `config.block_out_channels` (its length gives the
    pipeline's `vae_scale_factor`), `dtype`, `device`, `encode(x).latent_dist` (`sample(generator)`,
    `mode()`) and `decode(z, return_dict=...)`, with the pixels and latents sent to the server in
    float32. Results follow the caller's device and dtype.

    `pipe.to(...)` and CPU offloading leave it alone: it holds no weights.
    """

    def __init__(self, target: str | None = None, model: str | None = None, *, token: str | None = None,
                 tls: TLS = None, timeout: float | None = 600.0, client: LatentClient | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if client is None and target is None:
            raise ValueError("give a target (host:port) or a LatentClient")
        self.client = client or LatentClient(target, token=token, tls=tls, timeout=timeout)
        info = self.client.model(model)
        if not info.has_posterior:
            raise ValueError(f"model {info.name!r} is a {info.model_class}: it has no posterior to stand in for an "
                             "AutoencoderKL")
        if info.patch_size != 1:  # FLUX.2's pipeline patchifies the VAE's own z; the server's are patched
            raise ValueError(f"model {info.name!r} serves its latents in {info.patch_size}x{info.patch_size} "
                             "patches: use LatentClient.encode/decode, whose latents are the pipeline's")
        self.model_name = info.name
        levels = int(math.log2(info.downsampling_factor)) + 1
        self.config = RemoteConfig(
            scaling_factor=info.scaling_factor, shift_factor=info.shift_factor,
            # SDXL-style pipelines scale by these when set (None: by shift_factor alone).
            latents_mean=list(info.latents_mean) or None, latents_std=list(info.latents_std) or None,
            latent_channels=info.latent_channels, in_channels=3, out_channels=3,
            # Only its length matters to pipelines (vae_scale_factor = 2 ** (len - 1)); the server's
            # channel widths are not part of the contract.
            block_out_channels=[0] * levels, force_upcast=False, use_quant_conv=True, use_post_quant_conv=True)
        self.dtype = dtype
        self.device = torch.device("cpu")

    def to(self, *args: Any, **kwargs: Any) -> "RemoteAutoencoderKL":
        """Accepted and ignored for placement; a dtype changes the dtype results come back in."""
        for value in (*args, kwargs.get("dtype")):
            if isinstance(value, torch.dtype):
                self.dtype = value
        return self

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Images [N, 3, H, W] in [-1, 1] -> the posterior, as `AutoencoderKL.encode` returns it."""
        means, logvars = self.client.posterior(x.detach().float().cpu(), model=self.model_name, output="tensor")
        means, logvars = _batched(means), _batched(logvars)
        parameters = torch.cat([means, logvars], dim=1).to(device=x.device, dtype=x.dtype)
        dist = DiagonalGaussianDistribution(parameters)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> DecoderOutput | tuple:
        """Raw latents [N, C, h, w] (already divided by the scaling factor, as pipelines do) -> images
        [N, 3, h*f, w*f] in [-1, 1], as `AutoencoderKL.decode` returns them."""
        images = self.client.decode(z.detach().float().cpu(), model=self.model_name, scaled=False, output="tensor")
        sample = _batched(images).to(device=z.device, dtype=z.dtype)
        return DecoderOutput(sample=sample) if return_dict else (sample,)


def _batched(value: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    if isinstance(value, list):
        return torch.stack(value)
    return value if value.dim() == 4 else value[None]
