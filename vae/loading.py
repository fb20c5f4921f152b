"""Load a VAE from a registry name, a diffusers folder, a single-file LDM checkpoint or the Hub; save one."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import AutoencoderDC, AutoencoderKL, AutoencoderKLFlux2, AutoencoderTiny, VQModel
from torch import nn

from .errors import ModelLoadError, ModelNotFoundError
from .fileio import follow_umask
from .model_info import SUPPORTED_CLASSES
from .registry import MODELS, ModelSpec, get_spec, is_registered

_CLASSES: dict[str, type[nn.Module]] = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny,
                                        "AutoencoderDC": AutoencoderDC, "AutoencoderKLFlux2": AutoencoderKLFlux2,
                                        "VQModel": VQModel}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_CONFIG_NAME = "config.json"


@dataclass
class LoadedModel:
    """A model in eval mode with the name it was asked for and a human-readable origin."""

    model: nn.Module
    name: str
    source: str


def load_model(
    source: str | os.PathLike,
    *,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    random_seed: int | None = None,
    local_files_only: bool | None = None,
) -> LoadedModel:
    """Resolve `source` to a VAE, trying in order:

    1. a registry name (`default`, `sd`, `taesd`): packaged weights, else the Hub, or seeded random
       weights of that architecture when `random_seed` is given;
    2. a local diffusers model folder (`config.json` + `diffusion_pytorch_model.safetensors`), or a
       pipeline folder with a `vae/` subfolder;
    3. a single-file checkpoint (original LDM/SD or diffusers keys) with `config`: a registry name,
       a `config.json` or a folder holding one (default: the `sd` architecture);
    4. a Hub id `org/name` or `org/name/subfolder` (needs the internet).
    """
    text = os.fspath(source)
    if is_registered(text):
        return _load_registered(get_spec(text), random_seed, local_files_only)
    if random_seed is not None:
        raise ModelNotFoundError(f"random weights need a registered architecture name, not {text!r}")
    path = Path(text).expanduser()
    if path.is_dir():
        nested = not (path / _CONFIG_NAME).is_file() and (path / "vae" / _CONFIG_NAME).is_file()  # a pipeline folder
        folder = path / "vae" if nested else path
        return LoadedModel(_from_pretrained(str(folder), None, True), folder.name or text, f"folder {folder}")
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(f"{path}: not a checkpoint (expected one of {', '.join(SINGLE_FILE_SUFFIXES)})")
        return LoadedModel(load_single_file(path, config), path.stem, f"checkpoint {path}")
    if _looks_like_hub_id(text):
        repo, subfolder = _split_hub_id(text)
        return LoadedModel(_from_hub(repo, subfolder, local_files_only, text), text, f"hub {text}")
    known = ", ".join(spec.name for spec in MODELS)
    raise ModelNotFoundError(f"model {text!r} is not a registered name ({known}), an existing path or a Hub id")


def _load_registered(spec: ModelSpec, random_seed: int | None, local_files_only: bool | None) -> LoadedModel:
    if random_seed is not None:
        return LoadedModel(build_random(spec, random_seed), spec.name, f"{spec.name} architecture, seed {random_seed}")
    packaged = spec.packaged_path()
    if packaged is not None:
        return LoadedModel(_from_pretrained(str(packaged), None, True), spec.name, f"packaged {packaged}")
    if spec.hub_id is None:
        hint = "; ".join(spec.notes)
        raise ModelNotFoundError(f"model {spec.name!r} has no weights installed in this package ({hint})")
    return LoadedModel(
        _from_hub(spec.hub_id, spec.hub_subfolder, local_files_only, spec.name), spec.name, f"hub {spec.hub_id}"
    )


def _from_hub(repo: str, subfolder: str | None, local_files_only: bool | None, name: str) -> nn.Module:
    """From the local Hub cache when the model is there, else from the Hub; a Hub that cannot be reached
    is said at once rather than after the Hub client's retries."""
    from . import hub

    if not local_files_only:
        where = hub.availability(repo, subfolder)
        if where == "unavailable":
            raise ModelNotFoundError(
                f"model {name!r} needs its weights from the Hugging Face Hub ({repo}), which this machine cannot "
                f"reach, and they are not in the local cache; download them where there is internet "
                f"(`huggingface-cli download {repo}`) or pass a local model folder or .safetensors file")
        local_files_only = where == "cached"
    return _from_pretrained(repo, subfolder, local_files_only)


