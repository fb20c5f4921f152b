"""Where each tile's next pass of `RecomputedStatistics` resumes: its last finished block, spilled to disk.

Recomputing the GroupNorm statistics pass by pass (vae/tile_norms.py) reruns every tile up to the
layer a pass gathers. The blocks a tile finished in an earlier pass (resnet blocks, attention,
up- and downsamplers) normalised with statistics that are final by then, so the next pass would
compute exactly the same outputs again. Instead each tile keeps the output of the last block it
finished (its *frontier*) in an anonymous temporary file, and in the next pass the
blocks before the frontier return a placeholder of their output's shape without computing, the
frontier block returns the kept output, and the tile computes on from there. Every block then runs
about 1.5 times instead of once per later layer, memory stays one tile's (plus one block's output
on disk for each tile), and the results are bit for bit those of rerunning from the start.

This relies on the blocks forming a chain, each one's output read only by what comes after it up
to the next block, as in diffusers' VAE encoders and decoders; only those block classes resume, and
only the outermost of nested ones.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from dataclasses import dataclass
from typing import IO, Callable, Iterator, Protocol

import torch
from torch import nn

_current = threading.local()


class _TileCounter(Protocol):
    index: int  # the tile's place in its image's list of tiles: the same in every pass
    calls: int  # GroupNorm layers the tile passed in this pass


@dataclass
class _Frontier:
    block: int  # the block's place among the tile's block calls of one pass
    calls: int  # the tile's GroupNorm calls when that block returned


class SpilledTiles:
    """One tensor per tile, kept as raw bytes in an anonymous temporary file of its own (unlinked when
    made, so that nothing is left on disk however the process ends, even killed)."""

    def __init__(self) -> None:
        self._files: dict[int, IO[bytes]] = {}
        self._layout: dict[int, tuple[tuple[int, ...], torch.dtype, torch.device, bool]] = {}

    def put(self, index: int, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        # A channels-last tensor is stored in its own memory order and comes back with the same
        # strides, so that the convolutions after it take the path they took before.
        channels_last = (tensor.dim() == 4 and not tensor.is_contiguous()
                         and tensor.is_contiguous(memory_format=torch.channels_last))
        host = (tensor.permute(0, 2, 3, 1) if channels_last else tensor).contiguous().cpu()
        if index not in self._files:
            self._files[index] = tempfile.TemporaryFile(prefix="latentd-tile-")
        file = self._files[index]
        file.seek(0)
        file.truncate()
        file.write(_raw(host).numpy().data)
        self._layout[index] = (tuple(host.shape), host.dtype, tensor.device, channels_last)

    def get(self, index: int) -> torch.Tensor:
        shape, dtype, device, channels_last = self._layout[index]
        host = torch.empty(shape, dtype=dtype)
        file = self._files[index]
        file.seek(0)
        view = memoryview(_raw(host).numpy()).cast("B")
        if file.readinto(view) != len(view):
            raise OSError(f"the spilled activations of tile {index} came back short")
        return (host.permute(0, 3, 1, 2) if channels_last else host).to(device)

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()
        self._layout.clear()


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as a dtype numpy has (bfloat16 as its 16 bits)."""
    return tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor


@dataclass
class _Pass:
    """One tile's current pass: which frontiers it reads and the newest block it finished."""

    frontiers: "Frontiers"
    tile: _TileCounter
    blocks: int = 0
    finished: tuple[int, int, torch.Tensor] | None = None  # block, GroupNorm calls, output


class Frontiers:
    """Every tile's frontier across the passes of one `RecomputedStatistics` run."""

    def __init__(self, keep_on: type[BaseException]) -> None:
        self._keep_on = keep_on  # how a pass ends that stopped early on purpose
        self._spilled = SpilledTiles()
        self._at: dict[int, _Frontier] = {}
        self._shapes: dict[tuple[int, int], tuple[torch.Size, torch.dtype, torch.device]] = {}

    @contextlib.contextmanager
    def resuming(self, tile: _TileCounter) -> Iterator[None]:
        """Run one tile's pass in this thread; a pass that stops early keeps its newest finished block."""
        state = _Pass(self, tile)
        _current.state = state
        try:
            yield
        except self._keep_on:
            if state.finished is not None:
                block, calls, output = state.finished
                state.finished = None
                self._spilled.put(tile.index, output)
                self._at[tile.index] = _Frontier(block, calls)
            raise
        finally:
            _current.state = None

    def block(self, state: _Pass, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        index = state.tile.index
        block = state.blocks
        state.blocks += 1
        at = self._at.get(index)
        if at is not None and block < at.block:
            shape, dtype, device = self._shapes[(index, block)]
            return torch.zeros((), dtype=dtype, device=device).expand(shape)  # read only by skipped blocks
        if at is not None and block == at.block:
            state.tile.calls = at.calls
            return self._spilled.get(index)
        output = compute()
        self._shapes[(index, block)] = (output.shape, output.dtype, output.device)
        state.finished = (block, state.tile.calls, output)
        return output

    def close(self) -> None:
        self._spilled.close()
        self._at.clear()
        self._shapes.clear()


_RESUMABLE: dict[type, type] = {}


def _resumable_class(base: type) -> type:
    """A subclass of `base` whose forward resumes in a tile's pass and is `base`'s anywhere else."""
    if base not in _RESUMABLE:

        class Resumable(base):  # type: ignore[valid-type, misc]
            def forward(self, *args, **kwargs):
                state: _Pass | None = getattr(_current, "state", None)
                if state is None or self.training:
                    return super().forward(*args, **kwargs)
                return state.frontiers.block(state, lambda: super(Resumable, self).forward(*args, **kwargs))

        Resumable.__name__, Resumable.__qualname__ = base.__name__, base.__qualname__
        Resumable.__module__ = base.__module__
        _RESUMABLE[base] = Resumable
    return _RESUMABLE[base]


def _chain_blocks() -> tuple[type, ...]:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    return ResnetBlock2D, Downsample2D, Upsample2D, Attention


def resumable_blocks(model: nn.Module) -> int:
    """Make the outermost chain blocks of `model` resume in a tile's pass; returns how many are.
    Parameters, state-dict keys and every result outside a tile's pass are unchanged."""
    kinds = _chain_blocks()
    count = 0
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if type(module) in _RESUMABLE.values():
            count += 1
        elif isinstance(module, kinds):
            module.__class__ = _resumable_class(type(module))
            count += 1
        else:
            continue
        inside.append(f"{name}." if name else "")
    return count
