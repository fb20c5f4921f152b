"""Archives as a training cache: crops, flips, sizes, log-variances, and the two training datasets."""

from __future__ import annotations

import math
import sqlite3

import numpy as np
import pytest
import torch
from latentd.archive import LatentDataset, LatentIterableDataset
from latentd.archive.manifest import MANIFEST, ArchiveError
from latentd.archive.reader import open_archive, verify_archive
from latentd.archive.sizing import SizePolicy
from latentd.client.cli import main
from latentd.vae import load_codec, save_model
from PIL import Image
from torch.utils.data import DataLoader

from tests.conftest import make_tiny_kl, smooth_image

SHAPES = [(40, 64), (64, 40), (48, 48), (30, 70), (56, 36), (33, 45), (64, 64), (20, 50), (45, 33)]


def _keys(items) -> list[str]:
    return [key for item in items for key in ([item["key"]] if isinstance(item["key"], str) else item["key"])]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(make_tiny_kl(), tmp_path_factory.mktemp("model") / "tiny-vae")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for index, (height, width) in enumerate(SHAPES):
        Image.fromarray(smooth_image(height, width, seed=index)).save(folder / f"{index}.png")
    return folder


def _encode(images, model_dir, out, *args) -> None:
    assert main(["encode", str(images), "-o", str(out), "--model", str(model_dir), "--no-progress", *args]) == 0


@pytest.fixture(scope="module")
def cache(images, model_dir, tmp_path_factory):
    """center-crop:32 (main) and 16, flipped too, with log-variances."""
    out = tmp_path_factory.mktemp("cache") / "train.latents"
    _encode(images, model_dir, out, "--size", "center-crop:32", "--sizes", "16,32", "--flip", "--logvar")
    return out


def _sized(images, key: str, policy: str) -> np.ndarray:
    return np.asarray(SizePolicy.parse(policy).apply(Image.open(images / key).convert("RGB")))


def test_crops_are_what_center_crop_did(cache, images):
    with open_archive(cache) as archive:
        for entry in archive:
            record = entry.record
            for variant in archive.variants(record):
                side = int(variant["size_policy"].split(":")[1])
                scale = side / min(record.width, record.height)  # independent of sizing.py: cover, crop the middle
                covered_w, covered_h = max(side, round(record.width * scale)), max(side, round(record.height * scale))
                assert (variant["crop_top"], variant["crop_left"]) == ((covered_h - side) // 2, (covered_w - side) // 2)
                assert variant["flipped_crop_left"] == covered_w - side - variant["crop_left"]
            assert (record.crop_top, record.crop_left) == (archive.variants(record)[0]["crop_top"],
                                                           archive.variants(record)[0]["crop_left"])
    assert verify_archive(cache) == []


def test_bucket_crops_reproduce_the_encoded_image(images, model_dir, tmp_path):
    out = tmp_path / "buckets.latents"
    _encode(images, model_dir, out, "--size", "buckets:64")
    codec = load_codec(model_dir)
    policy = SizePolicy.parse("buckets:64")
    seen_crops = set()
    with open_archive(out) as archive:
        for entry in archive:
            record = entry.record
            original = Image.open(images / entry.key).convert("RGB")
            (width, height), covered, _ = policy.plan(*original.size)
            top, left = record.crop_top, record.crop_left
            cropped = np.asarray(original.resize(covered, Image.Resampling.LANCZOS).crop(
                (left, top, left + width, top + height)))
            assert (record.encoded_width, record.encoded_height) == (width, height)
            np.testing.assert_allclose(entry.latents, codec.encode(cropped).half().float().numpy(), atol=2e-3)
            seen_crops.add((top, left))
    assert len(seen_crops) > 1  # the images' crops differ: the coordinates are not a constant


def test_flipped_latents_are_the_flipped_image_encoded_and_logvar_the_posterior(cache, images, model_dir):
    codec = load_codec(model_dir)
    scale = codec.info.scaling_factor
    with open_archive(cache) as archive:
        for key in ("0.png", "3.png"):
            record = archive[key].record
            for variant in archive.variants(record):
                sized = _sized(images, key, variant["size_policy"])
                tensors, shape = variant["tensors"], variant["latent_shape"]
                flipped = archive.array(record, tensors["flipped"], shape)
                expected = codec.encode(np.ascontiguousarray(sized[:, ::-1])).half().float().numpy()
                np.testing.assert_allclose(flipped, expected, atol=2e-3)
                mean, logvar = codec.posterior(sized)[0]
                np.testing.assert_allclose(archive.array(record, tensors["logvar"], shape),
                                           (logvar + 2 * math.log(scale)).half().float().numpy(), atol=2e-2)
                np.testing.assert_allclose(archive.array(record, tensors["latents"], shape),
                                           codec.scale(mean).half().float().numpy(), atol=2e-3)


def test_map_style_dataset_items(cache):
    ds = LatentDataset(cache)
    assert len(ds) == len(SHAPES)
    item = ds[ds.keys.index("0.png")]
    assert item["latents"].shape == (4, 16, 16) and item["latents"].dtype == torch.float32
    assert item["original_size"].tolist() == [40, 64] and item["target_size"].tolist() == [32, 32]
    assert item["crop_top_left"].tolist() == [0, 9] and item["flipped"] is False
    small = LatentDataset(cache, size=16, flip=True, logvar=True)[ds.keys.index("0.png")]
    assert small["latents"].shape == (4, 8, 8) and small["logvar"].shape == (4, 8, 8) and small["flipped"]
    assert small["target_size"].tolist() == [16, 16]
    sampled = [LatentDataset(cache, sample=True, seed=seed)[0]["latents"] for seed in (1, 1, 2)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])
    assert not torch.equal(sampled[0], ds[0]["latents"])
    flips = [LatentDataset(cache, flip="random", seed=3)[i]["flipped"] for i in range(len(ds))]
    assert any(flips) and not all(flips)
    with pytest.raises(ArchiveError, match="no latents of size 64"):
        LatentDataset(cache, size=64)[0]


