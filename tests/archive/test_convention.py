"""An archive's latent scaling: recorded, read back, and converted for a model that scales otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentd.archive.convention import Scaling, rescaled
from latentd.archive.reader import open_archive
from latentd.client.cli import main
from latentd.vae import Codec, save_model
from tests.conftest import make_tiny_kl, smooth_image

MEAN, STD = [0.1, -0.2, 0.3, 0.0], [0.5, 1.5, 1.0, 2.0]


@pytest.mark.parametrize("overrides", [{}, {"latents_mean": MEAN, "latents_std": STD}])
def test_scaling_is_the_codecs_own(overrides):
    codec = Codec(make_tiny_kl(**overrides, scaling_factor=0.7, shift_factor=0.2))
    scaling = Scaling(0.7, 0.2, tuple(overrides.get("latents_mean", ())), tuple(overrides.get("latents_std", ())))
    raw = np.random.default_rng(0).normal(size=(4, 3, 5))
    np.testing.assert_allclose(scaling.from_raw(raw), codec.scale(torch.from_numpy(raw)).numpy(), rtol=1e-6)
    np.testing.assert_allclose(scaling.to_raw(scaling.from_raw(raw)), raw, rtol=1e-9, atol=1e-12)


def test_rescaled_latents_are_the_same_raw_latents():
    source, target = Scaling(0.3, 0.1), Scaling(0.7, 0.2, tuple(MEAN), tuple(STD))
    latents = np.random.default_rng(1).normal(size=(4, 2, 3)).astype(np.float32)
    converted = rescaled(latents, source, target)
    np.testing.assert_allclose(target.to_raw(converted), source.to_raw(latents), rtol=1e-5, atol=1e-6)
    assert rescaled(latents, source, source) is latents
    with pytest.raises(ValueError, match="per-channel statistics of 4 channels"):
        rescaled(latents[:3], source, target)


@pytest.mark.parametrize("meta", [{}, {"scaling_factor": "x"}, {"scaling_factor": 0}, {"scaling_factor": float("nan")},
                                  {"scaling_factor": 1, "latents_mean": [0], "latents_std": []},
                                  {"scaling_factor": 1, "latents_mean": [0], "latents_std": [-1]}])
def test_settings_without_a_usable_scaling_give_none(meta):
    assert Scaling.of_meta(meta) is None


def test_decode_with_a_model_scaled_otherwise_converts_and_says_so(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(2):
        Image.fromarray(smooth_image(32, 40, seed=seed)).save(photos / f"p{seed}.png")
    plain = save_model(make_tiny_kl(), tmp_path / "a" / "vae")
    per_channel = save_model(make_tiny_kl(latents_mean=MEAN, latents_std=STD), tmp_path / "b" / "vae")  # same weights
    out = tmp_path / "x.latents"
    assert main(["encode", str(photos), "-o", str(out), "--model", str(plain), "--no-progress"]) == 0
    with open_archive(out) as archive:
        assert "latents_mean" not in archive.meta
    assert main(["decode", str(out), "-o", str(tmp_path / "same"), "--model", str(plain)]) == 0
    assert "note:" not in capsys.readouterr().err
    assert main(["decode", str(out), "-o", str(tmp_path / "other"), "--model", str(per_channel)]) == 0
    assert "converting through the raw latents" in capsys.readouterr().err
    for seed in range(2):
        same = np.asarray(Image.open(tmp_path / "same" / f"p{seed}.png"), np.int16)
        other = np.asarray(Image.open(tmp_path / "other" / f"p{seed}.png"), np.int16)
        assert np.abs(same - other).max() <= 1
    # an archive written by the per-channel model records its statistics
    out2 = tmp_path / "y.latents"
    assert main(["encode", str(photos), "-o", str(out2), "--model", str(per_channel), "--no-progress"]) == 0
    with open_archive(out2) as archive:
        assert archive.meta["latents_mean"] == pytest.approx(MEAN) and archive.meta["latents_std"] == pytest.approx(STD)
    assert main(["decode", str(out2), "-o", str(tmp_path / "back"), "--model", str(plain)]) == 0
    assert "converting through the raw latents" in capsys.readouterr().err
