"""`latentd bench tiling`: tiled against untiled encode and decode, latentd's and diffusers' tilers on the same
weights, each run in a fresh process so that its peak memory is its own."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch

# What each row runs, by the name `--methods` takes: latentd with each tile's own GroupNorm statistics
# (its default), latentd with the image's (tile_norms="image": tiles side by side; "image-recompute":
# one tile at a time, rerun per layer), and diffusers' `enable_tiling()` on an unmodified copy of the
# same weights. Each: the row's label, the library, the latentd tile_norms it runs with.
METHODS: dict[str, tuple[str, str, str]] = {
    "tile": ("latentd, tile norms", "latentd", "tile"),
    "image": ("latentd, image norms", "latentd", "image"),
    "image-recompute": ("latentd, image norms recomputed", "latentd", "image-recompute"),
    "diffusers": ("diffusers", "diffusers", "tile"),
}


@dataclass
class TilingRow:
    size: int
    operation: str  # encode or decode
    method: str  # one of METHODS, or "untiled" for the reference itself
    psnr_vs_untiled: float | None  # of the method's own untiled pass (decode: pixels, encode: latents over their range)
    ms: float
    peak_mb: float  # the process's peak resident memory above what it held with the model loaded


@dataclass
class TilingBenchResult:
    model: str
    tile_size: int
    tile_overlap: int
    rows: list[TilingRow] = field(default_factory=list)


def bench_tiling(model: str = "default", *, sizes: tuple[int, ...] = (1024, 2048), tile_size: int = 512,
                 tile_overlap: int = 128, operations: tuple[str, ...] = ("decode", "encode"),
                 image: str | None = None, untiled: bool = True, seed: int = 0,
                 methods: tuple[str, ...] = tuple(METHODS)) -> TilingBenchResult:
    """For each size and operation: the untiled pass of latentd and of diffusers, then each tiler, every
    one in a process of its own (model loaded, input given, one untimed warm-up on a small input)."""
    result = TilingBenchResult(model, tile_size, tile_overlap)
    spawn = multiprocessing.get_context("spawn")
    for size in sizes:
        pixels = _bench_pixels(image, size, seed)
        latents = _in_child(spawn, _image_latents, model, seed, tile_size, tile_overlap, pixels)
        for operation in operations:
            given = latents if operation == "decode" else pixels
            references: dict[str, np.ndarray | None] = {}
            for library in dict.fromkeys(METHODS[method][1] for method in methods):
                if untiled:
                    ms, peak, out = _in_child(spawn, _measure, model, seed, tile_size, tile_overlap, library, "off",
                                              operation, given)
                    references[library] = out
                    result.rows.append(TilingRow(size, operation, f"untiled ({library})", None, ms, peak))
            for method in methods:
                label, library, norms = METHODS[method]
                ms, peak, out = _in_child(spawn, _measure, model, seed, tile_size, tile_overlap, library, norms,
                                          operation, given)
                reference = references.get(library)
                result.rows.append(TilingRow(size, operation, label,
                                             None if reference is None else _psnr(out, reference), ms, peak))
    return result


def _in_child(spawn, fn, *args):
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(fn, *args).result()


def _codec(model: str, seed: int, tile_size: int, tile_overlap: int, norms: str):
    """latentd's codec of the bench's model; one image is one model call (or one per tile) at any size."""
    from latentd.vae.codec import Codec, CodecOptions

    from .baseline import load_for_bench

    return Codec(load_for_bench(model, seed), name=model,
                 options=CodecOptions(tile_size=tile_size, tile_overlap=tile_overlap, tile_norms=norms))


def _image_latents(model: str, seed: int, tile_size: int, tile_overlap: int, pixels: np.ndarray) -> np.ndarray:
    """The decode rows' input: the image's scaled latents, encoded tile by tile with the image's statistics
    (recomputed: one tile's memory at any size)."""
    codec = _codec(model, seed, tile_size, tile_overlap, "image-recompute")
    return codec.encode(pixels, tiling="on").numpy()


def _measure(model: str, seed: int, tile_size: int, tile_overlap: int, library: str, tiling: str, operation: str,
             given: np.ndarray) -> tuple[float, float, np.ndarray]:
    """In a fresh process: load, warm up, then one timed pass; (ms, peak MB above the loaded model, output).
    `tiling` is "off", or for latentd the GroupNorm statistics its tiles use (a CodecOptions.tile_norms);
    `given` is uint8 pixels [H, W, 3] to encode or scaled latents [C, h, w] to decode."""
    from .baseline import load_for_bench

    codec = _codec(model, seed, tile_size, tile_overlap, "image" if tiling == "off" else tiling)
    tensor = torch.from_numpy(given)
    with torch.inference_mode():
        codec.decode(codec.encode(np.zeros((64, 64, 3), np.uint8), tiling="off"), tiling="off")  # warm-up
        if library == "diffusers":
            vae = load_for_bench(model, seed).eval()
            if tiling != "off":
                vae.enable_tiling()  # its own blend over tile_overlap_factor of each tile, per-tile statistics
                vae.tile_sample_min_size = tile_size
                vae.tile_latent_min_size = tile_size // codec.factor
                vae.tile_overlap_factor = tile_overlap / tile_size
            image = tensor.permute(2, 0, 1).float()[None] / 127.5 - 1.0 if operation == "encode" else None
            run = (lambda: vae.decode(codec.unscale(tensor)[None]).sample[0]) if operation == "decode" else (
                lambda: vae.encode(image).latent_dist.mean[0])
        else:
            mode = "off" if tiling == "off" else "on"
            run = (lambda: codec.decode(tensor, tiling=mode, output="tensor")) if operation == "decode" else (
                lambda: codec.encode(given, tiling=mode, scaled=False))
        before = _rss_mb()
        started = time.perf_counter()
        out = run()
        ms = (time.perf_counter() - started) * 1e3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return ms, max(peak, 0.0), out.float().numpy()


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def _psnr(out: np.ndarray, reference: np.ndarray) -> float:
    """PSNR over the reference's range (2 for pixels in [-1, 1]; the latents' own range for encode)."""
    if out.shape != reference.shape:
        out = out[..., : reference.shape[-2], : reference.shape[-1]]
    peak = max(float(reference.max() - reference.min()), 1e-12)
    mse = float(np.mean((out.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak * peak / mse)


def _bench_pixels(image: str | None, size: int, seed: int) -> np.ndarray:
    """A size x size uint8 RGB image: the given photo resized, or smooth seeded colour gradients."""
    from PIL import Image

    from latentd.vae.convert import tensor_to_uint8
    from latentd.vae.imageio import open_image

    if image is not None:
        return np.asarray(Image.fromarray(np.asarray(open_image(image))).resize((size, size),
                                                                                 Image.Resampling.LANCZOS))
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 8, 8, generator=generator) * 2 - 1
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return np.asarray(tensor_to_uint8(smooth[0]))
