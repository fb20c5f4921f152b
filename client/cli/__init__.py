"""The `latentd` command line: one module per subcommand, `main(argv)` returning the exit code."""

from __future__ import annotations

import argparse
import sys
import traceback
from importlib import metadata
from typing import Sequence

from . import (bench, decode, encode, entropy_train, eval_curve, eval_rd, evaluate, health, info, inspect, models,
               roundtrip, serve, train, verify)
from .common import EXIT_CODES_HELP, EXIT_INTERRUPTED, EXIT_USAGE, Parser, exit_code, one_line

# Each module adds its own parser with `add_parser(subparsers)`; order is the order of `--help`.
COMMANDS = (info, serve, models, health, encode, decode, inspect, verify, roundtrip, evaluate, eval_rd, eval_curve,
            entropy_train, train, bench)
# The commands that run a model over and over, for which malloc keeps freed activation memory
# (`latentd.vae.allocator`); the others (info, health, inspect, ...) leave the process as it is.
MODEL_COMMANDS = frozenset({"serve", "encode", "decode", "roundtrip", "eval", "eval-rd", "eval-curve", "entropy-train",
                            "train", "export", "bench"})


def _version() -> str:
    try:
        return metadata.version("latentd")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="latentd",
        description="Latent-diffusion image compression: encode images to VAE latents and back.",
        epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"latentd {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with `argv` (default: sys.argv[1:]) and return the process exit code."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit_:  # --help, --version and usage errors
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    args.extra = extra
    if not getattr(args, "run", None):  # `latentd` or `latentd bench` alone
        prog = " ".join(filter(None, ("latentd", args.command)))
        print(f"{prog}: error: a command is needed (see {prog} --help)", file=sys.stderr)
        return EXIT_USAGE
    if args.command in MODEL_COMMANDS:
        from latentd.vae.allocator import retain_freed_memory

        retain_freed_memory()
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"latentd {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # every failure is one line; --debug shows where it came from
        if args.debug:
            traceback.print_exc()
        print(f"latentd {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return exit_code(exc)


__all__ = ["build_parser", "main"]
