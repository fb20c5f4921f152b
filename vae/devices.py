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


# bfloat16 runs natively (tensor cores, no emulation) from compute capability 8.0, Ampere, on.
BF16_MIN_CAPABILITY = (8, 0)


def native_bf16(device: str | torch.device) -> bool:
    """Whether `device` (a CUDA device: its own index, not the current one) computes bfloat16 natively.

    `torch.cuda.is_bf16_supported()` also counts emulation, which makes T4 and V100 convolutions slow
    or unsupported, and judges the current device rather than the one asked for."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(torch.cuda.get_device_capability(index)) >= BF16_MIN_CAPABILITY


def resolve_placement(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Placement:
    """Auto-select: CUDA with bfloat16 where the device computes it natively (no fp16 overflow) else
    float16; MPS with
    float16; CPU with float32 (CPU half precision is slower than float32 for convolutions)."""
    resolved = torch.device(device) if device is not None else default_device()
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("device 'cuda' was asked for but CUDA is not available", field="device")
    chosen = parse_dtype(dtype)
    if chosen is None:
        if resolved.type == "cuda":
            chosen = torch.bfloat16 if native_bf16(resolved) else torch.float16
        elif resolved.type == "mps":
            chosen = torch.float16
        else:
            chosen = torch.float32
    return Placement(resolved, chosen)


def configure_cuda(*, benchmark: bool, tf32: bool) -> None:
    """Process-wide CUDA backend switches, set when a codec is placed on a CUDA device (never at import):
    cuDNN times its algorithms per input shape and keeps the fastest (`benchmark`: worth it where shapes
    repeat, as a server's buckets do), and float32 convolutions and matrix products run in TF32 (`tf32`:
    Ampere and later; what the float32 retry and dtype float32 compute in)."""
    torch.backends.cudnn.benchmark = benchmark
    precision = "tf32" if tf32 else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:  # torch before 2.9
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
