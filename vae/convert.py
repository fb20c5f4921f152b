"""Conversions between what callers hand the codec (PIL, arrays, tensors, files) and CPU float tensors.

Inside the codec an image is a float32 tensor [3, H, W] in [-1, 1] (the diffusers model domain) and a
latent is a float32 tensor [C, h, w]. Results come back in the caller's form: a single item for a
single input, a stacked batch for a batched array or tensor, a list for a list.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch

from latentd.v1.outputs import OUTPUT_KINDS, OutputKind, normalise
from PIL import Image

from .errors import InvalidImageError, InvalidInputError
from .imageio import DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS, check_pixel_limit, open_image

Form = Literal["single", "batch", "list"]


@dataclass
class Items:
    """Per-item CPU float tensors plus the form the caller used, to shape the results alike."""

    tensors: list[torch.Tensor]
    form: Form


def images_to_tensors(
    images: Any,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    keep_uint8: bool = False,
) -> Items:
    """Accept PIL images, paths, encoded bytes, uint8 arrays (HW, HWC, NHWC), uint8 or float
    tensors (CHW, NCHW; float in [-1, 1]), or a list of any of these. `keep_uint8`: 8-bit sources stay
    uint8 [3, H, W] tensors (to be normalised on the device); float tensors are float either way."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise InvalidInputError("no images given", field="images")
        tensors = []
        for index, item in enumerate(images):
            batch = _one_input(item, f"images[{index}]", max_pixels, background, keep_uint8)
            if batch.dim() == 4:
                raise InvalidInputError(f"images[{index}]: a list holds single images, not batches", field="images")
            tensors.append(batch)
        return Items(tensors, "list")
    tensor = _one_input(images, "images", max_pixels, background, keep_uint8)
    if tensor.dim() == 4:
        if tensor.shape[0] == 0:
            raise InvalidInputError("empty batch of images", field="images")
        return Items(list(tensor.unbind(0)), "batch")
    return Items([tensor], "single")


def _one_input(item: Any, label: str, max_pixels: int, background: tuple[int, int, int],
               keep_uint8: bool = False) -> torch.Tensor:
    """One input as a float tensor [3, H, W] or [N, 3, H, W] in [-1, 1] (or uint8, see images_to_tensors)."""
    if isinstance(item, (Image.Image, str, os.PathLike, bytes, bytearray, memoryview)):
        name = os.fspath(item) if isinstance(item, (str, os.PathLike)) else label
        pixels = np.array(open_image(item, name=name, max_pixels=max_pixels, background=background))
        return _uint8_hwc_to_tensor(pixels, keep_uint8)
    if isinstance(item, np.ndarray):
        return _array_to_tensor(item, label, max_pixels, background, keep_uint8)
    if isinstance(item, torch.Tensor):
        return _tensor_to_tensor(item, label, max_pixels, keep_uint8)
    raise InvalidInputError(
        f"{label}: unsupported image type {type(item).__name__} (expected PIL image, path, bytes, "
        "uint8 array or tensor)",
        field="images",
    )


