"""The entropy format end to end: entropy-train, encode, resume, inspect, verify, decode, reader and dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from latentd.archive.entropy_model import load_entropy_model
from latentd.archive.reader import open_archive
from latentd.client.cli import main
from latentd.vae import load_codec
from tests.conftest import smooth_image


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed, (height, width) in enumerate([(40, 56), (33, 45), (64, 48)]):
        Image.fromarray(smooth_image(height, width, seed=seed)).save(folder / f"p{seed}.png")
    return folder


@pytest.fixture
def trained(tiny_model_dir, tmp_path, photos, capsys):
    out = tmp_path / "entropy"
    assert main(["entropy-train", "--images", str(photos), "-o", str(out), "--model", str(tiny_model_dir)]) == 0
    assert "trained on 3 images" in capsys.readouterr().out
    return out


def _encode(photos, out, model_dir, *extra):
    return main(["encode", str(photos), "-o", str(out), "--model", str(model_dir), "--no-progress", "--format",
                 "entropy", *extra])


def test_entropy_archive_end_to_end(tiny_model_dir, trained, photos, tmp_path, capsys):
    model = load_entropy_model(trained)
    assert model.config.vae == "tiny-vae" and model.config.images == 3
    out = tmp_path / "a.latents"
    assert _encode(photos, out, tiny_model_dir, "--entropy-model", str(trained), "--step", "0.25") == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert settings["format"] == "entropy" and settings["entropy_model"] == model.digest
    assert settings["entropy_step"] == 0.25
    assert main(["inspect", str(out)]) == 0
    assert f"entropy model {model.digest[:16]}" in capsys.readouterr().out
    assert main(["verify", str(out), "--entropy-model", str(trained)]) == 0

    codec = load_codec(str(tiny_model_dir), device="cpu")
    with open_archive(out, entropy_model=trained) as archive:
        entry = archive["p2.png"]
        exact = np.asarray(codec.encode(smooth_image(64, 48, seed=2)), np.float32)
        steps = (0.25 * model.unit)[:, None, None]
        assert entry.latents.shape == exact.shape
        assert (np.abs(entry.latents - exact) <= steps / 2 + 1e-5).all()
        assert entry.record.nbytes < exact.size  # fewer than q8's 8 bits per value, header included

    from latentd.archive.datasets import LatentDataset

    dataset = LatentDataset(out, entropy_model=trained)
    assert len(dataset) == 3 and dataset[2]["latents"].shape == exact.shape

    # Resuming with another step or model would mix two codings in one archive.
    capsys.readouterr()
    assert _encode(photos, out, tiny_model_dir, "--entropy-model", str(trained), "--step", "0.5") == 2
    assert "entropy_step" in capsys.readouterr().err

    decoded = tmp_path / "decoded"
    assert main(["decode", str(out), "-o", str(decoded), "--entropy-model", str(trained), "--model",
                 str(tiny_model_dir)]) == 0
    assert sorted(p.name for p in decoded.iterdir()) == ["p0.png", "p1.png", "p2.png"]


def test_reading_without_the_right_entropy_model_fails_each_entry_clearly(tiny_model_dir, trained, photos, tmp_path,
                                                                          capsys):
    out = tmp_path / "a.latents"
    assert _encode(photos, out, tiny_model_dir, "--entropy-model", str(trained)) == 0
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1  # the tiny VAE ships no entropy model
    assert capsys.readouterr().out.count("no entropy model ships with VAE tiny-vae") == 3

    other = tmp_path / "other"
    assert main(["entropy-train", "--images", str(photos / "p0.png"), "-o", str(other), "--model",
                 str(tiny_model_dir)]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--entropy-model", str(other)]) == 1
    assert capsys.readouterr().out.count("the archive was written with entropy model") == 3


def test_a_damaged_stream_is_one_failed_entry(tiny_model_dir, trained, photos, tmp_path, capsys):
    out = tmp_path / "a.latents"
    assert _encode(photos, out, tiny_model_dir, "--entropy-model", str(trained), "--commit-s", "0") == 0
    with open_archive(out) as archive:
        record = archive["p1.png"].record
    shard = out / record.shard
    data = bytearray(shard.read_bytes())
    data[record.offset + 44] ^= 0xFF  # inside its escapes or coder words, past the 40-byte header
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(out), "--entropy-model", str(trained)]) == 1
    report = capsys.readouterr().out
    assert "checksum mismatch" in report and "p1.png: unreadable" in report
    assert "p0.png" not in report and "p2.png" not in report

    decoded = tmp_path / "decoded"
    assert main(["decode", str(out), "-o", str(decoded), "--entropy-model", str(trained), "--no-verify", "--model",
                 str(tiny_model_dir)]) == 1
    assert "FAILED p1.png" in capsys.readouterr().err
    assert sorted(p.name for p in decoded.iterdir()) == ["p0.png", "p2.png"]


def test_entropy_options_are_checked(tiny_model_dir, trained, photos, tmp_path, capsys):
    out = tmp_path / "a.latents"
    assert main(["encode", str(photos), "-o", str(out), "--model", str(tiny_model_dir), "--no-progress",
                 "--step", "0.5"]) == 2
    assert "--step goes with --format entropy" in capsys.readouterr().err
    assert main(["encode", str(photos), "-o", str(out), "--model", str(tiny_model_dir), "--no-progress",
                 "--entropy-model", str(trained)]) == 2
    assert "--entropy-model goes with --format entropy or vq" in capsys.readouterr().err
    assert _encode(photos, out, tiny_model_dir, "--entropy-model", str(trained), "--step", "0") == 2
    assert "--step: entropy step 0" in capsys.readouterr().err
    assert _encode(photos, out, tiny_model_dir) == 2
    assert "no entropy model ships with model tiny-vae" in capsys.readouterr().err
    assert _encode(photos, out, tiny_model_dir, "--entropy-model", str(tmp_path)) == 2
    assert "not an entropy model" in capsys.readouterr().err


def test_bench_archive_measures_the_entropy_stage(tiny_model_dir, trained, photos, capsys):
    files = [str(p) for p in sorted(photos.iterdir())]
    assert main(["bench", "archive", "--from", *files, "--batch-size", "1", "--workers", "1", "--model",
                 str(tiny_model_dir), "--entropy-model", str(trained), "--format", "entropy"]) == 0
    out = capsys.readouterr().out
    assert "bench archive stage q8-zstd:" in out and "bench archive stage entropy@0.09375:" in out
    assert "(target >= 20 MB/s:" in out
    assert main(["bench", "archive", "--from", *files, "--batch-size", "1", "--model", str(tiny_model_dir)]) == 0
    assert "stage entropy" not in capsys.readouterr().out  # the tiny VAE ships none: no entropy row
