"""`latentd eval-curve` and `latentd.evaluate.curve`: the log-linear fit, its projection, the command's outputs and
its refusals."""

from __future__ import annotations

import csv
import json
import math

import pytest
from PIL import Image

from latentd.client.cli import main
from latentd.evaluate import curve
from latentd.evaluate.curve import CurvePoint
from tests.conftest import make_tiny_kl, smooth_image


def points_on(intercept, per_doubling, steps):
    return [CurvePoint(f"m{s}", s, intercept + per_doubling * math.log2(s), 0.9, 24) for s in steps]


def test_fit_recovers_a_log_linear_curve_and_projects_its_goal():
    fit = curve.fit_log2("psnr", points_on(20.0, 0.8, [1000, 3000, 12000, 17000]))
    assert fit.per_doubling == pytest.approx(0.8)
    assert fit.intercept == pytest.approx(20.0)
    assert fit.rms_residual == pytest.approx(0.0, abs=1e-9)
    assert fit.points == 4
    assert fit.steps_for(28.0) == pytest.approx(2 ** 10)
    assert fit.at(2 ** 10) == pytest.approx(28.0)


def test_fit_reports_its_residual():
    points = points_on(20.0, 0.5, [100, 200, 400])
    points[1] = CurvePoint("noisy", 200, points[1].psnr + 0.3, None, 24)
    fit = curve.fit_log2("psnr", points)
    assert fit.rms_residual > 0.05
    assert curve.fit_log2("ms_ssim", points).points == 2  # the point without MS-SSIM is left out of that fit


def test_no_fit_without_two_distinct_steps():
    assert curve.fit_log2("psnr", points_on(20.0, 0.8, [500, 500])) is None
    at_zero = [CurvePoint("init", 0, 15.0, 0.5, 24)] + points_on(20.0, 0.8, [500])
    assert curve.fit_log2("psnr", at_zero) is None  # log2(0): step 0 cannot be placed on the axis
    assert curve.build_curve(points_on(20.0, 0.8, [500]), {"psnr": 27.0}).fits == {}


def test_a_flat_or_falling_fit_never_reaches_its_goal():
    fit = curve.fit_log2("psnr", points_on(26.0, -0.1, [1000, 2000, 4000]))
    assert fit.steps_for(27.0) is None
    lines = curve.projection_lines(curve.build_curve(points_on(26.0, -0.1, [1000, 2000]), {"psnr": 27.0}))
    assert "never" in lines[0]
    far = curve.fit_log2("psnr", points_on(26.0, 1e-6, [1000, 2000]))
    assert math.isinf(far.steps_for(27.0))


def test_projection_names_the_steps_after_the_last_point():
    built = curve.build_curve(points_on(20.0, 1.0, [4096, 1024, 2048]), {"psnr": 33.0})
    assert [p.steps for p in built.points] == [1024, 2048, 4096]  # sorted by steps
    line = curve.projection_lines(built)[0]
    assert "+1.00 per doubling" in line and "goal 33 at about 8,192 steps (4,096 after the last point)" in line


@pytest.mark.parametrize("text, expected", [
    ("runs/a@1200", ("runs/a", 1200)), ("runs/a", ("runs/a", None)), ("me@host/a", ("me@host/a", None)),
    ("a@", ("a@", None)), ("@5", ("@5", None)), ("x@y@7", ("x@y", 7)), ("a@-3", ("a@-3", None)),
])
def test_model_argument_splits_a_trailing_step(text, expected):
    assert curve.parse_model_arg(text) == expected


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three tiny model folders: two with training_state.json (steps 100 and 400), one without."""
    from latentd.vae import save_model

    root = tmp_path_factory.mktemp("curve-models")
    folders = {}
    for seed, step in ((0, 100), (1, 400), (2, None)):
        extras = {} if step is None else {"training_state.json": json.dumps({"step": step})}
        folders[step] = save_model(make_tiny_kl(seed), root / f"m{seed}", extras=extras)
    return folders


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("curve-images")
    for index, (h, w) in enumerate([(168, 176), (176, 192)]):  # MS-SSIM needs > 160 px
        Image.fromarray(smooth_image(h, w, seed=index)).save(folder / f"img{index}.png")
    return folder


def test_command_measures_each_model_at_its_steps_and_writes_the_curve(models, image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["eval-curve", str(models[100]), str(models[400]), f"{models[None]}@250", "--images",
                 str(image_dir), "--step-offset", "1000", "--goal-psnr", "60", "--goal-ms-ssim", "0.999",
                 "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows = list(csv.DictReader((out / "curve.csv").open()))
    assert [int(row["steps"]) for row in rows] == [1100, 1250, 1400]
    assert [row["model"] for row in rows] == [str(models[100]), str(models[None]), str(models[400])]
    assert all(row["images"] == "2" and 0 < float(row["ms_ssim"]) <= 1 for row in rows)
    markdown = (out / "curve.md").read_text()
    assert "| 1,250 |" in markdown and "psnr:" in markdown and "goal 60" in markdown and "goal 0.999" in markdown
    assert (out / "curve.png").read_bytes().startswith(b"\x89PNG")
    assert "1,400 steps" in printed and "wrote" in printed


def test_command_json_matches_the_measurements(models, image_dir, tmp_path, capsys):
    code = main(["eval-curve", str(models[100]), str(models[400]), "--images", str(image_dir), "--json",
                 "-o", str(tmp_path / "out")])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [p["steps"] for p in report["points"]] == [100, 400]
    fit = report["fits"]["psnr"]
    first, last = report["points"]
    assert fit["per_doubling"] == pytest.approx((last["psnr"] - first["psnr"]) / 2)  # two points: the line
    assert report["failures"] == [] and report["goals"] == {}


def test_a_folder_without_its_step_is_refused_before_any_model_loads(models, image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["eval-curve", str(models[100]), str(models[None]), "--images", str(image_dir), "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert f"{models[None]}@STEP" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert captured.out == "" and not out.exists()


@pytest.mark.parametrize("state", ['{"step": -4}', '{"steps": 4}', "not json", "[1, 2]"])
def test_a_bad_training_state_is_refused_naming_its_file(tmp_path, image_dir, capsys, state):
    from latentd.vae import save_model

    folder = save_model(make_tiny_kl(), tmp_path / "m", extras={"training_state.json": state})
    code = main(["eval-curve", str(folder), "--images", str(image_dir), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "training_state.json" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["missing-folder"], "not a model folder"),
    (["{m}", "--step-offset", "-1"], "must be >= 0"),
    (["{m}", "--images", "{empty}"], "no images found"),
    (["{m}", "--goal-psnr", "nan"], "must be a finite number"),
    (["{m}", "--goal-ms-ssim", "inf"], "must be a finite number"),
])
def test_usage_errors_are_one_line(models, image_dir, tmp_path, capsys, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["eval-curve"] + [a.format(m=models[100], empty=empty) for a in args]
    if "--images" not in argv:
        argv += ["--images", str(image_dir)]
    assert main(argv + ["-o", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_a_broken_model_fails_its_own_point_and_the_others_are_measured(models, image_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((models[100] / "config.json").read_text())
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    out = tmp_path / "out"
    code = main(["eval-curve", str(models[100]), f"{broken}@200", str(models[400]), "--images", str(image_dir),
                 "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 1
    assert f"{broken}: FAILED" in printed
    assert [int(row["steps"]) for row in csv.DictReader((out / "curve.csv").open())] == [100, 400]
