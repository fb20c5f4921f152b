"""`latentd bench codec|tiling|serve|archive|reader|http|priority`: each measured against its baseline in the same
run."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from .common import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, CommandError, add_entropy_model_arg, add_model_args,
                     add_server_args, backend_from_args, server_address)

# Speed-ups latentd aims for over plain diffusers (CPU, 512x512, batch 1); printed, never asserted.
TARGETS = {"encode": 1.25, "decode": 1.15}
ARCHIVE_TARGET = 0.90  # `latentd encode` end to end vs the model alone
ENTROPY_STAGE_TARGET = 20.0  # MB/s of float32 latents through the entropy coder, each way, one thread


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (codec speed, tiling quality)",
                                   description="Benchmarks measured against a baseline in the same run.")
    kinds = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)

    codec = kinds.add_parser(
        "codec", help="latentd encode/decode vs plain diffusers on the same weights",
        description="Time latentd's encode and decode against plain diffusers (in latentd's compute dtype, "
                    "default memory format) on "
                    "the same weights, after warm-up, median of several runs; check both give the same latents. "
                    "diffusers runs twice per run: alone in a process of its own, as a program using it gets it, "
                    "and in this process, with latentd's process-wide settings (like for like).")
    codec.add_argument("--model", default="sd",
                       help="registered name, folder, checkpoint or Hub id; registered architectures without "
                            "local weights use seeded random weights (default: sd)")
    codec.add_argument("--size", type=int, default=512, help="image side in pixels (default: 512)")
    codec.add_argument("--batch", type=int, default=1, help="images per call (default: 1)")
    codec.add_argument("--runs", type=int, default=3, help="timed runs; the median is reported (default: 3)")
    codec.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    codec.add_argument("--profile", action="store_true", help="also print where one latentd decode spends its time")
    codec.add_argument("--same-process", action="store_true",
                       help="skip the separate diffusers process (compare like for like only)")
    _add_common(codec)
    codec.set_defaults(run=run_codec)

    tiling = kinds.add_parser(
        "tiling", help="tiled vs untiled encode and decode, latentd's and diffusers' tilers",
        description="For each size: encode and decode untiled and tiled, with latentd (the image's GroupNorm "
                    "statistics, and each tile's own) and with diffusers' enable_tiling() on the same weights; "
                    "report each tiler's PSNR against its own untiled pass, the time, and the peak memory "
                    "above the loaded model (every pass in a fresh process).")
    tiling.add_argument("--model", default="default", help="model to use (default: default)")
    tiling.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048],
                        help="image sides in pixels (default: 1024 2048)")
    tiling.add_argument("--ops", nargs="+", choices=("decode", "encode"), default=["decode", "encode"])
    tiling.add_argument("--tile-size", type=int, default=512, help="tile side in pixels (default: 512)")
    tiling.add_argument("--tile-overlap", type=int, default=128, help="tile overlap in pixels (default: 128)")
    tiling.add_argument("--image", help="photo to resize to SIZE x SIZE (default: synthetic gradients)")
    tiling.add_argument("--no-untiled", dest="untiled", action="store_false",
                        help="skip the untiled passes (for sizes that do not fit in memory): no PSNR")
    tiling.add_argument("--methods", nargs="+",
                        help="tilers to run: tile, image, image-recompute, diffusers (default: all; 'image' holds "
                             "every tile's activations at once)")
    tiling.add_argument("--seed", type=int, default=0, help="seed of the random weights and input (default: 0)")
    tiling.add_argument("--json", action="store_true", help="print one JSON object")
    tiling.set_defaults(run=run_tiling)

    serve = kinds.add_parser(
        "serve", help="the gRPC service under concurrent load vs the in-process codec",
        description="Start `latentd serve` (or use --target) and drive it with concurrent clients sending one "
                    "image per request (raw pixels in and out); report throughput, p50/p95/p99 latency, mean "
                    "batch size and errors, and in the same run the in-process codec at its best batch size, "
                    "the server with batching off, and one client's overhead over an in-process call.")
    serve.add_argument("--model", default="default", help="model to serve and compare with (default: default)")
    serve.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512], help="image sides (default: 64 256 512)")
    serve.add_argument("--ops", nargs="+", choices=("encode", "decode"), default=["encode", "decode"])
    serve.add_argument("--clients", "--concurrency", type=int, default=16, help="concurrent clients (default: 16)")
    serve.add_argument("--duration", type=float, metavar="S",
                       help="soak instead: steady load for S seconds over the ops and sizes given; report "
                            "requests, errors by code, p99 latency and server memory per minute")
    serve.add_argument("--requests", type=int, default=64,
                       help="requests per phase at 256x256, scaled by pixel count for other sizes and split "
                            "over the rounds (default: 64)")
    serve.add_argument("--rounds", type=int, default=3,
                       help="interleaved rounds of in-process, batched and unbatched measurements per workload, "
                            "so that all see the same drift of the machine's speed (default: 3)")
    _add_served_args(serve, "measure a running server instead of starting one (no batching-off phase, no batch "
                            "sizes)")
    serve.set_defaults(run=run_serve)
    _add_archive_parser(kinds)
    _add_reader_parser(kinds)
    _add_http_parser(kinds)
    _add_priority_parser(kinds)


def _add_http_parser(kinds) -> None:
    http = kinds.add_parser(
        "http", help="a decode over the HTTP Remote VAE endpoint vs the same decode over gRPC",
        description="Start `latentd serve --http-port 0` and alternate one decode over gRPC (the SDK) and the "
                    "same decode over HTTP as diffusers' remote_decode sends it (output_type=pt, uint8 pixels "
                    "back), one request at a time; print each path's median and their ratio.")
    http.add_argument("--model", default="default", help="model to serve (default: default)")
    http.add_argument("--size", type=int, default=512, help="image side in pixels (default: 512)")
    http.add_argument("--requests", type=int, default=20, help="timed requests per path (default: 20)")
    http.add_argument("--seed", type=int, default=0, help="seed of the latents (default: 0)")
    http.add_argument("--json", action="store_true", help="print one JSON object")
    http.set_defaults(run=run_http)


def run_http(args: argparse.Namespace) -> int:
    from latentd.bench.http import bench_http

    _positive(args, "size", "requests")
    result = bench_http(args.model, size=args.size, requests=args.requests, seed=args.seed)
    if args.json:
        print(json.dumps({**asdict(result), "ratio": result.ratio}, indent=2))
        return EXIT_OK
    print(f"bench http: model {result.model}, {result.size}x{result.size} decode, {result.requests} requests per "
          f"path: gRPC {result.grpc_ms:.1f} ms, HTTP {result.http_ms:.1f} ms (median), HTTP/gRPC "
          f"{result.ratio:.2f}x, overhead {result.http_ms - result.grpc_ms:+.1f} ms")
    return EXIT_OK


def _add_priority_parser(kinds) -> None:
    priority = kinds.add_parser(
        "priority", help="interactive latency idle vs under a flood of bulk streams",
        description="Start `latentd serve` (or use --target); time interactive calls one at a time on the idle "
                    "server, then while several bulk streams (as encode_many and archives send) keep it busy, "
                    "then a third as many sent as bulk during the flood (what no priority would give); print "
                    "p50/p99 of each and the ratio p99 loaded / p99 idle (target: at most 2x).")
    priority.add_argument("--model", default="default", help="model to serve (default: default)")
    priority.add_argument("--op", choices=("encode", "decode"), default="encode", help="(default: encode)")
    priority.add_argument("--size", type=int, default=256, help="image side in pixels (default: 256)")
    priority.add_argument("--bulk-streams", type=int, default=4, help="concurrent bulk streams (default: 4)")
    priority.add_argument("--requests", type=int, default=30, help="interactive calls per phase (default: 30)")
    priority.add_argument("--bulk-max-batch-size", type=int, metavar="N",
                          help="the server's bulk_max_batch_size (default: its max batch size)")
    _add_served_args(priority, "measure a running server instead of starting one")
    priority.set_defaults(run=run_priority)


def _add_served_args(parser: argparse.ArgumentParser, target_help: str) -> None:
    """What the benchmarks that start a server (or use --target) share."""
    parser.add_argument("--max-batch-size", type=int, default=8, help="the server's batch size (default: 8)")
    parser.add_argument("--target", metavar="HOST:PORT", type=server_address, help=target_help)
    parser.add_argument("--device", help="cpu, cuda, ... (default: auto)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run_priority(args: argparse.Namespace) -> int:
    import sys

    from latentd.bench.priority import TARGET_RATIO, bench_priority

    _positive(args, "bulk_streams", "requests", "max_batch_size")
    if args.bulk_max_batch_size is not None:
        _positive(args, "bulk_max_batch_size")
    if args.size < 8:
        raise CommandError("--size must be at least 8 pixels", EXIT_USAGE)
    result = bench_priority(args.model, op=args.op, size=args.size, bulk_streams=args.bulk_streams,
                            requests=args.requests, max_batch_size=args.max_batch_size,
                            bulk_max_batch_size=args.bulk_max_batch_size, device=args.device,
                            target=args.target, progress=lambda message: print(f"  {message}", file=sys.stderr))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return EXIT_OK if not result.errors else EXIT_FAILED
    row = result.to_dict()
    ratio, verdict = result.ratio, "-" if result.ratio is None else ("met" if result.ratio <= TARGET_RATIO else "MISSED")
    print(f"bench priority: model {args.model}, {args.op} {args.size}x{args.size}, {args.bulk_streams} bulk streams, "
          f"{args.requests} interactive calls per phase (one at a time); ms per call")
    print(f"{'phase':<28} {'p50':>8} {'p99':>8}")
    for label, key in (("interactive, idle", "idle"), ("interactive, bulk flood", "loaded"),
                       ("sent as bulk, bulk flood", "unprioritized")):
        print(f"{label:<28} {_num(row[f'{key}_p50_ms'], '8.1f'):>8} {_num(row[f'{key}_p99_ms'], '8.1f'):>8}")
    p50_ratio = (row["loaded_p50_ms"] / row["idle_p50_ms"]) if row["idle_p50_ms"] and row["loaded_p50_ms"] else None
    print(f"p99 loaded/idle {_num(ratio, '.2f')}x (target <= {TARGET_RATIO:.0f}x: {verdict}), p50 "
          f"{_num(p50_ratio, '.2f')}x; sent as bulk "
          f"{_num(result.unprioritized_ratio, '.2f')}x; bulk served meanwhile {result.bulk_images_per_s:.2f} "
          f"images/s; errors {dict(result.error_codes) or 0}")
    return EXIT_OK if not result.errors else EXIT_FAILED


def _add_reader_parser(kinds) -> None:
    reader = kinds.add_parser(
        "reader", help="training reads: an archive through a DataLoader vs one .npz per image",
        description="Write the same random latents as an archive and as one kohya-style .npz per image, then "
                    "read an epoch of each through a DataLoader (LatentIterableDataset vs np.load per item) at "
                    "each worker count; print latents per second and the archive's ratio (target: at least 5x).")
    reader.add_argument("--items", type=int, default=4096, help="latents (default: 4096)")
    reader.add_argument("--side", type=int, default=64, help="latent side, 64 for 512x512 images (default: 64)")
    from latentd.archive.quantize import FORMAT_NAMES

    from latentd.archive.quantize import get_format

    reader.add_argument("--format", choices=[n for n in FORMAT_NAMES if not get_format(n).entropy], default="float16",
                        help="the archive's latent format (default: float16)")
    reader.add_argument("--batch-size", type=int, default=32, help="DataLoader batch size (default: 32)")
    reader.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers (default: 0 2)")
    reader.set_defaults(run=run_reader)


def run_reader(args: argparse.Namespace) -> int:
    from latentd.bench.reader import bench_reader, table

    _positive(args, "items", "side", "batch_size")
    if any(count < 0 for count in args.workers):
        raise CommandError("--workers must be at least 0", EXIT_USAGE)
    rows = bench_reader(items=args.items, side=args.side, fmt=args.format, batch_size=args.batch_size,
                        workers=tuple(args.workers))
    print(f"bench reader: {args.items} latents of [4, {args.side}, {args.side}], batch {args.batch_size}")
    print(table(rows))
    return EXIT_OK


def _add_archive_parser(kinds) -> None:
    archive = kinds.add_parser(
        "archive", help="`latentd encode` end to end vs the model alone",
        description="Encode the same images twice in one run: with the model alone on decoded pixels, and end "
                    "to end through `latentd encode` (file decoding, model, quantization, shards, manifest); "
                    "print both rates and their ratio (target: at least 90%%). Then the storage stage alone on "
                    "those latents, one thread: q8-zstd and, where the model has an entropy model, the entropy "
                    "format at its default step (vq for VQ models), in MB/s of float32 latents (entropy target: "
                    "at least 20).")
    archive.add_argument("--images", type=int, default=16, help="synthetic Kodak-sized JPEGs (default: 16)")
    archive.add_argument("--from", dest="sources", nargs="+", type=Path, metavar="FILE",
                         help="use these image files instead")
    archive.add_argument("--batch-size", type=int, default=8)
    archive.add_argument("--workers", type=int, default=4)
    archive.add_argument("--format", default="q8-zstd")
    add_entropy_model_arg(archive)
    add_model_args(archive)
    add_server_args(archive)
    archive.set_defaults(run=run_archive)


def run_archive(args: argparse.Namespace) -> int:
    from latentd.bench.archive import bench_archive

    _positive(args, "images", "batch_size", "workers")
    backend = backend_from_args(args)
    from latentd.archive.quantize import get_format

    from .entropy_args import default_coded_format, entropy_coder

    try:
        coded = args.format if get_format(args.format).entropy else default_coded_format(backend)
    except ValueError as exc:
        raise CommandError(f"--format: {exc}", EXIT_USAGE) from None
    try:
        coder = entropy_coder(args.entropy_model, None, backend, coded, args.model)
    except CommandError:
        if args.entropy_model is not None or args.format == coded:
            raise
        coder = None  # no entropy model for this VAE: no coded row
    result = bench_archive(backend, args.sources, images=args.images, batch_size=args.batch_size,
                           workers=args.workers, fmt=args.format, coder=coder)
    verdict = "met" if result.ratio >= ARCHIVE_TARGET else "MISSED"
    print(f"bench archive: {result.images} images, batch {result.batch_size}: model alone "
          f"{result.model_images_per_s:.2f} images/s, latentd encode end to end {result.archive_images_per_s:.2f} "
          f"images/s = {result.ratio:.0%} (target >= {ARCHIVE_TARGET:.0%}: {verdict})")
    for stage in result.stages:
        target = ""
        if stage.format.startswith("entropy"):
            met = min(stage.encode_mb_per_s, stage.decode_mb_per_s) >= ENTROPY_STAGE_TARGET
            target = f" (target >= {ENTROPY_STAGE_TARGET:g} MB/s: {'met' if met else 'MISSED'})"
        print(f"bench archive stage {stage.format}: {stage.bits_per_value:.2f} bits per latent value, encode "
              f"{stage.encode_mb_per_s:.1f} MB/s, decode {stage.decode_mb_per_s:.1f} MB/s of float32 latents, "
              f"one thread{target}")
    return EXIT_OK


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu, cuda, ... (default: auto)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="latentd's compute dtype")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and input (default: 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be at least 1", EXIT_USAGE)


def run_codec(args: argparse.Namespace) -> int:
    from latentd.bench.codec import bench_codec

    _positive(args, "size", "batch", "runs")
    result = bench_codec(args.model, size=args.size, batch=args.batch, runs=args.runs, warmup=max(args.warmup, 0),
                         seed=args.seed, device=args.device, dtype=args.dtype, profile=args.profile,
                         alone=not args.same_process)
    if args.json:
        print(json.dumps({**asdict(result), "tolerance": result.tolerance,
                          "speedups": {t.operation: t.speedup for t in result.timings},
                          "same_process_speedups": {t.operation: t.same_process_speedup for t in result.timings},
                          "agrees": result.agrees}, indent=2))
        return EXIT_OK if result.agrees else EXIT_FAILED
    print(f"bench codec: model {result.model}, {result.size}x{result.size}, batch {result.batch}, "
          f"{result.device} ({result.dtype}), {result.threads} threads, median of {result.runs} runs")
    print("ms per image; diffusers alone: in a process of its own; here: in this process, with its settings")
    print(f"{'operation':<10} {'diffusers alone':>16} {'diffusers here':>15} {'latentd':>9} {'speed-up':>9} "
          f"{'like for like':>14}  target")
    for timing in result.timings:
        target = TARGETS.get(timing.operation)
        verdict = "" if target is None else f">= {target:.2f}x {'met' if timing.speedup >= target else 'MISSED'}"
        print(f"{timing.operation:<10} {_num(timing.alone_ms, '16.1f'):>16} {timing.baseline_ms:>15.1f} "
              f"{timing.latentd_ms:>9.1f} {timing.speedup:>8.2f}x {timing.same_process_speedup:>13.2f}x  {verdict}")
    status = "ok" if result.agrees else "MISMATCH"
    alone = "" if result.alone_rel_error is None else f", separate process {result.alone_rel_error:.2e}"
    print(f"agreement with diffusers: latents rel. error {result.latent_rel_error:.2e}, images rel. error "
          f"{result.image_rel_error:.2e}{alone} (tolerance {result.tolerance:.0e}): {status}")
    if result.profile:
        print("\nprofile of one latentd decode (by operator, self time):")
        print(result.profile)
    return EXIT_OK if result.agrees else EXIT_FAILED


def run_tiling(args: argparse.Namespace) -> int:
    from latentd.bench.tiling import METHODS, bench_tiling

    _positive(args, "tile_size")
    methods = tuple(args.methods or METHODS)
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise CommandError(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})", EXIT_USAGE)
    if min(args.sizes) < 1:
        raise CommandError("--sizes must be at least 1", EXIT_USAGE)
    result = bench_tiling(args.model, sizes=tuple(args.sizes), tile_size=args.tile_size,
                          tile_overlap=args.tile_overlap, operations=tuple(args.ops), image=args.image,
                          untiled=args.untiled, seed=args.seed, methods=methods)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
        return EXIT_OK
    print(f"bench tiling: model {result.model}, tiles {result.tile_size} px overlapping {result.tile_overlap} px; "
          "PSNR against the same library's untiled pass; peak MB above the loaded model")
    print(f"{'size':>5} {'op':<7} {'method':<24} {'PSNR dB':>8} {'ms':>9} {'peak MB':>8}")
    for row in result.rows:
        print(f"{row.size:>5} {row.operation:<7} {row.method:<24} {_num(row.psnr_vs_untiled, '8.2f'):>8} "
              f"{row.ms:>9.0f} {row.peak_mb:>8.0f}")
    return EXIT_OK


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _print_cpu(rows: list, clients: int) -> None:
    """Where the cores' time goes per image: the codec alone, the batched server process, its clients, and
    the floor (a bare gRPC server and its clients); how many model calls the server ran at once; and how much
    of the machine's core time went unused meanwhile."""
    if not any(row.batched and row.batched.server_cpu_ms for row in rows):
        return  # --target: no server metrics to read
    print(f"CPU ms per image (all threads): in process, the batched server, its {clients} clients (one process), "
          "and the floor: a bare gRPC server answering at once, and its clients; calls: model calls running at "
          "once in the batched server, on average (1: one always busy; 2: two side by side); idle: the machine's core "
          "time that nothing used while the batched server ran (server and clients waiting on each other)")
    print(f"{'op':<7}{'size':>5} {'in-proc':>8} {'server':>8} {'clients':>8} {'serving':>8} {'floor':>8} "
          f"{'floor cl.':>9} {'calls':>6} {'idle':>5}")
    for row in rows:
        server, clients_ms = row.batched.server_cpu_ms, row.batched.client_cpu_ms
        extra = None if server is None or row.in_process_cpu_ms is None else server - row.in_process_cpu_ms
        floor_ms, floor_clients_ms = (row.floor.server_cpu_ms, row.floor.client_cpu_ms) if row.floor else (None, None)
        print(f"{row.op:<7}{row.size:>5} {_num(row.in_process_cpu_ms, '8.2f'):>8} {_num(server, '8.2f'):>8} "
              f"{_num(clients_ms, '8.2f'):>8} {_num(extra, '+8.2f'):>8} {_num(floor_ms, '8.2f'):>8} "
              f"{_num(floor_clients_ms, '9.2f'):>9} {_num(row.batched.calls_running, '6.2f'):>6} "
              f"{_pct(row.batched.cores_idle):>5}")


