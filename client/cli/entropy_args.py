"""The entropy model (and step) of `--format entropy` or `--format vq`, checked once for `encode` (and `eval-rd`)."""

from __future__ import annotations

from pathlib import Path

from .common import EXIT_USAGE, CommandError


def default_coded_format(backend) -> str:
    """The coded format a model's entropy model codes unless asked otherwise: vq for VQ models, else entropy."""
    return "vq" if backend.codebook_size else "entropy"


def folder_entropy_model(model_arg: str | None) -> Path | None:
    """`<model folder>/entropy` when --model names a folder holding one (a VAE loaded by path has no packaged one)."""
    from latentd.archive.entropy_model import CONFIG_FILE

    if model_arg and (Path(model_arg) / "entropy" / CONFIG_FILE).is_file():
        return Path(model_arg) / "entropy"
    return None


def _default_folder(backend, model_arg: str | None) -> Path | None:
    """The model shipped with a packaged VAE, else `<model folder>/entropy` of a VAE loaded from a folder."""
    from latentd.archive.entropy_model import packaged_entropy_model

    return packaged_entropy_model(backend.name) or folder_entropy_model(model_arg)


def entropy_model_for(folder: Path | None, backend, fmt: str = "entropy", model_arg: str | None = None):
    """The model in `folder` (or the VAE's own, see `_default_folder`); CommandError unless it codes `fmt` and
    belongs to that VAE (same name, scaling and shift: latents scaled otherwise would be coded with the wrong
    tables; for `vq` also the same codebook, where the VAE is in this process)."""
    import numpy as np

    from latentd.archive.coding import format_of, load_coding_model

    if fmt == "vq" and not backend.codebook_size:
        raise CommandError(f"--format vq: model {backend.name} has no codebook (a VQ model's format)", EXIT_USAGE)
    if folder is None:
        folder = _default_folder(backend, model_arg)
        if folder is None:
            raise CommandError(f"no entropy model ships with model {backend.name}: train one with "
                               "`latentd entropy-train` and pass --entropy-model DIR", EXIT_USAGE)
    try:
        model = load_coding_model(folder)
    except ValueError as exc:
        raise CommandError(f"--entropy-model: {exc}", EXIT_USAGE) from None
    if format_of(model) != fmt:
        raise CommandError(f"--entropy-model {folder} codes the {format_of(model)} format, not {fmt}", EXIT_USAGE)
    config = model.config
    if (config.vae, config.scaling_factor, config.shift_factor) != \
            (backend.name, float(backend.scaling_factor), float(backend.shift_factor or 0.0)):
        raise CommandError(f"--entropy-model {folder} was trained for VAE {config.vae} (scaling "
                           f"{config.scaling_factor}, shift {config.shift_factor}), not {backend.name} (scaling "
                           f"{backend.scaling_factor}, shift {backend.shift_factor})", EXIT_USAGE)
    if fmt == "vq":
        codebook = backend.codebook
        if (config.codebook_size, config.codebook_dim) != (backend.codebook_size, backend.codebook_dim) \
                or (codebook is not None and not np.array_equal(codebook, model.codebook)):
            raise CommandError(f"--entropy-model {folder} holds another codebook than model {backend.name}'s "
                               f"({backend.codebook_size} codes of dimension {backend.codebook_dim}): train one "
                               "for these weights with `latentd entropy-train`", EXIT_USAGE)
    return model


def entropy_coder(folder: Path | None, step: float | None, backend, fmt: str = "entropy",
                  model_arg: str | None = None):
    """The coder of `fmt` (`entropy` at `step`, None: the model's default; `vq`, which has no step)."""
    from latentd.archive.coding import coder_for

    model = entropy_model_for(folder, backend, fmt, model_arg)
    try:
        return coder_for(model, step)
    except ValueError as exc:
        raise CommandError(f"--step: {exc}", EXIT_USAGE) from None
