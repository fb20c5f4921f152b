"""GroupNorm statistics shared across tiles: tiled passes that normalise as the untiled one does."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from latentd.vae.codec import Codec, CodecOptions
from latentd.vae.errors import InvalidInputError
from latentd.vae.stopping import stoppable
from latentd.vae.tile_norms import TileGroupNorm, share_tile_norms
from latentd.vae.tiling import core_spans, tile_spans, tiled_map
from tests.conftest import make_tiny_kl as tiny_vae


def _norm(channels: int = 8, groups: int = 2) -> TileGroupNorm:
    norm = nn.GroupNorm(groups, channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    share_tile_norms(norm)
    return norm.eval()


def test_cores_partition_the_length_and_sit_inside_their_tiles():
    spans = tile_spans(100, 16, 6)
    cores = core_spans(spans)
    assert cores[0][0] == 0 and cores[-1][1] == 100
    assert all(a[1] == b[0] for a, b in zip(cores, cores[1:]))
    assert all(start <= lo < hi <= end for (start, end), (lo, hi) in zip(spans, cores))


def test_outside_a_tile_it_is_group_norm():
    norm = _norm()
    x = torch.randn(3, 8, 5, 7)
    torch.testing.assert_close(norm(x), nn.functional.group_norm(x, 2, norm.weight, norm.bias, norm.eps))


def test_shared_statistics_make_a_tiled_group_norm_exact():
    """A pointwise network around one GroupNorm: tiles differ from the whole image only by statistics."""
    norm = _norm()
    x = torch.randn(8, 40, 56) * torch.linspace(0.2, 3.0, 56) + torch.linspace(-2, 2, 40)[:, None]
    with torch.inference_mode():
        whole = norm(x[None])[0]
        shared = tiled_map(x, norm, tile=16, overlap=4, in_scale=1, out_scale=1, shared_norms=True)
        alone = tiled_map(x, norm, tile=16, overlap=4, in_scale=1, out_scale=1)
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=1e-5)
    assert (alone - whole).abs().max() > 0.1  # each tile alone normalises differently


def test_a_tile_that_fails_stops_every_tile_and_raises_its_error():
    norm = _norm()
    calls = []

    def fn(batch: torch.Tensor) -> torch.Tensor:
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise RuntimeError("tile three broke")
        return norm(batch)

    before = threading.active_count()
    with pytest.raises(RuntimeError, match="tile three broke"), torch.inference_mode():
        tiled_map(torch.randn(8, 40, 40), fn, tile=16, overlap=4, in_scale=1, out_scale=1, shared_norms=True)
    assert threading.active_count() == before  # no tile thread left waiting


def test_the_callers_stop_check_reaches_the_tile_threads():
    norm = _norm()
    checks = []

    def check() -> None:
        checks.append(threading.current_thread().name)
        if len(checks) > 2:
            raise TimeoutError("deadline exceeded")

    with pytest.raises(TimeoutError), stoppable(check), torch.inference_mode():
        tiled_map(torch.randn(8, 40, 40), norm, tile=16, overlap=4, in_scale=1, out_scale=1, shared_norms=True)
    assert any(name.startswith("latentd-tile-") for name in checks)


def test_the_state_dict_is_unchanged():
    model = tiny_vae()
    keys = list(model.state_dict())
    assert share_tile_norms(model) > 0
    assert list(model.state_dict()) == keys
    assert not any(type(m) is nn.GroupNorm for m in model.modules())


@pytest.mark.parametrize("operation", ["decode", "encode"])
def test_tiled_codec_equals_untiled_with_image_statistics(operation):
    """Without attention (global by nature) the tiles' cores are the untiled pass, to float rounding."""
    codec_options = dict(tile_size=64, tile_overlap=48, max_batch_pixels=1 << 20)
    image = torch.rand(3, 160, 144, generator=torch.Generator().manual_seed(0)) * 2 - 1
    errors = {}
    for norms in ("image", "image-recompute", "tile"):
        codec = Codec(tiny_vae(mid_block_add_attention=False), options=CodecOptions(tile_norms=norms, **codec_options))
        latents = codec.encode(image, tiling="off")
        if operation == "decode":
            tiled, untiled = codec.decode(latents, tiling="on", output="tensor"), codec.decode(latents, tiling="off",
                                                                                               output="tensor")
        else:
            tiled, untiled = codec.encode(image, tiling="on"), latents
        errors[norms] = float((tiled - untiled).abs().max())
    assert errors["image"] < 1e-4 and errors["image-recompute"] < 1e-4
    assert errors["tile"] > 1e-2  # the same tiles, each normalising alone


def test_tile_norms_must_be_named():
    with pytest.raises(InvalidInputError) as raised:
        Codec(tiny_vae(), options=CodecOptions(tile_norms="global"))
    assert raised.value.field == "tile_norms"


def test_beyond_the_shared_tile_limit_tiles_normalise_alone(monkeypatch):
    """A sliver of thousands of tiles must not start a thread per tile."""
    from latentd.vae import tiling

    norm = _norm()
    x = torch.randn(8, 40, 56)
    with torch.inference_mode():
        alone = tiled_map(x, norm, tile=16, overlap=4, in_scale=1, out_scale=1)
        monkeypatch.setattr(tiling, "MAX_SHARED_TILES", 4)  # this grid has 12 tiles
        before = threading.active_count()
        capped = tiled_map(x, norm, tile=16, overlap=4, in_scale=1, out_scale=1, shared_norms=True)
    assert threading.active_count() == before
    torch.testing.assert_close(capped, alone)


def test_recomputed_statistics_run_one_tile_at_a_time_once_per_layer_and_match_the_shared_ones():
    """Two GroupNorms in a row: three passes over the tiles (layer 0, layer 1, through), in this thread."""
    first, second = _norm(), _norm()
    model = nn.Sequential(first, nn.Conv2d(8, 8, 1), second)
    x = torch.randn(8, 40, 56) * torch.linspace(0.2, 3.0, 56) + torch.linspace(-2, 2, 40)[:, None]
    threads, live = [], []

    def fn(batch: torch.Tensor) -> torch.Tensor:
        threads.append(threading.current_thread().name)
        live.append(batch.shape[0])
        return model(batch)

    with torch.inference_mode():
        whole = model(x[None])[0]
        shared = tiled_map(x, model, tile=16, overlap=4, in_scale=1, out_scale=1, shared_norms=True)
        recomputed = tiled_map(x, fn, tile=16, overlap=4, in_scale=1, out_scale=1, shared_norms=True,
                               recompute_norms=True)
    tiles = len(tile_spans(40, 16, 4)) * len(tile_spans(56, 16, 4))
    assert len(threads) == 3 * tiles and set(threads) == {threading.current_thread().name} and set(live) == {1}
    torch.testing.assert_close(recomputed, shared, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recomputed, whole, atol=1e-5, rtol=1e-5)


def test_recomputed_statistics_stop_between_layers_when_asked():
    norm = _norm()
    checks = []

    def check() -> None:
        checks.append(1)
        if len(checks) > 3:
            raise TimeoutError("deadline exceeded")

    with pytest.raises(TimeoutError), stoppable(check), torch.inference_mode():
        tiled_map(torch.randn(8, 40, 40), norm, tile=16, overlap=4, in_scale=1, out_scale=1, shared_norms=True,
                  recompute_norms=True)
