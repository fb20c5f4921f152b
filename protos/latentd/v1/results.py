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
    # AutoencoderKL has a Gaussian posterior to sample from; AutoencoderTiny is deterministic.
    has_posterior: bool

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
        return cls(**{field.name: getattr(message, field.name) for field in fields(cls)})

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
