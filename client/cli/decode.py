"""`latentd decode ARCHIVE -o DIR`: an archive's images back as files (original sizes, safe names)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import EXIT_FAILED, EXIT_OK, add_model_args, add_server_args, backend_from_args

SUFFIX = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "decode", help="decode a latent archive back to image files",
        description="Decode every image of ARCHIVE to DIR at its encoded size (the original size for the native "
                    "policy). Names come from the archive keys, made safe: nothing is written outside DIR. "
                    "Existing files are kept, so an interrupted run can simply be started again.")
    parser.add_argument("archive", type=Path)
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="DIR")
    parser.add_argument("--image-format", choices=tuple(SUFFIX), default="png", help="default: png")
    parser.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (default: 95)")
    parser.add_argument("--batch-size", type=int, default=8)
    add_model_args(parser)
    add_server_args(parser)
    parser.set_defaults(run=run, model=None)


def run(args: argparse.Namespace) -> int:
    from latentd.client.archive.reader import open_archive, safe_relative_path
    from latentd.vae.fileio import write_atomic

    with open_archive(args.archive) as archive:
        if args.model is None:
            args.model = archive.meta.get("model", "default")  # the model that wrote it
        backend = backend_from_args(args)
        root = args.output.resolve()
        used: set[Path] = set()
        entries = list(archive)
        written = failed = 0
        for start in range(0, len(entries), max(1, args.batch_size)):
            chunk = entries[start:start + args.batch_size]
            sizes = [(e.record.encoded_height, e.record.encoded_width) for e in chunk]
            images = backend.decode([e.latents for e in chunk], sizes)
            for entry, image in zip(chunk, images):
                target = _unique(root / safe_relative_path(entry.key, SUFFIX[args.image_format]), used)
                if root not in target.resolve().parents:  # defence in depth: never write outside DIR
                    failed += 1
                    continue
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    write_atomic(target, _file_bytes(image, args.image_format, args.quality))
                written += 1
    print(f"decoded {written} images to {args.output}" + (f" ({failed} refused)" if failed else ""))
    return EXIT_FAILED if failed else EXIT_OK


def _unique(path: Path, used: set[Path]) -> Path:
    candidate, counter = path, 2
    while candidate in used:
        candidate = path.with_name(f"{path.stem}-{counter}{path.suffix}")
        counter += 1
    used.add(candidate)
    return candidate


def _file_bytes(image, image_format: str, quality: int) -> bytes:
    from latentd.vae.imageio import encode_image

    return encode_image(image, image_format.upper(), quality if image_format != "png" else None)
