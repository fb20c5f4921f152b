"""Files latentd writes get the mode the umask asks for, not the 0600 of mkstemp and safetensors."""

from __future__ import annotations

import os
import stat

import pytest

from latentd.vae.fileio import current_umask, write_atomic


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_atomic_follows_the_umask(tmp_path, umask):
    assert current_umask() == umask
    write_atomic(tmp_path / "out" / "a.bin", b"data")
    assert mode(tmp_path / "out" / "a.bin") == 0o666 & ~umask
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.bin"]


def test_saved_models_follow_the_umask(tmp_path, umask, tiny_kl):
    from latentd.vae import save_model

    folder = save_model(tiny_kl, tmp_path / "model")
    assert {p.name: mode(p) for p in folder.iterdir()} == {
        "config.json": 0o666 & ~umask, "diffusion_pytorch_model.safetensors": 0o666 & ~umask}
