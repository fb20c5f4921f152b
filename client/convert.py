"""Caller inputs (paths, bytes, PIL, numpy, torch) -> Image/Latents messages, and replies -> the caller's kind."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np

from latentd.v1 import latentd_pb2 as pb

from latentd.v1.outputs import OUTPUT_KINDS, normalise
from latentd.v1.tensors import from_tensor, to_tensor

from .errors import InvalidInputError

Form = Literal["single", "list", "batch"]


@dataclass(frozen=True)
class Prepared:
    """Messages for the items of a call, and the form the caller gave them in (to answer in kind)."""

    messages: list[Any]
    form: Form


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _numpy(value: Any) -> np.ndarray:
    """torch tensors (any device) become numpy arrays without this module importing torch."""
    if _is_torch(value):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _image_message(item: Any, label: str) -> pb.Image:
    if isinstance(item, (bytes, bytearray, memoryview)):
        if not len(item):
            raise InvalidInputError(f"{label}: empty bytes")
        return pb.Image(encoded=bytes(item))
    if isinstance(item, (str, os.PathLike)):
        try:
            with open(item, "rb") as handle:
                return pb.Image(encoded=handle.read())
        except OSError as exc:
            raise InvalidInputError(f"{label}: cannot read {os.fspath(item)!r}: {exc.strerror or exc}") from None
    if type(item).__module__.startswith("PIL."):
        return pb.Image(pixels=to_tensor(np.asarray(item.convert("RGB"))))
    array = _numpy(item)
    if array.dtype == np.uint8:
        if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
            array = array.transpose(1, 2, 0)  # CHW -> HWC
        if array.ndim != 3 or array.shape[-1] != 3:
            raise InvalidInputError(f"{label}: uint8 images must be HWC (or CHW) RGB, got shape {array.shape}")
        return pb.Image(pixels=to_tensor(array))
    if np.issubdtype(array.dtype, np.floating):
        if array.ndim != 3 or array.shape[0] != 3:
            raise InvalidInputError(f"{label}: float images must be CHW RGB in [-1, 1], got shape {array.shape}")
        # float16 travels as it is (half the bytes; the server reads it as float32), other floats as float32.
        return pb.Image(pixels=to_tensor(array.astype(np.float16 if array.dtype == np.float16 else np.float32)))
    raise InvalidInputError(f"{label}: unsupported image {type(item).__name__} of dtype {array.dtype}")


def _split_batch(array: np.ndarray) -> list[np.ndarray] | None:
    """NHWC uint8 or NCHW (uint8 or float) batches as a list of images; None if not a batch."""
    if array.ndim != 4:
        return None
    if array.dtype == np.uint8 and array.shape[-1] != 3 and array.shape[1] == 3:
        array = array.transpose(0, 2, 3, 1)
    return list(array)


def prepare_images(images: Any) -> Prepared:
    """One image, a list of images, or a 4-D batch (NHWC uint8, NCHW uint8 or float in [-1, 1])."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise InvalidInputError("images: empty list")
        return Prepared([_image_message(item, f"images[{i}]") for i, item in enumerate(images)], "list")
    if isinstance(images, np.ndarray) or _is_torch(images):
        array = _numpy(images)
        batch = _split_batch(array)
        if batch is not None:
            if not batch:
                raise InvalidInputError("images: empty batch")
            return Prepared([_image_message(item, f"images[{i}]") for i, item in enumerate(batch)], "batch")
        return Prepared([_image_message(array, "images")], "single")
    return Prepared([_image_message(images, "images")], "single")


def _integers(array: np.ndarray) -> bool:
    return bool(np.issubdtype(array.dtype, np.integer))