def _print_sweep(rows: list) -> None:
    """The in-process batch-size sweep: where batching stops paying on this machine (the server's pixel budget)."""
    print("in-process images/s by batch size (one sweep before the rounds; x: against batch 1)")
    for row in rows:
        one = row.in_process_rates.get(1)
        rates = "  ".join(f"{batch}: {rate:.2f}" + (f" ({rate / one:.2f}x)" if one else "")
                          for batch, rate in row.in_process_rates.items())
        print(f"{row.op:<7}{row.size:>5}  {rates}")


def _share(row) -> str:
    """The concurrent share and, over several rounds, the range of the rounds' own shares."""
    if len(row.round_shares) < 2:
        return _pct(row.concurrent_share)
    low, high = min(row.round_shares), max(row.round_shares)
    return f"{_pct(row.concurrent_share)} ({low * 100:.0f}-{high * 100:.0f})"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def run_soak(args: argparse.Namespace) -> int:
    from latentd.bench.serve import make_workload
    from latentd.bench.server_process import ServerProcess
    from latentd.bench.soak import soak
    from latentd.vae.codec import load_codec

    codec = load_codec(args.model, device=args.device)
    model = "" if args.target is None else args.model
    workloads = [make_workload(codec, op, size, model) for op in args.ops for size in args.sizes]
    server = None if args.target else ServerProcess.latentd("bench", args.model, args.max_batch_size).__enter__()
    try:
        metrics = None if server is None else f"http://127.0.0.1:{server.metrics_port}/metrics"
        report = soak(args.target or server.target, workloads, clients=args.clients, duration_s=args.duration,
                      interval_s=min(60.0, args.duration), metrics_url=metrics)
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    if args.json:
        print(json.dumps({"seconds": report.seconds, "clients": report.clients, "requests": report.requests,
                          "errors": dict(report.errors), "peak_rss_mb": report.peak_rss_mb,
                          "rss_growth_mb": report.rss_growth_mb,
                          "intervals": [{"start_s": i.start_s, "requests": i.requests, "errors": dict(i.errors),
                                         "p99_ms": i.p99_ms, "rss_mb": i.rss_mb} for i in report.intervals]},
                         indent=2))
    else:
        print(f"soak: {report.seconds:.0f} s, {report.clients} clients, {report.requests} requests, errors "
              f"{dict(report.errors) or 0}; server peak RSS {_num(report.peak_rss_mb, '.0f')} MB, growth after "
              f"the first interval {_num(report.rss_growth_mb, '+.1f')} MB")
        print(f"{'from s':>7} {'requests':>9} {'errors':>7} {'p99 ms':>8} {'RSS MB':>8}")
        for i in report.intervals:
            print(f"{i.start_s:>7.0f} {i.requests:>9} {sum(i.errors.values()):>7} {_num(i.p99_ms, '8.0f'):>8} "
                  f"{_num(i.rss_mb, '8.0f'):>8}")
    return EXIT_OK if not report.errors else EXIT_FAILED


