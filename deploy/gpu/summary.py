"""Helpers of deploy/gpu/run.sh: the versions on the machine, one-line reports of the JSON that the stages write,
and the run's summary ($OUT/summary.json and $OUT/summary.md). The standard library only, except `versions`."""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

STAGES = ("install", "train", "export", "eval", "tests", "bench-codec", "bench-serve")


def read_json(path: Path) -> dict | None:
    """The first JSON object in a file (a command's stdout may carry a stray line before it)."""
    try:
        text = path.read_text()
        start = text.index("{")
        return json.JSONDecoder().raw_decode(text[start:])[0]
    except (OSError, ValueError):
        return None


def versions() -> dict:
    import platform
    from importlib import metadata

    found: dict = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "latentd", "accelerate", "grpcio", "protobuf", "numpy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    try:
        import torch

        found["cuda"] = torch.version.cuda
        found["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            found["gpu"] = torch.cuda.get_device_name(0)
            found["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            found["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            found["cudnn"] = torch.backends.cudnn.version()
        import latentd.vae  # the library imports with what is installed

        package = Path(latentd.vae.__file__).parent
        found["latentd_from"] = str(package.parent)
        found["default_weights"] = (package / "weights/default/diffusion_pytorch_model.safetensors").is_file()
    except Exception as exc:  # noqa: BLE001  # reported, not fatal: the stages that need it fail on their own
        found["error"] = f"{type(exc).__name__}: {exc}"
    return found


def _float(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def codec_row(result: dict, requested: str) -> dict:
    timings = {t["operation"]: t for t in result.get("timings", [])}
    row = {"size": result.get("size"), "batch": result.get("batch"), "requested": requested,
           "dtype": result.get("dtype"), "device": result.get("device"), "agrees": result.get("agrees"),
           "latent_rel_error": result.get("latent_rel_error"), "image_rel_error": result.get("image_rel_error")}
    for op in ("encode", "decode"):
        timing = timings.get(op, {})
        row[f"{op}_diffusers_ms"] = timing.get("baseline_ms")
        row[f"{op}_latentd_ms"] = timing.get("latentd_ms")
    return row


def pytest_counts(path: Path) -> dict:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return {}
    last = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", line)), "")
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", last)}


def training(run_dir: Path, metrics: Path, data: Path) -> dict:
    info: dict = {}
    states = sorted(run_dir.glob("checkpoints/step-*/trainer_state.json"))
    if states:
        state = json.loads(states[-1].read_text())
        info.update(step=state.get("step"), fresh_from=state.get("fresh_from"),
                    train_seconds=round(state.get("train_seconds", 0.0), 1), skipped_files=state.get("skipped_files"))
        if info["step"] is not None and info["fresh_from"] is not None and state.get("train_seconds"):
            info["steps_per_s"] = round((info["step"] - info["fresh_from"]) / state["train_seconds"], 2)
    config = run_dir / "config.yaml"
    if config.is_file():
        try:
            import yaml

            values = yaml.safe_load(config.read_text())
            loader, optim, runtime = values["data"], values["optim"], values["runtime"]
            info.update(batch_size=loader["batch_size"], crop_size=loader["crop_size"], train_dirs=loader["train_dirs"],
                        precision=runtime["precision"], lr=optim["lr"], schedule=optim["schedule"],
                        max_steps=optim["max_steps"])
        except Exception as exc:  # noqa: BLE001  # the run's other figures still count
            info["config_error"] = f"{type(exc).__name__}: {exc}"
    if metrics.is_file():
        with metrics.open() as handle:
            rows = list(csv.DictReader(handle))
        validated = [row for row in rows if row.get("val_psnr")]
        if validated:
            info["validation"] = [{"step": int(row["step"]), "psnr": _float(row["val_psnr"]),
                                   "ms_ssim": _float(row.get("val_ms_ssim"))} for row in validated]
        if rows:
            info["last_loss"] = rows[-1].get("loss")
    manifest = read_json(data / "manifest.json")
    if manifest:
        info["data"] = manifest
    return info


def summary(args: argparse.Namespace) -> int:
    import time

    work, out = Path(args.work), Path(args.out)
    stages = {}
    if Path(args.stages).is_file():
        for line in Path(args.stages).read_text().splitlines():
            name, status, rc, seconds = (line.split("\t") + ["", "", "", ""])[:4]
            stages[name] = {"status": status, "exit": rc, "seconds": int(seconds) if seconds.isdigit() else None}
    for name in STAGES:
        stages.setdefault(name, {"status": "not run", "exit": None, "seconds": None})
    codec = []
    for path in sorted(work.glob("bench-codec-*.json")):
        result = read_json(path)
        if result:
            codec.append(codec_row(result, path.stem.rsplit("-", 1)[-1]))
    serve = read_json(work / "bench-serve.json")
    evaluation = read_json(work / "eval.json")
    result = {
        "device": args.device, "budget_s": args.budget, "seconds": round(time.time() - args.started),
        "passed": [name for name in STAGES if stages[name]["status"] == "pass"],
        "stages": {name: stages[name] for name in STAGES},
        "versions": read_json(work / "versions.json"),
        "training": training(work / "train-run", out / "metrics.csv", Path(args.data)),
        "kodak": evaluation and evaluation.get("summary"),
        "tests": pytest_counts(work / "pytest.txt"),
        "bench_codec": codec,
        "bench_serve": serve,
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(result))
    print((out / "summary.md").read_text())
    return 0


def markdown(result: dict) -> str:
    v = result.get("versions") or {}
    lines = [f"# latentd device run ({result['device']})", "",
             (f"{result['seconds']} s of a {result['budget_s']} s budget; "
              f"torch {v.get('torch')} (CUDA {v.get('cuda')}), {v.get('gpu', 'no GPU')}, "
              f"diffusers {v.get('diffusers')}, latentd {v.get('latentd')}, python {v.get('python')}"), "",
             "| stage | status | exit | seconds |", "|---|---|---|---|"]
    for name, stage in result["stages"].items():
        lines.append(f"| {name} | {stage['status']} | {stage['exit'] if stage['exit'] is not None else '-'} | "
                     f"{_fmt(stage['seconds'], 'd')} |")
    t = result["training"]
    if t:
        lines += ["", "## Training (vae/train/configs/long.yaml)", "",
                  (f"step {t.get('fresh_from')} -> {t.get('step')} in {t.get('train_seconds')} s "
                   f"({t.get('steps_per_s')} steps/s), batch {t.get('batch_size')} x {t.get('crop_size')} px, "
                   f"{t.get('precision')}, lr {t.get('lr')}, max_steps {t.get('max_steps')}")]
        for row in t.get("validation", []):
            lines.append(f"- validation at step {row['step']}: {_fmt(row['psnr'])} dB, "
                         f"MS-SSIM {_fmt(row['ms_ssim'], '.4f')}")
    k = result.get("kodak")
    if k:
        lines += ["", "## Kodak (latentd eval, exported fp16 weights)", "",
                  "| images | PSNR (dB) | MS-SSIM | bpp | encode ms | decode ms | device |", "|---|---|---|---|---|---|---|",
                  (f"| {k.get('images')} ({k.get('failed')} failed) | {_fmt(k.get('mean_psnr'))} | "
                   f"{_fmt(k.get('mean_ms_ssim'), '.4f')} | {_fmt(k.get('mean_bpp'), '.3f')} | "
                   f"{_fmt(k.get('mean_encode_ms'), '.1f')} | {_fmt(k.get('mean_decode_ms'), '.1f')} | "
                   f"{k.get('device')} |")]
    if result.get("tests"):
        lines += ["", "pytest -m gpu: " + ", ".join(f"{n} {w}" for w, n in result["tests"].items())]
    if result["bench_codec"]:
        lines += ["", "## latentd bench codec (ms per image; diffusers in the same dtype, same process)", "",
                  ("| size | batch | asked | ran | encode diffusers | encode latentd | decode diffusers | "
                   "decode latentd | agrees |"), "|---|---|---|---|---|---|---|---|---|"]
        for r in result["bench_codec"]:
            lines.append(f"| {r['size']} | {r['batch']} | {r['requested']} | {r['dtype']} | "
                         f"{_fmt(r['encode_diffusers_ms'])} | {_fmt(r['encode_latentd_ms'])} | "
                         f"{_fmt(r['decode_diffusers_ms'])} | {_fmt(r['decode_latentd_ms'])} | {r['agrees']} |")
    serve = result.get("bench_serve")
    if serve and serve.get("rows"):
        lines += ["", f"## latentd bench serve (model {serve.get('model')}, {serve.get('clients')} clients)", "",
                  "| op | size | in-process images/s | server images/s | p50 ms | p99 ms | mean batch | errors |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in serve["rows"]:
            b = row.get("batched") or {}
            lines.append(f"| {row['op']} | {row['size']} | {_fmt(row.get('in_process_images_per_s'))} | "
                         f"{_fmt(b.get('images_per_s'))} | {_fmt(b.get('p50_ms'), '.1f')} | "
                         f"{_fmt(b.get('p99_ms'), '.1f')} | {_fmt(b.get('mean_batch'))} | {b.get('errors', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("versions", help="print the versions as JSON")
    one = commands.add_parser("eval", help="one line of an eval --json file")
    one.add_argument("path", type=Path)
    one = commands.add_parser("codec", help="one line of a bench codec --json file")
    one.add_argument("path", type=Path)
    full = commands.add_parser("summary", help="write summary.json and summary.md")
    full.add_argument("--stages", required=True)
    full.add_argument("--work", required=True)
    full.add_argument("--out", required=True)
    full.add_argument("--data", required=True)
    full.add_argument("--budget", type=int, required=True)
    full.add_argument("--started", type=int, required=True)
    full.add_argument("--device", required=True)
    args = parser.parse_args(argv)
    if args.command == "versions":
        print(json.dumps(versions(), indent=2))
        return 0
    if args.command == "summary":
        return summary(args)
    result = read_json(args.path)
    if result is None:
        print(f"{args.path.name}: no JSON", file=sys.stderr)
        return 1
    if args.command == "eval":
        k = result.get("summary", {})
        print(f"Kodak: {k.get('images')} images, PSNR {_fmt(k.get('mean_psnr'))} dB, "
              f"MS-SSIM {_fmt(k.get('mean_ms_ssim'), '.4f')}, {k.get('failed')} failed, on {k.get('device')}")
    else:
        r = codec_row(result, "")
        print(f"codec {r['size']} px {r['dtype']} on {r['device']}: encode {_fmt(r['encode_diffusers_ms'])} -> "
              f"{_fmt(r['encode_latentd_ms'])} ms, decode {_fmt(r['decode_diffusers_ms'])} -> "
              f"{_fmt(r['decode_latentd_ms'])} ms (diffusers -> latentd), agrees {r['agrees']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