def prepare_latents(latents: Any, sizes: Any = None, *, packed: bool = False) -> Prepared:
    """[C, h, w] or [N, C, h, w] float arrays/tensors, or a list of [C, h, w]; optional crop sizes,
    one (height, width) for all items or one per item. `packed`: FLUX.1's [tokens, C * 4] per item
    ([N, tokens, C * 4] a batch), with the image sizes required. Integer arrays are a VQ model's
    codebook indices, [h, w] per item ([N, h, w] a batch), sent as INT32."""
    if isinstance(latents, (list, tuple)):
        arrays, form = [_numpy(item) for item in latents], "list"
    else:
        array = _numpy(latents)
        rank = 2 if packed or _integers(array) else 3
        arrays, form = (list(array), "batch") if array.ndim == rank + 1 else ([array], "single")
    if not arrays:
        raise InvalidInputError("latents: nothing to decode")
    if packed and sizes is None:
        raise InvalidInputError("sizes: packed latents need each image's (height, width) to unpack them")
    if sizes is None:
        crop = [(0, 0)] * len(arrays)
    elif len(sizes) == 2 and all(isinstance(v, (int, np.integer)) for v in sizes):
        crop = [tuple(sizes)] * len(arrays)
    else:
        crop = [tuple(size) for size in sizes]
        if len(crop) != len(arrays):
            raise InvalidInputError(f"sizes: {len(crop)} sizes for {len(arrays)} latents")
    messages = []
    for index, (array, (height, width)) in enumerate(zip(arrays, crop)):
        if _integers(array) and not packed:
            messages.append(pb.Latents(latents=_indices_tensor(array, index), height=int(height), width=int(width)))
            continue
        rank = 2 if packed else 3
        if not np.issubdtype(array.dtype, np.floating) or array.ndim != rank:
            expected = "[tokens, C * 4] (packed)" if packed else "[C, h, w]"
            raise InvalidInputError(f"latents[{index}]: expected a float {expected} array, got {array.dtype} "
                                    f"{array.shape}")
        wire = "float16" if array.dtype == np.float16 else "float32"
        messages.append(pb.Latents(latents=to_tensor(array, wire), height=int(height), width=int(width)))
    return Prepared(messages, form)


def _indices_tensor(array: np.ndarray, index: int) -> pb.Tensor:
    if array.ndim != 2:
        raise InvalidInputError(f"latents[{index}]: codebook indices must be [h, w], got shape {array.shape}")
    if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
        raise InvalidInputError(f"latents[{index}]: codebook indices beyond the int32 range")
    return to_tensor(array, "int32")


def latents_output(arrays: list[np.ndarray], form: Form, output: str) -> Any:
    output = check_output(output, ("numpy", "tensor"))
    if output == "tensor":
        import torch

        arrays = [torch.from_numpy(array) for array in arrays]
    return _in_form(arrays, form, output)


def image_from_message(image: pb.Image, output: str) -> Any:
    """A decoded Image message as numpy uint8 HWC, PIL, torch float CHW in [-1, 1], or encoded bytes."""
    output = normalise(output)
    if image.WhichOneof("content") == "encoded":
        return image.encoded
    array = from_tensor(image.pixels, "pixels")
    if output == "pil":
        from PIL import Image

        return Image.fromarray(array)
    if output == "tensor":
        import torch

        return torch.from_numpy(array)
    return array


def images_output(images: list[Any], form: Form, output: str) -> Any:
    return _in_form(images, form, normalise(output))


def _in_form(items: list[Any], form: Form, output: str) -> Any:
    if form == "single":
        return items[0]
    if form == "batch" and output != "pil" and not isinstance(items[0], bytes) \
            and len({tuple(item.shape) for item in items}) == 1:
        if output == "tensor":
            import torch

            return torch.stack(items)
        return np.stack(items)
    return list(items)


def check_output(output: str, allowed: Sequence[str] = OUTPUT_KINDS) -> str:
    """`output` in the shared vocabulary (`latentd.v1.outputs`; "torch" is "tensor"), if `allowed`."""
    kind = normalise(output)
    if kind not in allowed:
        raise InvalidInputError(f"output must be one of {', '.join(allowed)}, got {output!r}")
    return kind
