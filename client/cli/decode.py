"""`latentd decode ARCHIVE -o DIR`: an archive's images back as files (original sizes, safe names)."""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from .archive_input import archive_input
from .common import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError, add_entropy_model_arg, add_model_args,
                     add_server_args, backend_from_args)

SUFFIX = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "decode", help="decode a latent archive back to image files",
        description="Decode every image of ARCHIVE to DIR at its encoded size (the original size for the native "
                    "policy). Names come from the archive keys, made safe: nothing is written outside DIR. "
                    "Existing files are kept, so an interrupted run can simply be started again. Each shard's "
                    "checksum is checked before its images are decoded. An entry that cannot be decoded (damaged "
                    "shard or manifest row) is printed with the reason and the others go on. Exit codes: 0 all "
                    "decoded, 1 some entries failed (or a runtime error), 2 bad usage or not an archive.")
    parser.add_argument("archive", help="the archive folder (written by `latentd encode`) or its fsspec URL")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="DIR",
                        help="folder for the decoded images (created; one file per entry, named after its key)")
    parser.add_argument("--image-format", choices=tuple(SUFFIX), default="png",
                        help="file format of the decoded images (default: png)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (default: 95)")
    parser.add_argument("--batch-size", type=int, default=8, help="latents per model call (default: 8)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the shard checksums (a damaged shard then decodes to wrong images silently)")
    add_entropy_model_arg(parser)
    add_model_args(parser)
    add_server_args(parser)
    parser.set_defaults(run=run, model=None)


def run(args: argparse.Namespace) -> int:
    from latentd.archive.reader import Problem, open_archive

    if args.output.exists() and not args.output.is_dir():
        raise CommandError(f"{args.output}: exists and is not a folder", EXIT_USAGE)
    with archive_input():
        archive = open_archive(args.archive, verify_checksums=args.verify, entropy_model=_entropy_model(args))
    with archive:
        if args.model is None:
            args.model = archive.meta.get("model", "default")  # the model that wrote it
        backend = backend_from_args(args)
        convert = _conversion(archive.meta, backend)
        writer = _Writer(args.output.resolve(), args.image_format, args.quality)
        problems: list[Problem] = []
        entries = archive.scan()
        while chunk := list(itertools.islice(entries, max(1, args.batch_size))):
            _decode_chunk(backend, chunk, writer, problems, convert)
    for problem in problems:
        print(f"FAILED {problem}", file=sys.stderr)
    print(f"decoded {writer.written} images to {args.output}" + (f"; {len(problems)} failed" if problems else ""))
    return EXIT_FAILED if problems else EXIT_OK


def _entropy_model(args: argparse.Namespace) -> Path | None:
    """--entropy-model, else the `entropy` folder of a --model folder (a VAE loaded by path has no packaged one)."""
    from .entropy_args import folder_entropy_model

    return args.entropy_model if args.entropy_model is not None else folder_entropy_model(args.model)


def _conversion(meta: dict, backend):
    """Latents as the archive scaled them -> as the backend scales them: the identity when they agree, else
    through the raw latents, said once on stderr (the model's weights may differ from the writer's too)."""
    from latentd.archive.convention import Scaling, rescaled
    from latentd.archive.text import shown

    source, target = Scaling.of_meta(meta), Scaling.of_backend(backend)
    if source is None or source == target:
        return lambda latents: latents
    print(f"note: the archive's latents were scaled by {shown(meta.get('model'), 80)} with {source.describe()}; model "
          f"{backend.name} scales with {target.describe()}: converting through the raw latents (if its weights are "
          "not the ones that wrote the archive, the images will differ from what they gave)", file=sys.stderr)
    return lambda latents: rescaled(latents, source, target)


def _decode_chunk(backend, chunk: list, writer: "_Writer", problems: list, convert) -> None:
    """Decode the sound entries of `chunk` in one call (each alone if one of them is at fault)."""
    from latentd.archive.encode import call_isolating
    from latentd.v1.errors import one_line
    from latentd.archive.reader import Problem

    ready = []
    for entry in chunk:
        if isinstance(entry, Problem):
            problems.append(entry)
            continue
        try:
            ready.append((entry, convert(entry.latents)))
        except Exception as exc:  # noqa: BLE001 - a damaged entry is that entry's failure
            problems.append(Problem(entry.key, one_line(exc)))

    def decode(pairs):
        return backend.decode([latents for _, latents in pairs],
                              [(e.record.encoded_height, e.record.encoded_width) for e, _ in pairs])

    for (entry, _), image in zip(ready, call_isolating(decode, ready)):
        if isinstance(image, str):
            problems.append(Problem(entry.key, image))
            continue
        try:
            writer.write(entry.key, image)
        except (OSError, ValueError) as exc:
            problems.append(Problem(entry.key, f"cannot write: {one_line(exc)}"))


class _Writer:
    """Image files under `root`, one per key, names made safe and unique."""

    def __init__(self, root: Path, image_format: str, quality: int) -> None:
        self.root, self.image_format, self.quality = root, image_format, quality
        self.used: set[Path] = set()
        self.written = 0

    def write(self, key: str, image) -> None:
        from latentd.archive.reader import safe_relative_path
        from latentd.vae.fileio import write_atomic
        from latentd.vae.imageio import encode_image

        target = self._unique(self.root / safe_relative_path(key, SUFFIX[self.image_format]))
        if self.root not in target.resolve().parents:  # defence in depth: never write outside DIR
            raise ValueError("its file name leads outside the output folder")
        if not target.exists():
            quality = self.quality if self.image_format != "png" else None
            write_atomic(target, encode_image(image, self.image_format.upper(), quality))
        self.written += 1

    def _unique(self, path: Path) -> Path:
        candidate, counter = path, 2
        while candidate in self.used:
            candidate = path.with_name(f"{path.stem}-{counter}{path.suffix}")
            counter += 1
        self.used.add(candidate)
        return candidate
