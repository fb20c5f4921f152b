"""`latentd train CONFIG [--section.key VALUE ...]` and `latentd export CKPT -o DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train", help="train or fine-tune the VAE (runs under `accelerate launch` too)",
        description="Train the KL-VAE from a YAML/TOML config. Any config key can be overridden as "
                    "`--section.key VALUE`, e.g. `--optim.lr 2e-4 --data.batch_size 16`. "
                    "Several GPUs: `accelerate launch --multi_gpu -m latentd.client.cli train CONFIG`; "
                    "several CPU processes: "
                    "`torchrun --standalone --nproc_per_node N -m latentd.client.cli train CONFIG`.")
    train.add_argument("config", type=Path, help="YAML or TOML training config")
    train.add_argument("--resume", metavar="latest|auto|CHECKPOINT",
                       help="continue from the run's newest checkpoint (auto: or start fresh when there is "
                            "none) or from a given checkpoint folder")
    train.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    train.add_argument("--no-export", dest="export", action="store_false",
                       help="do not export the final EMA weights to RUN/export")
    train.set_defaults(run=run_train, accepts_overrides=True)

    export = subparsers.add_parser(
        "export", help="export a checkpoint's EMA weights as a diffusers model folder",
        description="Write the EMA weights of a training checkpoint (or a run's newest one) in diffusers format, "
                    "with scaling_factor and shift_factor measured on the training data (KL models; VQ models keep "
                    "scaling_factor 1).")
    export.add_argument("checkpoint", type=Path, help="checkpoint folder or run folder")
    export.add_argument("-o", "--output", type=Path, required=True, help="model folder to write")
    export.add_argument("--stat-images", type=int, help="training crops for the latent statistics")
    export.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="weights dtype (config default)")
    export.add_argument("--latent-stats", choices=("global", "per-channel"),
                        help="global: scaling_factor and shift_factor; per-channel: also latents_mean and "
                             "latents_std, for unit variance in every channel (default: the config's "
                             "export.latent_stats, global)")
    export.add_argument("--data", nargs="+", metavar="DIR", help="image folders for the statistics "
                                                                  "(default: the config's train_dirs)")
    export.set_defaults(run=run_export)


def parse_overrides(extra: list[str]) -> dict[str, str]:
    """`--a.b 1 --c.d=x` -> {"a.b": "1", "c.d": "x"}."""
    overrides: dict[str, str] = {}
    items = iter(extra)
    for item in items:
        if not item.startswith("--") or len(item) < 3:
            raise CommandError(f"unexpected argument {item!r}; overrides look like --section.key VALUE", EXIT_USAGE)
        key, sep, value = item[2:].partition("=")
        if not sep:
            value = next(items, None)
            if value is None:
                raise CommandError(f"--{key} needs a value", EXIT_USAGE)
        overrides[key] = value
    return overrides


def run_train(args: argparse.Namespace) -> int:
    from latentd.vae.train.config import load_config
    from latentd.vae.train.trainer import training_function

    config = load_config(args.config, parse_overrides(args.extra))
    summary = training_function(config, resume=args.resume, progress=args.progress, export=args.export)
    where = f"; checkpoint {summary.checkpoint}" if summary.checkpoint else ""
    exported = f"; exported to {summary.exported}" if summary.exported else ""
    print(f"training stopped at step {summary.steps} ({summary.stopped_by}){where}{exported}")
    if summary.stopped_by == "signal":
        print(f"resume with: latentd train {args.config} --resume latest")
        return 128 + 15
    return EXIT_OK if summary.stopped_by == "max_steps" else EXIT_FAILED


def run_export(args: argparse.Namespace) -> int:
    from latentd.vae.train.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.output, stat_images=args.stat_images, dtype=args.dtype,
                               data_dirs=args.data, latent_stats=args.latent_stats)
    per_channel = (f", latents_mean {', '.join(f'{v:.5f}' for v in result.latents_mean)}, latents_std "
                   f"{', '.join(f'{v:.5f}' for v in result.latents_std)}" if result.latents_mean else "")
    print(f"exported step {result.step} ({'EMA' if result.used_ema else 'raw'} weights) to {result.directory}: "
          f"scaling_factor {result.scaling_factor:.5f}, shift_factor {result.shift_factor:.5f}{per_channel}")
    return EXIT_OK
