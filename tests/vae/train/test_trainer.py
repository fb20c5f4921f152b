"""The training loop, run for real on tiny models: loss goes down, resume is exact, export loads back."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from latentd.client.cli import main
from latentd.vae import Codec, load_model
from latentd.vae.metrics import psnr
from latentd.vae.errors import InvalidInputError
from latentd.vae.train.checkpoint import STATE_FILE, list_checkpoints, resolve_checkpoint
from latentd.vae.train.config import load_config
from latentd.vae.train.export import export_checkpoint
from latentd.vae.train.trainer import training_function
from tests.conftest import smooth_image


def _rows(run_dir, column):
    with (run_dir / "metrics.csv").open() as handle:
        return [float(row[column]) for row in csv.DictReader(handle) if row[column]]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_training_lowers_the_loss_and_writes_everything(write_config):
    config = load_config(write_config(), {"optim.max_steps": "40", "runtime.save_every": "20",
                                          "runtime.val_every": "20", "loss.ms_ssim_weight": "0.1"})
    summary = training_function(config, progress=False)
    run_dir = summary.run_dir
    assert summary.steps == 40 and summary.stopped_by == "max_steps"
    losses = _rows(run_dir, "reconstruction")
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000020", "step-0000040"]
    assert (run_dir / "validation" / "step-0000040.png").is_file()
    assert _rows(run_dir, "val_psnr") and _rows(run_dir, "val_active_units")
    assert (run_dir / "config.yaml").is_file() and (list_checkpoints(run_dir)[-1] / "config.yaml").is_file()
    assert summary.exported is not None and (summary.exported / "config.json").is_file()


def test_resume_continues_exactly(tmp_path, write_config):
    """Run 12 steps straight; resume a second run from the first run's step-7 checkpoint (what a
    run killed after that checkpoint leaves behind; mid-epoch, with 2 batches per epoch): both
    reach the same weights, optimizer and EMA."""
    straight = training_function(load_config(write_config("straight"), {"runtime.save_every": "7"}),
                                 progress=False, export=False)
    halfway = list_checkpoints(straight.run_dir)[0]
    assert halfway.name == "step-0000007"
    resumed_dir = tmp_path / "runs" / "resumed"
    shutil.copytree(halfway, resumed_dir / "checkpoints" / halfway.name)
    resumed = training_function(load_config(write_config("resumed"), {"runtime.save_every": "7"}), resume="latest",
                                progress=False, export=False)
    assert resumed.steps == 12
    a, b = straight.checkpoint, resumed.checkpoint
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = _weights(a / name), _weights(b / name)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{name}:{key}"
    opt_a = torch.load(a / "optimizer.bin", weights_only=True)
    opt_b = torch.load(b / "optimizer.bin", weights_only=True)
    assert opt_a["state"][0]["step"] == opt_b["state"][0]["step"] == 12
    assert torch.equal(opt_a["state"][0]["exp_avg"], opt_b["state"][0]["exp_avg"])
    assert json.loads((b / STATE_FILE).read_text())["step"] == 12


def test_resume_auto_starts_fresh_and_latest_demands_a_checkpoint(tmp_path):
    assert resolve_checkpoint(tmp_path, "auto") is None
    with pytest.raises(InvalidInputError, match="no checkpoint"):
        resolve_checkpoint(tmp_path, "latest")
    with pytest.raises(InvalidInputError, match="not a checkpoint folder"):
        resolve_checkpoint(tmp_path, str(tmp_path))


def test_sigterm_checkpoints_and_resume_finishes(tmp_path, write_config):
    """The real thing: SIGTERM to a `latentd train` process group (main process and data workers, as a
    shell's Ctrl-C or a container runtime sends it), then a second process resumes."""
    path = write_config("killed", optim={"max_steps": 400, "warmup_steps": 2, "lr": 2e-3},
                        data={"workers": 1},
                        runtime={"save_every": 1000, "val_every": 1000, "log_every": 1, "tensorboard": False})
    run_dir = tmp_path / "runs" / "killed"
    command = [sys.executable, "-m", "latentd.client.cli", "train", str(path), "--no-progress", "--no-export"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_rows_if_any(run_dir)) < 3:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + 15, output
    assert "resume with" in output
    stopped_at = json.loads((list_checkpoints(run_dir)[-1] / STATE_FILE).read_text())["step"]
    assert 3 <= stopped_at < 400
    finish = subprocess.run([*command, "--resume", "latest", "--optim.max_steps", str(stopped_at + 3)],
                            capture_output=True, text=True, timeout=300)
    assert finish.returncode == 0, finish.stdout + finish.stderr
    assert json.loads((list_checkpoints(run_dir)[-1] / STATE_FILE).read_text())["step"] == stopped_at + 3
    with (run_dir / "metrics.csv").open() as handle:  # training rows (validation rows repeat their step)
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row["loss"]]
    assert steps == sorted(set(steps)) and steps[-1] == stopped_at + 3, steps  # each step logged once


