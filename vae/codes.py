"""Codebook indices of VQ models: recognising and checking them, and converting latents to indices and back."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .convert import Items
from .errors import InvalidInputError


def _is_integer(item: Any) -> bool:
    if isinstance(item, np.ndarray):
        return bool(np.issubdtype(item.dtype, np.integer))
    return isinstance(item, torch.Tensor) and not item.is_floating_point() and not item.is_complex() \
        and item.dtype != torch.bool


def are_indices(latents: Any) -> bool:
    """True when `latents` (one item, a batch or a list) holds integers: codebook indices, not latents."""
    if isinstance(latents, (list, tuple)):
        return bool(latents) and _is_integer(latents[0])
    return _is_integer(latents)


def indices_to_tensors(indices: Any, codebook_size: int) -> Items:
    """Accept integer indices [h, w] / [N, h, w] (tensor or array) or a list of [h, w]; each in
    [0, codebook_size). Returns int64 CPU tensors [h, w] in the caller's form."""
    if codebook_size <= 0:
        raise InvalidInputError("codebook indices need a VQ model; this model has no codebook", field="latents")
    if isinstance(indices, (list, tuple)):
        if not indices:
            raise InvalidInputError("no indices given", field="latents")
        return Items([_one(item, f"latents[{i}]", codebook_size, (2,)) for i, item in enumerate(indices)], "list")
    tensor = _one(indices, "latents", codebook_size, (2, 3))
    if tensor.dim() == 3:
        if tensor.shape[0] == 0:
            raise InvalidInputError("empty batch of indices", field="latents")
        return Items(list(tensor.unbind(0)), "batch")
    return Items([tensor], "single")


def _one(item: Any, label: str, codebook_size: int, dims: tuple[int, ...]) -> torch.Tensor:
    if not _is_integer(item):
        raise InvalidInputError(f"{label}: codebook indices must be integers", field="latents")
    tensor = torch.from_numpy(np.ascontiguousarray(item)) if isinstance(item, np.ndarray) else item
    if tensor.dim() not in dims:
        raise InvalidInputError(f"{label}: expected {' or '.join(f'{d}-D' for d in dims)} indices ([h, w] per "
                                f"image), got shape {tuple(tensor.shape)}", field="latents")
    if tensor.shape[-1] == 0 or tensor.shape[-2] == 0:
        raise InvalidInputError(f"{label}: empty spatial size {tuple(tensor.shape)}", field="latents")
    tensor = tensor.detach().cpu().long()
    low, high = int(tensor.min()), int(tensor.max())
    if low < 0 or high >= codebook_size:
        bad = low if low < 0 else high
        raise InvalidInputError(f"{label}: index {bad} is outside the codebook [0, {codebook_size})", field="latents")
    return tensor


def lookup(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Indices [h, w] -> their codebook vectors as a raw latent [D, h, w] (what the decoder reads)."""
    return codebook[indices].permute(2, 0, 1).contiguous()


def nearest(latent: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """A raw latent [D, h, w] -> the index [h, w] of the nearest codebook vector at each position (the
    Euclidean distance diffusers' VectorQuantizer uses)."""
    dim, height, width = latent.shape
    vectors = latent.reshape(dim, -1).t().to(codebook.dtype)
    return torch.argmin(torch.cdist(vectors, codebook), dim=1).reshape(height, width)
