"""The `latentd` CLI through `main(argv)`: exit codes, outputs, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from latentd.client.cli import main
from tests.conftest import smooth_image


def test_help_and_usage(capsys):
    assert main(["--help"]) == 0
    assert "roundtrip" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["no-such-command"]) == 2
    for command in (["info"], ["roundtrip"], ["eval"], ["train"], ["export"], ["bench", "codec"], ["bench", "tiling"]):
        assert main([*command, "--help"]) == 0


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["packages"]["latentd"] and report["compute"]["threads"] >= 1
    assert {row["name"] for row in report["models"]} >= {"default", "sd", "taesd"}


def _write_images(folder):
    folder.mkdir()
    paths = []
    for index, (height, width) in enumerate([(40, 56), (33, 17)]):
        path = folder / f"img{index}.png"
        Image.fromarray(smooth_image(height, width, seed=index)).save(path)
        paths.append(path)
    return paths


def test_roundtrip_writes_reconstructions_and_reports(tmp_path, tiny_model_dir, capsys):
    paths = _write_images(tmp_path / "in")
    out = tmp_path / "out"
    code = main(["roundtrip", *map(str, paths), "-o", str(out), "--model", str(tiny_model_dir), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["images"] == 2 and report["summary"]["failed"] == 0
    for row, path in zip(report["images"], paths):
        written = np.asarray(Image.open(row["output"]))
        assert written.shape == np.asarray(Image.open(path)).shape
        assert row["psnr"] > 0 and row["encode_ms"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["img0.png", "img1.png"]  # no temporary files left


@pytest.mark.parametrize("norms", ["tile", "image", "image-recompute"])
def test_tile_norms_reach_the_codec(tiny_model_dir, norms):
    """What each mode does is tested on the codec (tests/vae/test_tile_norms.py, test_tile_resume.py)."""
    from latentd.client.cli import build_parser
    from latentd.client.cli.common import load_codec_from_args

    args = build_parser().parse_args(["roundtrip", "x.png", "-o", "out", "--model", str(tiny_model_dir),
                                      "--tile-norms", norms])
    assert load_codec_from_args(args).options.tile_norms == norms


def test_an_unknown_tile_norms_is_a_usage_error(tiny_model_dir, capsys):
    assert main(["roundtrip", "x.png", "-o", "out", "--tile-norms", "global"]) == 2
    assert "--tile-norms" in capsys.readouterr().err


def test_roundtrip_table_output(tmp_path, tiny_model_dir, capsys):
    paths = _write_images(tmp_path / "in")
    assert main(["roundtrip", *map(str, paths), "-o", str(tmp_path / "o"), "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "mean over 2 images" in out


def test_one_bad_image_does_not_stop_the_others(tmp_path, tiny_model_dir, capsys):
    paths = _write_images(tmp_path / "in")
    bad = tmp_path / "in" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code = main(["roundtrip", str(paths[0]), str(bad), str(paths[1]), "-o", str(tmp_path / "out"),
                 "--model", str(tiny_model_dir)])
    assert code == 1
    captured = capsys.readouterr()
    assert "broken.jpg: FAILED" in captured.err and "(1 failed)" in captured.out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img0.png", "img1.png"]


def test_same_stem_inputs_keep_both_outputs(tmp_path, tiny_model_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for folder in (a, b):
        Image.fromarray(smooth_image(16, 16)).save(folder / "x.png")
    assert main(["roundtrip", str(a / "x.png"), str(b / "x.png"), "-o", str(tmp_path / "out"),
                 "--model", str(tiny_model_dir)]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x-2.png", "x.png"]


def test_errors_are_one_line_with_a_nonzero_exit(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.fromarray(smooth_image(8, 8)).save(image)
    assert main(["roundtrip", str(image), "-o", str(tmp_path / "o"), "--model", "no-such-model"]) == 2  # bad input
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentd roundtrip: error:") and "no-such-model" in err and "\n" not in err


def test_pixel_limit_flag(tmp_path, tiny_model_dir, capsys):
    paths = _write_images(tmp_path / "in")
    code = main(["roundtrip", str(paths[0]), "-o", str(tmp_path / "o"), "--model", str(tiny_model_dir),
                 "--max-pixels", "100"])
    assert code == 1 and "exceeds the limit" in capsys.readouterr().err


def test_bench_codec_compares_with_diffusers(tiny_model_dir, capsys):
    code = main(["bench", "codec", "--model", str(tiny_model_dir), "--size", "32", "--runs", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["agrees"] and result["latent_rel_error"] < 1e-4
    assert {t["operation"] for t in result["timings"]} == {"encode", "decode"}
    assert all(t["baseline_ms"] > 0 and t["latentd_ms"] > 0 for t in result["timings"])
    # diffusers alone in its own process: same weights (the latents agree), its own timings
    assert result["alone_rel_error"] < 1e-4 and all(t["alone_ms"] > 0 for t in result["timings"])
    assert set(result["same_process_speedups"]) == {"encode", "decode"}


def test_bench_codec_table_and_profile(tiny_model_dir, capsys):
    assert main(["bench", "codec", "--model", str(tiny_model_dir), "--size", "16", "--runs", "1", "--profile",
                 "--same-process"]) == 0
    out = capsys.readouterr().out
    assert "speed-up" in out and "like for like" in out and "agreement with diffusers" in out and "Self CPU" in out
    assert "separate process" not in out  # --same-process: no second diffusers


def test_bench_tiling(tiny_model_dir, capsys):
    assert main(["bench", "tiling", "--model", str(tiny_model_dir), "--sizes", "96", "--tile-size", "32",
                 "--tile-overlap", "16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    methods = {(row["operation"], row["method"]) for row in rows}
    assert methods == {(op, method) for op in ("decode", "encode")
                       for method in ("untiled (latentd)", "untiled (diffusers)", "latentd, tile norms",
                                      "latentd, image norms", "latentd, image norms recomputed", "diffusers")}
    for row in rows:
        assert row["ms"] > 0 and row["peak_mb"] >= 0
        assert (row["psnr_vs_untiled"] is None) == row["method"].startswith("untiled")
    assert all(row["psnr_vs_untiled"] > 10 for row in rows if row["psnr_vs_untiled"] is not None)


def test_bench_tiling_table(tiny_model_dir, capsys):
    assert main(["bench", "tiling", "--model", str(tiny_model_dir), "--sizes", "64", "--tile-size", "32",
                 "--tile-overlap", "16", "--ops", "decode", "--no-untiled"]) == 0
    out = capsys.readouterr().out
    assert "bench tiling: model" in out and "latentd, image norms" in out and "peak MB" in out


def test_bench_tiling_runs_the_methods_asked_for(tiny_model_dir, capsys):
    assert main(["bench", "tiling", "--model", str(tiny_model_dir), "--sizes", "64", "--tile-size", "32",
                 "--tile-overlap", "16", "--ops", "decode", "--methods", "image-recompute", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [row["method"] for row in rows] == ["untiled (latentd)", "latentd, image norms recomputed"]
    assert rows[1]["psnr_vs_untiled"] > 10


def test_bench_tiling_refuses_an_unknown_method(tiny_model_dir, capsys):
    assert main(["bench", "tiling", "--model", str(tiny_model_dir), "--sizes", "64", "--methods", "global"]) == 2
    assert "--methods: unknown global" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--size", "0"], ["--runs", "0"]])
def test_bench_rejects_bad_numbers(tiny_model_dir, args, capsys):
    assert main(["bench", "codec", "--model", str(tiny_model_dir), *args]) == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_eval_reports_quality_rate_and_time_and_writes_a_grid(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "set"
    _write_images(folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    grid = tmp_path / "grid.png"
    code = main(["eval", "--model", str(tiny_model_dir), "--images", str(folder), "--grid", str(grid),
                 "--warmup", "0", "--json"])
    assert code == 1  # the broken file fails, the others are measured
    report = json.loads(capsys.readouterr().out)
    assert report["summary"]["images"] == 3 and report["summary"]["failed"] == 1
    rows = {row["source"].rsplit("/", 1)[-1]: row for row in report["images"]}
    assert "broken.png" in rows["broken.png"]["error"]
    # tiny model: factor 2, 4 channels; fp16 latents of ceil(h/2) x ceil(w/2) over h x w pixels
    assert rows["img0.png"]["bpp"] == pytest.approx(4 * 20 * 28 * 16 / (40 * 56))
    assert rows["img1.png"]["bpp"] == pytest.approx(4 * 17 * 9 * 16 / (33 * 17))
    assert report["summary"]["mean_psnr"] == pytest.approx((rows["img0.png"]["psnr"] + rows["img1.png"]["psnr"]) / 2)
    # One labelled row per measured image: the original at full resolution beside its reconstruction.
    sheet = np.array(Image.open(grid).convert("RGB"))
    assert sheet.shape[:2] == (2 * (18 + 4) + 40 + 33, 56 + 4 + 56)
    first = np.array(Image.open(folder / "img0.png").convert("RGB"))
    assert np.array_equal(sheet[18:18 + 40, :56], first)


def test_eval_float32_latents_cost_twice_the_bits(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "set"
    _write_images(folder)
    rates = []
    for dtype in ("float16", "float32"):
        assert main(["eval", "--model", str(tiny_model_dir), "--images", str(folder), "--latent-dtype", dtype,
                     "--warmup", "0", "--json"]) == 0
        rates.append(json.loads(capsys.readouterr().out)["summary"]["mean_bpp"])
    assert rates[1] == pytest.approx(2 * rates[0])


def test_eval_refuses_an_empty_crop(tmp_path, tiny_model_dir, capsys):
    _write_images(tmp_path / "set")
    assert main(["eval", "--model", str(tiny_model_dir), "--images", str(tmp_path / "set"), "--grid",
                 str(tmp_path / "g.png"), "--grid-crop", "0"]) == 2
    assert "--grid-crop must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


def test_eval_without_images_is_a_usage_error(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--model", str(tiny_model_dir), "--images", str(tmp_path / "empty")]) == 2
    assert "no images found" in capsys.readouterr().err


def test_only_commands_that_run_models_change_malloc(monkeypatch, tiny_model_dir, tmp_path, capsys):
    from latentd.client import cli
    from latentd.vae import allocator

    calls = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append(True) or True)
    assert main(["info", "--json"]) == 0 and calls == []
    _write_images(tmp_path / "set")
    assert main(["eval", "--model", str(tiny_model_dir), "--images", str(tmp_path / "set"), "--warmup", "0"]) == 0
    assert calls == [True]
    subcommands = cli.build_parser()._subparsers._group_actions[0].choices
    assert cli.MODEL_COMMANDS <= set(subcommands) and "health" not in cli.MODEL_COMMANDS


def test_roundtrip_refine_improves_every_image(tmp_path, tiny_model_dir, capsys):
    paths = _write_images(tmp_path / "in")
    psnrs = {}
    for steps in ("0", "8"):
        assert main(["roundtrip", *map(str, paths), "-o", str(tmp_path / steps), "--model", str(tiny_model_dir),
                     "--refine", steps, "--json"]) == 0
        psnrs[steps] = [row["psnr"] for row in json.loads(capsys.readouterr().out)["images"]]
    assert all(after > before for before, after in zip(psnrs["0"], psnrs["8"]))


@pytest.mark.parametrize("argv", [["roundtrip", "x.png", "-o", "o", "--refine", "-1", "--server", "127.0.0.1:1"],
                                  ["encode", "src", "-o", "arch", "--refine", "2", "--logvar"],
                                  ["roundtrip", "x.png", "-o", "o", "--refine", "201"]])
def test_refine_usage_errors_exit_2_with_one_line(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "src").mkdir()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "refine" in err and len(err.splitlines()) == 1
