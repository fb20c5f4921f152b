"""Pixels and latents to and from an accelerator: uint8 across the bus, pinned buffers, one synchronisation."""

from __future__ import annotations

import torch


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1], in the same operations as the host path (convert.py), so that
    the values are the same to the bit wherever it runs; the memory format is kept."""
    return pixels.float().div_(127.5).sub_(1.0)


def denormalise(images: torch.Tensor) -> torch.Tensor:
    """Model output in [-1, 1] -> uint8 pixels, rounded and clamped as `convert.tensor_to_uint8` does."""
    return ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round_().to(torch.uint8)


def from_host(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: on CUDA copied asynchronously from pinned memory (pinned first if it is
    not already); the copy keeps the tensor's memory format."""
    if device.type != "cuda":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def to_host(result: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """`output` (computed from `result`) on the host, and whether `result` was all finite.

    On CUDA the finiteness flag and the output travel together, asynchronously into pinned memory, and
    the host waits once for both: one synchronisation per batch, not one for the check and one for the
    copy. The result is returned in ordinary (pageable) memory."""
    finite = torch.isfinite(result).all()
    if output.device.type != "cuda":
        return output.cpu(), bool(finite)
    host = torch.empty_like(output, device="cpu", pin_memory=True)
    host.copy_(output, non_blocking=True)
    flag = torch.empty((), dtype=torch.bool, pin_memory=True)
    flag.copy_(finite, non_blocking=True)
    torch.cuda.current_stream(output.device).synchronize()
    # Into pageable memory for the caller (a host copy, fast beside the bus): results a caller keeps must
    # not keep pages locked, and the pinned block goes back to torch's cache for the next batch.
    return host.clone(), bool(flag)
