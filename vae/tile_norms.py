"""GroupNorm statistics of the whole image for every tile of it, so that tiled and untiled passes agree.

A VAE's GroupNorm layers normalise with the mean and variance of the whole image; a tile alone sees
only its own, and that difference, not the convolutions, is what makes tiles visible. Here the
tiles of one image run side by side, one thread each and one computing at a time: at every
GroupNorm each tile adds the statistics of its *core* (the tiles partitioned without overlap, so
each pixel counts once) and waits for the others; then all normalise with the merged statistics,
which are exactly the untiled pass's wherever the overlap covers what the tile edges disturb.

Each tile keeps its activations while it waits, so memory grows with the image (the widest layer's
activations once, plus one tile's working set) rather than staying one tile's. `RecomputedStatistics`
gets the same statistics in one tile's memory by running the network once per GroupNorm layer
instead: pass k runs every tile, one after the other, up to layer k with the k layers before it
normalised by the statistics already merged, adds its core of layer k and stops there; a last pass
runs the tiles through. A pass resumes each tile where its last one left it (the output of the last
block it finished, kept on disk: vae/tile_resume.py), so every block runs about 1.5 times in all,
and memory stays one tile's. Attention blocks (the SD decoder's mid-block) still attend within a
tile and normalise within it.
"""

from __future__ import annotations

import contextvars
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from .stopping import checkpoint
from .tile_resume import Frontiers, resumable_blocks

_tile = threading.local()


@dataclass
class _Moments:
    """Count, mean and summed squared deviations per group, merged tile by tile (Chan et al.)."""

    count: float = 0.0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    def add(self, region: torch.Tensor) -> None:
        """Merge `region` [G, N] (one tile core of one layer) in float64."""
        n = float(region.shape[1])
        if n == 0:
            return
        values = region.float()
        mean = values.mean(dim=1)
        m2 = (values - mean[:, None]).square().sum(dim=1).double()
        mean = mean.double()
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.mean is not None and self.m2 is not None and self.count > 0
        return self.mean, self.m2 / self.count


@dataclass
class _Tile:
    """What a tile's thread knows: its image's shared statistics, its size on the grid and its core."""

    image: "SharedStatistics | RecomputedStatistics"
    grid: tuple[int, int]  # the tile's height and width in grid units
    core: tuple[int, int, int, int]  # top, bottom, left, right in grid units, relative to the tile
    index: int = 0  # the tile's place in its image's list of tiles
    calls: int = 0  # GroupNorm layers passed so far: the key of the next one's statistics

    def core_of(self, x: torch.Tensor, groups: int) -> torch.Tensor | None:
        """The tile's core of `x` [1, C, H, W] as [groups, values]; None for a layer off the tile grid."""
        grid_h, grid_w = self.grid
        height, width = x.shape[-2:]
        if x.shape[0] != 1 or height % grid_h or width % grid_w:
            return None
        sy, sx = height // grid_h, width // grid_w
        top, bottom, left, right = self.core
        return x[0, :, top * sy : bottom * sy, left * sx : right * sx].reshape(groups, -1)


