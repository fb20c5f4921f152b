"""Image decoding: EXIF orientation, every mode to RGB, the pixel limit, one clear error type."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from latentd.vae import ImageTooLargeError, InvalidImageError, open_image
from latentd.vae.imageio import to_rgb


def _encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    opened = open_image(_encoded(image, "JPEG", exif=exif, quality=95))
    assert opened.size == (20, 40)
    top = np.asarray(opened)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the blue band is now on top


def test_transparency_is_composited_on_the_background():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(to_rgb(rgba, background=(0, 10, 20)))[0, 0].tolist() == [0, 10, 20]
    half = Image.new("LA", (2, 2), (0, 128))
    assert np.asarray(to_rgb(half))[0, 0].tolist() == [127, 127, 127]
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([10, 20, 30] * 256)
    palette.info["transparency"] = 0
    assert np.asarray(open_image(_encoded(palette)))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("L", (3, 3), 77), [77, 77, 77]),
        (lambda: Image.new("1", (3, 3), 1), [255, 255, 255]),
        (lambda: Image.new("CMYK", (3, 3), (0, 255, 255, 0)), [255, 0, 0]),
        (lambda: Image.new("YCbCr", (3, 3), (76, 85, 255)), [254, 0, 0]),
        (lambda: Image.fromarray(np.full((3, 3), 65535, np.uint16)), [255, 255, 255]),
        (lambda: Image.fromarray(np.full((3, 3), 32896, np.uint16)), [128, 128, 128]),
        (lambda: Image.fromarray(np.full((3, 3), 200.4, np.float32)), [200, 200, 200]),
        (lambda: Image.new("I", (3, 3), 100), [100, 100, 100]),
    ],
)
def test_modes_become_rgb(make, expected):
    converted = to_rgb(make())
    assert converted.mode == "RGB"
    assert np.asarray(converted)[1, 1].tolist() == pytest.approx(expected, abs=1)


def test_sixteen_bit_png_files_are_scaled():
    data = _encoded(Image.fromarray(np.full((5, 5), 65535, np.uint16)))
    assert np.asarray(open_image(data))[0, 0].tolist() == [255, 255, 255]


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    with pytest.raises(ImageTooLargeError, match="exceeds the limit of 50000") as caught:
        open_image(path, max_pixels=50_000)
    assert str(path) in str(caught.value)
    assert open_image(path, max_pixels=60_000).size == (300, 200)
    with pytest.raises(ImageTooLargeError):
        open_image(Image.new("RGB", (300, 200)), max_pixels=100)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty data"),
        (b"definitely not an image", "not a recognised image format"),
        (_encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")[:200], "corrupt or truncated"),
        (_encoded(Image.new("RGB", (64, 64)), "PNG")[:60], "corrupt or truncated"),
    ],
)
def test_bad_bytes_raise_one_error_type(data, reason):
    with pytest.raises(InvalidImageError, match=reason) as caught:
        open_image(data, name="upload-3")
    assert caught.value.source == "upload-3" and "upload-3" in str(caught.value)


def test_bad_paths_name_the_file(tmp_path):
    with pytest.raises(InvalidImageError, match="no such file"):
        open_image(tmp_path / "missing.png")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(InvalidImageError, match=r"empty\.jpg: empty file"):
        open_image(empty)
    with pytest.raises(InvalidImageError, match="not a recognised"):
        open_image(io.BytesIO(b"plain text"))
