"""Model loading: registry names, diffusers folders, single-file LDM checkpoints, the Hub, saving."""

from __future__ import annotations

import json

import pytest
import torch

from latentd.vae import (
    Codec,
    ModelLoadError,
    ModelNotFoundError,
    build_random,
    get_spec,
    load_codec,
    load_model,
    save_model,
)
from latentd.vae.registry import MODELS
from tests.conftest import TINY_KL_CONFIG, make_tiny_kl, make_tiny_taesd, smooth_image
from tests.vae.ldm_format import to_ldm_state_dict


def _same_outputs(a, b):
    image = smooth_image(24, 32)
    ca, cb = Codec(a), Codec(b)
    assert torch.equal(ca.encode(image), cb.encode(image))
    latents = ca.encode(image)
    assert torch.equal(ca.decode(latents, output="tensor"), cb.decode(latents, output="tensor"))


def test_registry_is_one_table_with_unique_names():
    names = [spec.name for spec in MODELS]
    assert len(names) == len(set(names)) and {"default", "sd", "taesd"} <= set(names)


def test_sd_architecture_has_the_published_size():
    model = build_random("sd", seed=0)
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    info = Codec(model, name="sd").info
    assert (info.latent_channels, info.downsampling_factor, info.scaling_factor) == (4, 8, 0.18215)


def test_random_weights_follow_the_seed():
    a, b, c = (load_model("taesd", random_seed=s).model for s in (1, 1, 2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_default_model_without_weights_says_so(monkeypatch):
    # An installation whose packaged weights are missing (a stripped wheel, a broken checkout).
    monkeypatch.setattr(type(get_spec("default")), "packaged_path", lambda self: None)
    with pytest.raises(ModelNotFoundError, match="no weights installed"):
        load_model("default")


def test_save_and_load_gives_identical_outputs(tmp_path):
    model = make_tiny_kl()
    folder = save_model(model, tmp_path / "saved")
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_model(folder)
    assert loaded.name == "saved" and "folder" in loaded.source
    _same_outputs(make_tiny_kl(), loaded.model)


def test_saving_over_a_model_replaces_it_whole_and_a_failed_save_keeps_it(tmp_path, monkeypatch):
    target = save_model(make_tiny_kl(seed=1), tmp_path / "model")
    save_model(make_tiny_kl(seed=2), target)
    _same_outputs(make_tiny_kl(seed=2), load_model(target).model)

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(make_tiny_kl()), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_model(make_tiny_kl(seed=3), target)
    _same_outputs(make_tiny_kl(seed=2), load_model(target).model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folders left


def test_saving_an_optimized_codec_model_keeps_the_diffusers_format(tmp_path):
    codec = Codec(make_tiny_kl())
    folder = save_model(codec.model, tmp_path / "from-codec")
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    _same_outputs(make_tiny_kl(), load_model(folder).model)


def test_pipeline_folder_with_a_vae_subfolder(tmp_path):
    save_model(make_tiny_kl(), tmp_path / "pipeline" / "vae")
    (tmp_path / "pipeline" / "model_index.json").write_text("{}")
    _same_outputs(make_tiny_kl(), load_model(tmp_path / "pipeline").model)


def test_autoencoder_tiny_folder(tmp_path):
    folder = save_model(make_tiny_taesd(), tmp_path / "taesd")
    codec = load_codec(folder)
    assert codec.info.model_class == "AutoencoderTiny" and not codec.info.has_posterior
    _same_outputs(make_tiny_taesd(), load_model(folder).model)


def test_unsupported_model_class_is_refused(tmp_path):
    folder = save_model(make_tiny_kl(), tmp_path / "other")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    with pytest.raises(ModelLoadError, match="UNet2DModel is not supported"):
        load_model(folder)


def test_pickle_weights_are_not_loaded_from_folders(tmp_path):
    folder = tmp_path / "pickled"
    model = make_tiny_kl()
    model.save_pretrained(str(folder), safe_serialization=False)
    with pytest.raises((ModelLoadError, ModelNotFoundError)):
        load_model(folder)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_ldm_checkpoint_with_local_config(tmp_path, suffix):
    model = make_tiny_kl()
    state = to_ldm_state_dict(model.state_dict(), prefix="first_stage_model.")
    path = tmp_path / f"vae{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 1}, path)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"_class_name": "AutoencoderKL", **TINY_KL_CONFIG}))
    _same_outputs(make_tiny_kl(), load_model(path, config=config_file).model)
    _same_outputs(make_tiny_kl(), load_model(path, config=TINY_KL_CONFIG).model)


def test_single_file_in_diffusers_keys(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "diffusers-keys.safetensors"
    save_file(make_tiny_kl().state_dict(), str(path))
    _same_outputs(make_tiny_kl(), load_model(path, config=TINY_KL_CONFIG).model)


def test_single_file_that_does_not_fit_the_config(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file(to_ldm_state_dict(make_tiny_kl().state_dict()), str(path))
    with pytest.raises(ModelLoadError, match="missing|do not fit"):
        load_model(path)  # the default `sd` architecture is much larger


def test_corrupt_and_malicious_checkpoints_are_refused(tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        load_model(corrupt, config=TINY_KL_CONFIG)

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    malicious = tmp_path / "malicious.ckpt"
    torch.save({"state_dict": Payload()}, malicious)
    with pytest.raises(ModelLoadError, match="cannot read checkpoint"):
        load_model(malicious, config=TINY_KL_CONFIG)
    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a checkpoint"):
        load_model(not_a_checkpoint)


def test_unknown_name_lists_the_registry():
    with pytest.raises(ModelNotFoundError, match="registered name"):
        load_model("no-such-model")
    with pytest.raises(ModelNotFoundError, match="registered architecture"):
        load_model("./somewhere", random_seed=1)


def test_hub_ids_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="Hugging Face Hub"):
        load_model("some-org/some-vae", local_files_only=True)


@pytest.mark.parametrize("where", ["online", "cached"])
def test_hub_id_with_subfolder_loads_through_from_pretrained(tmp_path, monkeypatch, where):
    from diffusers import AutoencoderKL

    from latentd.vae import hub

    save_model(make_tiny_kl(), tmp_path / "repo" / "vae")
    monkeypatch.setattr(hub, "availability", lambda repo, subfolder=None: where)
    seen = []
    real_load_config, real_from_pretrained = AutoencoderKL.load_config, AutoencoderKL.from_pretrained.__func__

    def fake_load_config(location, subfolder=None, **kwargs):
        seen.append((location, subfolder))
        return real_load_config(str(tmp_path / "repo"), subfolder=subfolder, **kwargs)

    def fake_from_pretrained(cls, location, subfolder=None, **kwargs):
        assert kwargs["use_safetensors"] is True
        assert kwargs["local_files_only"] is (where == "cached")  # a cached model never touches the network
        return real_from_pretrained(cls, str(tmp_path / "repo"), subfolder=subfolder, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "load_config", fake_load_config)
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", classmethod(fake_from_pretrained))
    loaded = load_model("some-org/some-pipeline/vae")
    assert seen[0] == ("some-org/some-pipeline", "vae") and loaded.source == "hub some-org/some-pipeline/vae"
    _same_outputs(make_tiny_kl(), loaded.model)
