"""The typed training config: files, overrides, validation, round trip."""

from __future__ import annotations

import pytest

from latentd.vae import InvalidInputError
from latentd.vae.train.config import TrainConfig, apply_overrides, load_config


def test_yaml_and_overrides_with_types(write_config):
    config = load_config(write_config(), {"optim.lr": "1e-4", "data.hflip": "false", "loss.beta.value": "2",
                                          "optim.betas": "[0.5, 0.9]", "model.init_from": "none"})
    assert config.optim.lr == 1e-4 and config.data.hflip is False and config.loss.beta.value == 2.0
    assert config.optim.betas == [0.5, 0.9] and config.model.init_from is None
    assert config.model.architecture["block_out_channels"] == [16, 16]


def test_toml(tmp_path, image_folders):
    path = tmp_path / "cfg.toml"
    path.write_text(f'[data]\ntrain_dirs = ["{image_folders[0]}"]\n[optim]\nmax_steps = 3\n')
    assert load_config(path).optim.max_steps == 3


def test_saved_config_loads_back(tmp_path, write_config):
    config = load_config(write_config())
    config.save(tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == config


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"optim.nope": "1"}, "unknown config key"),
        ({"nope.lr": "1"}, "unknown config section"),
        ({"optim.max_steps": "many"}, "cannot use"),
        ({"optim": "1"}, "is a section"),
        ({"loss.reconstruction": "l3"}, "l1 or l2"),
        ({"loss.lpips_weight": "0.1"}, "cannot be downloaded"),
        ({"runtime.precision": "fp8"}, "precision"),
    ],
)
def test_bad_values_are_named(write_config, overrides, words):
    with pytest.raises(InvalidInputError, match=words):
        load_config(write_config(), overrides)


def test_bad_files(tmp_path):
    with pytest.raises(InvalidInputError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(InvalidInputError, match="not valid"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optimizer: {lr: 1}\n")
    with pytest.raises(InvalidInputError, match="unknown config key optimizer"):
        load_config(unknown)


def test_defaults_are_the_compact_f8_model():
    architecture = TrainConfig().model.architecture
    assert len(architecture["block_out_channels"]) == 4 and architecture["latent_channels"] == 4
    assert apply_overrides(TrainConfig(), {}).optim.max_steps > 0