def run_serve(args: argparse.Namespace) -> int:
    import sys

    from latentd.bench.results import TARGET_CONCURRENT_SHARE, TARGET_SINGLE_OVERHEAD
    from latentd.bench.serve import bench_serve

    _positive(args, "clients", "requests", "max_batch_size", "rounds")
    if any(size < 8 for size in args.sizes):
        raise CommandError("--sizes must be at least 8 pixels", EXIT_USAGE)
    if args.duration is not None:
        if args.duration <= 0:
            raise CommandError("--duration must be positive", EXIT_USAGE)
        return run_soak(args)
    rows = bench_serve(args.model, sizes=tuple(args.sizes), ops=tuple(args.ops), clients=args.clients,
                       requests=args.requests, max_batch_size=args.max_batch_size, rounds=args.rounds,
                       target=args.target, device=args.device,
                       progress=lambda message: print(f"  {message}", file=sys.stderr))
    failed = sum((row.batched.errors if row.batched else 0) + (row.single.errors if row.single else 0)
                 + (row.unbatched.errors if row.unbatched else 0) for row in rows)
    if args.json:
        print(json.dumps({"model": args.model, "clients": args.clients, "rows": [row.to_dict() for row in rows]},
                         indent=2))
        return EXIT_OK if not failed else EXIT_FAILED
    print(f"bench serve: model {args.model}, {args.clients} clients, server max batch {args.max_batch_size}, "
          f"{args.rounds} rounds; images/s and ms per request; share over all rounds (each round's range)")
    print(f"{'op':<7}{'size':>5} {'in-proc':>8} {'(batch)':>7} {'server':>8} {'share':>14} {'p50':>7} {'p95':>7} "
          f"{'p99':>7} {'batch':>6} {'no-batch':>9} {'gain':>6} {'1-client':>9} {'in-proc':>8} {'overhead':>9} "
          f"{'errors':>6}")
    for row in rows:
        b, u, s1 = row.batched, row.unbatched, row.single
        print(f"{row.op:<7}{row.size:>5} {row.in_process_images_per_s:>8.2f} {row.in_process_batch:>7} "
              f"{_num(b and b.images_per_s, '8.2f'):>8} {_share(row):>14} "
              f"{_num(b and b.percentile(50), '7.0f'):>7} {_num(b and b.percentile(95), '7.0f'):>7} "
              f"{_num(b and b.percentile(99), '7.0f'):>7} {_num(b and b.mean_batch, '6.2f'):>6} "
              f"{_num(u and u.images_per_s, '9.2f'):>9} {_num(row.batching_gain, '5.2f'):>5}x "
              f"{_num(s1 and s1.percentile(50), '9.1f'):>9} {row.in_process_single_ms:>8.1f} "
              f"{_pct(row.single_overhead):>9} {(b.errors if b else 0):>6}")
    _print_sweep(rows)
    _print_cpu(rows, args.clients)
    print(f"targets: share >= {TARGET_CONCURRENT_SHARE:.0%} of in-process batched throughput at {args.clients} "
          f"clients; one client's overhead <= {TARGET_SINGLE_OVERHEAD:.0%} at 512x512; gain > 1x (batching on vs off)")
    for row in rows:
        verdicts = []
        if row.concurrent_share is not None:
            verdicts.append(f"share {'met' if row.concurrent_share >= TARGET_CONCURRENT_SHARE else 'MISSED'}")
        if row.size == 512 and row.single_overhead is not None:
            verdicts.append(f"overhead {'met' if row.single_overhead <= TARGET_SINGLE_OVERHEAD else 'MISSED'}")
        if row.batching_gain is not None and row.batched.mean_batch == 1:
            # Nothing to gain: max_batch_pixels runs this size one image per call (on CPU, where it is fastest).
            verdicts.append("gain - (one image per call at this size: max_batch_pixels)")
        elif row.batching_gain is not None:
            verdicts.append(f"gain {'met' if row.batching_gain > 1 else 'MISSED'}")
        print(f"  {row.op} {row.size}: {', '.join(verdicts) or '-'}")
    return EXIT_OK if not failed else EXIT_FAILED
