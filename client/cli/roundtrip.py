"""`latentd roundtrip IMAGE... -o DIR`: encode and decode images in-process, write PNGs, report quality and time."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from .common import EXIT_FAILED, EXIT_OK, add_model_args, add_refine_arg, add_server_args, backend_from_args
from latentd.evaluate.measure import LATENT_BITS, print_result, print_summary, roundtrip_all, summarize


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "roundtrip", help="encode and decode images, write reconstructions, print PSNR/MS-SSIM",
        description="Encode and decode each image (in-process, or on a server with --server), write the "
                    "reconstructions as PNG and print "
                    "PSNR (8-bit RGB), MS-SSIM, bits per pixel and timings per image and their means.")
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="DIR", help="folder for the PNGs")
    add_measure_args(parser)
    add_model_args(parser)
    add_refine_arg(parser)
    add_server_args(parser)
    parser.set_defaults(run=run)


def add_measure_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--latent-dtype", choices=tuple(LATENT_BITS), default="float16",
                        help="precision the latents are stored in between encode and decode (default: float16)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")


def output_name(source: Path, taken: set[str]) -> str:
    name, counter = f"{source.stem}.png", 2
    while name in taken:  # two inputs with one stem (a/x.jpg, b/x.png) keep both results
        name, counter = f"{source.stem}-{counter}.png", counter + 1
    taken.add(name)
    return name


def run(args: argparse.Namespace) -> int:
    from latentd.vae.fileio import write_atomic
    from latentd.vae.imageio import encode_image

    backend = backend_from_args(args)
    results, taken = [], set()
    for result, _, reconstruction in roundtrip_all(backend, args.images, latent_dtype=args.latent_dtype,
                                                   tiling=args.tiling):
        if reconstruction is not None:
            target = args.output / output_name(Path(result.source), taken)
            write_atomic(target, encode_image(reconstruction))
            result.output = str(target)
        results.append(result)
        if not args.json:
            print_result(result)
    summary = summarize(results, backend)
    if args.json:
        print(json.dumps({"summary": summary, "images": [asdict(r) for r in results]}, indent=2))
    else:
        print_summary(summary)
        written = sum(result.output is not None for result in results)
        print(f"wrote {written} reconstruction{'s' * (written != 1)} to {args.output}")
    return EXIT_OK if not summary["failed"] else EXIT_FAILED