@dataclass
class SharedStatistics:
    """The GroupNorm statistics of one image, gathered from its tiles layer by layer."""

    tiles: int
    _turn: threading.Lock = field(default_factory=threading.Lock)
    _pending: dict[int, _Moments] = field(default_factory=dict)
    _merged: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _barrier: threading.Barrier = field(init=False)

    def __post_init__(self) -> None:
        self._barrier = threading.Barrier(self.tiles, action=self._merge)

    def _merge(self) -> None:
        # Runs once all tiles have arrived, before any goes on: nothing else touches the tables then.
        for key, moments in self._pending.items():
            self._merged[key] = moments.mean_var()
        self._pending.clear()

    def gather(self, tile: _Tile, x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Add the tile's core of `x` [1, C, H, W], wait for every tile, return the image's (mean, var)
        per group; None for a layer off the tile grid, which then normalises within the tile."""
        checkpoint()  # long tiled work stops between layers when its caller says so
        key = tile.calls
        tile.calls += 1
        core = tile.core_of(x, groups)
        if core is not None:
            self._pending.setdefault(key, _Moments()).add(core)
        self._turn.release()  # let the next tile compute while this one waits
        try:
            self._barrier.wait()
        finally:
            self._turn.acquire()
        return self._merged.get(key) if core is not None else None

    def run(self, calls: list[tuple[Callable[[], torch.Tensor], tuple[int, int], tuple[int, int, int, int]]]
            ) -> list[torch.Tensor]:
        """Run each tile's call (one per tile: the call, its grid size, its core) in a thread of its own
        and return the results in order; the first error stops every tile and is raised here."""
        if len(calls) != self.tiles:
            raise ValueError(f"{len(calls)} tile calls for {self.tiles} tiles")
        results: list[torch.Tensor | None] = [None] * len(calls)
        errors: list[BaseException] = []

        def work(index: int) -> None:
            call, grid, core = calls[index]
            with self._turn:
                if self._barrier.broken:
                    return  # another tile failed or was stopped before this one began
                _tile.current = _Tile(self, grid, core)
                try:
                    with torch.inference_mode():
                        results[index] = call()
                except threading.BrokenBarrierError:
                    pass  # another tile failed; its error is the one raised
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
                    errors.append(exc)
                    self._barrier.abort()
                finally:
                    _tile.current = None

        # Each thread runs in a copy of the caller's context: its stop check (vae/stopping.py) applies.
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(work, index), daemon=True,
                                    name=f"latentd-tile-{index}") for index in range(len(calls))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results  # type: ignore[return-value]


class _Gathered(Exception):
    """A tile's pass reached the layer whose statistics it was run for."""


@dataclass
class RecomputedStatistics:
    """The GroupNorm statistics of one image, gathered layer by layer by rerunning its tiles, one
    tile at a time (see the module docstring): the `SharedStatistics` results in one tile's memory."""

    tiles: int
    _target: int = 0  # the layer this pass gathers
    _pending: _Moments = field(default_factory=_Moments)
    _merged: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=dict)
    _frontiers: Frontiers = field(default_factory=lambda: Frontiers(keep_on=_Gathered))

    def gather(self, tile: _Tile, x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The image's (mean, var) of a layer gathered in an earlier pass (None: off the tile grid, or
        no tile on it); at this pass's layer, add the tile's core and stop the tile there."""
        checkpoint()
        key = tile.calls
        tile.calls += 1
        if key < self._target:
            return self._merged[key]
        core = tile.core_of(x, groups)
        if core is not None:
            self._pending.add(core)
        raise _Gathered

    def stream(self, calls: list[tuple[Callable[[], torch.Tensor], tuple[int, int], tuple[int, int, int, int]]]
               ) -> Iterator[torch.Tensor]:
        """Each tile's call (the call, its grid size, its core), rerun until every GroupNorm layer's
        statistics are known; then the results of the last pass, in order, each as soon as it is
        computed (a caller that blends them at once never holds more than one)."""
        if len(calls) != self.tiles:
            raise ValueError(f"{len(calls)} tile calls for {self.tiles} tiles")
        try:
            while True:
                finished = 0
                for index, (call, grid, core) in enumerate(calls):
                    tile = _tile.current = _Tile(self, grid, core, index)
                    try:
                        with torch.inference_mode(), self._frontiers.resuming(tile):
                            result = call()
                    except _Gathered:
                        if finished:  # tiles of one model pass the same layers; anything else is a bug
                            raise RuntimeError(f"{finished} of {len(calls)} tiles ran through at layer "
                                               f"{self._target}") from None
                        continue
                    finally:
                        _tile.current = None
                    finished += 1
                    yield result
                    del result
                if finished:
                    return
                self._merged[self._target] = self._pending.mean_var() if self._pending.count else None
                self._pending = _Moments()
                self._target += 1
        finally:
            self._frontiers.close()  # the spilled blocks' files go, however the run ended


class TileGroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` that, in a tile's thread, normalises with the whole image's statistics.

    Anywhere else (untiled calls, training, every other thread) it is exactly `nn.GroupNorm`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tile: _Tile | None = getattr(_tile, "current", None)
        if tile is None or x.dim() != 4 or self.training:
            return super().forward(x)
        stats = tile.image.gather(tile, x, self.num_groups)
        if stats is None:
            return super().forward(x)
        mean, var = stats
        per_group = self.num_channels // self.num_groups
        inv_std = (var + self.eps).rsqrt()
        scale = inv_std.repeat_interleave(per_group)
        shift = -(mean * inv_std).repeat_interleave(per_group)
        if self.affine:
            shift = shift * self.weight.double() + self.bias.double()
            scale = scale * self.weight.double()
        shape = (1, self.num_channels, 1, 1)
        scale = scale.to(device=x.device, dtype=x.dtype).view(shape)
        shift = shift.to(device=x.device, dtype=x.dtype).view(shape)
        return torch.addcmul(shift, x, scale)


def share_tile_norms(model: nn.Module) -> int:
    """Make every `nn.GroupNorm` of `model` a `TileGroupNorm` (and its blocks resumable for
    `RecomputedStatistics`); returns how many norms. Parameters, state-dict keys and every result
    outside a tile's pass are unchanged."""
    resumable_blocks(model)
    count = 0
    for module in model.modules():
        if type(module) is nn.GroupNorm:
            module.__class__ = TileGroupNorm
        count += isinstance(module, TileGroupNorm)
    return count