def test_every_item_exactly_once_across_two_ranks_and_two_workers(cache):
    seen = []
    for rank in (0, 1):
        ds = LatentIterableDataset(cache, rank=rank, world_size=2, seed=5, batch_size=2)
        ds.set_epoch(1)
        loader = DataLoader(ds, batch_size=2, num_workers=2)
        keys = _keys(loader)
        assert keys == [ds._items.records[i].key for i in ds.rank_indices()]  # the rank's order, whatever the workers
        seen += keys
    assert sorted(seen) == sorted(LatentDataset(cache).keys)


def test_worker_split_without_a_loader_is_exactly_once(cache, monkeypatch):
    """4 simulated workers x 3 simulated ranks, batch runs of 2."""
    from latentd.archive import datasets

    seen = []
    for rank in range(3):
        for worker in range(4):
            monkeypatch.setattr(datasets, "get_worker_info", lambda w=worker: type("Info", (), {"id": w,
                                                                                              "num_workers": 4}))
            seen += _keys(LatentIterableDataset(cache, rank=rank, world_size=3, batch_size=2))
    assert sorted(seen) == sorted(LatentDataset(cache).keys)


def test_the_order_is_a_function_of_seed_and_epoch(cache):
    def epoch_keys(seed, epoch):
        ds = LatentIterableDataset(cache, seed=seed)
        ds.set_epoch(epoch)
        return _keys(ds)

    assert epoch_keys(0, 0) == epoch_keys(0, 0)
    assert epoch_keys(0, 1) != epoch_keys(0, 0) and sorted(epoch_keys(0, 1)) == sorted(epoch_keys(0, 0))
    assert epoch_keys(1, 0) != epoch_keys(0, 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_yields_exactly_the_remaining_items(cache, workers):
    ds = LatentIterableDataset(cache, rank=1, world_size=2, seed=7, batch_size=2)
    ds.set_epoch(3)
    everything = _keys(ds)
    ds.set_epoch(3)
    taken = []
    loader = DataLoader(ds, batch_size=2, num_workers=workers)
    for batch in loader:
        taken += batch["key"]
        if len(taken) >= 2:
            break
    state = ds.state_dict(consumed=len(taken)) if workers else ds.state_dict()
    assert state == {"seed": 7, "epoch": 3, "consumed": 2}
    resumed = LatentIterableDataset(cache, rank=1, world_size=2, seed=7, batch_size=2)
    resumed.load_state_dict(state)
    rest = _keys(DataLoader(resumed, batch_size=2, num_workers=workers))
    assert taken + rest == everything


def _damage_one_entry(archive_path) -> str:
    """NaNs over one entry's float16 latents in its shard: that entry, and only it, cannot be read."""
    with open_archive(archive_path) as archive:
        record = archive["2.png"].record
        path = archive.shard_path(record.shard)
    with open(path, "r+b") as handle:
        handle.seek(record.offset)
        handle.write(b"\xff" * 16)
    return record.key


def test_a_damaged_entry_raises_naming_archive_and_key_or_is_skipped_and_counted(images, model_dir, tmp_path,
                                                                                caplog):
    out = tmp_path / "damaged.latents"
    _encode(images, model_dir, out)
    key = _damage_one_entry(out)
    with pytest.raises(ArchiveError, match=rf"{out}: {key}: latents hold values that are not finite"):
        _keys(LatentIterableDataset(out))
    with pytest.raises(ArchiveError, match=rf"{out}: {key}"):
        LatentDataset(out)[LatentDataset(out).keys.index(key)]
    skipping = LatentIterableDataset(out, on_error="skip")
    keys = _keys(skipping)
    assert sorted(keys) == sorted(k for k in LatentDataset(out).keys if k != key)
    assert skipping.skipped == 1 and f"{key}" in caplog.text and "skipped (1 so far" in caplog.text
    assert skipping.state_dict()["consumed"] == len(SHAPES)
    # a manifest row that does not parse fails its own item only
    with sqlite3.connect(out / MANIFEST) as connection:
        connection.execute("UPDATE items SET variants = '{not json' WHERE key = '5.png'")
    connection.close()
    with pytest.raises(ArchiveError, match=rf"{out}: 5.png: manifest column variants is not JSON"):
        LatentDataset(out)[LatentDataset(out).keys.index("5.png")]
    skipping = LatentIterableDataset(out, on_error="skip", shuffle=False)
    assert _keys(skipping) == [k for k in LatentDataset(out).keys if k not in (key, "5.png")]
    assert skipping.skipped == 2


def test_archives_written_before_crops_and_variants_still_read(images, model_dir, tmp_path):
    """An archive of the previous schema (no crop_top, crop_left, variants columns): the readers give the
    crop its size policy computes, and resuming it adds the columns and goes on."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for index in range(3):
        (folder / f"{index}.png").write_bytes((images / f"{index}.png").read_bytes())
    out = tmp_path / "old.latents"
    _encode(folder, model_dir, out, "--size", "center-crop:32")
    with open_archive(out) as archive:
        expected = {e.key: (e.record.crop_top, e.record.crop_left) for e in archive}
    connection = sqlite3.connect(out / MANIFEST)
    for column in ("crop_top", "crop_left", "variants"):
        connection.execute(f"ALTER TABLE items DROP COLUMN {column}")
    connection.commit()
    connection.close()
    ds = LatentDataset(out)
    assert {key: tuple(ds[i]["crop_top_left"].tolist()) for i, key in enumerate(ds.keys)} == expected
    assert expected["0.png"] == (0, 9) and verify_archive(out) == []
    Image.fromarray(smooth_image(24, 60, seed=99)).save(folder / "new.png")
    _encode(folder, model_dir, out, "--size", "center-crop:32")
    with open_archive(out) as archive:
        assert archive["new.png"].record.crop_left == 24 and archive["0.png"].record.crop_top is None
    assert len(LatentDataset(out)) == 4 and verify_archive(out) == []


def test_sizes_need_a_policy_with_a_side(images, model_dir, tmp_path, capsys):
    assert main(["encode", str(images), "-o", str(tmp_path / "x"), "--model", str(model_dir), "--no-progress",
                 "--sizes", "16"]) == 2
    assert "several sizes need center-crop:S or buckets:S" in capsys.readouterr().err


@pytest.fixture(scope="module")
def zstd_cache(images, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("zstd") / "train.latents"
    _encode(images, model_dir, out, "--size", "center-crop:32", "--flip", "--logvar", "--format", "q8-zstd")
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("options", [{}, {"flip": "random", "sample": True, "logvar": True}])
@pytest.mark.parametrize("archive", ["cache", "zstd_cache"])
def test_batched_reading_gives_the_default_collation_of_the_items(request, archive, options, workers):
    path = request.getfixturevalue(archive)
    common = dict(rank=0, world_size=1, seed=4, batch_size=4, **options)
    items = DataLoader(LatentIterableDataset(path, **common), batch_size=4, num_workers=workers)
    batches = DataLoader(LatentIterableDataset(path, batched=True, **common), batch_size=None, num_workers=workers)
    expected, got = list(items), list(batches)
    assert [len(b["key"]) for b in got] == [4, 4, 1]
    assert len(got) == len(expected)
    for want, have in zip(expected, got):
        assert want.keys() == have.keys()
        for name, value in want.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == have[name].dtype and torch.equal(value, have[name]), name
            else:
                assert value == have[name], name


def test_batched_reading_skips_or_raises_one_damaged_entry_and_refuses_mixed_shapes(images, model_dir, tmp_path,
                                                                                    caplog):
    out = tmp_path / "damaged.latents"
    _encode(images, model_dir, out, "--size", "center-crop:32")
    key = _damage_one_entry(out)
    with pytest.raises(ArchiveError, match=rf"{out}: {key}: latents hold values that are not finite"):
        list(LatentIterableDataset(out, batched=True, batch_size=4))
    skipping = LatentIterableDataset(out, batched=True, batch_size=4, on_error="skip", shuffle=False)
    batches = list(skipping)
    assert sum(len(b["key"]) for b in batches) == len(SHAPES) - 1 and key not in _keys(batches)
    assert skipping.skipped == 1 and skipping.state_dict()["consumed"] == len(SHAPES)
    assert all(len(b["key"]) == len(b["latents"]) == len(b["original_size"]) for b in batches)
    mixed = tmp_path / "mixed.latents"
    _encode(images, model_dir, mixed)  # the default size policy keeps each image's aspect
    with pytest.raises(ArchiveError, match="latents of different shapes cannot be stacked"):
        list(LatentIterableDataset(mixed, batched=True, batch_size=len(SHAPES)))
    assert len(_keys(LatentIterableDataset(mixed, batched=True, batch_size=1))) == len(SHAPES)
