"""deploy/gpu/run.sh, the prepared device run, dry-run for real on the CPU with tiny settings: on a tiny image
folder that deploy/gpu/pack_data.py packs from synthetic datasets, without wheels (the packages are importable
here), into a temporary OUT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import smooth_image

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["install", "train", "export", "eval", "tests", "bench-codec", "bench-serve"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """The folders vae/train/configs/long.yaml names, a few small images each, packed as a device run gets them."""
    root = tmp_path_factory.mktemp("gpu-data")
    datasets = root / "datasets"
    for folder, count, suffix in [("bsds500/train", 3, "jpg"), ("bsds500/test", 2, "jpg"), ("sun-hays80", 2, "jpg"),
                                  ("bsds500/val", 3, "jpg"), ("kodak", 2, "png")]:
        (datasets / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(smooth_image(40, 48, seed=i)).save(datasets / folder / f"img{i}.{suffix}")
    data = root / "packed"
    subprocess.run([sys.executable, "deploy/gpu/pack_data.py", "--datasets", str(datasets), "--out", str(data),
                    "--budget-bytes", str(2**20)], cwd=ROOT, check=True, capture_output=True, text=True)
    return data


def run_script(packed: Path, out: Path, budget_s: int) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "DEVICE": "cpu", "BUDGET_S": str(budget_s), "OUT": str(out), "DATA": str(packed),
           "PY": sys.executable, "WHEELS": str(out.parent / "no-wheels")}
    started = time.monotonic()
    result = subprocess.run(["bash", "deploy/gpu/run.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=budget_s + 60, check=False)
    return result, time.monotonic() - started


def test_pack_data_copies_the_recipe_folders_and_kodak(packed):
    manifest = json.loads((packed / "manifest.json").read_text())
    assert sorted(manifest["sets"]) == ["bsds500-test", "bsds500-train", "sun-hays80"]
    assert manifest["kodak"]["images"] == 2 and manifest["val"]["images"] == 3 and not manifest["dropped"]
    assert len(list((packed / "train" / "bsds500-train").iterdir())) == 3


def test_pack_data_reencodes_then_leaves_out_the_largest_set(tmp_path):
    """Noise at JPEG quality 100: re-encoded at 90 it shrinks, but not enough for all three sets."""
    datasets = tmp_path / "datasets"
    for folder, count in [("bsds500/train", 2), ("bsds500/test", 6), ("sun-hays80", 1), ("bsds500/val", 1),
                          ("kodak", 1)]:
        (datasets / folder).mkdir(parents=True)
        for i in range(count):
            noise = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(noise).save(datasets / folder / f"img{i}.jpg", quality=100)
    fixed = sum(p.stat().st_size for d in ("bsds500/val", "kodak") for p in (datasets / d).iterdir())
    small = sum(p.stat().st_size for d in ("bsds500/train", "sun-hays80") for p in (datasets / d).iterdir())
    out = tmp_path / "packed"
    subprocess.run([sys.executable, "deploy/gpu/pack_data.py", "--datasets", str(datasets), "--out", str(out),
                    "--budget-bytes", str(fixed + small)], cwd=ROOT, check=True, capture_output=True, text=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [d["set"] for d in manifest["dropped"]] == ["bsds500/test"]
    assert manifest["jpeg_quality"] == 90 and manifest["sets"]["bsds500-train"]["reencoded"] == 2
    assert manifest["total_bytes"] <= fixed + small


@pytest.mark.slow
def test_dry_run_on_cpu_passes_every_stage(packed, tmp_path):
    out = tmp_path / "out"
    result, _ = run_script(packed, out, budget_s=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == STAGES
    assert summary["passed"] == STAGES, summary["stages"]
    assert summary["versions"]["default_weights"] and summary["training"]["step"] >= 1
    assert summary["kodak"]["images"] == 2
    assert summary["tests"].get("skipped", 0) >= 1 and summary["bench_codec"] and summary["bench_serve"]["rows"]
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["default/config.json", "default/diffusion_pytorch_model.safetensors",
                     "default/training_state.json", "metrics.csv", "run.log", "summary.json", "summary.md"]
    assert "| bench-serve | pass |" in (out / "summary.md").read_text()
    assert "== bench-codec: pass" in (out / "run.log").read_text()


@pytest.mark.slow
def test_dry_run_stays_within_a_short_budget(packed, tmp_path):
    out = tmp_path / "out"
    result, seconds = run_script(packed, out, budget_s=30)
    assert seconds < 30 + 10, result.stdout[-4000:]  # a stage's kill grace and the shell's own time
    assert result.returncode != 0  # not every stage fits in 30 s on a CPU
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == STAGES
    assert {stage["status"] for stage in summary["stages"].values()} - {"pass", "fail", "timeout", "skipped"} == set()
    assert summary["stages"]["bench-serve"]["status"] in ("skipped", "timeout")
