"""Size policies: keep the native size (the codec pads to its factor), resize, center-crop, or aspect buckets."""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image

_RESIZE = re.compile(r"^resize:(\d+)x(\d+)$")
_SQUARE = re.compile(r"^(center-crop|buckets):(\d+)$")


@dataclass(frozen=True)
class SizePolicy:
    """`native`, `resize:WxH`, `center-crop:S` (S x S), or `buckets:S` (sides multiples of 64 with about
    S x S pixels, the bucket closest to the image's aspect ratio, as training-cache tools do)."""

    kind: str
    width: int = 0
    height: int = 0

    @classmethod
    def parse(cls, text: str) -> "SizePolicy":
        if text == "native":
            return cls("native")
        if match := _RESIZE.match(text):
            return cls("resize", int(match.group(1)), int(match.group(2)))
        if match := _SQUARE.match(text):
            side = int(match.group(2))
            return cls(match.group(1), side, side)
        raise ValueError(f"size policy {text!r}: expected native, resize:WxH, center-crop:S or buckets:S")

    def __post_init__(self) -> None:
        if self.kind != "native" and (self.width < 8 or self.height < 8):
            raise ValueError("size policy sides must be at least 8 pixels")

    def __str__(self) -> str:
        if self.kind == "native":
            return "native"
        if self.kind == "resize":
            return f"resize:{self.width}x{self.height}"
        return f"{self.kind}:{self.width}"

    def buckets(self) -> list[tuple[int, int]]:
        area = self.width * self.height
        sizes = set()
        for width in range(64, 4 * self.width + 1, 64):
            height = max(64, round(area / width / 64) * 64)
            if 0.25 <= width / height <= 4:
                sizes.add((width, height))
        return sorted(sizes)

    def target(self, width: int, height: int) -> tuple[int, int]:
        if self.kind == "native":
            return width, height
        if self.kind == "buckets":
            aspect = width / height
            return min(self.buckets(), key=lambda size: abs(size[0] / size[1] - aspect))
        return self.width, self.height

    def apply(self, image: Image.Image) -> Image.Image:
        if self.kind == "native":
            return image
        width, height = self.target(*image.size)
        if self.kind == "resize":
            return image.resize((width, height), Image.Resampling.LANCZOS)
        # center-crop and buckets: scale to cover the target, then crop the middle
        scale = max(width / image.width, height / image.height)
        covered = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                               Image.Resampling.LANCZOS)
        left, top = (covered.width - width) // 2, (covered.height - height) // 2
        return covered.crop((left, top, left + width, top + height))
