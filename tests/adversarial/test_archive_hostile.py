"""Hostile sources and archives through the real `latentd` CLI: each gives a recorded failure or a one-line
error, and every other image is kept, decoded and verified."""

from __future__ import annotations

import gzip
import io
import json
import os
import sqlite3
import stat
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from latentd.archive.manifest import MANIFEST
from latentd.archive.reader import open_archive, safe_relative_path, verify_archive
from latentd.archive.sources import UnreadableItem, read_limited
from latentd.client.cli import main
from tests.conftest import smooth_image


def png(seed: int, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(smooth_image(size, size, seed=seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(folder, names, seed0=0):
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png(seed0 + index))


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


@pytest.fixture
def run(tiny_model_dir, capsys):
    """`latentd ARGS` in process with the tiny model: (exit code, stdout, stderr)."""
    def call(*args: str, model: bool = True):
        argv = [str(a) for a in args]
        if model:
            argv += ["--model", str(tiny_model_dir)]
        if argv[0] == "encode":
            argv.append("--no-progress")
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err
    return call


def keys_of(folder) -> list[str]:
    with open_archive(folder) as archive:
        return sorted(entry.key for entry in archive)


def failures_of(folder) -> dict[str, str]:
    with open_archive(folder) as archive:
        return {record.key: record.reason for record in archive.failures()}


# Sources: names that meet, damaged members, damaged sources, oversized members


def test_equal_relative_names_in_two_sources_are_both_kept(tmp_path, run):
    names = [f"{i}.png" for i in range(5)]
    write_images(tmp_path / "src" / "a" / "imgs", names, seed0=0)
    write_images(tmp_path / "src" / "b" / "imgs", names, seed0=10)
    archive = tmp_path / "out"
    sources = [tmp_path / "src" / "a" / "imgs", tmp_path / "src" / "b" / "imgs"]
    code, out, _ = run("encode", *sources, "-o", archive)  # all ten fall in one shard
    assert code == 0 and "encoded 10 images (0 already in the archive" in out
    assert keys_of(archive) == sorted(f"{side}/imgs/{name}" for side in "ab" for name in names)
    with open_archive(archive) as opened:
        assert opened["a/imgs/0.png"].record.sha256 != opened["b/imgs/0.png"].record.sha256
    code, out, _ = run("encode", *sources, "-o", archive)
    assert code == 0 and "encoded 0 images (10 already in the archive" in out
    assert run("verify", archive, model=False)[0] == 0
    code, out, _ = run("decode", archive, "-o", tmp_path / "decoded")
    assert code == 0 and len(list((tmp_path / "decoded").rglob("*.png"))) == 10


def test_an_archive_written_under_the_old_colliding_keys_resumes_without_loss_or_twice(tmp_path, run):
    names = [f"{i}.png" for i in range(4)]
    write_images(tmp_path / "a" / "imgs", names, seed0=0)
    write_images(tmp_path / "b" / "imgs", names, seed0=10)
    (tmp_path / "b" / "imgs" / "3.png").write_bytes((tmp_path / "a" / "imgs" / "3.png").read_bytes())
    archive = tmp_path / "out"
    assert run("encode", tmp_path / "a" / "imgs", "-o", archive)[0] == 0
    with sqlite3.connect(archive / MANIFEST) as db:  # what the old scheme wrote: a's images under imgs/
        db.execute("UPDATE items SET key = 'imgs/' || key")
    code, out, _ = run("encode", tmp_path / "a" / "imgs", tmp_path / "b" / "imgs", "-o", archive)
    assert code == 0 and "encoded 4 images (4 already in the archive" in out
    assert keys_of(archive) == sorted([f"imgs/{name}" for name in names] + [f"b/imgs/{name}" for name in names])
    with open_archive(archive) as opened:  # b's copy of a's 3.png is b's own entry, not a's one claimed twice
        assert opened["b/imgs/3.png"].record.sha256 == opened["imgs/3.png"].record.sha256
    code, out, _ = run("encode", tmp_path / "a" / "imgs", tmp_path / "b" / "imgs", "-o", archive)
    assert code == 0 and "encoded 0 images (8 already in the archive" in out


def test_sources_with_distinct_names_keep_their_plain_labels(tmp_path, run):
    write_images(tmp_path / "x" / "cats", ["1.png"])
    write_images(tmp_path / "y" / "dogs", ["1.png"], seed0=5)
    code, _, _ = run("encode", tmp_path / "x" / "cats", tmp_path / "y" / "dogs", "-o", tmp_path / "out")
    assert code == 0 and keys_of(tmp_path / "out") == ["cats/1.png", "dogs/1.png"]


def test_one_source_given_twice_is_bad_usage(tmp_path, run):
    write_images(tmp_path / "imgs", ["a.png"])
    code, out, err = run("encode", tmp_path / "imgs", tmp_path / "imgs" / ".", "-o", tmp_path / "out")
    assert code == 2 and "given twice" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_unknown_source_kind_is_bad_usage(tmp_path, run):
    (tmp_path / "notes.json").write_text("{}")
    code, _, err = run("encode", tmp_path / "notes.json", "-o", tmp_path / "out")
    assert code == 2 and "notes.json" in err and len(err.strip().splitlines()) == 1


def test_a_tar_member_name_repeated_keeps_both_images(tmp_path, run):
    with tarfile.open(tmp_path / "set.tar", "w") as archive:
        add_member(archive, "x.png", png(1))
        add_member(archive, "x.png", png(2))
        add_member(archive, "y.png", png(3))
    code, _, _ = run("encode", tmp_path / "set.tar", "-o", tmp_path / "out", "--batch-size", "4")
    assert code == 0 and keys_of(tmp_path / "out") == ["x.png", "x.png~2", "y.png"]
    with open_archive(tmp_path / "out") as opened:
        assert opened["x.png"].record.sha256 != opened["x.png~2"].record.sha256
    assert run("encode", tmp_path / "set.tar", "-o", tmp_path / "out")[0] == 0  # a re-run resumes cleanly


def test_a_list_file_naming_one_image_twice_encodes_it_twice_without_dedupe(tmp_path, run):
    write_images(tmp_path, ["a.png"])
    (tmp_path / "list.txt").write_text("a.png\na.png\nmissing.png\n")
    code, _, _ = run("encode", tmp_path / "list.txt", "-o", tmp_path / "out")
    assert code == 1  # missing.png failed
    assert keys_of(tmp_path / "out") == ["a.png", "a.png~2"]
    assert "No such file" in failures_of(tmp_path / "out")["missing.png"]


def test_dedupe_lists_every_skipped_duplicate(tmp_path, run):
    write_images(tmp_path / "imgs", ["a.png"])
    (tmp_path / "imgs" / "b.png").write_bytes((tmp_path / "imgs" / "a.png").read_bytes())
    code, _, err = run("encode", tmp_path / "imgs", "-o", tmp_path / "out", "--dedupe")
    assert code == 0 and "--duplicates" in err
    code, out, _ = run("inspect", tmp_path / "out", "--duplicates", "--json", model=False)
    report = json.loads(out)
    assert code == 0 and report["duplicates"] == [
        {"key": "b.png", "source": str(tmp_path / "imgs" / "b.png"), "reason": "same bytes as a.png"}]


def test_a_zip_member_with_a_bad_crc_is_a_failure_and_the_rest_is_encoded(tmp_path, run):
    good, bad = png(1), png(2)
    with zipfile.ZipFile(tmp_path / "set.zip", "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a.png", good)
        archive.writestr("b.png", bad)
        archive.writestr("c.png", png(3))
    data = bytearray((tmp_path / "set.zip").read_bytes())
    where = data.index(bad) + len(bad) // 2
    data[where] ^= 0xFF  # stored, so the CRC no longer matches
    (tmp_path / "set.zip").write_bytes(bytes(data))
    code, _, err = run("encode", tmp_path / "set.zip", "-o", tmp_path / "out")
    assert code == 1 and "--failures" in err
    assert keys_of(tmp_path / "out") == ["a.png", "c.png"]
    assert "CRC" in failures_of(tmp_path / "out")["b.png"]
    code, out, _ = run("inspect", tmp_path / "out", "--failures", model=False)
    assert code == 0 and "FAILED b.png" in out and "CRC" in out
    code, out, _ = run("encode", tmp_path / "set.zip", "-o", tmp_path / "out")
    assert code == 0 and "3 already in the archive" in out  # the re-run does not fail the same way


@pytest.mark.parametrize("compressed", [False, True])
def test_a_truncated_tar_keeps_what_came_before_and_records_the_rest(tmp_path, run, compressed):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        for index in range(4):
            add_member(archive, f"{index}.png", png(index, size=24))
    data = raw.getvalue()
    cut = data[: data.index(png(2, size=24)) + 100]  # inside the third member's data
    name = "set.tar.gz" if compressed else "set.tar"
    (tmp_path / name).write_bytes(gzip.compress(cut) if compressed else cut)
    (tmp_path / "more").mkdir()
    write_images(tmp_path / "more", ["z.png"], seed0=9)
    code, _, _ = run("encode", tmp_path / name, tmp_path / "more", "-o", tmp_path / "out")
    assert code == 1
    assert keys_of(tmp_path / "out") == ["more/z.png", f"{name}/0.png", f"{name}/1.png"]
    failures = failures_of(tmp_path / "out")
    assert sorted(failures) == [f"{name}#rest", f"{name}/2.png"]
    assert "unexpected end of data" in failures[f"{name}/2.png"] and "truncated" in failures[f"{name}#rest"]
    assert run("encode", tmp_path / name, tmp_path / "more", "-o", tmp_path / "out")[0] == 0


@pytest.mark.parametrize("name, mode", [("set.tar", "w"), ("set.tar.gz", "w:gz"), ("set.tgz", "w:gz")])
def test_a_complete_tar_reports_no_failure(tmp_path, run, name, mode):
    with tarfile.open(tmp_path / name, mode) as archive:
        for index in range(2):
            add_member(archive, f"{index}.png", png(index))
    code, _, _ = run("encode", tmp_path / name, "-o", tmp_path / "out")
    assert code == 0 and keys_of(tmp_path / "out") == ["0.png", "1.png"] and failures_of(tmp_path / "out") == {}


def test_a_tar_cut_inside_a_header_is_recorded(tmp_path, run):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        for index in range(2):
            add_member(archive, f"{index}.png", png(index))
    data = raw.getvalue()
    first_end = 512 + (len(png(0)) + 511) // 512 * 512
    (tmp_path / "set.tar").write_bytes(data[: first_end + 200])  # the second header is cut
    code, _, _ = run("encode", tmp_path / "set.tar", "-o", tmp_path / "out")
    assert code == 1 and keys_of(tmp_path / "out") == ["0.png"]
    assert "truncated" in failures_of(tmp_path / "out")["set.tar#rest"]


@pytest.mark.parametrize(("name", "content"), [("broken.zip", b"PK\x03\x04 definitely not a zip"),
                                              ("list.txt", b"\xff\xfe\x00garbage\x80\n")],
                         ids=["not-a-zip", "list-not-text"])
def test_an_unreadable_source_is_one_failure_and_the_next_source_goes_on(tmp_path, run, name, content):
    (tmp_path / name).write_bytes(content)
    write_images(tmp_path / "imgs", ["a.png"])
    code, _, _ = run("encode", tmp_path / name, tmp_path / "imgs", "-o", tmp_path / "out")
    assert code == 1 and keys_of(tmp_path / "out") == ["imgs/a.png"]
    assert "unreadable source" in failures_of(tmp_path / "out")[f"{name}#rest"]


def test_webdataset_sidecars_nested_200k_deep_or_not_json_fail_their_item_only(tmp_path, run):
    with tarfile.open(tmp_path / "shard-0.tar", "w") as archive:
        for key, sidecar in (("000", b'{"caption": "fine"}'), ("001", b"[" * 200_000 + b"]" * 200_000),
                             ("002", b"{not json"), ("003", b'{"caption": "also fine"}')):
            add_member(archive, f"{key}.png", png(int(key)))
            add_member(archive, f"{key}.json", sidecar)
    code, _, _ = run("encode", tmp_path / "shard-0.tar", "-o", tmp_path / "out")
    assert code == 1 and keys_of(tmp_path / "out") == ["000", "003"]
    failures = failures_of(tmp_path / "out")
    assert "nested too deeply" in failures["001"] and "not JSON" in failures["002"]
    with open_archive(tmp_path / "out") as opened:
        assert opened["003"].record.extra == {"json": {"caption": "also fine"}}


def test_members_and_files_over_the_item_limit_are_refused_before_being_read(tmp_path, run):
    big = b"\0" * (3 << 20)
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb.png", big)  # a few KB compressed
        archive.writestr("ok.png", png(1))
    with tarfile.open(tmp_path / "big.tar", "w") as archive:
        add_member(archive, "huge.png", big)
        add_member(archive, "ok.png", png(2))
    write_images(tmp_path / "imgs", ["ok.png"], seed0=3)
    (tmp_path / "imgs" / "huge.png").write_bytes(big)
    code, _, _ = run("encode", tmp_path / "bomb.zip", tmp_path / "big.tar", tmp_path / "imgs", "-o",
                     tmp_path / "out", "--max-item-mb", "1")
    assert code == 1
    assert keys_of(tmp_path / "out") == ["big.tar/ok.png", "bomb.zip/ok.png", "imgs/ok.png"]
    failures = failures_of(tmp_path / "out")
    assert sorted(failures) == ["big.tar/huge.png", "bomb.zip/bomb.png", "imgs/huge.png"]
    assert all("--max-item-mb" in reason for reason in failures.values())


def test_a_stream_that_lies_about_its_size_is_cut_at_the_limit():
    with pytest.raises(UnreadableItem, match="item limit"):
        read_limited(io.BytesIO(b"x" * 5000), limit=4096, declared=10)
    assert read_limited(io.BytesIO(b"x" * 4096), limit=4096) == b"x" * 4096


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux /proc")
def test_a_file_that_fails_to_read_is_a_failure(tmp_path, run):
    write_images(tmp_path / "imgs", ["a.png", "c.png"])
    (tmp_path / "imgs" / "b.png").symlink_to("/proc/self/mem")  # a regular file whose read fails, even for root
    code, _, _ = run("encode", tmp_path / "imgs", "-o", tmp_path / "out")
    assert code == 1 and keys_of(tmp_path / "out") == ["a.png", "c.png"]
    assert "Input/output error" in failures_of(tmp_path / "out")["b.png"]


# Archives: damaged shards and manifests, hostile names


@pytest.fixture
def two_shards(tmp_path, run):
    """An archive of six images in two shards (three per shard), the shard names in order."""
    write_images(tmp_path / "imgs", [f"{i}.png" for i in range(6)])
    archive = tmp_path / "archive"
    one_image = 4 * 8 * 8 * 2  # float16 latents of a 16x16 image with the factor-2 tiny model
    code, _, _ = run("encode", tmp_path / "imgs", "-o", archive, "--batch-size", "3",
                     "--shard-mb", str(2.5 * one_image / (1 << 20)))
    assert code == 0
    with open_archive(archive) as opened:
        shards = [row["name"] for row in opened.manifest.shards()]
    assert len(shards) == 2
    return archive, shards


def shard_keys(archive, shard) -> list[str]:
    with sqlite3.connect(archive / MANIFEST) as db:
        return sorted(row[0] for row in db.execute("SELECT key FROM items WHERE shard = ?", (shard,)))


def decoded(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.png"))


@pytest.mark.parametrize("damage", ["truncate", "remove", "flip"])
def test_a_damaged_shard_fails_its_entries_and_the_other_shard_decodes(two_shards, tmp_path, run, damage):
    archive, (first, second) = two_shards
    path = archive / first
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "remove":
        path.unlink()
    else:
        flipped = bytearray(data)
        flipped[-3] ^= 0x01
        path.write_bytes(bytes(flipped))
    lost = shard_keys(archive, first)
    code, out, _ = run("verify", archive, model=False)
    assert code == 1 and first in out
    code, out, err = run("decode", archive, "-o", tmp_path / "decoded")
    assert code == 1 and "decoded 3 images" in out and "3 failed" in out
    assert decoded(tmp_path / "decoded") == shard_keys(archive, second)
    assert all(f"FAILED {key}: shard {first}" in err for key in lost)
    if damage == "flip":  # the opt-out decodes the changed bytes, as asked
        assert run("decode", archive, "-o", tmp_path / "unchecked", "--no-verify")[0] == 0
        assert len(decoded(tmp_path / "unchecked")) == 6


@pytest.mark.parametrize("column, value, named", [
    ("latent_shape", "{not json", "latent_shape"),
    ("latent_shape", "[4, 100000, 100000]", "latent_shape"),
    ("extra", "[" * 100_000, "extra"),
    ("shard", None, "shard"),
    ("tensor", "nowhere::data", "nowhere"),
    ("format", "float99", "format"),
    ("encoded_width", -5, "encoded_width"),
])
def test_a_damaged_manifest_row_fails_its_entry_only(two_shards, tmp_path, run, column, value, named):
    archive, _ = two_shards
    with sqlite3.connect(archive / MANIFEST) as db:
        db.execute(f"UPDATE items SET {column} = ? WHERE key = '2.png'", (value,))
    code, out, _ = run("verify", archive, model=False)
    assert code == 1 and "2.png" in out and named in out
    code, out, err = run("decode", archive, "-o", tmp_path / "decoded")
    assert code == 1 and "decoded 5 images" in out
    assert "FAILED 2.png" in err and named in err
    assert decoded(tmp_path / "decoded") == [f"{i}.png" for i in range(6) if i != 2]


@pytest.mark.parametrize("name, complaint", [
    ("../other/shard-000000.safetensors", "not a file name"),
    ("/etc/passwd", "not a file name"),
    ("..", "not a file name"),
    ("escape-link.safetensors", "outside the archive"),
])
def test_shard_paths_are_confined_to_the_archive_folder(two_shards, tmp_path, run, name, complaint):
    archive, (first, _) = two_shards
    # A sound copy outside the folder: opening it would pass every check but the confinement.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / first).write_bytes((archive / first).read_bytes())
    (archive / "escape-link.safetensors").symlink_to(tmp_path / "other" / first)
    with sqlite3.connect(archive / MANIFEST) as db:
        db.execute("UPDATE shards SET name = ? WHERE name = ?", (name, first))
        db.execute("UPDATE items SET shard = ? WHERE shard = ?", (name, first))
    code, out, _ = run("verify", archive, model=False)
    assert code == 1 and complaint in out
    code, out, err = run("decode", archive, "-o", tmp_path / "decoded")
    assert code == 1 and "decoded 3 images" in out and complaint in err


def test_a_5000_character_key_decodes_under_a_bounded_name(two_shards, tmp_path, run):
    archive, _ = two_shards
    long_key = "k" * 5000 + ".png"
    with sqlite3.connect(archive / MANIFEST) as db:
        db.execute("UPDATE items SET key = ? WHERE key = '1.png'", (long_key,))
        db.execute("UPDATE items SET key = ? WHERE key = '3.png'", ("/".join(["d"] * 3000) + "/x.png",))
    code, out, _ = run("decode", archive, "-o", tmp_path / "decoded")
    assert code == 0 and "decoded 6 images" in out
    names = [p.name for p in (tmp_path / "decoded").rglob("*.png")]
    assert len(names) == 6 and max(len(name) for name in names) <= 200
    assert safe_relative_path(long_key, ".png") != safe_relative_path("k" * 4999 + "j.png", ".png")


def test_a_key_with_a_newline_is_printed_on_one_line(two_shards, tmp_path, run):
    archive, _ = two_shards
    with sqlite3.connect(archive / MANIFEST) as db:
        db.execute("UPDATE items SET key = ?, latent_shape = 'x' WHERE key = '4.png'", ("a\nFORGED ok",))
    code, _, err = run("decode", archive, "-o", tmp_path / "decoded")
    assert code == 1 and "a\\nFORGED ok" in err and not any(line.startswith("FORGED") for line in err.splitlines())


@pytest.mark.parametrize("content", [None, b"not a database at all, just bytes" * 10, "other-schema"])
@pytest.mark.parametrize("command", ["decode", "verify", "inspect"])
def test_a_folder_that_is_not_an_archive_is_bad_input(tmp_path, run, content, command):
    folder = tmp_path / "fake"
    folder.mkdir()
    if content == "other-schema":
        with sqlite3.connect(folder / MANIFEST) as db:
            db.execute("CREATE TABLE items (key TEXT)")
    elif content is not None:
        (folder / MANIFEST).write_bytes(content)
    args = [command, folder] + (["-o", tmp_path / "out"] if command == "decode" else [])
    code, _, err = run(*args, model=command == "decode")
    assert code == 2 and "not a latent archive" in err and len(err.strip().splitlines()) == 1
    if content == "other-schema":
        with sqlite3.connect(folder / MANIFEST) as db:  # opened read-only: nothing was added to it
            assert [row[0] for row in db.execute("SELECT name FROM sqlite_master")] == ["items"]


def test_an_output_that_is_a_file_is_bad_usage(two_shards, tmp_path, run):
    archive, _ = two_shards
    (tmp_path / "file").write_text("not a folder")
    for args in (("encode", tmp_path / "imgs", "-o", tmp_path / "file"), ("decode", archive, "-o", tmp_path / "file")):
        code, _, err = run(*args)
        assert code == 2 and "not" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "file").read_text() == "not a folder"


def test_a_manifest_left_mid_transaction_by_a_killed_writer_still_reads(two_shards, run):
    archive, _ = two_shards
    writer = (
        "import os, signal, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1])\n"
        "db.execute('PRAGMA cache_size = 1')\n"  # pages spill to the file: the journal becomes hot
        "db.execute('BEGIN')\n"
        "for i in range(2000):\n"
        "    db.execute(\"INSERT INTO items (key, source, status) VALUES (?, 'x', 'failed')\", (f'k{i:05d}' * 40,))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    import subprocess
    import sys

    killed = subprocess.run([sys.executable, "-c", writer, str(archive / MANIFEST)], timeout=120)
    assert killed.returncode == -9 and (archive / (MANIFEST + "-journal")).exists()
    code, out, _ = run("verify", archive, model=False)
    assert code == 0 and "OK" in out
    code, out, _ = run("inspect", archive, "--json", model=False)
    assert code == 0 and json.loads(out)["counts"] == {"ok": 6}


def test_a_zstd_frame_claiming_a_huge_size_is_refused(tmp_path, run):
    import zstandard
    from safetensors.numpy import load_file, save_file

    from latentd.archive.writer import file_sha256

    write_images(tmp_path / "imgs", ["a.png", "b.png"])
    archive = tmp_path / "archive"
    assert run("encode", tmp_path / "imgs", "-o", archive, "--format", "q8-zstd")[0] == 0
    with open_archive(archive) as opened:
        record = opened["a.png"].record
    # A shard rewritten by someone else, checksums and all: the entry's frame claims 1 GiB.
    shard = archive / record.shard
    tensors = load_file(shard)
    tensors[record.tensor] = np.frombuffer(zstandard.ZstdCompressor().compress(b"\0" * (1 << 30)), np.uint8)
    save_file(tensors, shard)
    with sqlite3.connect(archive / MANIFEST) as db:
        db.execute("UPDATE shards SET sha256 = ?, bytes = ?", (file_sha256(shard), shard.stat().st_size))
        db.execute("UPDATE items SET offset = NULL")
    problems = [str(p) for p in verify_archive(archive)]
    assert len(problems) == 1 and "a.png" in problems[0] and "zstd frame" in problems[0]
    code, out, err = run("decode", archive, "-o", tmp_path / "decoded")
    assert code == 1 and "decoded 1 images" in out and "FAILED a.png" in err


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_follow_the_umask(tmp_path, run, mask):
    write_images(tmp_path / "imgs", ["a.png"])
    previous = os.umask(mask)
    try:
        assert run("encode", tmp_path / "imgs", "-o", tmp_path / "archive")[0] == 0
        assert run("decode", tmp_path / "archive", "-o", tmp_path / "decoded")[0] == 0
    finally:
        os.umask(previous)
    files = [*tmp_path.joinpath("archive").glob("shard-*"), tmp_path / "decoded" / "a.png"]
    assert len(files) == 2
    assert {oct(stat.S_IMODE(path.stat().st_mode)) for path in files} == {oct(0o666 & ~mask)}
