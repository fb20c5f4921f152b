"""`latentd info`: versions, compute device, threads and the registered models."""

from __future__ import annotations

import argparse
import json
import platform
from importlib import metadata

PACKAGES = ("latentd", "torch", "diffusers", "accelerate", "safetensors", "grpcio", "protobuf", "numpy", "Pillow")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="show versions, device, threads and models",
                                   description="Show versions, the compute device, threads and the registered models.")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(run=run)


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _compute() -> dict:
    try:
        import torch
    except ImportError:
        return {"device": None, "note": "torch is not installed: pip install 'latentd[vae]' for the codec"}
    from latentd.vae.devices import default_device, resolve_placement

    placement = resolve_placement()
    compute = {
        "device": str(default_device()),
        "dtype": str(placement.dtype).removeprefix("torch."),
        "cuda": torch.cuda.is_available(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
    }
    if torch.cuda.is_available():
        compute["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return compute


def _models() -> list[dict]:
    from latentd.vae import hub
    from latentd.vae.registry import MODELS

    rows, online = [], None
    for spec in MODELS:
        packaged = spec.packaged_path()
        if packaged is not None:
            weights, usable = f"packaged ({packaged})", "yes"
        elif spec.hub_id:
            weights = f"hub {spec.hub_id}" + (f"/{spec.hub_subfolder}" if spec.hub_subfolder else "")
            if hub.cached(spec.hub_id, spec.hub_subfolder):
                usable = "yes (in the local Hub cache)"
            else:
                online = hub.reachable() if online is None else online
                usable = "yes (downloads from the Hub)" if online else "no: needs the internet (not cached)"
        else:
            weights, usable = "not installed", "no"
        rows.append({"name": spec.name, "class": spec.model_class, "weights": weights, "usable": usable,
                     "description": spec.description})
    return rows


def run(args: argparse.Namespace) -> int:
    report = {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "packages": _versions(),
        "compute": _compute(),
        "models": _models(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"latentd {report['packages']['latentd']} on Python {report['python']} ({report['platform']})")
    print("packages: " + ", ".join(f"{k} {v or '-'}" for k, v in report["packages"].items() if k != "latentd"))
    compute = report["compute"]
    if compute.get("device") is None:
        print(f"compute: {compute['note']}")
    else:
        gpus = f", GPUs: {', '.join(compute['gpus'])}" if compute.get("gpus") else ""
        print(f"compute: {compute['device']} ({compute['dtype']}), torch threads {compute['threads']}, "
              f"inter-op threads {compute['interop_threads']}{gpus}")
    print("models:")
    width = max(len(row["name"]) for row in report["models"])
    for row in report["models"]:
        print(f"  {row['name']:<{width}}  {row['class']:<18}  {row['weights']}; usable here: {row['usable']}")
        print(f"  {'':<{width}}  {row['description']}")
    return 0
