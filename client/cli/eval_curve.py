"""`latentd eval-curve MODEL... --images DIR`: quality against training steps and the steps projected to a goal."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path

from .common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError, add_device_args, one_line
from .roundtrip import add_measure_args

DEFAULT_OUT = Path("out/eval-curve")


def _steps(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval-curve", help="quality of a model's weights along its training, and the steps to a goal",
        description="Round-trip the images through each model folder (as `latentd eval`), place each at its "
                    "training steps (training_state.json beside the weights, or FOLDER@STEP) plus --step-offset, "
                    "fit each metric against log2(steps) and project the steps at which the fit reaches the "
                    "goals. Writes curve.csv, curve.md and curve.png to -o.")
    parser.add_argument("models", nargs="+", metavar="MODEL[@STEP]",
                        help="model folders (`latentd export` output), each with its step; `make learning-curve` "
                             "passes the default model at every commit that shipped new weights")
    parser.add_argument("--images", nargs="+", type=Path, required=True, metavar="PATH",
                        help="image files or folders (searched recursively)")
    parser.add_argument("--step-offset", type=_steps, default=0, metavar="N",
                        help="steps the weights had before the recorded ones, added to each (the long schedule "
                             "counts from the 12,400 steps before it; default: 0)")
    parser.add_argument("--goal-psnr", type=_finite, metavar="DB", help="project the steps to this PSNR")
    parser.add_argument("--goal-ms-ssim", type=_finite, metavar="V", help="project the steps to this MS-SSIM")
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help=f"output folder (default: {DEFAULT_OUT})")
    add_device_args(parser)
    add_measure_args(parser)
    parser.set_defaults(run=run)


def _placed_models(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(folder, total steps) of each MODEL argument, all checked before any model loads."""
    from latentd.evaluate.curve import parse_model_arg
    from latentd.vae.train.checkpoint import EXPORTED_STATE_FILE, exported_step

    placed = []
    for text in args.models:
        folder, step = parse_model_arg(text)
        if not Path(folder).is_dir():
            raise CommandError(f"{folder}: not a model folder", EXIT_USAGE)
        if step is None:
            if not (Path(folder) / EXPORTED_STATE_FILE).is_file():
                raise CommandError(f"{folder}: no {EXPORTED_STATE_FILE}; give the weights' step as {folder}@STEP",
                                   EXIT_USAGE)
            try:
                step = exported_step(folder)
            except ValueError as exc:
                raise CommandError(str(exc), EXIT_USAGE) from None
        placed.append((folder, args.step_offset + step))
    return placed


def measure(folder: str, steps: int, sources: list[Path], args: argparse.Namespace):
    """(CurvePoint or None, failed images, one-line error or None) for one model folder."""
    from latentd.client.cli.backends import LocalBackend
    from latentd.evaluate.curve import CurvePoint
    from latentd.evaluate.measure import roundtrip_all, summarize
    from latentd.vae import load_codec

    try:
        backend = LocalBackend(load_codec(folder, device=args.device, dtype=args.dtype))
    except Exception as exc:  # a broken folder fails its own point, the others are still measured
        return None, 0, one_line(exc)
    results = [result for result, _, _ in roundtrip_all(backend, sources, latent_dtype=args.latent_dtype,
                                                        tiling="auto")]
    summary = summarize(results, backend)
    if summary["mean_psnr"] is None:
        return None, summary["failed"], "no image could be measured"
    point = CurvePoint(model=folder, steps=steps, psnr=summary["mean_psnr"], ms_ssim=summary["mean_ms_ssim"],
                       images=summary["images"] - summary["failed"])
    return point, summary["failed"], None


def run(args: argparse.Namespace) -> int:
    from latentd.evaluate.curve import build_curve, markdown_table, write_outputs
    from latentd.vae.imageio import find_image_files

    placed = _placed_models(args)
    sources = find_image_files(args.images)
    if not sources:
        raise CommandError(f"no images found in {' '.join(map(str, args.images))}", EXIT_USAGE)
    points, failures = [], []
    for folder, steps in placed:
        point, failed_images, error = measure(folder, steps, sources, args)
        if error:
            failures.append(f"{folder}: {error}")
            if not args.json:
                print(f"{folder}: FAILED: {error}")
            continue
        points.append(point)
        if failed_images:
            failures.append(f"{folder}: {failed_images} of {len(sources)} images failed")
        if not args.json:
            ms_ssim = "-" if point.ms_ssim is None else f"{point.ms_ssim:.4f}"
            print(f"{folder}: {steps:,} steps  PSNR {point.psnr:.2f} dB  MS-SSIM {ms_ssim}  "
                  f"({point.images} images)")
    goals = {metric: goal for metric, goal in (("psnr", args.goal_psnr), ("ms_ssim", args.goal_ms_ssim))
             if goal is not None}
    curve = build_curve(points, goals)
    written = write_outputs(curve, args.out)
    if args.json:
        print(json.dumps({"points": [asdict(p) for p in curve.points], "fits": {k: asdict(v) for k, v in
                          curve.fits.items()}, "goals": curve.goals, "failures": failures,
                          "outputs": {k: None if v is None else str(v) for k, v in written.items()}}, indent=2))
    else:
        print(markdown_table(curve), end="")
        if not curve.fits:
            print("no fit: it needs two or more models at different steps")
        print(f"wrote {', '.join(str(path) for path in written.values() if path is not None)}")
    return EXIT_FAILED if failures else EXIT_OK
