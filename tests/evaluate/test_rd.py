"""`latentd eval-rd` and `latentd.evaluate.rd`: latent formats, classic codecs, published points, outputs."""

from __future__ import annotations

import csv
import sys

import pytest
from PIL import Image

from latentd.evaluate import rd
from latentd.client.cli import main
from tests.conftest import make_tiny_kl, smooth_image

SIZES = [(48, 64), (40, 56), (32, 48)]
REFERENCE_ROWS = [
    "file,name,bpp,psnr_rgb,ms_ssim_rgb",
    "jpeg.json,JPEG,0.2,24.0,0.80",
    "jpeg.json,JPEG,0.6,30.0,0.95",
    "jpeg.json,JPEG,1.2,33.0,",
    "a_mse.json,net,0.3,30.0,0.94",
    "a_ms-ssim.json,net,0.3,28.0,0.97",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from latentd.vae import save_model

    return save_model(make_tiny_kl(), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def images():
    return [smooth_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]


@pytest.fixture
def image_dir(tmp_path, images):
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img{index}.png")
    return folder


@pytest.fixture
def reference_csv(tmp_path):
    path = tmp_path / "reference.csv"
    path.write_text("\n".join(REFERENCE_ROWS) + "\n")
    return path


class CountingBackend:
    """A LocalBackend that counts its encode calls."""

    def __init__(self, backend):
        self.backend, self.name, self.encodes = backend, backend.name, 0

    def encode(self, images, tiling="auto"):
        self.encodes += len(images)
        return self.backend.encode(images, tiling=tiling)

    def decode(self, latents, sizes, tiling="auto"):
        return self.backend.decode(latents, sizes, tiling=tiling)


def _by_setting(points):
    return {p.setting: p for p in points}


def test_latent_formats_encode_once_and_q8_halves_float16(tiny_codec, images):
    from latentd.client.cli.backends import LocalBackend

    backend = CountingBackend(LocalBackend(tiny_codec))
    points = _by_setting(rd.latent_points(backend, images, ["float16", "bfloat16", "q8", "q8-zstd"]))
    assert backend.encodes == len(images)  # the latents are reused across formats
    assert set(points) == {"float16", "bfloat16", "q8", "q8-zstd"}
    assert all(p.codec == "latentd tiny" and p.source == "measured" for p in points.values())
    assert 0.45 < points["q8"].bpp / points["float16"].bpp < 0.56  # 8 of 16 bits, plus per-channel scale/offset
    assert points["float16"].psnr >= points["q8"].psnr - 0.05
    assert points["q8-zstd"].psnr == pytest.approx(points["q8"].psnr)  # zstd is lossless on top of q8
    for point in points.values():
        assert len(point.images) == len(images)
        assert point.psnr == pytest.approx(sum(r.psnr for r in point.images) / len(images))  # mean of per-image
        assert point.ms_ssim is None  # images under 161 px have no MS-SSIM


def test_latent_points_skip_a_rejected_image_in_every_format(tiny_codec, images):
    from latentd.client.cli.backends import LocalBackend

    class Picky(CountingBackend):
        def encode(self, batch, tiling="auto"):
            if batch[0].shape[0] == SIZES[1][0]:
                raise OSError("rejected")
            return super().encode(batch, tiling)

    errors = []
    points = rd.latent_points(Picky(LocalBackend(tiny_codec)), images, ["float16", "q8"],
                              on_error=lambda index, exc: errors.append(index))
    assert errors == [1]
    assert [len(p.images) for p in points] == [2, 2]


def test_classic_jpeg_bpp_rises_with_quality(images):
    result = rd.classic_points(images, ["jpeg"], [10, 50, 90])
    assert [p.setting for p in result.points] == ["q=10", "q=50", "q=90"]
    bpps = [p.bpp for p in result.points]
    psnrs = [p.psnr for p in result.points]
    assert bpps == sorted(bpps) and bpps[0] < bpps[-1]
    assert psnrs[0] < psnrs[-1]
    assert all(p.codec == "JPEG" and len(p.images) == len(images) for p in result.points)


def test_classic_ms_ssim_on_large_enough_images():
    result = rd.classic_points([smooth_image(168, 168)], ["webp"], [75])
    assert 0.5 < result.points[0].ms_ssim <= 1.0


def test_missing_avif_is_a_note_not_a_crash(images, monkeypatch):
    monkeypatch.setattr(rd, "classic_available", lambda codec: codec != "avif")
    result = rd.classic_points(images, ["jpeg", "avif"], [50])
    assert [p.codec for p in result.points] == ["JPEG"]
    assert any("AVIF skipped" in note for note in result.notes)


def test_reference_points(reference_csv, tmp_path):
    result = rd.reference_points(reference_csv)
    assert not result.notes and len(result.points) == 5
    assert all(p.source == "published" for p in result.points)
    jpeg = [p for p in result.points if p.codec == "JPEG"]
    assert [p.bpp for p in jpeg] == [0.2, 0.6, 1.2] and jpeg[2].ms_ssim is None
    # One name in two result files: two curves, told apart by the file.
    assert {p.codec for p in result.points} == {"JPEG", "a_mse", "a_ms-ssim"}
    assert rd.interpolate(jpeg, 0.4, "psnr") == pytest.approx(27.0)
    assert rd.interpolate(jpeg, 2.0, "psnr") is None
    missing = rd.reference_points(tmp_path / "nope.csv")
    assert missing.points == [] and "not found" in missing.notes[0]


def test_cli_writes_csv_markdown_and_plot(tmp_path, image_dir, model_dir, reference_csv, capsys):
    out = tmp_path / "out"
    code = main(["eval-rd", "--images", str(image_dir), "-o", str(out), "--model", str(model_dir),
                 "--classic", "jpeg", "webp", "--qualities", "20", "80", "--reference", str(reference_csv)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "| codec | setting | bpp |" in stdout and "wrote" in stdout and "3 of 3 images" in stdout
    with (out / "rd.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["codec", "setting", "bpp", "psnr", "ms_ssim", "source"]
    measured = {(r["codec"], r["setting"]) for r in rows if r["source"] == "measured"}
    assert {("JPEG", "q=20"), ("JPEG", "q=80"), ("WebP", "q=80")} <= measured
    assert sum(r["codec"].startswith("latentd ") for r in rows) == 4
    assert sum(r["source"] == "published" for r in rows) == 5
    markdown = (out / "rd.md").read_text()
    assert "| JPEG | q=20 |" in markdown and "| published codec |" in markdown
    assert (out / "rd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["rd.csv", "rd.md", "rd.png"]  # no temporary files left


def test_cli_without_model_or_reference(tmp_path, image_dir, capsys):
    out = tmp_path / "out"
    assert main(["eval-rd", "--images", str(image_dir), "-o", str(out), "--formats", "--classic", "jpeg",
                 "--qualities", "50", "--reference", str(tmp_path / "missing.csv")]) == 0
    rows = list(csv.DictReader((out / "rd.csv").open(newline="")))
    assert [r["codec"] for r in rows] == ["JPEG"]
    assert "not found" in (out / "rd.md").read_text()


def test_plot_skipped_without_matplotlib(tmp_path, images, monkeypatch):
    # A None entry makes `import` raise ImportError, also for submodules an earlier test already imported.
    for name in ["matplotlib", *(n for n in list(sys.modules) if n.startswith("matplotlib."))]:
        monkeypatch.setitem(sys.modules, name, None)
    outputs = rd.write_outputs(rd.classic_points(images[:1], ["jpeg"], [50]).points, tmp_path / "out")
    assert outputs.plot is None and any("matplotlib" in note for note in outputs.notes)
    assert outputs.csv.is_file() and outputs.markdown.is_file()
    assert not (tmp_path / "out" / "rd.png").exists()


def test_bad_image_is_reported_and_skipped(tmp_path, image_dir, model_dir, capsys):
    (image_dir / "broken.png").write_bytes(b"\x89PNG not really")
    code = main(["eval-rd", "--images", str(image_dir), "-o", str(tmp_path / "out"), "--model", str(model_dir),
                 "--formats", "q8", "--classic", "jpeg", "--qualities", "50"])
    assert code == 1
    captured = capsys.readouterr()
    assert "broken.png: FAILED" in captured.err and "3 of 4 images (1 failed)" in captured.out
    assert (tmp_path / "out" / "rd.csv").is_file()


def test_no_images_is_a_usage_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval-rd", "--images", str(empty), "-o", str(tmp_path / "out"), "--formats"]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["eval-rd", "--help"]) == 0


def test_entropy_steps_are_a_curve_of_their_own(tiny_codec, images):
    import numpy as np

    from latentd.archive.entropy_coder import EntropyCoder
    from latentd.archive.entropy_model import EntropyModelConfig, train_model
    from latentd.archive.quantize import entropy_format
    from latentd.client.cli.backends import LocalBackend

    backend = LocalBackend(tiny_codec)
    latents = [np.asarray(z, np.float32) for z in backend.encode(images)]
    model = train_model(latents, EntropyModelConfig("tiny", 1.0, 0.0, latents[0].shape[0]))
    formats = ["q8", *(entropy_format(EntropyCoder(model, step)) for step in (0.25, 1.0))]
    points = _by_setting(rd.latent_points(backend, images, formats))
    assert points["q8"].codec == "latentd tiny"
    assert points["entropy@0.25"].codec == points["entropy@1"].codec == "latentd tiny entropy"
    assert points["entropy@1"].bpp < points["entropy@0.25"].bpp < points["q8"].bpp
    assert all(len(p.images) == len(images) and p.psnr is not None for p in points.values())  # the random
    # tiny model's PSNR is noise at any step: the quality side is measured on the default model (compression.md)
