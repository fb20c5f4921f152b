"""`latentd serve`: the gRPC service (settings from --config FILE, then LATENTD_* variables, then flags)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import EXIT_USAGE, CommandError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the gRPC encode/decode service",
        description="Serve Encode/Decode (and streams, models, latent-space operations) over gRPC with dynamic "
                    "batching, health, reflection and Prometheus metrics. Every flag has a LATENTD_<NAME> "
                    "environment variable and a key in the --config file; flags win over the environment, "
                    "which wins over the file. SIGTERM drains in-flight requests and exits 0.")
    parser.add_argument("--config", type=Path, help="settings file (TOML, YAML or JSON)")
    parser.add_argument("--host", help="address to bind (default: 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, help="port (default: 50051; 0: any free port; one in use: exit 2)")
    parser.add_argument("--model", dest="models", action="append", metavar="NAME=SOURCE",
                        help="serve SOURCE (registry name, model folder, checkpoint or Hub id) as NAME; repeat for "
                             "several, the first is the default (default: default=default)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA if available, else CPU)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="compute dtype")
    parser.add_argument("--max-batch-size", type=int, help="images per model call (default: 8)")
    parser.add_argument("--max-batch-delay-ms", type=float, help="how long a batch waits to fill (default: 5)")
    parser.add_argument("--max-batch-pixels", type=int, help="image pixels per model call, summed over its images "
                                                             "(default: four 512x512 images on CPU, unlimited on GPU; "
                                                             "0: unlimited)")
    parser.add_argument("--busy-batch-delay-ms", type=float,
                        help="how long a batch waits to fill while another batch computes on a CPU lane "
                             "(default: 20)")
    parser.add_argument("--cpu-compute-lanes", type=int,
                        help="on a CPU, batches run side by side on this many lanes, each with an equal share of "
                             "the threads, when requests queue up; a lone batch gets every thread (default: 2; "
                             "1: one batch at a time)")
    parser.add_argument("--queue-limit", type=int, help="images waiting per model before RESOURCE_EXHAUSTED "
                                                        "(default: 256)")
    parser.add_argument("--max-pixels", type=int, help="largest image in pixels (default: 4096x4096)")
    parser.add_argument("--max-message-mb", type=int, help="gRPC message size limit (default: 64)")
    parser.add_argument("--max-request-pixels", type=int,
                        help="model work one request may cost, in image pixels in and out (padded to the model's "
                             "factor, tile overlaps counted); beyond it INVALID_ARGUMENT (default: 67108864)")
    parser.add_argument("--memory-budget-mb", type=int,
                        help="server memory held by requests at once (received bytes, pixels, latents, answers) "
                             "(default: 2048)")
    parser.add_argument("--admission-wait-ms", type=float,
                        help="how long a request waits for room in the memory budget before RESOURCE_EXHAUSTED "
                             "(default: 1000)")
    parser.add_argument("--max-concurrent-rpcs", type=int,
                        help="RPCs in progress at once (a stream counts once); beyond it RESOURCE_EXHAUSTED "
                             "(default: 128)")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (default: off)")
    parser.add_argument("--metrics-host", help="address of the metrics endpoint (default: 127.0.0.1)")
    parser.add_argument("--tls-cert", help="server certificate (PEM); with --tls-key enables TLS")
    parser.add_argument("--tls-key", help="server private key (PEM)")
    parser.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS)")
    parser.add_argument("--auth-tokens-file", type=Path,
                        help="bearer tokens, one per line (or LATENTD_AUTH_TOKENS=a,b; never on the command line)")
    parser.add_argument("--grace-s", type=float, help="seconds in-flight requests get on SIGTERM (default: 10)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_const", const=False,
                        help="skip the warm-up call per model")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.set_defaults(run=run)


FLAG_SETTINGS = ("host", "port", "models", "device", "dtype", "max_batch_size", "max_batch_delay_ms",
                 "busy_batch_delay_ms", "max_batch_pixels", "cpu_compute_lanes", "queue_limit", "max_pixels",
                 "max_message_mb", "max_request_pixels", "memory_budget_mb", "admission_wait_ms",
                 "max_concurrent_rpcs", "metrics_port", "metrics_host", "tls_cert", "tls_key", "tls_client_ca",
                 "grace_s", "warmup")


def settings_from_args(args: argparse.Namespace, environ=None):
    from latentd.server.settings import load_settings

    flags = {name: getattr(args, name) for name in FLAG_SETTINGS}
    if args.auth_tokens_file is not None:
        try:
            lines = args.auth_tokens_file.read_text().splitlines()
        except OSError as exc:
            raise CommandError(f"--auth-tokens-file: {exc}", EXIT_USAGE) from exc
        flags["auth_tokens"] = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return load_settings(flags, environ=environ, file=args.config)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from latentd.server.app import serve
    from latentd.vae.errors import InvalidInputError

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
    except InvalidInputError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from exc
    return asyncio.run(serve(settings))
