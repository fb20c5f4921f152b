"""The one vocabulary of what images and latents come back as, for the in-process codec and the SDK alike."""

from __future__ import annotations

from typing import Literal

OutputKind = Literal["numpy", "pil", "tensor"]
OUTPUT_KINDS: tuple[str, ...] = ("numpy", "pil", "tensor")
# Earlier names still understood: the SDK called torch tensors "torch".
ALIASES = {"torch": "tensor"}


def normalise(output: str) -> str:
    """`output` in this vocabulary (an alias becomes its name; anything else is left for the caller to refuse)."""
    return ALIASES.get(output, output)