def _array_to_tensor(array: np.ndarray, label: str, max_pixels: int, background: tuple[int, int, int],
                     keep_uint8: bool = False) -> torch.Tensor:
    if array.dtype != np.uint8:
        raise InvalidInputError(
            f"{label}: arrays must be uint8 (got {array.dtype}); pass float pixels as a torch tensor in [-1, 1]",
            field="images",
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim not in (3, 4):
        raise InvalidInputError(f"{label}: expected HW, HWC or NHWC, got shape {array.shape}", field="images")
    height, width, channels = array.shape[-3:]
    check_pixel_limit(width, height, max_pixels, label)
    if channels == 1:
        array = np.repeat(array, 3, axis=-1)
    elif channels == 4:
        array = _composite(array, background)
    elif channels != 3:
        raise InvalidInputError(f"{label}: expected 1, 3 or 4 channels last, got shape {array.shape}", field="images")
    array = np.ascontiguousarray(array)
    tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    return _uint8_hwc_to_tensor(tensor, keep_uint8)


def _composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    blended = rgba[..., :3].astype(np.float32) * alpha + np.asarray(background, np.float32) * (1.0 - alpha)
    return np.rint(blended).astype(np.uint8)


def _tensor_to_tensor(tensor: torch.Tensor, label: str, max_pixels: int, keep_uint8: bool = False) -> torch.Tensor:
    if tensor.dim() not in (3, 4) or tensor.shape[-3] != 3:
        raise InvalidInputError(f"{label}: expected a CHW or NCHW tensor with 3 channels, got {tuple(tensor.shape)}",
                                field="images")
    check_pixel_limit(tensor.shape[-1], tensor.shape[-2], max_pixels, label)
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.uint8:
        return tensor if keep_uint8 else tensor.float().div_(127.5).sub_(1.0)
    if not tensor.is_floating_point():
        raise InvalidInputError(f"{label}: tensors must be uint8 or floating point, got {tensor.dtype}", field="images")
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise InvalidImageError(label, "tensor holds NaN or infinite values", field="images")
    return tensor


def _uint8_hwc_to_tensor(pixels: np.ndarray | torch.Tensor, keep_uint8: bool = False) -> torch.Tensor:
    tensor = torch.as_tensor(pixels)
    tensor = tensor.movedim(-1, -3)  # HWC -> CHW, NHWC -> NCHW
    return tensor if keep_uint8 else tensor.float().div_(127.5).sub_(1.0)


def tensor_to_uint8(image: torch.Tensor) -> np.ndarray:
    """A [3, H, W] float tensor in [-1, 1] (or uint8 pixels, rounded already) as an HWC uint8 array
    (diffusers' rounding)."""
    if image.dtype == torch.uint8:
        return image.permute(1, 2, 0).contiguous().numpy()
    scaled = ((image.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round_()
    return scaled.to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def format_images(images: Sequence[torch.Tensor], form: Form, output: OutputKind) -> Any:
    """Shape decoded [3, H, W] float tensors as the caller asked (`output`) in the caller's form."""
    output = normalise(output)
    if output not in OUTPUT_KINDS:
        raise InvalidInputError(f"output must be one of {', '.join(OUTPUT_KINDS)}, got {output!r}", field="output")
    if output == "tensor":
        items: list[Any] = [image.float() for image in images]
    else:
        items = [tensor_to_uint8(image) for image in images]
        if output == "pil":
            items = [Image.fromarray(item) for item in items]
    if form == "single":
        return items[0]
    if form == "batch" and output != "pil" and len({tuple(item.shape) for item in items}) == 1:
        return torch.stack(items) if output == "tensor" else np.stack(items)
    return items


def latents_to_tensors(latents: Any, channels: int) -> Items:
    """Accept a latent tensor or float array [C, h, w] / [N, C, h, w], or a list of [C, h, w]."""
    if isinstance(latents, (list, tuple)):
        if not latents:
            raise InvalidInputError("no latents given", field="latents")
        tensors = [_one_latent(item, f"latents[{index}]", channels, 3) for index, item in enumerate(latents)]
        return Items(tensors, "list")
    tensor = _one_latent(latents, "latents", channels, None)
    if tensor.dim() == 4:
        if tensor.shape[0] == 0:
            raise InvalidInputError("empty batch of latents", field="latents")
        return Items(list(tensor.unbind(0)), "batch")
    return Items([tensor], "single")


def _one_latent(item: Any, label: str, channels: int, required_dim: int | None) -> torch.Tensor:
    if isinstance(item, np.ndarray):
        if not np.issubdtype(item.dtype, np.floating):
            raise InvalidInputError(f"{label}: latents must be floating point, got {item.dtype}", field="latents")
        item = torch.from_numpy(np.ascontiguousarray(item))
    if not isinstance(item, torch.Tensor) or not item.is_floating_point():
        raise InvalidInputError(f"{label}: latents must be a float tensor or array", field="latents")
    allowed = (required_dim,) if required_dim else (3, 4)
    if item.dim() not in allowed:
        raise InvalidInputError(f"{label}: expected {' or '.join(f'{d}-D' for d in allowed)} latents, got shape "
                                f"{tuple(item.shape)}", field="latents")
    if item.shape[-3] != channels:
        raise InvalidInputError(f"{label}: the model has {channels} latent channels, got {item.shape[-3]} "
                                f"(shape {tuple(item.shape)})", field="latents")
    if item.shape[-1] == 0 or item.shape[-2] == 0:
        raise InvalidInputError(f"{label}: empty spatial size {tuple(item.shape)}", field="latents")
    item = item.detach().cpu().float()
    if not torch.isfinite(item).all():
        raise InvalidInputError(f"{label}: latents hold NaN or infinite values", field="latents")
    return item


def format_latents(latents: Sequence[torch.Tensor], form: Form) -> torch.Tensor | list[torch.Tensor]:
    """[C, h, w] latents in the caller's form: one tensor, a stacked batch, or a list."""
    if form == "single":
        return latents[0]
    if form == "batch":
        return torch.stack(list(latents))
    return list(latents)