def _rows_if_any(run_dir):
    try:
        return _rows(run_dir, "loss")
    except (FileNotFoundError, KeyError):
        return []


def test_corrupt_files_are_skipped_and_counted(write_config, image_folders):
    (image_folders[0] / "broken.jpg").write_bytes(b"\xff\xd8 not an image")
    (image_folders[0] / "notes.txt").write_text("ignored: not an image suffix")
    summary = training_function(load_config(write_config(), {"optim.max_steps": "2"}), progress=False, export=False)
    assert json.loads((summary.checkpoint / STATE_FILE).read_text())["skipped_files"] == 1


def test_fewer_images_than_one_batch_is_a_clear_error(write_config):
    # 10 images, batch 16 with drop_last: an epoch without a single step would loop forever.
    with pytest.raises(InvalidInputError, match="no full batch of 16") as caught:
        training_function(load_config(write_config(data={"batch_size": 16})), progress=False, export=False)
    assert caught.value.field == "data.batch_size"


def test_non_finite_steps_are_skipped_then_stop_with_a_checkpoint(write_config, monkeypatch):
    import latentd.vae.train.trainer as trainer

    real = trainer.generator_loss

    def poisoned(*args, **kwargs):
        parts = real(*args, **kwargs)
        parts.total = parts.total * float("nan")
        return parts

    monkeypatch.setattr(trainer, "generator_loss", poisoned)
    config = load_config(write_config(), {"runtime.max_bad_steps": "3"})
    summary = training_function(config, progress=False)
    assert summary.stopped_by == "non-finite" and summary.steps == 0 and summary.exported is None
    state = json.loads((summary.checkpoint / STATE_FILE).read_text())
    assert state["bad_steps_total"] == 3 and state["bad_steps_in_a_row"] == 3


def test_discriminator_training_runs(write_config):
    config = load_config(write_config(), {"optim.max_steps": "4", "loss.discriminator.enabled": "true",
                                          "loss.discriminator.start_step": "2", "loss.discriminator.channels": "8",
                                          "loss.discriminator.layers": "2"})
    summary = training_function(config, progress=False, export=False)
    d_losses = _rows(summary.run_dir, "d_loss")
    assert summary.steps == 4 and len(d_losses) == 2
    assert (summary.checkpoint / "model_1.safetensors").is_file()  # the discriminator is checkpointed too


def test_the_discriminator_steps_on_the_gradient_of_its_own_loss_alone(write_config, monkeypatch):
    """The generator's GAN term backpropagates through the discriminator; none of that may reach the
    discriminator's step."""
    import copy

    from latentd.vae.train import trainer
    from latentd.vae.train.losses import hinge_d_loss

    checked = []

    def start_run(config, resume):
        run = real_start_run(config, resume)
        inputs = []
        forward, step = run.discriminator.forward, run.d_optimizer.step

        def recording_forward(x):
            inputs.append(x.detach().clone())
            return forward(x)

        def checking_step(*args, **kwargs):
            real, fake = inputs[-2:]  # the discriminator step's own two calls
            reference = copy.deepcopy(run.accelerator.unwrap_model(run.discriminator))
            reference.__dict__.pop("forward")  # the copy's own forward, not the recording one
            expected = torch.autograd.grad(hinge_d_loss(reference(real), reference(fake)),
                                           list(reference.parameters()))
            for parameter, grad in zip(run.discriminator.parameters(), expected):
                torch.testing.assert_close(parameter.grad, grad)
            checked.append(True)
            return step(*args, **kwargs)

        run.discriminator.forward = recording_forward
        run.d_optimizer.step = checking_step
        return run

    real_start_run = trainer.start_run
    monkeypatch.setattr(trainer, "start_run", start_run)
    config = load_config(write_config(), {"optim.max_steps": "3", "loss.discriminator.enabled": "true",
                                          "loss.discriminator.start_step": "0", "loss.discriminator.channels": "8",
                                          "loss.discriminator.layers": "2", "loss.discriminator.weight": "1.0"})
    training_function(config, progress=False, export=False)
    assert len(checked) == 3


