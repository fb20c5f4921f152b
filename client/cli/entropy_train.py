"""`latentd entropy-train --images DIR... -o DIR`: the `entropy` (or `vq`) format's probability model from training latents."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError, add_model_args, add_server_args, one_line


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from latentd.archive.entropy_model import DEFAULT_STEP

    parser = subparsers.add_parser(
        "entropy-train", help="train the entropy model of `--format entropy` (or vq) on a VAE's latents",
        description="Encode every image of --images once (each at its own size), histogram the latents per "
                    "channel (format vq: the codebook indices) and write the entropy model (config.json naming "
                    "the VAE and its scaling, tables.safetensors) to -o. Train on training images only, never "
                    "on the images you "
                    "measure with. Exit codes: 0 written, 1 some images failed (the model is still written "
                    "from the others), 2 bad usage or no image readable.")
    parser.add_argument("--images", nargs="+", type=Path, required=True, metavar="PATH",
                        help="image files or folders, searched recursively")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="DIR",
                        help="entropy model folder to write (the shipped one: vae/weights/<model>/entropy)")
    parser.add_argument("--format", choices=("entropy", "vq"), default=None,
                        help="the format the model codes: entropy (latents) or vq (a VQ model's codebook indices; "
                             "the model then holds the codebook) (default: vq for VQ models, else entropy)")
    parser.add_argument("--default-step", type=float, default=DEFAULT_STEP, metavar="S",
                        help="the step `encode --format entropy` uses unless given --step, in units (default: "
                             f"{DEFAULT_STEP})")
    parser.add_argument("--sensitivity-images", type=int, default=8, metavar="N",
                        help="decode the first N images' latents with noise in one channel at a time to set each "
                             "channel's step unit (docs/compression.md); 0: units are the standard deviations "
                             "(default: 8)")
    add_model_args(parser)
    add_server_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from latentd.archive.entropy_model import EntropyModelConfig, train_model
    from latentd.v1.errors import LatentdError
    from latentd.vae.imageio import find_image_files, open_image

    from .common import backend_from_args
    from .entropy_args import default_coded_format

    if not (np.isfinite(args.default_step) and args.default_step > 0):
        raise CommandError(f"--default-step {args.default_step} is not a positive number", EXIT_USAGE)
    if args.sensitivity_images < 0:
        raise CommandError(f"--sensitivity-images {args.sensitivity_images} is negative", EXIT_USAGE)
    if args.output.exists() and not args.output.is_dir():
        raise CommandError(f"{args.output}: exists and is not a folder", EXIT_USAGE)
    files = find_image_files(args.images)
    if not files:
        raise CommandError(f"no images found in {' '.join(map(str, args.images))}", EXIT_USAGE)
    backend = backend_from_args(args)
    fmt = args.format or default_coded_format(backend)
    if fmt == "vq" and backend.codebook is None:
        raise CommandError(f"--format vq: model {backend.name} " + (
            "has no codebook" if not backend.codebook_size else
            "is on a server, which does not send its codebook: run with the model here (--model, no --server)"),
            EXIT_USAGE)
    latents, failed = [], 0
    for index, path in enumerate(files):
        try:
            latents.append(np.asarray(backend.encode([np.array(open_image(path, max_pixels=backend.max_pixels))])[0],
                                      np.float32))
        except (LatentdError, OSError) as exc:
            print(f"{path}: FAILED: {one_line(exc)}", file=sys.stderr)
            failed += 1
        if (index + 1) % 50 == 0:
            print(f"encoded {index + 1} of {len(files)} images", file=sys.stderr)
    if not latents:
        raise CommandError(f"none of the {len(files)} images could be encoded", EXIT_USAGE)
    if fmt == "vq":
        return _train_indices(args, backend, latents, failed)
    config = EntropyModelConfig(vae=backend.name, scaling_factor=float(backend.scaling_factor),
                                shift_factor=float(backend.shift_factor or 0.0), channels=int(latents[0].shape[0]),
                                default_step=float(args.default_step), images=len(latents),
                                sources=tuple(str(p) for p in args.images))
    sensitivity = None
    if args.sensitivity_images:
        from latentd.evaluate.sensitivity import channel_sensitivity

        std = np.concatenate([a.reshape(a.shape[0], -1) for a in latents], axis=1).std(axis=1)
        sensitivity = channel_sensitivity(backend, latents[:args.sensitivity_images], std)
        print("channel sensitivity (pixel MSE per unit latent noise variance): "
              + ", ".join(f"{value:.4g}" for value in sensitivity), file=sys.stderr)
    try:
        model = train_model(latents, config, sensitivity)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    model.save(args.output)
    values = sum(a.size for a in latents)
    print(f"trained on {len(latents)} images ({values} latent values) of {backend.name}; step units "
          + ", ".join(f"{u:.4f}" for u in model.unit) + " (standard deviations "
          + ", ".join(f"{s:.4f}" for s in model.std) + f"); digest {model.digest[:16]}; wrote {args.output}")
    return EXIT_FAILED if failed else EXIT_OK


def _train_indices(args: argparse.Namespace, backend, latents: list, failed: int) -> int:
    """The `vq` format's model: the codebook, and flag and literal counts of the latents' nearest indices."""
    from latentd.archive.index_coder import IndexCoder
    from latentd.archive.index_model import FLAGS, IndexModelConfig, IndexTrainer

    config = IndexModelConfig(vae=backend.name, scaling_factor=float(backend.scaling_factor),
                              shift_factor=float(backend.shift_factor or 0.0),
                              codebook_size=int(backend.codebook_size), codebook_dim=int(backend.codebook_dim),
                              images=len(latents), sources=tuple(str(p) for p in args.images))
    trainer = IndexTrainer(backend.codebook)
    try:
        coder = IndexCoder(trainer.model(config))
        for array in latents:
            trainer.count(coder.nearest(array))
        model = trainer.model(config)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    model.save(args.output)
    total = int(model.flags.sum())
    print(f"trained on {len(latents)} images ({total} indices) of {backend.name}: "
          + ", ".join(f"{name} {count / total:.1%}" for name, count in zip(FLAGS, model.flags))
          + f", {int((model.counts > 0).sum())} of {config.codebook_size} codes seen as literals; digest "
          f"{model.digest[:16]}; wrote {args.output}")
    return EXIT_FAILED if failed else EXIT_OK
