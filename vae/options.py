"""`CodecOptions` and the names of the codec's modes, without torch: the server's settings and the CLI check
against them before any model loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import InvalidInputError
from .imageio import DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS

Tiling = Literal["auto", "on", "off"]
TILING_MODES: tuple[str, ...] = ("auto", "on", "off")
TILE_NORMS: tuple[str, ...] = ("image", "image-recompute", "tile")
# What `model_calls` counts a tile as under tile_norms="image-recompute": its passes, resumed at its last
# finished block, took 2.0-2.6x the time of one pass per tile (docs/benchmarks.md#tiling).
RECOMPUTED_TILE_WORK = 3
# torch.compile modes; "reduce-overhead" records CUDA graphs, one per input shape: for small fixed shapes.
COMPILE_MODES: tuple[str, ...] = ("off", "default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class CodecOptions:
    """Limits and tiling policy of a codec; all sizes in pixels."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    background: tuple[int, int, int] = DEFAULT_BACKGROUND
    # Pixels per forward pass (images x H x W): bounds activation memory; larger groups are split.
    max_batch_pixels: int = 4 * 512 * 512
    tile_size: int = 512
    tile_overlap: int = 128
    # With tiling="auto", images with a side above this many pixels are tiled.
    tile_threshold: int = 1024
    # GroupNorm statistics of tiles: "tile" (each its own: memory one tile's, seams visible on KL
    # models) or "image" (the whole image's: tiled equals untiled, but every tile's activations are
    # held at once, more memory than an untiled pass; for when an untiled pass fails for another
    # reason than memory, such as a kernel's size limit) or "image-recompute" (the same statistics in
    # one tile's memory, for about twice the compute of "tile" and a layer of activations in a
    # temporary folder: vae/tile_norms.py, vae/tile_resume.py).
    tile_norms: str = "tile"
    optimize: bool = True
    # On CUDA: the share of the device's free memory (when the codec loads) its forward passes may
    # use; it sizes batches and tiles in place of max_batch_pixels, tile_size and tile_threshold
    # (vae/pass_limits.py). 0: those three fields on CUDA too.
    device_memory_fraction: float = 0.8
    # On CUDA: let cuDNN time its convolution algorithms once per input shape and keep the fastest.
    cudnn_benchmark: bool = True
    # On CUDA: float32 matrix products and convolutions (the float32 retry, dtype float32) in TF32.
    tf32: bool = True
    # torch.compile the encoder and decoder (one of COMPILE_MODES); the first call compiles, for any size.
    compile: str = "off"

    def validate(self, factor: int) -> None:
        for name in ("max_pixels", "max_batch_pixels", "tile_size", "tile_threshold"):
            if getattr(self, name) <= 0:
                raise InvalidInputError(f"{name} must be positive", field=name)
        if not 0 <= self.device_memory_fraction <= 1:
            raise InvalidInputError(f"device_memory_fraction must be in [0, 1], got {self.device_memory_fraction}",
                                    field="device_memory_fraction")
        if self.compile not in COMPILE_MODES:
            raise InvalidInputError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}",
                                    field="compile")
        if self.compile != "off" and self.tile_norms != "tile":
            raise InvalidInputError("compile runs with tile_norms='tile' (shared tile statistics synchronise "
                                    "threads inside the model)", field="compile")
        if self.tile_size % factor or self.tile_overlap % factor:
            raise InvalidInputError(f"tile_size and tile_overlap must be multiples of the model's factor {factor}",
                                    field="tile_size")
        if self.tile_norms not in TILE_NORMS:
            raise InvalidInputError(f"tile_norms must be one of {', '.join(TILE_NORMS)}, got {self.tile_norms!r}",
                                    field="tile_norms")
        if not 0 <= self.tile_overlap < self.tile_size:
            raise InvalidInputError("tile_overlap must be in [0, tile_size)", field="tile_overlap")