def test_export_loads_back_with_unit_variance_latents(tmp_path, write_config, image_folders):
    summary = training_function(load_config(write_config(), {"optim.max_steps": "6"}), progress=False, export=False)
    result = export_checkpoint(summary.run_dir, tmp_path / "exported", stat_images=16, dtype="float32")
    assert result.step == 6 and result.used_ema
    loaded = load_model(result.directory).model
    config = json.loads((result.directory / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(result.scaling_factor)
    assert config["shift_factor"] == pytest.approx(result.shift_factor)
    # The exported weights are the checkpoint's EMA weights.
    ema = _weights(summary.checkpoint / "ema.safetensors")
    first = next(iter(loaded.parameters()))
    torch.testing.assert_close(first, ema[sorted(ema)[0]])
    # Scaled latents of training images come out near unit variance (the statistic's purpose).
    codec = Codec(loaded)
    images = [smooth_image(64, 64, seed=s) for s in range(6)]
    scaled = torch.stack(codec.encode(images))
    assert 0.3 < scaled.std().item() < 3.0
    # Exporting the same checkpoint again gives identical files (deterministic statistics).
    again = export_checkpoint(summary.checkpoint, tmp_path / "again", stat_images=16, dtype="float32")
    assert again.scaling_factor == result.scaling_factor
    # The CLI does the same from the run folder, in fp16 as the packaged model ships.
    assert main(["export", str(summary.run_dir), "-o", str(tmp_path / "cli"), "--stat-images", "16"]) == 0
    cli = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert cli["scaling_factor"] == pytest.approx(result.scaling_factor, rel=1e-6)
    assert {t.dtype for t in _weights(tmp_path / "cli" / "diffusion_pytorch_model.safetensors").values()} == {
        torch.float16}
    assert main(["export", str(tmp_path / "nothing-here"), "-o", str(tmp_path / "x")]) == 2  # bad input
    assert not (tmp_path / "x").exists()


def test_per_channel_export_gives_every_channel_unit_variance(tmp_path, write_config, image_folders, capsys):
    from latentd.vae.train.data import scan_images
    from latentd.vae.train.export import latent_statistics

    config = load_config(write_config(), {"optim.max_steps": "2"})
    summary = training_function(config, progress=False, export=False)
    result = export_checkpoint(summary.run_dir, tmp_path / "pc", stat_images=8, dtype="float32",
                               latent_stats="per-channel")
    saved = json.loads((result.directory / "config.json").read_text())
    assert saved["latents_mean"] == pytest.approx(list(result.latents_mean))
    assert saved["latents_std"] == pytest.approx(list(result.latents_std)) and len(result.latents_std) == 4
    # The same crops and samples as the export measured: per channel, the codec's scaling makes them
    # zero-mean and unit-variance.
    model = load_model(result.directory).model
    stats = latent_statistics(model, scan_images(config.data.train_dirs).files, count=8,
                              crop=max(config.data.crop_size, 256), seed=config.runtime.seed)
    codec = Codec(model)
    z_mean = torch.tensor(stats.channel_mean, dtype=torch.float64).view(-1, 1, 1)
    z_std = torch.tensor(stats.channel_std, dtype=torch.float64).view(-1, 1, 1)
    probe = z_mean + z_std * torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64).view(1, 1, 3)
    torch.testing.assert_close(codec.scale(probe.float()).double(),
                               torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64).expand(4, 1, 3), atol=1e-4, rtol=0)
    # the global fields stay those of a global export, for pipelines that read only them
    plain = export_checkpoint(summary.run_dir, tmp_path / "global", stat_images=8, dtype="float32")
    assert plain.scaling_factor == result.scaling_factor and plain.shift_factor == result.shift_factor
    assert json.loads((plain.directory / "config.json").read_text())["latents_mean"] is None
    assert main(["export", str(summary.run_dir), "-o", str(tmp_path / "cli"), "--stat-images", "8",
                 "--latent-stats", "per-channel"]) == 0
    assert "latents_mean" in capsys.readouterr().out
    with pytest.raises(InvalidInputError, match="latent statistics"):
        export_checkpoint(summary.run_dir, tmp_path / "bad", latent_stats="per-pixel")
    with pytest.raises(InvalidInputError, match="export.latent_stats must be global or per-channel"):
        load_config(write_config(), {"export.latent_stats": "per-pixel"})


