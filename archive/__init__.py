"""latentd.archive: image collections as compact latent archives (sharded safetensors + SQLite manifest).

`LatentDataset` and `LatentIterableDataset` (training readers, in `datasets.py`) import torch, so they
load on first use: `import latentd.archive` and its reader stay torch-free.
"""

from __future__ import annotations

__all__ = ["LatentDataset", "LatentIterableDataset"]


def __getattr__(name: str):
    if name in __all__:
        from . import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
