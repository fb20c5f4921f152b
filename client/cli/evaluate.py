"""`latentd eval --model M --images DIR`: PSNR, MS-SSIM, bits per pixel and timings over an image set."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from .common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    add_model_args, add_refine_arg,
    add_server_args,
    backend_from_args,
)
from latentd.evaluate.measure import print_result, print_summary, roundtrip_all, summarize
from .roundtrip import add_measure_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="measure reconstruction quality and speed on an image set",
        description="Round-trip every image (latents stored at --latent-dtype) and report per-image and mean "
                    "PSNR (8-bit RGB, mean of per-image values as CompressAI), MS-SSIM, bits per pixel of "
                    "the latents, and encode/decode time.")
    parser.add_argument("--images", nargs="+", type=Path, required=True, metavar="PATH",
                        help="image files or folders (searched recursively)")
    parser.add_argument("--grid", type=Path, metavar="PNG",
                        help="write a sheet of full-resolution centre crops, each original beside its "
                             "reconstruction, labelled with the image's PSNR")
    parser.add_argument("--grid-images", type=int, default=8, help="images on the sheet (default: 8)")
    parser.add_argument("--grid-crop", type=int, default=256, metavar="PX",
                        help="side of each crop on the sheet, in pixels (default: 256)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed round trips of the first image before measuring (default: 1)")
    add_measure_args(parser)
    add_model_args(parser)
    add_refine_arg(parser)
    add_server_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from latentd.vae.fileio import write_atomic
    from latentd.vae.imageio import find_image_files

    if args.grid_crop < 1:
        raise CommandError("--grid-crop must be at least 1", EXIT_USAGE)
    sources = find_image_files(args.images)
    if not sources:
        raise CommandError(f"no images found in {' '.join(map(str, args.images))}", EXIT_USAGE)
    backend = backend_from_args(args)
    for _ in range(max(args.warmup, 0)):  # first calls pay for allocations and kernel selection
        next(roundtrip_all(backend, sources[:1], latent_dtype=args.latent_dtype, tiling=args.tiling))
    results, originals, reconstructions, labels = [], [], [], []
    for result, original, reconstruction in roundtrip_all(backend, sources, latent_dtype=args.latent_dtype,
                                                          tiling=args.tiling):
        results.append(result)
        if reconstruction is not None and len(originals) < args.grid_images:
            originals.append(original)
            reconstructions.append(reconstruction)
            labels.append(f"{Path(result.source).name}  PSNR {result.psnr:.2f} dB")
        if not args.json:
            print_result(result)
    summary = summarize(results, backend)
    if args.grid and originals:
        from latentd.evaluate.grid import crop_sheet
        from latentd.vae.imageio import encode_image

        write_atomic(args.grid, encode_image(crop_sheet(originals, reconstructions, labels, args.grid_crop)))
        summary["grid"] = str(args.grid)
    if args.json:
        print(json.dumps({"summary": summary, "images": [asdict(r) for r in results]}, indent=2))
    else:
        print_summary(summary)
        if args.grid and originals:
            print(f"wrote {args.grid}")
    return EXIT_OK if not summary["failed"] else EXIT_FAILED
