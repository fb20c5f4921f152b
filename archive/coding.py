"""The trained models that code the `entropy` and `vq` formats: loading either kind and binding a coder to its format."""

from __future__ import annotations

import os
from typing import Any, Union

from .entropy_model import KIND as PHASES_KIND, EntropyModel, entropy_model_from, read_model_folder
from .index_model import KIND as INDICES_KIND, IndexModel, index_model_from

CodingModel = Union[EntropyModel, IndexModel]
FORMAT_OF_KIND = {PHASES_KIND: "entropy", INDICES_KIND: "vq"}  # a model's kind -> the format it codes


def load_coding_model(folder: str | os.PathLike) -> CodingModel:
    """An entropy model folder of either kind (config.json `kind`: phases for `entropy`, indices for `vq`);
    ValueError naming what is wrong."""
    raw, tables = read_model_folder(folder)
    kind = raw.get("kind", PHASES_KIND)
    if kind == INDICES_KIND:
        return index_model_from(raw, tables, str(folder))
    if kind != PHASES_KIND:
        raise ValueError(f"{folder}: entropy model kind {kind!r} is none of {', '.join(map(repr, FORMAT_OF_KIND))}")
    return entropy_model_from(raw, tables, str(folder))


def format_of(model: CodingModel) -> str:
    """The latent format a model codes."""
    return FORMAT_OF_KIND[model.config.kind]


def coder_for(model: CodingModel, step: float | None = None) -> Any:
    """An EntropyCoder at `step` (None: the model's default) or an IndexCoder (which has no step)."""
    if isinstance(model, IndexModel):
        if step is not None:
            raise ValueError("the vq format has no step: its indices are stored exactly")
        from .index_coder import IndexCoder

        return IndexCoder(model)
    from .entropy_coder import EntropyCoder

    step = model.config.default_step if step is None else step
    model.step_bins(step)
    return EntropyCoder(model, step)
