"""`latentd eval-rd`: rate-distortion of latent storage formats against JPEG/WebP/AVIF and published results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError, add_entropy_model_arg, add_model_args,
                     add_server_args, one_line)

DEFAULT_OUT = Path("out/eval-rd")
ENTROPY_STEPS = (0.0625, 0.078125, 0.09375, 0.125, 0.25, 0.5, 1.0)  # units (4 to 64 fine bins): about 0.07 to 0.27 bpp on Kodak


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from latentd.archive.quantize import FORMAT_NAMES
    from latentd.evaluate.rd import CLASSIC_CODECS, DEFAULT_QUALITIES

    parser = subparsers.add_parser(
        "eval-rd", help="rate-distortion: latent formats vs JPEG/WebP/AVIF and published codecs",
        description="Encode every image once, store the latents in each --formats format, decode and measure "
                    "bits per pixel (stored bytes incl. scales), PSNR and MS-SSIM (means of per-image values, as "
                    "CompressAI); do the same for Pillow's classic codecs at --qualities; add published points "
                    "from --reference. Writes rd.csv, rd.md and rd.png to -o.")
    parser.add_argument("--images", nargs="+", type=Path, required=True, metavar="PATH",
                        help="image files or folders, searched recursively (`make eval-rd`: Kodak)")
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--formats", nargs="*", choices=FORMAT_NAMES, default=None,
                        help="latent storage formats; none skips the model (default: all; entropy and vq only "
                             "where the model has an entropy model for them)")
    parser.add_argument("--entropy-steps", nargs="+", type=float, default=list(ENTROPY_STEPS), metavar="S",
                        help="steps of the entropy format, in the entropy model's units (default: %(default)s)")
    add_entropy_model_arg(parser)
    parser.add_argument("--classic", nargs="*", choices=tuple(CLASSIC_CODECS), default=list(CLASSIC_CODECS),
                        help="Pillow codecs to compare; none skips them (default: all this Pillow can write)")
    parser.add_argument("--qualities", nargs="+", type=int, default=list(DEFAULT_QUALITIES), metavar="Q",
                        help="qualities for the classic codecs (default: %(default)s)")
    parser.add_argument("--reference", type=Path, metavar="CSV",
                        help="published points to plot beside the measured ones, a CSV with the columns "
                             "file,name,bpp,psnr_rgb,ms_ssim_rgb (`make eval-rd`: CompressAI's Kodak results)")
    add_model_args(parser)
    add_server_args(parser)
    parser.set_defaults(run=run)


def load_images(sources: list[Path], max_pixels: int) -> tuple[list[Path], list, int]:
    """(loaded paths, uint8 HWC arrays, failures); a bad file is reported on stderr and skipped."""
    import numpy as np

    from latentd.v1.errors import LatentdError
    from latentd.vae.imageio import open_image

    paths, images, failed = [], [], 0
    for source in sources:
        try:
            images.append(np.array(open_image(source, max_pixels=max_pixels)))
            paths.append(source)
        except (LatentdError, OSError) as exc:
            print(f"{source}: FAILED: {one_line(exc)}", file=sys.stderr)
            failed += 1
    return paths, images, failed


def run(args: argparse.Namespace) -> int:
    from latentd.evaluate.rd import classic_points, latent_points, reference_points, write_outputs
    from latentd.vae.imageio import DEFAULT_MAX_PIXELS, find_image_files

    sources = find_image_files(args.images)
    if not sources:
        raise CommandError(f"no images found in {' '.join(map(str, args.images))}", EXIT_USAGE)
    # The model only when latent formats are asked for: a classic-only run needs neither torch nor a server.
    backend = None
    implicit = args.formats is None
    if implicit:
        from latentd.archive.quantize import FORMAT_NAMES

        args.formats = list(FORMAT_NAMES)
    if args.formats:
        from .common import backend_from_args

        backend = backend_from_args(args)
    paths, images, failed = load_images(sources, backend.max_pixels if backend else DEFAULT_MAX_PIXELS)
    if not images:
        raise CommandError(f"none of the {len(sources)} images could be read", EXIT_FAILED)

    rejected: list[int] = []

    def report(index: int, exc: Exception) -> None:
        from latentd.v1.errors import LatentdError

        if not isinstance(exc, (LatentdError, OSError)):
            raise exc  # a bug, not a bad image
        rejected.append(index)
        print(f"{paths[index]}: FAILED: {one_line(exc)}", file=sys.stderr)

    points, notes = [], []
    if backend is not None:
        points += latent_points(backend, images, _formats(args, backend, implicit, notes), tiling=args.tiling,
                                on_error=report)
    # Every codec averages over the same images: those the model rejected are left out of the classic ones too.
    images = [image for index, image in enumerate(images) if index not in rejected]
    failed += len(rejected)
    if not images:
        raise CommandError(f"none of the {len(sources)} images could be measured", EXIT_FAILED)
    classic = classic_points(images, args.classic, args.qualities)
    points += classic.points
    notes += classic.notes
    if args.reference is not None:
        reference = reference_points(args.reference)
        points += reference.points
        notes += reference.notes
    outputs = write_outputs(points, args.out, notes)
    print(outputs.markdown.read_text(), end="")
    print(f"\nmeasured on {len(images)} of {len(sources)} images" + (f" ({failed} failed)" if failed else "")
          + (f"; model {backend.name} on {backend.where}" if backend else ""))
    written = [outputs.csv, outputs.markdown] + ([outputs.plot] if outputs.plot else [])
    print("wrote " + ", ".join(map(str, written)))
    return EXIT_OK if not failed else EXIT_FAILED


def _formats(args: argparse.Namespace, backend, implicit: bool, notes: list[str]) -> list:
    """--formats, the entropy format once per --entropy-steps step, vq once; a coded format is left out with a
    note when --formats was not given and the model has no entropy model for it (or no codebook)."""
    from latentd.archive.quantize import entropy_format, get_format

    from .entropy_args import entropy_coder

    formats = []
    for name in args.formats:
        if not get_format(name).entropy:
            formats.append(get_format(name))
            continue
        steps = args.entropy_steps if name == "entropy" else [None]
        try:
            formats += [entropy_format(entropy_coder(args.entropy_model, step, backend, name, args.model))
                        for step in steps]
        except CommandError as exc:
            if not implicit or args.entropy_model is not None:
                raise
            notes.append(f"{name} format skipped: {exc}")
    return formats
