"""What the codec and the SDK answer with besides tensors: model descriptions and anomaly scores, as
dataclasses shared by the in-process library and the client, built from the wire messages here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from . import latentd_pb2 as pb


@dataclass(frozen=True)
class ModelInfo:
    """Describes a VAE in the terms its callers need (diffusers conventions)."""

    name: str
    model_class: str
    latent_channels: int
    downsampling_factor: int
    scaling_factor: float
    shift_factor: float
    dtype: str
    parameters: int
    # AutoencoderKL (and FLUX.2's) has a Gaussian posterior to sample from; AutoencoderTiny,
    # AutoencoderDC and VQModel are deterministic.
    has_posterior: bool
    # Per-channel latent statistics; empty: none. Scaled latents are (z - mean) * scaling_factor / std
    # with them, (z - shift_factor) * scaling_factor without (docs/models.md).
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()
    # p > 1: the latents are z in p x p patches (FLUX.2); channels and factor describe the patched grid.
    patch_size: int = 1
    # VQ models: codebook vectors and their dimension (= latent_channels); 0 without a codebook.
    codebook_size: int = 0
    codebook_dim: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ServedModelInfo(ModelInfo):
    """A model as a server serves it: its description, where it runs and the server's limits."""

    device: str = ""
    max_pixels: int = 0
    max_batch_size: int = 0

    @classmethod
    def from_message(cls, message: pb.ModelInfo) -> "ServedModelInfo":
        values = {field.name: getattr(message, field.name) for field in fields(cls)}
        values["latents_mean"], values["latents_std"] = tuple(message.latents_mean), tuple(message.latents_std)
        values["patch_size"] = message.patch_size or 1  # a server from before patches
        return cls(**values)

    def to_message(self) -> pb.ModelInfo:
        return pb.ModelInfo(**asdict(self))


@dataclass(frozen=True)
class AnomalyScore:
    """Reconstruction error of one image on 8-bit RGB: high MSE / low PSNR flags an unusual image."""

    mse: float
    psnr: float

    @classmethod
    def from_message(cls, message: pb.Score) -> "AnomalyScore":
        return cls(mse=message.mse, psnr=message.psnr)
