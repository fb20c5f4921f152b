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

    def with_side(self, side: int) -> "SizePolicy":
        """The same kind of policy at another side S (`--sizes`: center-crop:S or buckets:S per size)."""
        if self.kind not in ("center-crop", "buckets"):
            raise ValueError(f"size policy {self}: several sizes need center-crop:S or buckets:S")
        return SizePolicy(self.kind, side, side)

    def plan(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """What `apply` does to a (width, height) image: (target (w, h), the size it is scaled to before
        cropping (w, h), the crop's (top, left) in that scaled image). The crop is SDXL's
        `crop_coords_top_left`; (0, 0) for native and resize, which crop nothing."""
        target = self.target(width, height)
        if self.kind in ("native", "resize"):
            return target, target, (0, 0)
        # center-crop and buckets: scale to cover the target, then crop the middle
        scale = max(target[0] / width, target[1] / height)
        covered = (max(target[0], round(width * scale)), max(target[1], round(height * scale)))
        return target, covered, ((covered[1] - target[1]) // 2, (covered[0] - target[0]) // 2)

    def apply(self, image: Image.Image) -> Image.Image:
        return self.apply_with_crop(image)[0]

    def apply_with_crop(self, image: Image.Image) -> tuple[Image.Image, tuple[int, int]]:
        """The sized image and the (top, left) of its crop (see `plan`)."""
        if self.kind == "native":
            return image, (0, 0)
        (width, height), covered, (top, left) = self.plan(*image.size)
        if self.kind == "resize":
            return image.resize((width, height), Image.Resampling.LANCZOS), (0, 0)
        covered_image = image.resize(covered, Image.Resampling.LANCZOS)
        return covered_image.crop((left, top, left + width, top + height)), (top, left)
