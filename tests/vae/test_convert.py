"""Input kinds the codec accepts and output forms it returns."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from latentd.vae import InvalidImageError, InvalidInputError
from latentd.vae.convert import format_images, images_to_tensors, tensor_to_uint8


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_input_kind_gives_the_same_tensor(tmp_path, image):
    path = tmp_path / "x.png"
    Image.fromarray(image).save(path)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    kinds = [image, Image.fromarray(image), path, str(path), _png(image), chw, chw.float() / 127.5 - 1]
    expected = images_to_tensors(image).tensors[0]
    assert expected.shape == (3, 48, 64) and expected.min() >= -1 and expected.max() <= 1
    for kind in kinds:
        items = images_to_tensors(kind)
        assert items.form == "single"
        torch.testing.assert_close(items.tensors[0], expected)


def test_forms():
    batch = np.zeros((3, 8, 8, 3), np.uint8)
    assert images_to_tensors(batch).form == "batch" and len(images_to_tensors(batch).tensors) == 3
    assert images_to_tensors(torch.zeros(2, 3, 8, 8)).form == "batch"
    assert images_to_tensors([batch[0], batch[1]]).form == "list"


def test_grey_and_rgba_arrays():
    grey = images_to_tensors(np.full((4, 4), 255, np.uint8)).tensors[0]
    assert grey.shape == (3, 4, 4) and torch.all(grey == 1)
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black over the white background
    assert torch.all(images_to_tensors(rgba).tensors[0] == 1)


@pytest.mark.parametrize(
    "bad, words",
    [
        (np.zeros((4, 4, 3), np.float32), "must be uint8"),
        (np.zeros((4, 4, 5), np.uint8), "channels"),
        (np.zeros((2, 2, 4, 4, 3), np.uint8), "HW, HWC or NHWC"),
        (torch.zeros(4, 8, 8), "3 channels"),
        (torch.zeros(3, 8, 8, dtype=torch.int64), "uint8 or floating"),
        ([], "no images"),
        ([np.zeros((2, 4, 4, 3), np.uint8)], "not batches"),
        (42, "unsupported image type"),
        (torch.zeros(0, 3, 8, 8), "empty batch"),
    ],
)
def test_bad_inputs(bad, words):
    with pytest.raises(InvalidInputError, match=words) as caught:
        images_to_tensors(bad)
    assert caught.value.field == "images"


def test_nan_pixels_and_pixel_limit():
    with pytest.raises(InvalidImageError, match="NaN"):
        images_to_tensors(torch.full((3, 4, 4), float("nan")))
    with pytest.raises(InvalidImageError, match="exceeds"):
        images_to_tensors(np.zeros((10, 10, 3), np.uint8), max_pixels=99)
    with pytest.raises(InvalidImageError, match="empty image"):
        images_to_tensors(np.zeros((0, 10, 3), np.uint8))


def test_list_items_are_named_in_errors(image):
    with pytest.raises(InvalidImageError, match=r"images\[1\]"):
        images_to_tensors([image, b"garbage"])


def test_outputs():
    images = [torch.zeros(3, 4, 6), torch.ones(3, 4, 6)]
    assert format_images(images, "batch", "numpy").shape == (2, 4, 6, 3)
    assert isinstance(format_images(images, "batch", "pil")[0], Image.Image)
    assert format_images(images[:1], "single", "tensor").shape == (3, 4, 6)
    mixed = format_images([torch.zeros(3, 4, 6), torch.zeros(3, 2, 2)], "batch", "numpy")
    assert isinstance(mixed, list)
    with pytest.raises(InvalidInputError, match="output"):
        format_images(images, "list", "jpeg")


def test_uint8_rounding_round_trips_exactly():
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    assert np.array_equal(tensor_to_uint8(images_to_tensors(pixels).tensors[0]), pixels)
