"""Diffusers pipelines' `vae`, with its encode and decode run on a latentd server.

    from latentd.client.diffusers import RemoteAutoencoderKL
    pipe.vae = RemoteAutoencoderKL("vae-host:50051", model="default")

`RemoteAutoencoderKL` stands in for `AutoencoderKL` (Stable Diffusion, SDXL, FLUX, DiT, ...);
`RemoteAutoencoderDC` for `AutoencoderDC` (Sana), whose encode returns the latents themselves. Both
share `RemoteAutoencoder`: the config pipelines read, the calls they make on a VAE (tiling, slicing,
eval, requires_grad_, to), batches chunked under the message size limit, and the wire dtype.

Needs torch and diffusers (the pipeline has them anyway); the rest of `latentd.client` does not.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Callable

import torch
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution, EncoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from latentd.v1.results import ServedModelInfo

from .channel import TLS
from .sync import LatentClient

# What tensors may travel in: float16 halves pixels sent for encoding, latents both ways. Decoded
# images always come back float32 (the contract's RAW_FLOAT).
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
MIB = 1024 * 1024
DEFAULT_MAX_MESSAGE_MB = 64  # the server's default max_message_mb
# Room left in each message for framing, field headers and the response's own fields.
_MESSAGE_MARGIN = 0.9
_ITEM_OVERHEAD = 1024


class RemoteConfig(SimpleNamespace):
    """The config attributes pipelines read from `vae.config`, also reachable as `config["name"]`."""

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)

    def __contains__(self, name: str) -> bool:
        return hasattr(self, name)


class RemoteAutoencoder:
    """What both shims share. A pipeline's calls on its VAE:

    - `enable_tiling()` / `disable_tiling()`: tiling is the server's; they set the requests' tiling
      option to "on" / "off" (until either is called: "auto", the server's threshold);
    - `enable_slicing()` / `disable_slicing()`: with slicing on, one image per request;
    - `eval()`, `train(False)`, `requires_grad_(False)`: accepted; `train(True)` and
      `requires_grad_(True)` raise: a remote VAE has no gradients;
    - `to(...)`: placement is accepted and ignored (it holds no weights), a dtype or device sets the
      `dtype` and `device` results come back in;
    - batches are split so that no request or answer exceeds `max_message_mb` (the server's limit,
      64 MiB unless it says otherwise), the pieces sent one after another and joined in order;
    - `wire_dtype="float16"` sends pixels and latents in half precision (half the bytes; decoded
      images still come back in float32).
    """

    def __init__(self, target: str | None = None, model: str | None = None, *, token: str | None = None,
                 tls: TLS = None, timeout: float | None = 600.0, client: LatentClient | None = None,
                 dtype: torch.dtype = torch.float32, wire_dtype: str = "float32",
                 max_message_mb: float = DEFAULT_MAX_MESSAGE_MB) -> None:
        if client is None and target is None:
            raise ValueError("give a target (host:port) or a LatentClient")
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)}, got {wire_dtype!r}")
        if not max_message_mb > 0:
            raise ValueError(f"max_message_mb must be positive, got {max_message_mb!r}")
        self.client = client or LatentClient(target, token=token, tls=tls, timeout=timeout)
        info = self.client.model(model)
        self._check_model(info)
        self.model_name = info.name
        self.factor = info.downsampling_factor
        self.latent_channels = info.latent_channels
        self.config = self._config(info)
        self.dtype = dtype
        self.device = torch.device("cpu")
        self.wire_dtype = wire_dtype
        self.max_message_bytes = int(max_message_mb * MIB)
        self.tiling = "auto"
        self.use_slicing = False
        self.training = False

    # ---- what subclasses say ---------------------------------------------------------------------

    def _check_model(self, info: ServedModelInfo) -> None:
        """Raise ValueError if the model cannot stand in for this kind of VAE."""
        if info.patch_size != 1:  # FLUX.2's pipeline patchifies the VAE's own z; the server's are patched
            raise ValueError(f"model {info.name!r} serves its latents in {info.patch_size}x{info.patch_size} "
                             "patches: use LatentClient.encode/decode, whose latents are the pipeline's")

    def _config(self, info: ServedModelInfo) -> RemoteConfig:
        # SDXL-style pipelines scale by latents_mean/std when set (None: by shift_factor alone).
        return RemoteConfig(scaling_factor=info.scaling_factor, shift_factor=info.shift_factor,
                            latents_mean=list(info.latents_mean) or None, latents_std=list(info.latents_std) or None,
                            latent_channels=info.latent_channels, in_channels=3, out_channels=3,
                            force_upcast=False)

    @staticmethod
    def _levels(info: ServedModelInfo) -> list[int]:
        """A block_out_channels list whose length gives the pipeline's vae_scale_factor (2 ** (len - 1));
        the server's channel widths are not part of the contract."""
        return [0] * (int(math.log2(info.downsampling_factor)) + 1)

    # ---- the calls pipelines make on a VAE -------------------------------------------------------

    @property
    def use_tiling(self) -> bool:
        return self.tiling == "on"

    def enable_tiling(self, use_tiling: bool = True, **tile_sizes: Any) -> None:
        """Tile on the server (its tile sizes: diffusers' tile_sample_min_* arguments are ignored)."""
        self.tiling = "on" if use_tiling else "off"

    def disable_tiling(self) -> None:
        self.tiling = "off"

    def enable_slicing(self) -> None:
        """One image per request (diffusers' slicing: one image per model call)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def eval(self) -> "RemoteAutoencoder":
        return self

    def train(self, mode: bool = True) -> "RemoteAutoencoder":
        if mode:
            raise RuntimeError("a remote VAE cannot train: it has no gradients (use eval())")
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "RemoteAutoencoder":
        if requires_grad:
            raise RuntimeError("a remote VAE has no gradients: requires_grad_(True) is not possible")
        return self

    def to(self, *args: Any, **kwargs: Any) -> "RemoteAutoencoder":
        """Accepted; it holds no weights. A dtype or device sets what results come back in."""
        for value in (*args, kwargs.get("dtype"), kwargs.get("device")):
            if isinstance(value, torch.dtype):
                self.dtype = value
            elif isinstance(value, (torch.device, str)) and value:
                self.device = torch.device(value)
        return self

    # ---- shared machinery ------------------------------------------------------------------------

    @property
    def _wire(self) -> torch.dtype:
        return WIRE_DTYPES[self.wire_dtype]

    def _chunked(self, batch: torch.Tensor, item_bytes: int, call: Callable[[torch.Tensor], Any]) -> list[Any]:
        """call(piece) over consecutive pieces of a batch, each under the message limit by
        `item_bytes` per item (the larger of an item's request and answer); results in order."""
        batch = batch if batch.dim() == 4 else batch[None]
        room = int(self.max_message_bytes * _MESSAGE_MARGIN)
        per_call = 1 if self.use_slicing else max(1, room // (item_bytes + _ITEM_OVERHEAD))
        return [call(batch[start:start + per_call]) for start in range(0, batch.shape[0], per_call)]

    def _wire_bytes(self, *shape: int) -> int:
        return math.prod(shape) * self._wire.itemsize

    def _encode_latents(self, x: torch.Tensor, posterior: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images [N, 3, H, W] in [-1, 1] -> raw latents (the posterior mean, and its logvar when asked)."""
        pixels = x.detach().to("cpu", self._wire)
        _, _, height, width = pixels.shape if pixels.dim() == 4 else (1, *pixels.shape)
        latent_bytes = self._wire_bytes(self.latent_channels, -(-height // self.factor), -(-width // self.factor))
        item_bytes = max(self._wire_bytes(3, height, width), latent_bytes * (2 if posterior else 1))

        def call(piece: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            options = dict(model=self.model_name, dtype=self.wire_dtype, tiling=self.tiling, output="tensor")
            if posterior:
                means, logvars = self.client.posterior(piece, **options)
                return _batched(means), _batched(logvars)
            return _batched(self.client.encode(piece, scaled=False, **options)), None

        parts = self._chunked(pixels, item_bytes, call)
        means = torch.cat([mean for mean, _ in parts])
        logvars = torch.cat([logvar for _, logvar in parts]) if posterior else None
        return means, logvars

    def _decode_images(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents [N, C, h, w] -> images [N, 3, h*f, w*f] in [-1, 1], in the caller's device and dtype."""
        latents = z.detach().to("cpu", self._wire)
        channels, h, w = latents.shape[-3:]
        image_bytes = 3 * h * self.factor * w * self.factor * 4  # RAW_FLOAT answers: float32
        item_bytes = max(self._wire_bytes(channels, h, w), image_bytes)

        def call(piece: torch.Tensor) -> torch.Tensor:
            return _batched(self.client.decode(piece, model=self.model_name, scaled=False, tiling=self.tiling,
                                               output="tensor"))

        return self._result(torch.cat(self._chunked(latents, item_bytes, call)), z)

    def _result(self, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return value.to(device=like.device, dtype=like.dtype)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> DecoderOutput | tuple:
        """Raw latents [N, C, h, w] (already divided by the scaling factor, as pipelines do) -> images
        [N, 3, h*f, w*f] in [-1, 1], as the local VAE's `decode` returns them."""
        sample = self._decode_images(z)
        return DecoderOutput(sample=sample) if return_dict else (sample,)


class RemoteAutoencoderKL(RemoteAutoencoder):
    """Stands in for diffusers' `AutoencoderKL` in a pipeline: `config.scaling_factor`,
    `config.shift_factor`, `config.latent_channels`, `config.block_out_channels` (its length gives the
    pipeline's `vae_scale_factor`), `config.latents_mean`/`latents_std` (the model's per-channel
    statistics, None when it has none), `dtype`, `device`, `encode(x).latent_dist` (`sample(generator)`, `mode()`) and
    `decode(z, return_dict=...)`. Results follow the caller's device and dtype. See
    `RemoteAutoencoder` for tiling, slicing, chunking and the wire dtype.

    `pipe.to(...)` and CPU offloading leave it alone: it holds no weights.
    """

    def _check_model(self, info: ServedModelInfo) -> None:
        super()._check_model(info)
        if not info.has_posterior:
            raise ValueError(f"model {info.name!r} is a {info.model_class}: it has no posterior to stand in for an "
                             "AutoencoderKL (RemoteAutoencoderDC takes deterministic models)")

    def _config(self, info: ServedModelInfo) -> RemoteConfig:
        config = super()._config(info)
        config.__dict__.update(block_out_channels=self._levels(info), use_quant_conv=True, use_post_quant_conv=True)
        return config

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Images [N, 3, H, W] in [-1, 1] -> the posterior, as `AutoencoderKL.encode` returns it."""
        means, logvars = self._encode_latents(x, posterior=True)
        parameters = self._result(torch.cat([means.float(), logvars.float()], dim=1), x)
        dist = DiagonalGaussianDistribution(parameters)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)


class RemoteAutoencoderDC(RemoteAutoencoder):
    """Stands in for diffusers' `AutoencoderDC` (Sana): `encode(x).latent` is the latents themselves
    (raw: the pipeline multiplies by `config.scaling_factor`), `decode(z).sample` the images;
    `config.encoder_block_out_channels` / `decoder_block_out_channels` give the pipeline's
    `vae_scale_factor`. Any served model will do (a KL model answers with its posterior mean)."""

    def _config(self, info: ServedModelInfo) -> RemoteConfig:
        config = super()._config(info)
        levels = self._levels(info)
        config.__dict__.update(encoder_block_out_channels=levels, decoder_block_out_channels=list(levels))
        return config

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> EncoderOutput | tuple:
        """Images [N, 3, H, W] in [-1, 1] -> raw latents [N, C, H/f, W/f], as `AutoencoderDC.encode`."""
        latents = self._result(self._encode_latents(x, posterior=False)[0], x)
        return EncoderOutput(latent=latents) if return_dict else (latents,)


def _batched(value: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    if isinstance(value, list):
        return torch.stack(value)
    return value if value.dim() == 4 else value[None]
