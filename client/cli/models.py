"""`latentd models --server HOST:PORT`: the models a server serves, with their latent conventions."""

from __future__ import annotations

import argparse
import json

from .common import EXIT_OK, add_server_args, client_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list a server's models",
                                   description="List the models a latentd server serves: latent channels, "
                                               "downsampling factor, scaling and shift factors, dtype, device.")
    add_server_args(parser, required=True)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with client_from_args(args) as client:
        models = client.models(timeout=args.timeout)
    if args.json:
        print(json.dumps([m.to_dict() for m in models], indent=2))
        return EXIT_OK
    print(f"{'name':<16} {'class':<18} {'latent':>7} {'factor':>6} {'scaling':>9} {'shift':>8} {'dtype':<9} device")
    for m in models:
        # Scaling by per-channel statistics (the JSON form lists them) or in patches: said after the device.
        extra = (" per-channel mean/std" if m.latents_mean else "") + (f" {m.patch_size}x{m.patch_size} patches"
                                                                        if m.patch_size > 1 else "")
        print(f"{m.name:<16} {m.model_class:<18} {m.latent_channels:>7} {m.downsampling_factor:>6} "
              f"{m.scaling_factor:>9.5f} {m.shift_factor:>8.4f} {m.dtype:<9} {m.device}{extra}")
    return EXIT_OK
