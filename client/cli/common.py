"""Pieces the subcommands share: exit codes, model and server options, one-line errors."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from latentd.vae import Codec

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran but failed, or some of its items did
EXIT_USAGE = 2  # bad usage or bad input: arguments, files or requests that cannot succeed as given
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = f"""exit codes (every subcommand):
  {EXIT_OK}    success
  {EXIT_FAILED}    a runtime failure: the server unreachable, busy or failing, an I/O error, or some
       items of a batch failed (each is reported)
  {EXIT_USAGE}    bad usage or bad input: unknown flags, values out of range, missing input files, a model
       or request the server refuses as invalid; one line on stderr says which
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)"""


class CommandError(Exception):
    """A failure the user can fix, reported as one line with `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


class Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line (the usage itself is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def add_entropy_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--entropy-model", type=Path, metavar="DIR",
                        help="formats entropy and vq: the entropy model folder (`latentd entropy-train`); default: "
                             "the one shipped with the VAE, or the `entropy` folder inside a --model folder")


def server_address(text: str) -> str:
    """`--server` and `--target` (argparse type): see `channel.server_target`."""
    from latentd.client.channel import server_target

    try:
        return server_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def exit_code(exc: BaseException) -> int:
    """EXIT_USAGE for input that can never succeed as given (the same request would fail the same way),
    EXIT_FAILED for everything else."""
    from latentd.client.errors import CALLER_ERRORS, LatentdClientError
    from latentd.v1.tensors import TensorError
    from latentd.vae.errors import InvalidInputError, ModelNotFoundError  # no torch: the errors module alone

    if isinstance(exc, CommandError):
        return exc.exit_code
    if isinstance(exc, LatentdClientError):
        return EXIT_USAGE if exc.code in CALLER_ERRORS else EXIT_FAILED
    bad_input = (InvalidInputError, ModelNotFoundError, TensorError, FileNotFoundError, NotADirectoryError,
                 IsADirectoryError)
    return EXIT_USAGE if isinstance(exc, bad_input) else EXIT_FAILED


def one_line(exc: BaseException) -> str:
    """The error line of a command: the message, with its type for errors that are not latentd's own."""
    from latentd.v1 import errors

    text = errors.one_line(exc)
    known = isinstance(exc, (CommandError, OSError)) or type(exc).__module__.startswith("latentd.")
    return text if known else f"{type(exc).__name__}: {text}"


def add_device_args(parser) -> None:
    """--device and --dtype, where a model runs (a parser or an argument group)."""
    parser.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: CUDA if available, else CPU)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="compute dtype (default: bfloat16/float16 on GPU, float32 on CPU)")


def add_model_args(parser: argparse.ArgumentParser, default_model: str = "default") -> None:
    from latentd.vae.options import TILE_NORMS, TILING_MODES  # torch-free: --help loads no model code

    group = parser.add_argument_group("model")
    group.add_argument("--model", default=default_model,
                       help="registered name (default, sd, taesd), model folder, checkpoint file or Hub id "
                            f"(default: {default_model})")
    group.add_argument("--config", help="architecture for a single-file checkpoint: registered name or config.json")
    group.add_argument("--random-weights", type=int, metavar="SEED",
                       help="use the registered architecture with weights drawn from SEED (timing, tests)")
    add_device_args(group)
    group.add_argument("--tiling", choices=TILING_MODES, default="auto",
                       help="tile large images with overlap blending (default: auto, above 1024 px)")
    group.add_argument("--tile-norms", choices=TILE_NORMS, default="tile",
                       help="GroupNorm statistics of tiles: each tile's own (default: one tile's memory, seams "
                            "near 35 dB), the whole image's side by side (image: tiled equals untiled, memory of "
                            "all tiles) or recomputed tile by tile (image-recompute: tiled equals untiled in one "
                            "tile's memory, about twice the compute, one layer of activations in a temporary "
                            "folder); a server uses its own setting")
    group.add_argument("--max-pixels", type=int,
                       help="refuse images with more pixels (default: 8192x8192, the library's limit; a server "
                            "applies its own, 4096x4096 unless set, since every client shares its memory)")


def load_codec_from_args(args: argparse.Namespace) -> "Codec":
    from latentd.vae import CodecOptions, load_codec

    limits = {} if args.max_pixels is None else {"max_pixels": args.max_pixels}
    options = CodecOptions(tile_norms=args.tile_norms, **limits)
    return load_codec(args.model, device=args.device, dtype=args.dtype, options=options, config=args.config,
                      random_seed=args.random_weights)


def add_server_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    import os

    group = parser.add_argument_group("server" if required else "server (instead of the in-process model)")
    group.add_argument("--server", metavar="HOST:PORT", required=required, type=server_address,
                       help="use a latentd server" + ("" if required else " instead of loading the model here") +
                            " (port 50051 unless given)")
    group.add_argument("--token", default=os.environ.get("LATENTD_TOKEN"),
                       help="bearer token (default: $LATENTD_TOKEN; prefer the variable, flags show in `ps`)")
    group.add_argument("--tls-ca", metavar="PEM", help="use TLS, trusting this CA certificate")
    group.add_argument("--timeout", type=float, default=300.0, help="seconds per call (default: 300)")


def client_from_args(args: argparse.Namespace):
    from latentd.client import LatentClient

    return LatentClient(args.server, token=args.token, tls=args.tls_ca, timeout=args.timeout)


def backend_from_args(args: argparse.Namespace):
    """Where round trips run: a server with `--server`, else the model loaded in this process."""
    from latentd.client.cli.backends import backend_for

    refine = getattr(args, "refine", 0)
    options = dict(token=args.token, tls=args.tls_ca, timeout=args.timeout)
    return backend_for(args.server, args.model, client_options=options, load_local=lambda: load_codec_from_args(args),
                       refine=refine)


MAX_REFINE_STEPS = 200  # vae/refine.py's bound, checked here before any model loads


def _refine_steps(text: str) -> int:
    steps = int(text)
    if not 0 <= steps <= MAX_REFINE_STEPS:
        raise argparse.ArgumentTypeError(f"must be 0-{MAX_REFINE_STEPS}, got {steps}")
    return steps


def add_refine_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--refine", type=_refine_steps, default=0, metavar="STEPS",
                        help="optimise each latent STEPS steps against the decoder: better reconstructions for "
                             "about three decodes' time per step (docs/library.md); in this process or on the "
                             "--server, images up to the tiling threshold (default: 0, off; at most 200)")
