"""The one typed training configuration: read from YAML or TOML, overridden by `--section.key value`."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import InvalidInputError


MODEL_TYPES = ("kl", "vq")


@dataclass
class ModelConfig:
    # kl: a diffusers AutoencoderKL (Gaussian posterior); vq: a diffusers VQModel (codebook, docs/vq.md).
    type: str = "kl"
    # Any keyword of that class (VQModel adds num_vq_embeddings and vq_embed_dim); the defaults are
    # latentd's compact CPU-servable f8 model.
    architecture: dict[str, Any] = field(
        default_factory=lambda: {
            "block_out_channels": [24, 48, 96, 192],
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 8,
            "mid_block_add_attention": False,
            "sample_size": 512,
        }
    )
    # Start from these weights (anything `load_model` accepts) instead of random initialisation.
    init_from: str | None = None
    # With init_from: continue the learning-rate schedule at the step that `latentd export` recorded
    # beside those weights (training_state.json), so one long schedule chains across machines that
    # keep no checkpoint. The optimizer's moments start from zero, so the warm-up runs again.
    continue_schedule: bool = False


@dataclass
class DataConfig:
    train_dirs: list[str] = field(default_factory=list)
    val_dir: str | None = None
    crop_size: int = 128
    hflip: bool = True
    batch_size: int = 8
    workers: int = 2
    val_max_images: int = 16
    grid_images: int = 8


@dataclass
class BetaConfig:
    # constant | linear (KL annealing from 0 over `anneal_steps`) | cyclical (Fu et al. 2019)
    schedule: str = "constant"
    value: float = 1e-6
    anneal_steps: int = 1000
    cycle_steps: int = 2000
    cycle_ratio: float = 0.5  # fraction of each cycle spent rising


@dataclass
class DiscriminatorConfig:
    enabled: bool = False
    start_step: int = 5000
    weight: float = 0.5
    layers: int = 3
    channels: int = 64
    lr: float = 2e-4


@dataclass
class VQConfig:
    """The codebook terms of `model.type: vq` (van den Oord et al. 2017; EMA updates from Razavi et al. 2019)."""

    # beta of the commitment loss ||z - sg[e]||^2, which keeps the encoder near its codes.
    commitment: float = 0.25
    # ema: the codebook follows an exponential average of the encoder outputs assigned to each code (no
    # codebook loss); false: the codebook loss ||sg[z] - e||^2 trains it by gradient.
    ema: bool = True
    ema_decay: float = 0.99
    # A code no encoder output chose for this many batches in a row restarts at a random encoder
    # output of the current batch (dead-code restarts against codebook collapse); 0 disables.
    restart_after: int = 100


@dataclass
class LossConfig:
    reconstruction: str = "l1"  # l1 | l2
    ms_ssim_weight: float = 0.0
    beta: BetaConfig = field(default_factory=BetaConfig)
    # Free bits: per-channel floor (nats per latent element) under the KL term; 0 disables.
    free_bits: float = 0.0
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    lpips_weight: float = 0.0
    lpips_weights: str | None = None  # local safetensors file; LPIPS weights cannot be downloaded here
    vq: VQConfig = field(default_factory=VQConfig)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    schedule: str = "cosine"  # cosine | wsd (constant, then a cosine over the last decay_ratio of max_steps)
    decay_ratio: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    warmup_steps: int = 500
    max_steps: int = 10000
    min_lr_ratio: float = 0.05
    grad_accum: int = 1
    clip_norm: float = 1.0
    ema_decay: float = 0.999


@dataclass
class RuntimeConfig:
    output_dir: str = "runs/vae"
    seed: int = 0
    precision: str = "auto"  # auto | no | fp16 | bf16 (half precision only on GPU)
    channels_last: bool = True
    save_every: int = 250
    keep_checkpoints: int = 3
    log_every: int = 10
    val_every: int = 500
    max_bad_steps: int = 20  # stop (with a checkpoint) after this many non-finite steps in a row
    tensorboard: bool = True


LATENT_STATS = ("global", "per-channel")


@dataclass
class ExportConfig:
    stat_images: int = 256  # random training crops used to measure the latent scale and shift
    dtype: str = "float16"
    # "per-channel" also writes latents_mean / latents_std (the SDXL pipelines' convention), so that each
    # channel of the scaled latents has unit variance; "global": one scaling_factor and shift_factor.
    latent_stats: str = "global"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def validate(self) -> "TrainConfig":
        vq = self.loss.vq
        checks = [
            (self.model.type in MODEL_TYPES, f"model.type must be one of {', '.join(MODEL_TYPES)}"),
            (vq.commitment >= 0, "loss.vq.commitment must be non-negative"),
            (0 < vq.ema_decay < 1, "loss.vq.ema_decay must be in (0, 1)"),
            (vq.restart_after >= 0, "loss.vq.restart_after must be non-negative (0 disables restarts)"),
            (self.loss.reconstruction in ("l1", "l2"), "loss.reconstruction must be l1 or l2"),
            (self.loss.beta.schedule in ("constant", "linear", "cyclical"),
             "loss.beta.schedule must be constant, linear or cyclical"),
            (self.optim.schedule in ("cosine", "wsd"), "optim.schedule must be cosine or wsd"),
            (self.export.latent_stats in LATENT_STATS, f"export.latent_stats must be {' or '.join(LATENT_STATS)}"),
            (0 < self.optim.decay_ratio <= 1, "optim.decay_ratio must be in (0, 1]"),
            (not (self.model.continue_schedule and not self.model.init_from),
             "model.continue_schedule needs model.init_from"),
            (self.runtime.precision in ("auto", "no", "fp16", "bf16"),
             "runtime.precision must be auto, no, fp16, bf16"),
            (self.data.crop_size > 0 and self.data.batch_size > 0,
             "data.crop_size and data.batch_size must be positive"),
            (self.optim.max_steps > 0 and self.optim.grad_accum > 0,
             "optim.max_steps and optim.grad_accum must be positive"),
            (self.runtime.save_every > 0 and self.runtime.val_every > 0,
             "runtime.save_every and val_every must be positive"),
            (bool(self.data.train_dirs), "data.train_dirs must name at least one folder"),
            (not (self.loss.lpips_weight > 0 and not self.loss.lpips_weights),
             "loss.lpips_weight needs loss.lpips_weights: a local LPIPS safetensors file (they cannot be downloaded)"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInputError(message, field="config")
        return self


def _from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InvalidInputError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(known))})",
                                field="config")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise InvalidInputError(f"config section {where}{name} must be a mapping", field="config")
            kwargs[name] = _from_dict(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _parse_scalar(text: str, hint: Any, key: str) -> Any:
    """Convert a command-line string to the field's type (YAML syntax for lists and mappings)."""
    origin = typing.get_origin(hint)
    allowed = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    if text.lower() in ("none", "null") and type(None) in allowed:
        return None
    base = next((a for a in allowed if a is not type(None)), str)
    base_origin = typing.get_origin(base) or base
    if base_origin is str:
        return text
    if base_origin in (int, float):
        try:
            return base_origin(text)
        except ValueError:
            pass
    else:
        value = yaml.safe_load(text)
        if base_origin is bool and isinstance(value, bool):
            return value
        if base_origin in (list, dict) and isinstance(value, base_origin):
            return value
    raise InvalidInputError(f"--{key}: cannot use {text!r} as {getattr(base, '__name__', base)}", field=key)


