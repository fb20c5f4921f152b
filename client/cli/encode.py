"""`latentd encode SRC... -o ARCHIVE`: images (folders, lists, tar, zip, webdataset) into a resumable latent archive."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from .common import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError, add_entropy_model_arg, add_model_args,
                     add_refine_arg, add_server_args, backend_from_args)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from latentd.archive.quantize import FORMAT_NAMES
    from latentd.archive.sources import MAX_ITEM_BYTES
    from latentd.archive.writer import COMMIT_S

    parser = subparsers.add_parser(
        "encode", help="encode an image collection into a latent archive (resumable)",
        description="Encode every image of the sources into ARCHIVE (sharded safetensors + a SQLite manifest). "
                    "Re-running the same command after a crash finishes the job with every image exactly once. "
                    "Every image is kept: sources with equal names get distinct keys (LABEL/NAME, a repeated name "
                    "NAME~2), and only --dedupe skips equal bytes. An unreadable image, member or source is "
                    "listed in the manifest with the reason (latentd inspect ARCHIVE --failures) and the others "
                    "go on. Exit codes: 0 all encoded, 1 some failed (or a runtime error), 2 bad usage or input.")
    parser.add_argument("sources", nargs="+", type=Path, metavar="SRC",
                        help="folders (recursive), list files (.txt), tar/zip files, webdataset shards, images")
    parser.add_argument("-o", "--output", required=True, metavar="ARCHIVE",
                        help="archive folder, or an fsspec URL (s3://, gs://, memory://, file://)")
    parser.add_argument("--format", choices=FORMAT_NAMES, default="float16",
                        help="latent storage: float16, bfloat16, q8 (8-bit per channel), q8-zstd, entropy (quantised "
                             "in --step and coded with the VAE's entropy model), vq (a VQ model's codebook indices, coded with its "
                             "entropy model) (default: float16)")
    parser.add_argument("--step", type=float, default=None, metavar="S",
                        help="format entropy: quantisation step in the entropy model's per-channel units; larger is smaller "
                             "and coarser (default: the entropy model's, see docs/compression.md)")
    add_entropy_model_arg(parser)
    parser.add_argument("--size", default="native",
                        help="native, resize:WxH, center-crop:S or buckets:S (default: native)")
    parser.add_argument("--sizes", default="",
                        help="training caches: also store the latents at these sides S, comma-separated (each applies "
                             "--size's kind, center-crop:S or buckets:S, with its own crop); --size stays the main one")
    parser.add_argument("--flip", action="store_true",
                        help="also store the latents of the horizontally flipped image (of each size)")
    parser.add_argument("--logvar", action="store_true",
                        help="also store the posterior log-variance (diffusers-scaled) of each stored latent, for "
                             "sampling z = latents + exp(logvar / 2) * eps when training")
    parser.add_argument("--batch-size", type=int, default=8, help="images per model call (default: 8)")
    parser.add_argument("--workers", type=int, default=4, help="image-decoding threads (default: 4)")
    parser.add_argument("--shard-mb", type=float, default=256,
                        help="shard size in MB; the smaller shards --commit-s writes are merged up to it at the end "
                             "of a run (default: 256)")
    parser.add_argument("--dedupe", action="store_true",
                        help="skip images whose bytes were already encoded; each is listed by "
                             "`latentd inspect ARCHIVE --duplicates`")
    parser.add_argument("--max-item-mb", type=float, default=MAX_ITEM_BYTES / (1 << 20),
                        help="refuse (as a failed item) any image file or member larger than this, before reading "
                             f"it whole (default: {MAX_ITEM_BYTES >> 20})")
    parser.add_argument("--commit-s", type=float, default=COMMIT_S,
                        help="write encoded images to the archive at least this often, so an interrupted run "
                             f"loses at most this much work; 0 commits every image (default: {COMMIT_S:g})")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local threads, or Ray Data actors (a running cluster via RAY_ADDRESS, else a local "
                             "one) (default: local)")
    parser.add_argument("--ray-actors", type=int, default=1, help="model actors with --engine ray (default: 1)")
    parser.add_argument("--ray-gpus-per-actor", type=float, default=0.0,
                        help="GPUs per model actor with --engine ray (default: 0; 1 for one actor per GPU)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_model_args(parser)
    add_refine_arg(parser)
    add_server_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from latentd.archive.encode import Variants, encode_sources
    from latentd.archive.manifest import ArchiveError
    from latentd.archive.quantize import entropy_format, get_format
    from latentd.archive.sizing import SizePolicy
    from latentd.archive.sources import iter_sources
    from latentd.archive.writer import ArchiveMismatchError, ArchiveSettings, ArchiveWriter

    try:
        policy = SizePolicy.parse(args.size)
        sizes = [int(side) for side in args.sizes.split(",") if side.strip()]
        variants = Variants.of(policy, sizes, flip=args.flip, logvar=args.logvar)
    except ValueError as exc:
        raise CommandError(f"{exc} (--size {args.size} --sizes {args.sizes})" if args.sizes else str(exc),
                           EXIT_USAGE) from exc
    if not variants.plain and args.engine == "ray":
        raise CommandError("--sizes, --flip and --logvar need --engine local", EXIT_USAGE)
    if args.refine and (args.logvar or args.engine == "ray"):
        raise CommandError("--refine improves the stored mean: it does not combine with --logvar or --engine ray",
                           EXIT_USAGE)
    if args.batch_size < 1 or args.workers < 1 or not args.shard_mb > 0 or not args.max_item_mb > 0 \
            or not args.commit_s >= 0:
        raise CommandError("--batch-size and --workers must be at least 1, --shard-mb and --max-item-mb "
                           "positive, --commit-s at least 0", EXIT_USAGE)
    missing = [str(p) for p in args.sources if not p.exists()]
    if missing:
        raise CommandError(f"no such source: {', '.join(missing)}", EXIT_USAGE)
    from latentd.archive.storage import is_url, local_path

    if not is_url(args.output) and local_path(args.output).exists() and not local_path(args.output).is_dir():
        raise CommandError(f"{args.output}: exists and is not an archive folder", EXIT_USAGE)
    items = functools.partial(iter_sources, args.sources, int(args.max_item_mb * (1 << 20)))
    try:
        items()  # checks the sources' kinds and that none is given twice
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from exc
    if args.format != "entropy" and args.step is not None:
        raise CommandError("--step goes with --format entropy", EXIT_USAGE)
    if not get_format(args.format).entropy and args.entropy_model is not None:
        raise CommandError("--entropy-model goes with --format entropy or vq", EXIT_USAGE)
    if args.format == "vq" and args.logvar:
        raise CommandError("--logvar: a VQ model has no posterior log-variance (--format vq)", EXIT_USAGE)
    backend = backend_from_args(args)
    fmt, digest, step = get_format(args.format), "", 0.0
    if fmt.entropy:
        from .entropy_args import entropy_coder

        coder = entropy_coder(args.entropy_model, args.step, backend, args.format, args.model)
        fmt, digest, step = entropy_format(coder), coder.model.digest, getattr(coder, "step", 0.0)
    settings = ArchiveSettings(args.format, str(policy), backend.name, backend.scaling_factor, backend.shift_factor,
                               backend.factor, tuple(p.width for p in variants.policies[1:]), args.flip, args.logvar,
                               digest, step, tuple(backend.latents_mean), tuple(backend.latents_std))
    try:
        writer = ArchiveWriter(args.output, settings, fmt, int(args.shard_mb * (1 << 20)), commit_s=args.commit_s)
    except (ArchiveMismatchError, ArchiveError) as exc:
        raise CommandError(str(exc), EXIT_USAGE) from exc
    # Counting first costs a directory walk (no image is read) and gives the bar its ETA.
    bar = _progress_bar(args.progress, sum(1 for _ in items()) if args.progress else None)
    try:
        if args.engine == "ray":
            from latentd.archive.ray_engine import encode_with_ray

            summary = encode_with_ray(items(), writer, functools.partial(backend_from_args, args),
                                      policy, batch_size=args.batch_size, actors=args.ray_actors,
                                      gpus_per_actor=args.ray_gpus_per_actor, dedupe=args.dedupe,
                                      progress=bar.update if bar else None)
        else:
            summary = encode_sources(items(), writer, backend, variants,
                                     batch_size=args.batch_size, workers=args.workers, dedupe=args.dedupe,
                                     progress=bar.update if bar else None)
        writer.compact()  # the small shards of --commit-s, merged up to --shard-mb
    finally:
        writer.close()
        if bar:
            bar.close()
    bpp = "-" if summary.bpp is None else f"{summary.bpp:.3f}"
    print(f"encoded {summary.images} images ({summary.skipped} already in the archive, {summary.duplicates} "
          f"duplicates, {summary.failed} failed); {summary.bytes_in / 1e6:.1f} MB in, "
          f"{summary.bytes_out / 1e6:.2f} MB of latents out, {bpp} bpp, {summary.images_per_s:.2f} images/s "
          f"-> {args.output}")
    if summary.failed:
        print(f"see the failures with: latentd inspect {args.output} --failures", file=sys.stderr)
    if summary.duplicates:
        print(f"see the duplicates with: latentd inspect {args.output} --duplicates", file=sys.stderr)
    return EXIT_FAILED if summary.failed else EXIT_OK


class _Bar:
    def __init__(self, total: int | None) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="img", desc="encode", dynamic_ncols=True)
        self.seen = 0

    def update(self, summary) -> None:
        done = summary.images + summary.failed + summary.duplicates + summary.skipped
        self.bar.update(done - self.seen)
        self.seen = done
        self.bar.set_postfix(failed=summary.failed, refresh=False)

    def close(self) -> None:
        self.bar.close()


def _progress_bar(enabled: bool, total: int | None) -> _Bar | None:
    if not enabled:
        return None
    try:
        return _Bar(total)
    except ImportError:  # tqdm is optional on client machines
        return None
