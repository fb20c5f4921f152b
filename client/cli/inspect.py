"""`latentd inspect ARCHIVE`: what an archive holds (settings, counts, sizes, bpp) and which images failed."""

from __future__ import annotations

import argparse
import json

from .archive_input import archive_input
from .common import EXIT_OK


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="summarize a latent archive",
                                   description="Print an archive's settings, image counts, bytes, bits per "
                                               "pixel and shards; --failures lists the failed images and why, "
                                               "--duplicates the images --dedupe skipped. Exit codes: 0 shown, "
                                               "2 bad usage or not an archive.")
    parser.add_argument("archive", help="the archive folder (written by `latentd encode`) or its fsspec URL")
    parser.add_argument("--failures", action="store_true", help="list every failed image with its reason")
    parser.add_argument("--duplicates", action="store_true",
                        help="list every image skipped by --dedupe with the image it duplicates")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from latentd.archive.reader import open_archive
    from latentd.archive.text import shown

    with archive_input():
        archive = open_archive(args.archive)
    with archive:
        counts = archive.manifest.counts()
        totals = archive.manifest.totals()
        shards = archive.manifest.shards()
        report = {"archive": str(args.archive), "settings": archive.meta, "counts": counts,
                  "latent_bytes": totals["bytes"], "pixels": totals["pixels"], "mean_bpp": totals["mean_bpp"],
                  "bpp": totals["bytes"] * 8 / totals["pixels"] if totals["pixels"] else None,
                  "shards": len(shards), "shard_bytes": sum(row["bytes"] for row in shards)}
        # Rows, not records: listing needs no JSON column, so a damaged one hides nothing here.
        for wanted, status, name in ((args.failures, "failed", "failures"), (args.duplicates, "duplicate",
                                                                              "duplicates")):
            if wanted:
                report[name] = [{"key": r["key"], "source": r["source"], "reason": r["reason"]}
                                for r in archive.manifest.rows(status)]
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    meta = report["settings"]
    print(f"{args.archive}: model {meta.get('model')} (scaling {meta.get('scaling_factor')}, shift "
          f"{meta.get('shift_factor')}), format {meta.get('format')}, size {meta.get('size_policy')}")
    if meta.get("entropy_model"):
        coded = ("codebook indices" if meta.get("format") == "vq" else
                 f"step {shown(meta.get('entropy_step'))} units")
        print(f"entropy model {shown(str(meta['entropy_model']))[:18]}, {coded}")
    print(f"images: {counts.get('ok', 0)} encoded, {counts.get('failed', 0)} failed, "
          f"{counts.get('duplicate', 0)} duplicates")
    bpp = "-" if report["bpp"] is None else f"{report['bpp']:.4f}"
    print(f"latents: {report['latent_bytes'] / 1e6:.2f} MB for {report['pixels'] / 1e6:.2f} Mpixels = {bpp} bpp; "
          f"{report['shards']} shards, {report['shard_bytes'] / 1e6:.2f} MB on disk")
    for label, listed in (("FAILED", report.get("failures", [])), ("DUPLICATE", report.get("duplicates", []))):
        for row in listed:
            print(f"{label} {shown(row['key'])} ({shown(row['source'])}): {shown(row['reason'], 500)}")
    return EXIT_OK
