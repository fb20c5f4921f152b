"""`latentd verify ARCHIVE`: shard checksums and every manifest entry against its shard; exit 1 on any problem."""

from __future__ import annotations

import argparse

from .archive_input import archive_input
from .common import EXIT_FAILED, EXIT_OK, add_entropy_model_arg


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("verify", help="check a latent archive's integrity",
                                   description="Recompute every shard's SHA-256 and size, and read every "
                                               "encoded image's latents back; print each problem found (a "
                                               "damaged entry never stops the check). Exit codes: 0 sound, 1 "
                                               "problems found, 2 bad usage or not an archive.")
    parser.add_argument("archive", help="the archive folder (written by `latentd encode`) or its fsspec URL")
    add_entropy_model_arg(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from latentd.archive.reader import verify_archive

    with archive_input():
        problems = verify_archive(args.archive, entropy_model=args.entropy_model)
    for problem in problems:
        print(problem)
    print(f"{args.archive}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return EXIT_FAILED if problems else EXIT_OK
