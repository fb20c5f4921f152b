"""The entropy model and step of `--format entropy`, checked once for `encode` (and `eval-rd`)."""

from __future__ import annotations

from pathlib import Path

from .common import EXIT_USAGE, CommandError


def entropy_model_for(folder: Path | None, backend):
    """The model in `folder`, or the one shipped with the backend's VAE; CommandError unless it belongs to
    that VAE (same name, scaling and shift: latents scaled otherwise would be coded with the wrong tables)."""
    from latentd.archive.entropy_model import load_entropy_model, packaged_entropy_model

    if folder is None:
        folder = packaged_entropy_model(backend.name)
        if folder is None:
            raise CommandError(f"no entropy model ships with model {backend.name}: train one with "
                               "`latentd entropy-train` and pass --entropy-model DIR", EXIT_USAGE)
    try:
        model = load_entropy_model(folder)
    except ValueError as exc:
        raise CommandError(f"--entropy-model: {exc}", EXIT_USAGE) from None
    config = model.config
    if (config.vae, config.scaling_factor, config.shift_factor) != \
            (backend.name, float(backend.scaling_factor), float(backend.shift_factor)):
        raise CommandError(f"--entropy-model {folder} was trained for VAE {config.vae} (scaling "
                           f"{config.scaling_factor}, shift {config.shift_factor}), not {backend.name} (scaling "
                           f"{backend.scaling_factor}, shift {backend.shift_factor})", EXIT_USAGE)
    return model


def entropy_coder(folder: Path | None, step: float | None, backend):
    from latentd.archive.entropy_coder import EntropyCoder

    model = entropy_model_for(folder, backend)
    step = model.config.default_step if step is None else step
    try:
        model.step_bins(step)
    except ValueError as exc:
        raise CommandError(f"--step: {exc}", EXIT_USAGE) from None
    return EntropyCoder(model, step)
