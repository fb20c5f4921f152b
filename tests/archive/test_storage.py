"""Archives at fsspec URLs: written to and read from memory:// and file://, resumed exactly once after a crash."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pytest
from latentd.archive import LatentIterableDataset
from latentd.archive.encode import encode_sources
from latentd.archive.manifest import MANIFEST
from latentd.archive.quantize import get_format
from latentd.archive.reader import open_archive, verify_archive
from latentd.archive.sizing import SizePolicy
from latentd.archive.sources import iter_sources
from latentd.archive.storage import RemoteFolder
from latentd.archive.writer import ArchiveSettings, ArchiveWriter
from latentd.client.cli import main
from latentd.client.cli.backends import LocalBackend
from latentd.vae import load_codec
from PIL import Image
from torch.utils.data import DataLoader

from tests.client.test_archive import CrashAfter
from tests.conftest import smooth_image


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(9):
        Image.fromarray(smooth_image(16, 16 + 8 * (i % 2), seed=i)).save(images / f"{i:02d}.png")
    return images


def _writer(url, backend):
    settings = ArchiveSettings("q8-zstd", "native", backend.name, backend.scaling_factor, backend.shift_factor,
                               backend.factor)
    return ArchiveWriter(url, settings, get_format("q8-zstd"), shard_bytes=1 << 20, commit_s=0)


def test_memory_archive_resumes_exactly_once_after_crashes(folder, tiny_model_dir, monkeypatch):
    url = f"memory://latentd-test-{uuid.uuid4().hex}/photos.latents"
    backend = LocalBackend(load_codec(tiny_model_dir))
    # First run dies after 4 images (each committed at once: commit_s=0).
    writer = _writer(url, backend)
    with pytest.raises(SystemExit):
        encode_sources(iter_sources([folder]), writer, CrashAfter(backend, 4), SizePolicy.parse("native"),
                       batch_size=1, workers=1)
    # Second run dies between a shard's upload and the manifest's: the object store holds a shard the
    # manifest does not list.
    writer = _writer(url, backend)
    first_done = set(writer.done)
    assert 0 < len(first_done) < 9
    upload = RemoteFolder.upload

    def crash_on_manifest(self, local, name):
        if name == MANIFEST:
            raise SystemExit("simulated crash")
        upload(self, local, name)

    monkeypatch.setattr(RemoteFolder, "upload", crash_on_manifest)
    with pytest.raises(SystemExit):
        encode_sources(iter_sources([folder]), writer, backend, SizePolicy.parse("native"), batch_size=1)
    monkeypatch.setattr(RemoteFolder, "upload", upload)
    remote = RemoteFolder(url)
    assert len([n for n in remote.names() if n.startswith("shard-")]) == len(first_done) + 1  # the orphan
    # Third run finishes; the orphan is removed and its image encoded again.
    writer = _writer(url, backend)
    summary = encode_sources(iter_sources([folder]), writer, backend, SizePolicy.parse("native"), batch_size=2)
    writer.compact()
    writer.close()
    assert summary.skipped == len(first_done) and summary.images == 9 - len(first_done)
    assert not any(n.endswith(".tmp") for n in remote.names())
    with open_archive(url) as archive:
        keys = sorted(entry.key for entry in archive)
        assert keys == [f"{i:02d}.png" for i in range(9)]
        listed = sorted(row["name"] for row in archive.manifest.shards())
        assert sorted(n for n in remote.names() if n.startswith("shard-")) == listed
        for entry in archive:
            image = np.asarray(Image.open(folder / entry.key))
            np.testing.assert_allclose(entry.latents, backend.encode([image])[0], atol=0.05)
    assert verify_archive(url) == []
    # native sizes differ: no collation
    items = [item["key"] for item in DataLoader(LatentIterableDataset(url, seed=1), batch_size=None, num_workers=2)]
    assert sorted(items) == keys
    fsspec.filesystem("memory").rm(url.split("://")[1], recursive=True)


def test_file_url_and_memory_url_through_the_cli(folder, tiny_model_dir, tmp_path, capsys):
    for url in (f"file://{tmp_path}/local.latents", f"memory://latentd-test-{uuid.uuid4().hex}/cli.latents"):
        assert main(["encode", str(folder), "-o", url, "--model", str(tiny_model_dir), "--no-progress",
                     "--size", "center-crop:16", "--flip"]) == 0
        assert main(["verify", url]) == 0
        assert main(["inspect", url]) == 0
        with open_archive(url) as archive:
            assert len(archive) == 9 and archive.variants(archive["01.png"].record)[0]["crop_left"] == 4
        ds = LatentIterableDataset(url, flip=True)
        assert len(list(ds)) == 9
    assert (tmp_path / "local.latents" / MANIFEST).is_file()
    assert main(["verify", "memory://latentd-test-nothing/here"]) == 2
    assert "not a latent archive" in capsys.readouterr().err
