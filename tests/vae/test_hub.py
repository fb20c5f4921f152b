"""latentd.vae.hub: cached or reachable Hub models, and a loading error that comes at once without internet."""

from __future__ import annotations

import socket

import pytest

from latentd.vae import hub, load_model
from latentd.vae.errors import ModelNotFoundError


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty Hub cache and an endpoint that refuses connections (a bound, non-listening port)."""
    from huggingface_hub import constants

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{sock.getsockname()[1]}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield
    sock.close()


def test_an_empty_cache_and_a_refusing_endpoint(no_hub):
    assert not hub.cached("stabilityai/sd-vae-ft-mse")
    assert not hub.reachable(timeout=2)
    assert hub.availability("stabilityai/sd-vae-ft-mse") == "unavailable"


def test_offline_mode_is_never_reachable(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert not hub.reachable()


def test_a_model_cached_in_the_hub_layout_is_found(no_hub, tmp_path):
    from huggingface_hub import constants

    repo = "org/tiny-vae"
    folder = tmp_path / "hub-cache" / "models--org--tiny-vae"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123" / "vae").mkdir(parents=True)
    (folder / "snapshots" / "abc123" / "vae" / "config.json").write_text("{}")
    assert constants.HF_HUB_CACHE == str(tmp_path / "hub-cache")
    assert hub.cached(repo, "vae") and not hub.cached(repo)
    assert hub.availability(repo, "vae") == "cached"


@pytest.mark.parametrize("source", ["sd", "taesd", "someone/some-vae"])
def test_loading_a_hub_model_without_internet_says_so_at_once(no_hub, source):
    with pytest.raises(ModelNotFoundError, match="cannot reach, and they are not in the local cache"):
        load_model(source)