def build_random(spec: ModelSpec | str, seed: int) -> nn.Module:
    """The registered architecture with weights drawn from `seed` (same seed, same weights)."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    if spec.config is None:
        packaged = spec.packaged_path()
        if packaged is None:
            raise ModelNotFoundError(f"model {spec.name!r} has no architecture to initialise without its weights")
        config = _CLASSES[spec.model_class].load_config(str(packaged))
    else:
        config = dict(spec.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _CLASSES[spec.model_class].from_config(config)
    return model.eval()


def _from_pretrained(location: str, subfolder: str | None, local_files_only: bool | None) -> nn.Module:
    try:
        config = AutoencoderKL.load_config(location, subfolder=subfolder, local_files_only=bool(local_files_only))
    except (OSError, ValueError) as exc:
        where = "folder" if Path(location).exists() else "Hugging Face Hub repository (needs the internet)"
        raise ModelNotFoundError(f"cannot read the model config from {where} {location!r}: {exc}") from exc
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name not in _CLASSES:
        raise ModelLoadError(f"{location}: {class_name} is not supported (supported: {', '.join(SUPPORTED_CLASSES)})")
    try:
        model = _CLASSES[class_name].from_pretrained(
            location, subfolder=subfolder, use_safetensors=True, local_files_only=bool(local_files_only)
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load {class_name} weights from {location!r}: {exc}") from exc
    return model.eval()


def load_single_file(path: str | os.PathLike, config: str | os.PathLike | Mapping[str, Any] | None = None) -> nn.Module:
    """Build an `AutoencoderKL` from one checkpoint file, converting original LDM keys when needed.

    Pickled checkpoints load with `torch.load(weights_only=True)`: tensors only, no code.
    """
    path = Path(path)
    state = _read_state_dict(path)
    model_config = _resolve_config(config)
    model = AutoencoderKL.from_config(model_config)
    expected = set(model.state_dict())
    if not expected.issubset(state):
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        state = convert_ldm_vae_checkpoint(state, dict(model.config))
    missing = sorted(expected - set(state))
    if missing:
        raise ModelLoadError(
            f"{path}: {len(missing)} weights of the configured architecture are missing (first: {missing[0]}); "
            "is this a VAE checkpoint, and does the config match it?"
        )
    try:
        model.load_state_dict({key: state[key] for key in expected}, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{path}: weights do not fit the configured architecture: {exc}") from exc
    return model.eval()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt files raise many types; all mean the same to the caller
        raise ModelLoadError(f"{path}: cannot read checkpoint: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: not a state dict of tensors")
    return state


def _resolve_config(config: str | os.PathLike | Mapping[str, Any] | None) -> dict[str, Any]:
    if config is None:
        config = "sd"
    if isinstance(config, Mapping):
        return dict(config)
    text = os.fspath(config)
    if is_registered(text):
        spec = get_spec(text)
        if spec.model_class != "AutoencoderKL" or spec.config is None:
            raise ModelLoadError(f"model {text!r} has no AutoencoderKL architecture for a single-file checkpoint")
        return dict(spec.config)
    path = Path(text)
    if path.is_dir():
        path = path / _CONFIG_NAME
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read model config {text!r}: {exc}") from exc
    if loaded.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ModelLoadError(f"{text}: single-file checkpoints are supported for AutoencoderKL only")
    return loaded


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return 2 <= len(parts) <= 3 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def _split_hub_id(text: str) -> tuple[str, str | None]:
    """`org/name/sub` -> (`org/name`, `sub`): pipelines keep their VAE in a subfolder."""
    owner, name, *rest = text.split("/")
    return f"{owner}/{name}", rest[0] if rest else None


def save_model(model: nn.Module, directory: str | os.PathLike, extras: dict[str, str] | None = None) -> Path:
    """Write `model` in diffusers format (config.json + safetensors) so `load_model` rebuilds it, and
    `extras` (file name -> text) beside them.

    The folder is written beside its target and renamed into place, so an interrupted save never
    leaves a folder that looks like a complete model (or half-overwrites an existing one).
    """
    import shutil

    directory = Path(directory)
    temp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    try:
        model.save_pretrained(str(temp), safe_serialization=True)
        for name, text in (extras or {}).items():
            (temp / name).write_text(text)
        for written in temp.rglob("*"):  # safetensors creates 0600
            if written.is_file():
                follow_umask(written)
        if directory.exists():
            directory.rename(old)
        temp.rename(directory)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return directory
