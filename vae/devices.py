"""Choosing where and in what precision a model runs: CUDA in half precision, CPU in float32."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidInputError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class Placement:
    """The device and compute dtype of a codec."""

    device: torch.device
    dtype: torch.dtype

    @property
    def low_precision(self) -> bool:
        return self.dtype != torch.float32


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise InvalidInputError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16",
                                field="dtype") from None


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_placement(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Placement:
    """Auto-select: CUDA with bfloat16 where supported (no fp16 overflow) else float16; MPS with
    float16; CPU with float32 (CPU half precision is slower than float32 for convolutions)."""
    resolved = torch.device(device) if device is not None else default_device()
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("device 'cuda' was asked for but CUDA is not available", field="device")
    chosen = parse_dtype(dtype)
    if chosen is None:
        if resolved.type == "cuda":
            chosen = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif resolved.type == "mps":
            chosen = torch.float16
        else:
            chosen = torch.float32
    return Placement(resolved, chosen)
