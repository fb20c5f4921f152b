"""Latent archives: mixed sources round trip, resume exactly once, q8 bounds, verify, hostile keys."""

from __future__ import annotations

import io
import json
import sqlite3
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from latentd.archive.manifest import MANIFEST
from latentd.archive import manifest, quantize, writer
from latentd.archive.quantize import (FORMAT_NAMES, FORMATS, dequantize_q8, get_format, load, med_codes, med_residuals,
                                             quantize_q8, store)
from latentd.archive.reader import open_archive, safe_relative_path
from latentd.client.cli import main
from latentd.vae import load_codec
from latentd.vae.metrics import psnr
from tests.conftest import smooth_image


def _save(image: Image.Image, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


@pytest.fixture
def mixed_folder(tmp_path):
    root = tmp_path / "photos"
    _save(Image.fromarray(smooth_image(40, 56, seed=1)), root / "a.png")
    _save(Image.fromarray(smooth_image(33, 45, seed=2)), root / "sub" / "b.jpg", quality=95)
    _save(Image.fromarray(smooth_image(24, 24, seed=3)), root / "sub" / "c.webp", lossless=True)
    rgba = np.dstack([smooth_image(30, 20, seed=4), np.full((30, 20), 128, np.uint8)])
    _save(Image.fromarray(rgba, "RGBA"), root / "d_rgba.png")
    _save(Image.fromarray(smooth_image(28, 36, seed=5)[:, :, 0]), root / "e_gray.png")
    deep = (smooth_image(17, 23, seed=6)[:, :, 0].astype(np.uint16) * 257)
    _save(Image.fromarray(deep), root / "f_16bit.png")
    (root / "g_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return root


def test_mixed_folder_round_trips_and_reports_the_corrupt_file(mixed_folder, tiny_model_dir, tmp_path, capsys):
    archive = tmp_path / "photos.latents"
    code = main(["encode", str(mixed_folder), "-o", str(archive), "--model", str(tiny_model_dir), "--no-progress",
                 "--batch-size", "3"])
    assert code == 1  # one file failed, the others are in
    assert "encoded 6 images" in capsys.readouterr().out
    with open_archive(archive) as opened:
        assert len(opened) == 6 and [f.key for f in opened.failures()] == ["g_corrupt.png"]
        entry = opened["sub/b.jpg"]
        assert (entry.record.width, entry.record.height) == (45, 33) and entry.latents.shape == (4, 17, 23)
        assert entry.record.bpp == pytest.approx(entry.record.nbytes * 8 / (45 * 33))
        assert entry.record.model == "tiny-vae" and len(entry.record.sha256) == 64
    assert main(["inspect", str(archive), "--json", "--failures"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"ok": 6, "failed": 1} and "g_corrupt.png" in report["failures"][0]["key"]
    out = tmp_path / "decoded"
    assert main(["decode", str(archive), "-o", str(out), "--model", str(tiny_model_dir)]) == 0
    codec = load_codec(tiny_model_dir)
    original = np.asarray(Image.open(mixed_folder / "a.png"))
    decoded = np.asarray(Image.open(out / "a.png"))
    assert decoded.shape == original.shape
    expected = codec.decode(codec.encode(original).half().float(), sizes=original.shape[:2])
    assert psnr(decoded, expected) > 45  # float16 storage: the in-process round trip, up to fp16 rounding
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "a.png", "d_rgba.png", "e_gray.png", "f_16bit.png", "sub/b.png", "sub/c.png"]
    assert main(["verify", str(archive)]) == 0


def test_tar_zip_and_webdataset_sources(tmp_path, tiny_model_dir):
    images = {f"{i:04d}": smooth_image(16, 16, seed=i) for i in range(3)}

    def png(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    with zipfile.ZipFile(tmp_path / "set.zip", "w") as archive:
        for key, array in images.items():
            archive.writestr(f"dir/{key}.png", png(array))
    with tarfile.open(tmp_path / "shard-0.tar", "w") as archive:
        for key, array in images.items():
            for name, data in ((f"{key}.jpg", png(array)), (f"{key}.json", json.dumps({"caption": key}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    assert main(["encode", str(tmp_path / "set.zip"), str(tmp_path / "shard-0.tar"), "-o", str(out), "--model",
                 str(tiny_model_dir), "--no-progress", "--format", "q8-zstd"]) == 0
    with open_archive(out) as archive:
        keys = sorted(entry.key for entry in archive)
        assert keys == ["set.zip/dir/0000.png", "set.zip/dir/0001.png", "set.zip/dir/0002.png",
                        "shard-0.tar/0000", "shard-0.tar/0001", "shard-0.tar/0002"]
        assert archive["shard-0.tar/0001"].record.extra == {"json": {"caption": "0001"}}
        assert archive.meta["format"] == "q8-zstd"


class CrashAfter:
    """A backend that dies (like `kill -9`, as far as the archive can tell) after `limit` images."""

    def __init__(self, backend, limit):
        self.backend, self.limit, self.done = backend, limit, 0
        for name in ("name", "where", "max_pixels", "factor", "scaling_factor", "shift_factor"):
            setattr(self, name, getattr(backend, name))

    def encode(self, images, tiling="auto"):
        if self.done + len(images) > self.limit:
            raise SystemExit("simulated crash")
        self.done += len(images)
        return self.backend.encode(images, tiling)


def _writer(folder, backend, fmt="float16", shard_bytes=1):
    from latentd.archive.quantize import get_format
    from latentd.archive.writer import ArchiveSettings, ArchiveWriter

    settings = ArchiveSettings(fmt, "native", backend.name, backend.scaling_factor, backend.shift_factor,
                               backend.factor)
    return ArchiveWriter(folder, settings, get_format(fmt), shard_bytes)


def test_resume_after_a_crash_mid_shard_gives_every_image_exactly_once(tmp_path, tiny_model_dir, monkeypatch):
    from latentd.archive.encode import encode_sources
    from latentd.archive.manifest import Manifest
    from latentd.archive.sizing import SizePolicy
    from latentd.archive.sources import iter_sources
    from latentd.client.cli.backends import LocalBackend

    folder = tmp_path / "imgs"
    for i in range(11):
        _save(Image.fromarray(smooth_image(16, 16 + 8 * (i % 2), seed=i)), folder / f"{i:02d}.png")
    backend = LocalBackend(load_codec(tiny_model_dir))
    archive = tmp_path / "archive"
    # First run: shards of about 3 images; it dies while the 3rd shard is being filled.
    writer = _writer(archive, backend, shard_bytes=3 * 4 * 8 * 12 * 2)
    with pytest.raises(SystemExit):
        encode_sources(iter_sources([folder]), writer, CrashAfter(backend, 7), SizePolicy.parse("native"),
                       batch_size=1, workers=2)
    # Second run: a crash between a shard's rename and its manifest commit leaves an orphan shard.
    writer = _writer(archive, backend, shard_bytes=3 * 4 * 8 * 12 * 2)
    first_done = set(writer.done)
    assert 0 < len(first_done) < 11
    original_commit = Manifest.commit_shard
    monkeypatch.setattr(Manifest, "commit_shard", lambda *a, **k: (_ for _ in ()).throw(SystemExit("crash")))
    with pytest.raises(SystemExit):
        encode_sources(iter_sources([folder]), writer, backend, SizePolicy.parse("native"), batch_size=1)
    monkeypatch.setattr(Manifest, "commit_shard", original_commit)
    # Third run finishes; the orphan shard is removed and its images encoded again.
    writer = _writer(archive, backend, shard_bytes=3 * 4 * 8 * 12 * 2)
    summary = encode_sources(iter_sources([folder]), writer, backend, SizePolicy.parse("native"), batch_size=4)
    writer.close()
    assert summary.skipped == len(first_done) and summary.images == 11 - len(first_done)
    with open_archive(archive) as opened:
        keys = [entry.key for entry in opened]
        assert sorted(keys) == [f"{i:02d}.png" for i in range(11)] and len(set(keys)) == 11
        shards_on_disk = sorted(p.name for p in archive.glob("shard-*"))
        assert shards_on_disk == sorted(row["name"] for row in opened.manifest.shards())
        for entry in opened:
            image = np.asarray(Image.open(folder / entry.key))
            np.testing.assert_allclose(entry.latents, backend.encode([image])[0], atol=2e-3)
    assert main(["verify", str(archive)]) == 0


def test_resuming_with_other_settings_is_refused(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "imgs"
    _save(Image.fromarray(smooth_image(16, 16)), folder / "a.png")
    base = ["encode", str(folder), "-o", str(tmp_path / "a"), "--model", str(tiny_model_dir), "--no-progress"]
    assert main(base) == 0
    assert main(base) == 0 and "1 already in the archive" in capsys.readouterr().out
    assert main([*base, "--format", "q8"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_dedupe_skips_identical_sources(tmp_path, tiny_model_dir):
    folder = tmp_path / "imgs"
    _save(Image.fromarray(smooth_image(16, 16)), folder / "a.png")
    (folder / "copy.png").write_bytes((folder / "a.png").read_bytes())
    assert main(["encode", str(folder), "-o", str(tmp_path / "a"), "--model", str(tiny_model_dir), "--no-progress",
                 "--dedupe"]) == 0
    with open_archive(tmp_path / "a") as archive:
        assert len(archive) == 1 and archive.manifest.counts() == {"ok": 1, "duplicate": 1}


def test_q8_error_is_within_half_a_step_per_channel():
    latents = np.random.default_rng(0).normal(size=(4, 16, 16)).astype(np.float32) * [[[1]], [[3]], [[0.1]], [[9]]]
    codes, scale, offset = quantize_q8(latents)
    error = np.abs(dequantize_q8(codes, scale, offset) - latents)
    assert (error <= scale[:, None, None] / 2 + 1e-6).all()
    constant = np.full((4, 2, 2), 0.5, np.float32)
    np.testing.assert_array_equal(dequantize_q8(*quantize_q8(constant)), constant)
    for fmt in (f for f in FORMATS if not f.entropy):  # entropy needs a model: tests/archive/test_entropy.py
        stored = store(latents, fmt)
        back = load(stored, fmt, latents.shape)
        assert back.shape == latents.shape and np.isfinite(back).all()
        expected_bits = fmt.bits if not fmt.zstd else None
        if expected_bits:
            assert stored.data.nbytes == latents.size * expected_bits // 8


@pytest.mark.parametrize("shape", [(4, 1, 1), (4, 1, 9), (4, 7, 1), (3, 13, 8), (4, 64, 64)])
def test_med_prediction_is_exactly_invertible(shape):
    codes = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    residuals = med_residuals(codes)
    assert residuals.dtype == np.uint8 and residuals.shape == shape
    np.testing.assert_array_equal(med_codes(residuals), codes)


@pytest.mark.parametrize("name", [n for n in FORMAT_NAMES if not get_format(n).entropy])  # coded: test_entropy.py, test_vq_format.py
def test_loading_a_batch_together_gives_each_latent_as_loaded_alone(name):
    fmt, rng = get_format(name), np.random.default_rng(1)
    latents = [rng.standard_normal((4, 9, 13)).astype(np.float32) * (i + 1) for i in range(5)]
    stored = [store(x, fmt) for x in latents]
    out = np.empty((5, 4, 9, 13), np.float32)
    quantize.load_batch([quantize.unpack(s, fmt, (4, 9, 13)) for s in stored], fmt, out)
    for one, together in zip(stored, out):
        np.testing.assert_array_equal(load(one, fmt, (4, 9, 13)), together)
    with pytest.raises(ValueError, match="values|bytes"):  # the manifest's shape and the stored size disagree
        quantize.unpack(stored[0], fmt, (4, 9, 14))
    if fmt.quantized:
        with pytest.raises(ValueError, match="scale and offset must hold 4 values"):
            quantize.unpack(quantize.Stored(stored[0].data, stored[0].scale[:3], stored[0].offset), fmt, (4, 9, 13))


def test_q8_zstd_is_q8_losslessly_and_prediction_shrinks_smooth_latents():
    ramp = np.linspace(-3, 3, 48, dtype=np.float32)
    smooth = (ramp[None, :, None] + ramp[None, None, :] * [[[1.0]], [[0.5]], [[-1.0]], [[2.0]]]).astype(np.float32)
    q8, q8_zstd = get_format("q8"), get_format("q8-zstd")
    stored = store(smooth, q8_zstd)
    np.testing.assert_array_equal(load(stored, q8_zstd, smooth.shape), load(store(smooth, q8), q8, smooth.shape))
    unpredicted = store(smooth, quantize.LatentFormat("q8-zstd", 8, quantized=True, zstd=True))
    assert stored.nbytes < 0.75 * unpredicted.nbytes  # planes are predicted up to rounding


def test_format_version_1_archives_are_read_without_prediction(tmp_path, tiny_model_dir, monkeypatch):
    """Archives written before q8-zstd gained its predictor still decode to the same latents."""
    legacy = tuple(quantize.LatentFormat(f.name, f.bits, f.quantized, f.zstd) for f in FORMATS)
    monkeypatch.setattr(quantize, "FORMATS", legacy)
    monkeypatch.setattr(writer, "FORMAT_VERSION", "1")
    folder = tmp_path / "photos"
    _save(Image.fromarray(smooth_image(64, 48, seed=7)), folder / "a.png")
    out = tmp_path / "old.latents"
    assert main(["encode", str(folder), "-o", str(out), "--model", str(tiny_model_dir), "--no-progress",
                 "--format", "q8-zstd"]) == 0
    with open_archive(out) as archive:
        written = archive["a.png"].latents
    monkeypatch.undo()
    assert manifest.FORMAT_VERSION == "2" and get_format("q8-zstd").predictor == "med"
    with open_archive(out) as archive:
        assert archive.meta["format_version"] == 1
        np.testing.assert_array_equal(archive["a.png"].latents, written)


def test_verify_detects_a_flipped_byte(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "imgs"
    _save(Image.fromarray(smooth_image(16, 16)), folder / "a.png")
    archive = tmp_path / "a"
    assert main(["encode", str(folder), "-o", str(archive), "--model", str(tiny_model_dir), "--no-progress"]) == 0
    shard = next(archive.glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(archive)]) == 1
    assert "checksum mismatch" in capsys.readouterr().out


def test_hostile_keys_cannot_leave_the_output_folder(tmp_path, tiny_model_dir):
    folder = tmp_path / "imgs"
    _save(Image.fromarray(smooth_image(16, 16)), folder / "a.png")
    _save(Image.fromarray(smooth_image(16, 16, seed=1)), folder / "b.png")
    archive = tmp_path / "a"
    assert main(["encode", str(folder), "-o", str(archive), "--model", str(tiny_model_dir), "--no-progress"]) == 0
    with sqlite3.connect(archive / MANIFEST) as db:  # a manifest crafted by someone else
        db.execute("UPDATE items SET key = '../../escaped' WHERE key = 'a.png'")
        db.execute("UPDATE items SET key = '/etc/passwd' WHERE key = 'b.png'")
    out = tmp_path / "deep" / "out"
    assert main(["decode", str(archive), "-o", str(out), "--model", str(tiny_model_dir)]) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["escaped.png", "etc/passwd.png"]
    assert not (tmp_path / "escaped.png").exists()
    assert safe_relative_path("..\\..\\x", ".png").as_posix() == "x.png"
    assert safe_relative_path("...", ".png").as_posix() == "_.png"


def test_size_policies(tmp_path, tiny_model_dir):
    from latentd.archive.sizing import SizePolicy

    image = Image.fromarray(smooth_image(300, 200))
    assert SizePolicy.parse("native").apply(image).size == (200, 300)
    assert SizePolicy.parse("resize:64x48").apply(image).size == (64, 48)
    assert SizePolicy.parse("center-crop:128").apply(image).size == (128, 128)
    bucket = SizePolicy.parse("buckets:256")
    width, height = bucket.apply(image).size
    assert width % 64 == 0 and height % 64 == 0 and width < height  # portrait stays portrait
    assert abs(width * height - 256 * 256) <= 256 * 64
    for bad in ("tiny", "resize:0x3", "center-crop:x"):
        with pytest.raises(ValueError):
            SizePolicy.parse(bad)
    folder = tmp_path / "imgs"
    _save(image, folder / "p.png")
    assert main(["encode", str(folder), "-o", str(tmp_path / "a"), "--model", str(tiny_model_dir), "--no-progress",
                 "--size", "center-crop:32"]) == 0
    with open_archive(tmp_path / "a") as archive:
        record = archive["p.png"].record
        assert (record.width, record.height, record.encoded_width, record.encoded_height) == (200, 300, 32, 32)
        assert record.latent_shape == [4, 16, 16]
    assert main(["encode", str(folder), "-o", str(tmp_path / "b"), "--size", "square"]) == 2


def test_bench_archive_times_the_model_and_the_pipeline(tiny_model_dir, capsys):
    from latentd.bench.archive import bench_archive
    from latentd.client.cli.backends import LocalBackend

    result = bench_archive(LocalBackend(load_codec(tiny_model_dir)), images=4, size=(48, 32), batch_size=2,
                           workers=2)
    assert result.images == 4 and result.model_images_per_s > 0 and result.archive_images_per_s > 0
    assert result.ratio == pytest.approx(result.archive_images_per_s / result.model_images_per_s)
    assert main(["bench", "archive", "--images", "0"]) == 2


@pytest.mark.slow
def test_the_ray_engine_writes_what_the_local_engine_writes(tmp_path, tiny_model_dir, capsys):
    pytest.importorskip("ray")
    folder = tmp_path / "imgs"
    for i in range(6):
        _save(Image.fromarray(smooth_image(24, 32, seed=i)), folder / f"{i}.png")
    (folder / "bad.png").write_bytes(b"not a png")
    common = [str(folder), "--model", str(tiny_model_dir), "--no-progress", "--batch-size", "3", "--format", "q8"]
    assert main(["encode", *common, "-o", str(tmp_path / "local")]) == 1
    assert main(["encode", *common, "-o", str(tmp_path / "ray"), "--engine", "ray"]) == 1
    if "timed out during startup" in capsys.readouterr().err:  # Ray's own node, on an overloaded machine
        pytest.skip("the local Ray node did not start in time")
    with open_archive(tmp_path / "local") as local, open_archive(tmp_path / "ray") as remote:
        assert [e.key for e in local] == [e.key for e in remote] and len(local) == 6
        assert [f.key for f in remote.failures()] == ["bad.png"]
        for a, b in zip(local, remote):
            assert (a.record.sha256, a.record.latent_shape, a.record.width) == \
                (b.record.sha256, b.record.latent_shape, b.record.width)
            np.testing.assert_allclose(a.latents, b.latents, atol=1e-5)


def test_source_labels_tell_sources_with_equal_names_apart(tmp_path):
    from latentd.archive.sources import source_labels

    for folder in ("src/a/imgs", "src/b/imgs", "x/a/imgs", "cats"):
        (tmp_path / folder).mkdir(parents=True)
    assert source_labels([tmp_path / "cats"]) == [""]
    assert source_labels([tmp_path / "src/a/imgs", tmp_path / "cats"]) == ["imgs", "cats"]
    assert source_labels([tmp_path / "src/a/imgs", tmp_path / "src/b/imgs", tmp_path / "x/a/imgs"]) == [
        "src/a/imgs", "src/b/imgs", "x/a/imgs"]  # one depth for all the sources of a name
    assert source_labels([tmp_path / "src/a/imgs", tmp_path / "src/b/imgs"]) == ["a/imgs", "b/imgs"]
    with pytest.raises(ValueError, match="given twice"):
        source_labels([tmp_path / "cats", tmp_path / "src" / ".." / "cats"])


def test_unique_keys_number_a_key_met_again():
    from latentd.archive.sources import SourceItem, unique_keys

    items = [SourceItem(key, key, bytes) for key in ("a", "a", "a~2", "a", "b")]
    assert [item.key for item in unique_keys(items)] == ["a", "a~2", "a~2~2", "a~3", "b"]


def test_the_writer_commits_a_shard_once_its_first_image_waited_commit_s(tmp_path):
    from latentd.archive.manifest import ItemRecord
    from latentd.archive.quantize import get_format
    from latentd.archive.writer import ArchiveSettings, ArchiveWriter

    latents = np.zeros((4, 8, 8), np.float32)

    def record(key):
        return ItemRecord(key, key, "ok", width=16, height=16, encoded_width=16, encoded_height=16)

    settings = ArchiveSettings("float16", "native", "tiny-vae", 0.5, 0.1, 2)
    immediate = ArchiveWriter(tmp_path / "a", settings, get_format("float16"), commit_s=0)
    immediate.add(record("x"), latents)
    immediate.add(record("y"), latents)
    assert len(immediate.manifest.shards()) == 2 and immediate.manifest.keys() == {"x", "y"}
    with pytest.raises(ValueError, match="already in the archive"):
        immediate.add(record("x"), latents)
    immediate.close()
    patient = ArchiveWriter(tmp_path / "b", settings, get_format("float16"), commit_s=3600)
    patient.add(record("x"), latents)
    patient.add(record("y"), latents)
    assert patient.manifest.shards() == []
    patient.close()
    with open_archive(tmp_path / "b") as archive:
        assert len(archive.manifest.shards()) == 1 and len(archive) == 2


def test_compaction_merges_small_shards_and_survives_a_crash_before_its_commit(tmp_path, tiny_model_dir,
                                                                              monkeypatch):
    from latentd.archive.manifest import Manifest

    folder = tmp_path / "imgs"
    for i in range(7):
        _save(Image.fromarray(smooth_image(16, 16, seed=i)), folder / f"{i}.png")
    archive = tmp_path / "archive"
    args = ["encode", str(folder), "-o", str(archive), "--model", str(tiny_model_dir), "--no-progress",
            "--batch-size", "1", "--commit-s", "0"]
    monkeypatch.setattr(Manifest, "replace_shards", lambda *a, **k: (_ for _ in ()).throw(SystemExit("crash")))
    with pytest.raises(SystemExit):
        main(args)
    monkeypatch.undo()
    with open_archive(archive) as opened:
        assert len(opened.manifest.shards()) == 7 and len(opened) == 7
    assert len(list(archive.glob("shard-*"))) == 8  # the merged shard, renamed but never committed
    with open_archive(archive) as opened:
        before = {entry.key: entry.latents for entry in opened}
        small = {row["name"] for row in opened.manifest.shards()}
    assert main(args) == 0  # reopening removes the orphan; this run compacts
    with open_archive(archive) as opened:
        assert len(opened.manifest.shards()) == 1 and [row["items"] for row in opened.manifest.shards()] == [7]
        for entry in opened:
            np.testing.assert_array_equal(entry.latents, before[entry.key])
    merged = [p.name for p in archive.glob("shard-*")]
    assert len(merged) == 1 and merged[0] not in small
    assert main(["verify", str(archive)]) == 0
