"""Fixtures for trainer tests: a folder of small synthetic photos and a tiny, fast training config."""

from __future__ import annotations

import pytest
import yaml
from PIL import Image

from tests.conftest import smooth_image

TINY_ARCHITECTURE = {
    "block_out_channels": [16, 16],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
}


@pytest.fixture
def image_folders(tmp_path):
    train, val = tmp_path / "data" / "train", tmp_path / "data" / "val"
    (train / "nested").mkdir(parents=True)
    val.mkdir(parents=True)
    for i in range(10):
        folder = train / "nested" if i % 3 == 0 else train
        Image.fromarray(smooth_image(40 + 4 * i, 48, seed=i)).save(folder / f"img{i}.png")
    for i in range(3):
        Image.fromarray(smooth_image(36, 44, seed=50 + i)).save(val / f"val{i}.jpg", quality=95)
    return train, val


@pytest.fixture
def write_config(tmp_path, image_folders):
    """Write a tiny config (with optional section overrides) and return its path."""
    train, val = image_folders

    def write(name: str = "cfg", **sections) -> "Path":  # noqa: F821
        config = {
            "model": {"architecture": TINY_ARCHITECTURE},
            "data": {"train_dirs": [str(train)], "val_dir": str(val), "crop_size": 32, "batch_size": 4,
                     "workers": 0, "val_max_images": 3, "grid_images": 2},
            "optim": {"max_steps": 12, "warmup_steps": 2, "lr": 2e-3},
            "runtime": {"output_dir": str(tmp_path / "runs" / name), "save_every": 6, "val_every": 6,
                        "log_every": 1, "tensorboard": False},
            "export": {"stat_images": 8},
        }
        for section, values in sections.items():
            config[section] = {**config.get(section, {}), **values}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write
