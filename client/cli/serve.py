"""`latentd serve`: the gRPC service (settings from --config FILE, then LATENTD_* variables, then flags)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import EXIT_USAGE, CommandError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the gRPC encode/decode service",
        description="Serve Encode/Decode (and streams, models, latent-space operations) over gRPC with dynamic "
                    "batching, health, reflection and Prometheus metrics; with --http-port, also the Hugging Face "
                    "Remote VAE HTTP protocol (diffusers' remote_decode / remote_encode). Every flag has a "
                    "LATENTD_<NAME> environment variable and a key in the --config file; flags win over the "
                    "environment, which wins over the file. SIGTERM drains in-flight requests and exits 0.")
    parser.add_argument("--config", type=Path, help="settings file (TOML, YAML or JSON)")
    parser.add_argument("--model", dest="models", action="append", metavar="NAME=SOURCE",
                        help="serve SOURCE (registry name, model folder, checkpoint or Hub id) as NAME; repeat for "
                             "several, the first is the default (default: default=default)")
    parser.add_argument("--auth-tokens-file", type=Path,
                        help="bearer tokens, one per line (or LATENTD_AUTH_TOKENS=a,b; never on the command line)")
    add_setting_flags(parser.add_argument_group("settings (each also LATENTD_<NAME> and a --config key)"))
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="the server log's level (default: INFO)")
    parser.set_defaults(run=run)


def _default_text(value) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def add_setting_flags(group) -> None:
    """One flag per ServerSettings field that has one, from the field's type, default and help: adding a
    setting is one line in server/settings.py."""
    import dataclasses
    import typing

    from latentd.server.settings import ServerSettings

    hints = typing.get_type_hints(ServerSettings)
    for field in dataclasses.fields(ServerSettings):
        meta = field.metadata
        if not meta.get("flag", True):
            continue
        flag = "--" + field.name.replace("_", "-")
        default = meta["default_text"] or _default_text(field.default)
        kind = next((t for t in typing.get_args(hints[field.name]) if t is not type(None)), hints[field.name])
        if kind is bool:
            switch = f"--no-{field.name.replace('_', '-')}" if field.default else flag
            group.add_argument(switch, dest=field.name, action="store_const", const=not field.default,
                               help=f"{'turn off: ' if field.default else ''}{meta['help']}")
        else:
            group.add_argument(flag, dest=field.name, type=kind, choices=meta["choices"],
                               help=f"{meta['help']} (default: {default})")


def settings_from_args(args: argparse.Namespace, environ=None):
    import dataclasses

    from latentd.server.settings import ServerSettings, load_settings

    flags = {field.name: getattr(args, field.name, None) for field in dataclasses.fields(ServerSettings)}
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
