"""Pack the images of a device run into one folder (deploy/gpu/pack.sh runs this): the training sets and the
validation folder that vae/train/configs/long.yaml names, and Kodak for evaluation (never trained on).

Layout: OUT/train/<set>/ (one folder per training set), OUT/val/ (the first val_max_images of the
validation folder, which is all that validation reads), OUT/kodak/, OUT/manifest.json.

Everything is copied as it is when it fits in --budget-bytes. Otherwise the training JPEGs are re-encoded at
quality 90 with their own chroma subsampling (kept only where that is smaller), and then, while it still does
not fit, the largest training set is left out. Kodak and the validation images are always copied unchanged.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
RECIPE = Path("vae/train/configs/long.yaml")
RECIPE_DATASETS = "../shared/datasets"  # the prefix of the recipe's data paths
JPEG_QUALITY = 90


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def recipe_folders(recipe: Path) -> tuple[list[str], str | None, int]:
    """(training folders, validation folder, validation images) of the recipe, relative to the datasets."""
    import yaml

    data = (yaml.safe_load(recipe.read_text()) or {}).get("data", {})

    def relative(path: str) -> str:
        return str(Path(path).relative_to(RECIPE_DATASETS)) if path.startswith(RECIPE_DATASETS) else path

    val = data.get("val_dir")
    return [relative(p) for p in data.get("train_dirs", [])], val and relative(val), int(data.get("val_max_images", 16))


def reencoded(path: Path) -> bytes | None:
    """The JPEG at `path` re-encoded at JPEG_QUALITY, upright, with its own chroma subsampling; None if not smaller."""
    from PIL import Image, ImageOps

    if path.suffix.lower() not in (".jpg", ".jpeg"):
        return None
    buffer = io.BytesIO()
    with Image.open(path) as image:
        if image.mode == "RGB" and image.getexif().get(0x0112, 1) == 1:  # upright already: keep its subsampling
            image.save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling="keep", optimize=True)
        else:
            upright = ImageOps.exif_transpose(image).convert("RGB")
            upright.save(buffer, "JPEG", quality=JPEG_QUALITY, optimize=True)
    data = buffer.getvalue()
    return data if len(data) < path.stat().st_size else None


def copy_files(files: list[Path], target: Path) -> int:
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copyfile(path, target / path.name)
    return sum((target / p.name).stat().st_size for p in files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", type=Path, default=Path(RECIPE_DATASETS), help="the datasets folder")
    parser.add_argument("--out", type=Path, default=Path(".gpu-data"))
    parser.add_argument("--budget-bytes", type=int, required=True, help="the most the packed folder may take")
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    args = parser.parse_args(argv)

    train_dirs, val_dir, val_images = recipe_folders(args.recipe)
    missing = [d for d in [*train_dirs, val_dir, "kodak"] if d and not (args.datasets / d).is_dir()]
    if missing:
        print(f"missing under {args.datasets}: {', '.join(missing)}", file=sys.stderr)
        return 2
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    manifest: dict = {"datasets": str(args.datasets), "budget_bytes": args.budget_bytes, "sets": {},
                      "dropped": [], "jpeg_quality": None}
    kodak = images_in(args.datasets / "kodak")
    manifest["kodak"] = {"images": len(kodak), "bytes": copy_files(kodak, args.out / "kodak")}
    val = images_in(args.datasets / val_dir)[:val_images] if val_dir else []
    manifest["val"] = {"source": val_dir, "images": len(val), "bytes": copy_files(val, args.out / "val")}
    room = args.budget_bytes - manifest["kodak"]["bytes"] - manifest["val"]["bytes"]

    sets = {d.replace("/", "-"): (d, images_in(args.datasets / d)) for d in train_dirs}
    sizes = {name: sum(p.stat().st_size for p in files) for name, (_, files) in sets.items()}
    smaller: dict[Path, bytes] = {}
    if sum(sizes.values()) > room:
        manifest["jpeg_quality"] = JPEG_QUALITY
        for name, (_, files) in sets.items():
            for path in files:
                data = reencoded(path)
                if data is not None:
                    smaller[path] = data
            sizes[name] = sum(len(smaller[p]) if p in smaller else p.stat().st_size for p in files)
    while sets and sum(sizes.values()) > room:
        largest = max(sizes, key=sizes.get)
        manifest["dropped"].append({"set": sets[largest][0], "bytes": sizes.pop(largest)})
        del sets[largest]
    if not sets:
        print(f"no training set fits in {room} bytes beside Kodak and the validation images", file=sys.stderr)
        return 1
    for name, (source, files) in sets.items():
        target = args.out / "train" / name
        target.mkdir(parents=True)
        for path in files:
            if path in smaller:
                (target / path.name).write_bytes(smaller[path])
            else:
                shutil.copyfile(path, target / path.name)
        manifest["sets"][name] = {"source": source, "images": len(files), "bytes": sizes[name],
                                  "reencoded": sum(p in smaller for p in files)}
    manifest["total_bytes"] = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    mib = 2**20
    print(f"packed {args.out} ({manifest['total_bytes'] / mib:.1f} MiB of {args.budget_bytes / mib:.1f} MiB allowed):")
    for name, entry in manifest["sets"].items():
        note = f", {entry['reencoded']} re-encoded at quality {JPEG_QUALITY}" if entry["reencoded"] else ""
        print(f"  train/{name}: {entry['images']} images, {entry['bytes'] / mib:.1f} MiB{note}")
    for entry in manifest["dropped"]:
        print(f"  left out: {entry['set']} ({entry['bytes'] / mib:.1f} MiB), it did not fit")
    print(f"  val: {manifest['val']['images']} images, {manifest['val']['bytes'] / mib:.1f} MiB")
    print(f"  kodak: {manifest['kodak']['images']} images, {manifest['kodak']['bytes'] / mib:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
