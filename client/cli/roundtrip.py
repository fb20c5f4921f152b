"""`latentd roundtrip IMAGE... -o DIR`: encode and decode images in-process, report PSNR, MS-SSIM and time."""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .common import EXIT_FAILED, EXIT_OK, add_model_args, load_codec_from_args, one_line, write_atomic


@dataclass
class RoundtripRow:
    source: str
    output: str | None = None
    width: int = 0
    height: int = 0
    psnr: float | None = None
    ms_ssim: float | None = None
    encode_ms: float | None = None
    decode_ms: float | None = None
    error: str | None = None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "roundtrip", help="encode and decode images, write reconstructions, print PSNR/MS-SSIM",
        description="Encode and decode each image in-process, write the reconstructions as PNG and print "
                    "PSNR (8-bit RGB), MS-SSIM and timings per image and their means.")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="DIR", help="folder for the PNGs")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    add_model_args(parser)
    parser.set_defaults(run=run)


def _output_name(source: Path, taken: set[str]) -> str:
    name, counter = f"{source.stem}.png", 2
    while name in taken:  # two inputs with one stem (a/x.jpg, b/x.png) keep both results
        name, counter = f"{source.stem}-{counter}.png", counter + 1
    taken.add(name)
    return name


def _roundtrip_one(codec, source: Path, target: Path, tiling: str) -> RoundtripRow:
    import numpy as np
    from PIL import Image

    from latentd.vae import open_image
    from latentd.vae.metrics import ms_ssim, psnr

    row = RoundtripRow(source=str(source))
    original = open_image(source, max_pixels=codec.options.max_pixels, background=codec.options.background)
    row.width, row.height = original.size
    started = time.perf_counter()
    latents = codec.encode(original, tiling=tiling)
    encoded = time.perf_counter()
    reconstruction = codec.decode(latents, sizes=(row.height, row.width), tiling=tiling)
    decoded = time.perf_counter()
    row.encode_ms, row.decode_ms = (encoded - started) * 1e3, (decoded - encoded) * 1e3
    pixels = np.asarray(original)
    row.psnr, row.ms_ssim = psnr(pixels, reconstruction), ms_ssim(pixels, reconstruction)
    buffer = io.BytesIO()
    Image.fromarray(reconstruction).save(buffer, format="PNG")
    write_atomic(target, buffer.getvalue())
    row.output = str(target)
    return row


def run(args: argparse.Namespace) -> int:
    from latentd.vae import LatentdError
    from latentd.vae.metrics import mean_of

    codec = load_codec_from_args(args)
    rows: list[RoundtripRow] = []
    taken: set[str] = set()
    for source in args.images:
        try:
            rows.append(_roundtrip_one(codec, source, args.output / _output_name(source, taken), args.tiling))
        except (LatentdError, OSError) as exc:  # one bad image never stops the others
            rows.append(RoundtripRow(source=str(source), error=one_line(exc)))
        if not args.json:
            _print_row(rows[-1])
    good = [row for row in rows if row.error is None]
    summary = {
        "model": codec.info.name,
        "device": str(codec.placement.device),
        "images": len(rows),
        "failed": len(rows) - len(good),
        "mean_psnr": mean_of([row.psnr for row in good]),
        "mean_ms_ssim": mean_of([row.ms_ssim for row in good]),
        "mean_encode_ms": mean_of([row.encode_ms for row in good]),
        "mean_decode_ms": mean_of([row.decode_ms for row in good]),
    }
    if args.json:
        print(json.dumps({"summary": summary, "images": [asdict(row) for row in rows]}, indent=2))
    else:
        _print_summary(summary)
    return EXIT_OK if not summary["failed"] else EXIT_FAILED


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _print_row(row: RoundtripRow) -> None:
    if row.error:
        print(f"{row.source}: FAILED: {row.error}", file=sys.stderr)
        return
    print(f"{row.source}: {row.width}x{row.height}  PSNR {_fmt(row.psnr, '.2f')} dB  "
          f"MS-SSIM {_fmt(row.ms_ssim, '.4f')}  encode {_fmt(row.encode_ms, '.0f')} ms  "
          f"decode {_fmt(row.decode_ms, '.0f')} ms  -> {row.output}")


def _print_summary(summary: dict) -> None:
    print(f"mean over {summary['images'] - summary['failed']} images ({summary['model']} on {summary['device']}): "
          f"PSNR {_fmt(summary['mean_psnr'], '.2f')} dB  MS-SSIM {_fmt(summary['mean_ms_ssim'], '.4f')}  "
          f"encode {_fmt(summary['mean_encode_ms'], '.0f')} ms  decode {_fmt(summary['mean_decode_ms'], '.0f')} ms"
          + (f"  ({summary['failed']} failed)" if summary["failed"] else ""))