def apply_overrides(config: TrainConfig, overrides: dict[str, str]) -> TrainConfig:
    """Set `section.key` (any depth) from strings, converted to each field's declared type."""
    for key, text in overrides.items():
        target: Any = config
        parts = key.split(".")
        for part in parts[:-1]:
            if not dataclasses.is_dataclass(target) or not hasattr(target, part):
                raise InvalidInputError(f"--{key}: unknown config section {part!r}", field=key)
            target = getattr(target, part)
        name = parts[-1]
        if not dataclasses.is_dataclass(target) or name not in {f.name for f in dataclasses.fields(target)}:
            raise InvalidInputError(f"--{key}: unknown config key", field=key)
        hint = typing.get_type_hints(type(target))[name]
        if dataclasses.is_dataclass(hint):
            raise InvalidInputError(f"--{key} is a section; set one of its keys", field=key)
        setattr(target, name, _parse_scalar(text, hint, key))
    return config


def load_config(path: str | Path | None, overrides: dict[str, str] | None = None) -> TrainConfig:
    """Defaults, then the YAML/TOML/JSON file at `path`, then `overrides`; validated."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise InvalidInputError(f"cannot read config {path}: {exc.strerror}", field="config") from exc
        try:
            if path.suffix == ".toml":
                values = tomllib.loads(text)
            elif path.suffix == ".json":
                values = json.loads(text)
            else:
                values = yaml.safe_load(text) or {}
        except (yaml.YAMLError, tomllib.TOMLDecodeError, ValueError) as exc:
            message = " ".join(str(exc).split())
            raise InvalidInputError(f"config {path} is not valid: {message}", field="config") from exc
        if not isinstance(values, dict):
            raise InvalidInputError(f"config {path} must hold a mapping of sections", field="config")
    config = _from_dict(TrainConfig, values, "")
    return apply_overrides(config, overrides or {}).validate()
