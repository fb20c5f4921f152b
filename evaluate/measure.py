"""Round-trip one image through a backend (in-process or server) and measure it: what `roundtrip` and `eval` share."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path


LATENT_BITS = {"float16": 16, "bfloat16": 16, "float32": 32}


@dataclass
class ImageResult:
    source: str
    width: int = 0
    height: int = 0
    psnr: float | None = None
    ms_ssim: float | None = None
    bpp: float | None = None
    encode_ms: float | None = None
    decode_ms: float | None = None
    output: str | None = None
    error: str | None = None


def roundtrip_image(backend, source: Path, *, latent_dtype: str, tiling: str):
    """(ImageResult, original HWC uint8, reconstruction HWC uint8) for one file; bits per pixel count
    every latent value at `latent_dtype` over the original pixels."""
    import numpy as np

    from latentd.vae.imageio import open_image
    from latentd.vae.metrics import ms_ssim_if_available, psnr

    original = np.array(open_image(source, max_pixels=backend.max_pixels))
    height, width = original.shape[:2]
    values, reconstruction, encode_s, decode_s = backend.roundtrip(original, latent_dtype, tiling)
    result = ImageResult(
        source=str(source), width=width, height=height,
        psnr=psnr(original, reconstruction), ms_ssim=ms_ssim_if_available(original, reconstruction),
        bpp=values * LATENT_BITS[latent_dtype] / (height * width),
        encode_ms=encode_s * 1e3, decode_ms=decode_s * 1e3,
    )
    return result, original, reconstruction


def roundtrip_all(backend, sources: list[Path], *, latent_dtype: str, tiling: str):
    """`roundtrip_image` for each source; a bad image yields a failed result and the rest go on."""
    from latentd.v1.errors import LatentdError, one_line  # LatentdError: in process, and the SDK's too

    for source in sources:
        try:
            yield roundtrip_image(backend, source, latent_dtype=latent_dtype, tiling=tiling)
        except (LatentdError, OSError) as exc:
            yield ImageResult(source=str(source), error=one_line(exc)), None, None


def summarize(results: list[ImageResult], backend) -> dict:
    from latentd.vae.metrics import mean_of

    good = [r for r in results if r.error is None]
    return {
        "model": backend.name,
        "device": backend.where,
        "images": len(results),
        "failed": len(results) - len(good),
        **{f"mean_{key}": mean_of([getattr(r, key) for r in good])
           for key in ("psnr", "ms_ssim", "bpp", "encode_ms", "decode_ms")},
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_result(result: ImageResult) -> None:
    if result.error:
        print(f"{result.source}: FAILED: {result.error}", file=sys.stderr)
        return
    print(f"{result.source}: {result.width}x{result.height}  PSNR {_fmt(result.psnr, '.2f')} dB  "
          f"MS-SSIM {_fmt(result.ms_ssim, '.4f')}  {_fmt(result.bpp, '.3f')} bpp  "
          f"encode {_fmt(result.encode_ms, '.0f')} ms  decode {_fmt(result.decode_ms, '.0f')} ms"
          + (f"  -> {result.output}" if result.output else ""))


def print_summary(summary: dict) -> None:
    print(f"mean over {summary['images'] - summary['failed']} images ({summary['model']} on {summary['device']}): "
          f"PSNR {_fmt(summary['mean_psnr'], '.2f')} dB  MS-SSIM {_fmt(summary['mean_ms_ssim'], '.4f')}  "
          f"{_fmt(summary['mean_bpp'], '.3f')} bpp  encode {_fmt(summary['mean_encode_ms'], '.0f')} ms  "
          f"decode {_fmt(summary['mean_decode_ms'], '.0f')} ms"
          + (f"  ({summary['failed']} failed)" if summary["failed"] else ""))
