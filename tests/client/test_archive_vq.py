"""The vq format end to end: entropy-train on a VQ model, encode, inspect, verify, indices, decode, eval-rd, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from latentd.archive.coding import load_coding_model
from latentd.archive.datasets import LatentDataset
from latentd.archive.reader import open_archive
from latentd.client.cli import main
from latentd.vae import load_codec, save_model
from tests.conftest import make_tiny_vq, smooth_image

SHAPES = [(40, 56), (33, 45), (64, 48)]


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed, (height, width) in enumerate(SHAPES):
        Image.fromarray(smooth_image(height, width, seed=seed)).save(folder / f"p{seed}.png")
    return folder


@pytest.fixture
def vq_dir(tmp_path, photos, capsys):
    """A tiny VQ model folder with its index model trained into `<folder>/entropy`."""
    folder = save_model(make_tiny_vq(), tmp_path / "vq")
    assert main(["entropy-train", "--images", str(photos), "-o", str(folder / "entropy"), "--model", str(folder)]) == 0
    assert "trained on 3 images" in capsys.readouterr().out
    return folder


def _encode(photos, out, model_dir, *extra):
    return main(["encode", str(photos), "-o", str(out), "--model", str(model_dir), "--no-progress", "--format", "vq",
                 *extra])


def test_vq_archive_end_to_end(vq_dir, photos, tmp_path, capsys):
    model = load_coding_model(vq_dir / "entropy")
    codec = load_codec(str(vq_dir), device="cpu")
    assert model.config.codebook_size == 64 and np.array_equal(model.codebook, codec.codebook.numpy())
    out = tmp_path / "a.latents"
    assert _encode(photos, out, vq_dir) == 0  # the model folder's own entropy model by default
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["format"] == "vq" and report["settings"]["entropy_model"] == model.digest
    assert 0 < report["bpp"] < 6  # 6 bits an index at factor 2 would be 1.5 bpp; coded, far less
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"entropy model {model.digest[:16]}" in text and "codebook indices" in text
    assert main(["verify", str(out), "--entropy-model", str(vq_dir / "entropy")]) == 0

    with open_archive(out, entropy_model=vq_dir / "entropy") as archive:
        for seed, (height, width) in enumerate(SHAPES):
            entry = archive[f"p{seed}.png"]
            image = smooth_image(height, width, seed=seed)
            assert entry.indices.tolist() == codec.encode(image, indices=True).numpy().tolist()
            # the latents read back are the codes' vectors: they decode as the indices do
            vectors = codec.codebook.numpy()[entry.indices].transpose(2, 0, 1)
            np.testing.assert_allclose(entry.latents, vectors, atol=1e-6)
        dataset = LatentDataset(out, entropy_model=vq_dir / "entropy")
        assert dataset[0]["latents"].shape == (3, 20, 28)

    decoded = tmp_path / "decoded"
    assert main(["decode", str(out), "-o", str(decoded), "--model", str(vq_dir)]) == 0
    image = np.asarray(Image.open(decoded / "p2.png"))
    expected = codec.decode(codec.encode(smooth_image(64, 48, seed=2), indices=True), sizes=(64, 48))
    assert np.abs(image.astype(int) - np.asarray(expected).astype(int)).max() <= 1


def test_indices_of_an_archive_of_another_format_are_refused(vq_dir, photos, tmp_path):
    from latentd.archive.manifest import ArchiveError

    out = tmp_path / "f.latents"
    assert main(["encode", str(photos), "-o", str(out), "--model", str(vq_dir), "--no-progress"]) == 0
    with open_archive(out) as archive, pytest.raises(ArchiveError, match="only vq archives"):
        _ = archive["p0.png"].indices


def test_eval_rd_measures_the_vq_format(vq_dir, photos, tmp_path, capsys):
    assert main(["eval-rd", "--images", str(photos), "--model", str(vq_dir), "--formats", "float16", "vq",
                 "--classic", "-o", str(tmp_path / "rd")]) == 0
    rows = (tmp_path / "rd" / "rd.csv").read_text().splitlines()
    vq_row = next(row for row in rows if ",vq," in row)
    float_row = next(row for row in rows if ",float16," in row)
    assert float(vq_row.split(",")[2]) < float(float_row.split(",")[2])  # bpp


def test_implicit_formats_skip_what_the_model_cannot_code(vq_dir, photos, tmp_path, capsys):
    """A VQ model's folder holds an index model: all formats run, entropy is skipped with a note, vq is measured."""
    assert main(["eval-rd", "--images", str(photos), "--model", str(vq_dir), "--classic",
                 "-o", str(tmp_path / "rd")]) == 0
    text = capsys.readouterr().out
    assert "entropy format skipped" in text and "| vq |" in text


