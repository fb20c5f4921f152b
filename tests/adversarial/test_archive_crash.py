"""`kill -9` of a real `latentd encode` at random moments, then resume: every image is in the archive exactly once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from latentd.archive.reader import open_archive, verify_archive
from tests.conftest import smooth_image

IMAGES = 120
KILLS = 3
LATENTD = str(Path(sys.executable).with_name("latentd"))


def committed_shards(archive: Path) -> int:
    return len(list(archive.glob("shard-*.safetensors")))


def encode(folder: Path, archive: Path, model: Path) -> subprocess.Popen:
    return subprocess.Popen([LATENTD, "encode", str(folder), "-o", str(archive), "--model", str(model),
                             "--no-progress", "--batch-size", "2", "--workers", "1", "--commit-s", "0.01"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_at_random(process: subprocess.Popen, archive: Path, rng: random.Random) -> None:
    """Kill -9 during start-up, or once a random number of new shards are on disk."""
    more = rng.choice([0, *range(1, IMAGES // 12)])
    if more == 0:
        time.sleep(rng.uniform(0, 3))
    else:
        target = committed_shards(archive) + more
        deadline = time.monotonic() + 120  # bounded: a run that never gets there fails the test below
        while committed_shards(archive) < target and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)


def images_in(archive: Path) -> int:
    if not (archive / "manifest.sqlite").exists():
        return 0
    with open_archive(archive) as opened:
        return len(opened)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_gives_every_image_exactly_once(tmp_path, tiny_model_dir):
    folder, archive = tmp_path / "imgs", tmp_path / "archive"
    folder.mkdir()
    for index in range(IMAGES):
        Image.fromarray(smooth_image(32, 32, seed=index)).save(folder / f"{index:03d}.png")
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    partial = 0
    for _ in range(KILLS):
        before = images_in(archive)
        process = encode(folder, archive, tiny_model_dir)
        kill_at_random(process, archive, rng)
        after = images_in(archive)
        assert after >= before, f"seed {seed}: committed images were lost"
        partial += process.returncode == -signal.SIGKILL and before < after < IMAGES
    process = encode(folder, archive, tiny_model_dir)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, f"seed {seed}: {err}"
    assert partial, f"seed {seed}: no kill landed while images were being encoded"
    with open_archive(archive) as opened:
        keys = [entry.key for entry in opened]
        assert sorted(keys) == [f"{index:03d}.png" for index in range(IMAGES)], f"seed {seed}"
        assert opened.manifest.counts() == {"ok": IMAGES}
        listed = {row["name"] for row in opened.manifest.shards()}
        assert {path.name for path in archive.glob("shard-*")} == listed, f"seed {seed}: orphan or missing shards"
    from safetensors import safe_open

    stored = []
    for name in listed:
        with safe_open(str(archive / name), framework="numpy") as shard:
            stored += [tensor[: -len("::data")] for tensor in shard.keys() if tensor.endswith("::data")]
    assert sorted(stored) == sorted(keys), f"seed {seed}: an image is stored twice or not at all"
    assert verify_archive(archive) == []
