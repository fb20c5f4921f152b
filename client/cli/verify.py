"""`latentd verify ARCHIVE`: shard checksums and every manifest entry against its shard; exit 1 on any problem."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import EXIT_FAILED, EXIT_OK


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("verify", help="check a latent archive's integrity",
                                   description="Recompute every shard's SHA-256 and size, and read every "
                                               "encoded image's latents back; print each problem found.")
    parser.add_argument("archive", type=Path)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from latentd.client.archive.reader import verify_archive

    problems = verify_archive(args.archive)
    for problem in problems:
        print(problem)
    print(f"{args.archive}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return EXIT_FAILED if problems else EXIT_OK