@pytest.mark.parametrize("extra, message", [
    (["--step", "0.5"], "--step goes with --format entropy"),
    (["--logvar"], "no posterior"),
])
def test_options_the_vq_format_cannot_take_are_refused(vq_dir, photos, tmp_path, capsys, extra, message):
    assert _encode(photos, tmp_path / "x.latents", vq_dir, *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.latents").exists()


def test_vq_needs_a_model_with_a_codebook(tiny_model_dir, photos, tmp_path, capsys):
    assert _encode(photos, tmp_path / "x.latents", tiny_model_dir) == 2
    assert "has no codebook" in capsys.readouterr().err
    assert main(["entropy-train", "--images", str(photos), "-o", str(tmp_path / "e"), "--model", str(tiny_model_dir),
                 "--format", "vq"]) == 2
    assert "has no codebook" in capsys.readouterr().err


def test_an_index_model_of_another_codebook_is_refused(vq_dir, photos, tmp_path, capsys):
    other = save_model(make_tiny_vq(seed=1), tmp_path / "o" / "vq")  # same name, config and size; other codes
    assert _encode(photos, tmp_path / "x.latents", other, "--entropy-model", str(vq_dir / "entropy")) == 2
    assert "holds another codebook" in capsys.readouterr().err


def test_a_model_of_the_other_format_is_refused(vq_dir, tiny_model_dir, photos, tmp_path, capsys):
    kl_entropy = tmp_path / "kl-entropy"
    assert main(["entropy-train", "--images", str(photos), "-o", str(kl_entropy), "--model", str(tiny_model_dir),
                 "--sensitivity-images", "0"]) == 0
    assert _encode(photos, tmp_path / "x.latents", vq_dir, "--entropy-model", str(kl_entropy)) == 2
    assert "codes the entropy format, not vq" in capsys.readouterr().err


def test_reading_with_the_wrong_model_names_both(vq_dir, photos, tmp_path, capsys):
    out = tmp_path / "a.latents"
    assert _encode(photos, out, vq_dir) == 0
    other = save_model(make_tiny_vq(seed=1), tmp_path / "o" / "vq")
    assert main(["entropy-train", "--images", str(photos), "-o", str(tmp_path / "o-entropy"), "--model",
                 str(other)]) == 0
    capsys.readouterr()
    assert main(["verify", str(out), "--entropy-model", str(tmp_path / "o-entropy")]) == 1
    assert "was written with entropy model" in capsys.readouterr().out + capsys.readouterr().err


def test_bench_archive_measures_the_vq_stage(vq_dir, photos, capsys):
    files = [str(p) for p in sorted(photos.iterdir())]
    assert main(["bench", "archive", "--from", *files, "--batch-size", "1", "--workers", "1", "--model",
                 str(vq_dir), "--format", "vq"]) == 0
    out = capsys.readouterr().out
    assert "bench archive stage q8-zstd:" in out and "bench archive stage vq:" in out


def test_the_batched_reader_gives_the_codes_vectors_as_the_items_do(vq_dir, photos, tmp_path):
    import torch
    from torch.utils.data import DataLoader

    from latentd.archive.datasets import LatentIterableDataset

    out = tmp_path / "c.latents"
    assert _encode(photos, out, vq_dir, "--size", "center-crop:32", "--flip") == 0
    common = dict(rank=0, world_size=1, seed=1, batch_size=2, flip="random", entropy_model=vq_dir / "entropy")
    items = list(DataLoader(LatentIterableDataset(out, **common), batch_size=2))
    batches = list(DataLoader(LatentIterableDataset(out, batched=True, **common), batch_size=None))
    assert [len(b["key"]) for b in batches] == [2, 1]
    codebook = torch.from_numpy(load_coding_model(vq_dir / "entropy").codebook)
    for want, have in zip(items, batches):
        assert want["key"] == have["key"] and torch.equal(want["latents"], have["latents"])
        vectors = have["latents"].permute(0, 2, 3, 1).reshape(-1, 3)
        assert (vectors[:, None] == codebook[None]).all(-1).any(-1).all()  # every position is exactly a code


def test_a_damaged_vq_stream_is_one_failed_entry_and_resume_adds_only_the_new(vq_dir, photos, tmp_path, capsys):
    out = tmp_path / "a.latents"
    assert _encode(photos, out, vq_dir, "--commit-s", "0") == 0
    with open_archive(out) as archive:
        record = archive["p1.png"].record
    shard = out / record.shard
    data = bytearray(shard.read_bytes())
    data[record.offset + 40] ^= 0xFF  # in its coder words, past the 36-byte header
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["decode", str(out), "-o", str(tmp_path / "decoded"), "--no-verify", "--model", str(vq_dir)]) == 1
    assert "FAILED p1.png" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "decoded").iterdir()) == ["p0.png", "p2.png"]
    # a resumed run skips what the archive holds and codes only the new image
    Image.fromarray(smooth_image(24, 24, seed=9)).save(photos / "p9.png")
    assert _encode(photos, out, vq_dir) == 0
    assert "encoded 1 images (3 already in the archive" in capsys.readouterr().out
    with open_archive(out, entropy_model=vq_dir / "entropy") as archive:
        assert len(archive) == 4 and archive["p9.png"].indices.shape == (12, 12)