@pytest.mark.slow
def test_two_cpu_processes_through_accelerate_launch(tmp_path, write_config):
    path = write_config("ddp", optim={"max_steps": 4, "warmup_steps": 1},
                        runtime={"save_every": 2, "val_every": 4, "tensorboard": False})
    # accelerate runs several CPU processes on one machine when torchrun starts them (its own
    # `accelerate launch --cpu` starts one process unless mpirun is configured).
    launcher = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert launcher, "torchrun is installed with torch"
    result = subprocess.run(
        [launcher, "--standalone", "--nproc_per_node", "2", "-m", "latentd.client.cli", "train", str(path),
         "--no-progress", "--no-export"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "ddp"
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000002", "step-0000004"]
    assert (list_checkpoints(run_dir)[-1] / "random_states_1.pkl").is_file()  # both processes saved state


def test_validation_grid_and_units(image_folders):
    from latentd.vae.train.data import load_validation_images
    from latentd.vae.train.validate import validate
    from tests.conftest import make_tiny_kl

    images = load_validation_images(image_folders[1], 3)
    model = make_tiny_kl()  # scaling 0.5, shift 0.1: validation must not apply them to raw latents
    result = validate(model, images, grid_images=2)
    codec = Codec(make_tiny_kl())
    expected = [psnr(image, codec.roundtrip(image)) for _, image in images]
    assert result.psnr == pytest.approx(sum(expected) / len(expected), abs=1e-6)
    assert len(result.kl_per_channel) == 4
    assert 0 <= result.active_units <= 4
    assert result.grid.size[1] == 2 * 160 + 4
    assert isinstance(result.grid, Image.Image)


def test_a_schedule_continues_from_exported_weights(tmp_path, write_config):
    """A machine without the run's checkpoints continues the long schedule from the exported weights:
    at the step recorded beside them, with the warm-up run again for the fresh optimizer."""
    first = training_function(load_config(write_config("first", optim={"schedule": "wsd", "max_steps": 4})),
                              progress=False, export=False)
    exported = export_checkpoint(first.run_dir, tmp_path / "weights", stat_images=4, dtype="float32")
    assert json.loads((exported.directory / "training_state.json").read_text())["step"] == 4
    config = load_config(write_config("second", optim={"schedule": "wsd", "max_steps": 7, "warmup_steps": 2},
                                      model={"init_from": str(exported.directory),
                                             "continue_schedule": True}))
    second = training_function(config, progress=False, export=False)
    assert second.steps == 7
    state = json.loads((second.checkpoint / STATE_FILE).read_text())
    assert state["fresh_from"] == 4 and state["step"] == 7
    rates = _rows(second.run_dir, "lr")
    assert rates[0] == pytest.approx(1e-3) and rates[1] == pytest.approx(2e-3)  # warm-up again, from step 4
    # A record that is not one is a clear error naming the field, not a crash.
    (exported.directory / "training_state.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="training state") as caught:
        training_function(load_config(write_config("third", model={"init_from": str(
            exported.directory), "continue_schedule": True})), progress=False, export=False)
    assert caught.value.field == "model.init_from"
