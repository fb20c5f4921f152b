"""`latentd health --server HOST:PORT`: the server's gRPC health status; exit 0 only when SERVING."""

from __future__ import annotations

import argparse

from .common import EXIT_FAILED, EXIT_OK, add_server_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("health", help="check a server's health (exit 0 when SERVING)",
                                   description="Ask a latentd server's grpc.health.v1 service; prints SERVING, "
                                               "NOT_SERVING (loading or draining) or the error, and exits 0 only "
                                               "when SERVING, so it works as a readiness probe.")
    add_server_args(parser, required=True)
    parser.set_defaults(run=run, timeout=5.0)


def run(args: argparse.Namespace) -> int:
    from latentd.client import LatentClient
    from latentd.client.retry import NO_RETRIES

    with LatentClient(args.server, token=args.token, tls=args.tls_ca, retries=NO_RETRIES) as client:
        status = client.health(timeout=args.timeout)
    print(status)
    return EXIT_OK if status == "SERVING" else EXIT_FAILED
