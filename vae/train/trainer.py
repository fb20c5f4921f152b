"""The accelerate training loop of the KL- and VQ-VAEs: `training_function` runs a run that `prepare.start_run` built."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import save_checkpoint
from .config import TrainConfig
from .logbook import Logbook
from .losses import LossParts, generator_loss, hinge_d_loss, schedule_lr, vq_generator_loss
from .prepare import TrainingRun, start_run
from .validate import validate, write_grid

logger = logging.getLogger(__name__)


def step_generator(seed: int, step: int, micro: int, process: int, device: torch.device) -> torch.Generator:
    """The posterior noise (KL) or codebook restarts (VQ) of one micro-batch depend on (seed, step,
    micro-batch, process) only, so a resumed run draws exactly what an uninterrupted one would,
    whatever else used the global RNG."""
    mixed = (seed * 1_000_003 + step) * 1_009 + micro
    return torch.Generator(device=device).manual_seed((mixed * 65_537 + process) % (2**63))


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (then checkpoints and exits)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignal":
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (tests): leave the handlers alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclass
class TrainSummary:
    run_dir: Path
    steps: int
    stopped_by: str  # "max_steps" | "signal" | "non-finite"
    checkpoint: Path | None
    exported: Path | None


@dataclass
class StepResult:
    finite: bool  # on every process: a non-finite loss anywhere skips the step everywhere
    parts: LossParts
    d_loss: torch.Tensor | None


def training_function(config: TrainConfig, *, resume: str | None = None, progress: bool = True,
                      export: bool = True) -> TrainSummary:
    run = start_run(config, resume)
    state, accelerator = run.state, run.accelerator
    logbook = Logbook(run.run_dir, accelerator, total=config.optim.max_steps, start=state.step,
                      log_every=config.runtime.log_every, progress=progress)
    stop = StopSignal().install()
    stopped_by = "max_steps"
    last_checkpoint: Path | None = None
    batches = _micro_batches(run, state.step * config.optim.grad_accum)
    try:
        while state.step < config.optim.max_steps:
            micro, (x, skipped) = next(batches)
            started = time.perf_counter()
            state.skipped_files += int(skipped)
            result = _train_step(run, x, micro)
            if not accelerator.sync_gradients:
                continue
            if not result.finite:
                if _count_bad_step(run):
                    stopped_by = "non-finite"
                    last_checkpoint = _save(run)
                    break
                continue
            _record_step(run, result, time.perf_counter() - started, logbook)
            signalled = accelerator.reduce(torch.tensor(float(stop.signum is not None), device=accelerator.device),
                                           "max").item() > 0
            if signalled or state.step % config.runtime.save_every == 0 or state.step >= config.optim.max_steps:
                last_checkpoint = _save(run)
            if signalled:
                stopped_by = "signal"
                break
    finally:
        batches.close()  # ends the data loader's iteration (and its workers' prefetching)
        stop.restore()
        logbook.close()
        accelerator.end_training()
    exported = None
    if export and stopped_by == "max_steps" and last_checkpoint is not None and accelerator.is_main_process:
        from .export import export_checkpoint

        exported = export_checkpoint(last_checkpoint, run.run_dir / "export").directory
    return TrainSummary(run.run_dir, state.step, stopped_by, last_checkpoint, exported)


def _micro_batches(run: TrainingRun, start: int) -> Iterator[tuple[int, Any]]:
    """(micro-batch number, batch) from micro-batch `start` on, epoch after epoch without end: a
    resumed run continues mid-epoch with the batch where it stopped."""
    epoch, skip = divmod(start, len(run.train_loader))
    micro = start
    while True:
        batches = run.accelerator.skip_first_batches(run.train_loader, skip) if skip else run.train_loader
        # accelerate's loaders pass their own epoch counter to the sampler when iterated; a
        # resumed run (or a skipping loader) must be told which epoch this is.
        batches.set_epoch(epoch)
        skip = 0
        for batch in batches:
            micro += 1
            yield micro, batch
        epoch += 1


def _train_step(run: TrainingRun, x: torch.Tensor, micro: int) -> StepResult:
    """Forward, loss and backward of one micro-batch; the optimizers step when accumulation completes."""
    config, state, accelerator, optim = run.config, run.state, run.accelerator, run.config.optim
    if config.runtime.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for group in run.optimizer.param_groups:
        group["lr"] = schedule_lr(state.step, optim, state.fresh_from)
    with accelerator.accumulate(run.module):
        noise = step_generator(config.runtime.seed, state.step, micro % optim.grad_accum,
                               accelerator.process_index, accelerator.device)
        reconstruction, *latent = run.module(x, noise)
        extras = {"step": state.step, "config": config.loss, "lpips": run.lpips, "discriminator": run.discriminator,
                  "last_layer": run.vae.decoder.conv_out.weight}
        if config.model.type == "vq":
            parts = vq_generator_loss(x, reconstruction, *latent, run.vae.quantize.embedding.num_embeddings, **extras)
        else:
            parts = generator_loss(x, reconstruction, *latent, **extras)
        finite = accelerator.reduce(torch.isfinite(parts.total.detach()).float(), "min").item() > 0
        if finite:
            accelerator.backward(parts.total)
            if accelerator.sync_gradients and optim.clip_norm > 0:
                accelerator.clip_grad_norm_(run.module.parameters(), optim.clip_norm)
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        d_loss = None
        if finite and run.discriminator is not None and state.step >= config.loss.discriminator.start_step:
            # The generator's backward pass went through the discriminator: its gradients belong to the
            # generator's loss, so the discriminator steps on the gradient of its own loss alone.
            run.d_optimizer.zero_grad(set_to_none=True)
            d_loss = hinge_d_loss(run.discriminator(x), run.discriminator(reconstruction.detach()))
            accelerator.backward(d_loss)
            run.d_optimizer.step()
            run.d_optimizer.zero_grad(set_to_none=True)
    return StepResult(finite, parts, d_loss)


def _count_bad_step(run: TrainingRun) -> bool:
    """Count a skipped non-finite step; True once max_bad_steps came in a row (time to stop)."""
    state = run.state
    state.bad_steps_total += 1
    state.bad_steps_in_a_row += 1
    logger.warning("non-finite loss at step %d (%d in a row); step skipped", state.step, state.bad_steps_in_a_row)
    return state.bad_steps_in_a_row >= run.config.runtime.max_bad_steps


def _record_step(run: TrainingRun, result: StepResult, seconds: float, logbook: Logbook) -> None:
    """After a completed step: EMA, counters, logs, and validation when it is due."""
    state = run.state
    state.bad_steps_in_a_row = 0
    run.ema.step(run.vae.parameters())
    state.step += 1
    state.train_seconds += seconds
    logbook.step(state, result.parts, result.d_loss, lr=run.optimizer.param_groups[0]["lr"])
    if state.step % run.config.runtime.val_every == 0 or state.step == run.config.optim.max_steps:
        _validate(run, logbook)


def _save(run: TrainingRun) -> Path:
    return save_checkpoint(run.accelerator, run.run_dir, run.state, run.ema, run.config,
                           run.config.runtime.keep_checkpoints)


def _validate(run: TrainingRun, logbook: Logbook) -> None:
    """Validate the EMA weights on the main process; the others wait."""
    accelerator, vae, ema, state = run.accelerator, run.vae, run.ema, run.state
    if accelerator.is_main_process and run.validation:
        ema.store(vae.parameters())
        ema.copy_to(vae.parameters())
        try:
            result = validate(vae, run.validation, grid_images=run.config.data.grid_images)
        finally:
            ema.restore(vae.parameters())
        write_grid(result, run.run_dir / "validation" / f"step-{state.step:07d}.png")
        logbook.validation(state.step, result)
    accelerator.wait_for_everyone()

