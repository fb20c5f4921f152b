"""The accelerate training loop of the KL-VAE: `get_dataloaders`, `training_function`, `train` (entry point)."""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import TrainerState, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import CropDataset, EpochSampler, collate_crops, load_validation_images, scan_images
from .logbook import Logbook
from .losses import PatchDiscriminator, generator_loss, hinge_d_loss, lr_at
from .validate import validate, write_grid

logger = logging.getLogger(__name__)


class AutoencoderForTraining(nn.Module):
    """Wraps an AutoencoderKL so one `forward` (what DDP synchronises) returns all the loss needs."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator=generator)  # reparameterisation: mu + sigma * eps
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


def step_generator(seed: int, step: int, micro: int, process: int, device: torch.device) -> torch.Generator:
    """The posterior noise of one micro-batch depends on (seed, step, micro-batch, process) only, so a
    resumed run draws exactly what an uninterrupted one would, whatever else used the global RNG."""
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
class Loaders:
    train: DataLoader
    skipped_at_scan: int
    validation: list


def get_dataloaders(config: TrainConfig) -> Loaders:
    data = config.data
    scan = scan_images(data.train_dirs)
    dataset = CropDataset(scan.files, data.crop_size, hflip=data.hflip, seed=config.runtime.seed)
    sampler = EpochSampler(len(dataset), seed=config.runtime.seed)
    loader = DataLoader(dataset, batch_size=data.batch_size, sampler=sampler, collate_fn=collate_crops,
                        num_workers=data.workers, drop_last=True, persistent_workers=data.workers > 0,
                        worker_init_fn=ignore_stop_signals if data.workers > 0 else None)
    return Loaders(loader, len(scan.skipped), load_validation_images(data.val_dir, data.val_max_images))


def ignore_stop_signals(worker_id: int) -> None:
    """Data workers leave SIGTERM/SIGINT to the main process: a signal sent to the whole process group
    (Ctrl-C, `kill -- -PGID`, a container runtime) must end in a checkpoint, not in a dead worker
    crashing the loop. The main process stops the workers when it is done."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_model(config: TrainConfig) -> nn.Module:
    from diffusers import AutoencoderKL

    if config.model.init_from:
        from ..loading import load_model

        return load_model(config.model.init_from).model.train()
    return AutoencoderKL(**config.model.architecture).train()


def _precision(requested: str) -> str:
    if not torch.cuda.is_available():
        if requested in ("fp16", "bf16"):
            logger.warning("precision %s needs a GPU; training in float32 on the CPU", requested)
        return "no"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


def _make_accelerator(config: TrainConfig, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    trackers = None
    if config.runtime.tensorboard:
        try:
            import tensorboard  # noqa: F401

            trackers = "tensorboard"
        except ImportError:
            logger.warning("tensorboard is not installed; metrics go to metrics.csv only")
    return Accelerator(
        # Without a GPU, accelerate joins torchrun's processes into one CPU (gloo) group only when told
        # it runs on the CPU; otherwise every process would train alone.
        cpu=not torch.cuda.is_available(),
        mixed_precision=_precision(config.runtime.precision),
        gradient_accumulation_steps=config.optim.grad_accum,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
    )


@dataclass
class TrainSummary:
    run_dir: Path
    steps: int
    stopped_by: str  # "max_steps" | "signal" | "non-finite"
    checkpoint: Path | None
    exported: Path | None


def training_function(config: TrainConfig, *, resume: str | None = None, progress: bool = True,
                      export: bool = True) -> TrainSummary:
    from accelerate.utils import set_seed
    from diffusers.training_utils import EMAModel

    run_dir = Path(config.runtime.output_dir)
    accelerator = _make_accelerator(config, run_dir)
    set_seed(config.runtime.seed)
    module = AutoencoderForTraining(build_model(config))
    if config.runtime.channels_last:
        module = module.to(memory_format=torch.channels_last)
    optim = config.optim
    optimizer = torch.optim.AdamW(module.parameters(), lr=optim.lr, betas=tuple(optim.betas),
                                  weight_decay=optim.weight_decay)
    loaders = get_dataloaders(config)
    discriminator = d_optimizer = None
    lpips = None
    if config.loss.lpips_weight > 0:
        from .lpips import LPIPS

        lpips = LPIPS.from_file(config.loss.lpips_weights).to(accelerator.device)
    if config.loss.discriminator.enabled:
        disc = config.loss.discriminator
        discriminator = PatchDiscriminator(disc.layers, disc.channels)
        d_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=disc.lr, betas=(0.5, 0.9))
        module, optimizer, train_loader, discriminator, d_optimizer = accelerator.prepare(
            module, optimizer, loaders.train, discriminator, d_optimizer)
    else:
        module, optimizer, train_loader = accelerator.prepare(module, optimizer, loaders.train)
    vae = accelerator.unwrap_model(module).vae
    ema = EMAModel(vae.parameters(), decay=optim.ema_decay)
    state = TrainerState(skipped_files=loaders.skipped_at_scan)
    checkpoint = resolve_checkpoint(run_dir, resume) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, ema)
        logger.info("resumed at step %d", state.step)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
    if accelerator.log_with:
        accelerator.init_trackers("latentd-vae")
    logbook = Logbook(run_dir, accelerator, total=optim.max_steps, start=state.step,
                      log_every=config.runtime.log_every, progress=progress)
    stop = StopSignal().install()
    batches_per_epoch = len(train_loader)
    stopped_by = "max_steps"
    last_checkpoint: Path | None = None
    try:
        micro = state.step * optim.grad_accum
        epoch, skip = divmod(micro, batches_per_epoch)
        while state.step < optim.max_steps and stopped_by == "max_steps":
            batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
            # accelerate's loaders pass their own epoch counter to the sampler when iterated; a
            # resumed run (or a skipping loader) must be told which epoch this is.
            batches.set_epoch(epoch)
            skip = 0
            for x, skipped in batches:
                micro += 1
                started = time.perf_counter()
                state.skipped_files += int(skipped)
                if config.runtime.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(state.step, optim.lr, optim.warmup_steps, optim.max_steps, optim.min_lr_ratio)
                with accelerator.accumulate(module):
                    noise = step_generator(config.runtime.seed, state.step, micro % optim.grad_accum,
                                           accelerator.process_index, accelerator.device)
                    reconstruction, mean, logvar = module(x, noise)
                    last_layer = vae.decoder.conv_out.weight
                    parts = generator_loss(x, reconstruction, mean, logvar, step=state.step, config=config.loss,
                                           lpips=lpips, discriminator=discriminator, last_layer=last_layer)
                    finite = accelerator.reduce(torch.isfinite(parts.total.detach()).float(), "min").item() > 0
                    if finite:
                        accelerator.backward(parts.total)
                        if accelerator.sync_gradients and optim.clip_norm > 0:
                            accelerator.clip_grad_norm_(module.parameters(), optim.clip_norm)
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    d_loss = None
                    if finite and discriminator is not None and state.step >= config.loss.discriminator.start_step:
                        d_loss = hinge_d_loss(discriminator(x), discriminator(reconstruction.detach()))
                        accelerator.backward(d_loss)
                        d_optimizer.step()
                        d_optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                if not finite:
                    state.bad_steps_total += 1
                    state.bad_steps_in_a_row += 1
                    logger.warning("non-finite loss at step %d (%d in a row); step skipped", state.step,
                                   state.bad_steps_in_a_row)
                    if state.bad_steps_in_a_row >= config.runtime.max_bad_steps:
                        stopped_by = "non-finite"
                        break
                    continue
                state.bad_steps_in_a_row = 0
                ema.step(vae.parameters())
                state.step += 1
                state.train_seconds += time.perf_counter() - started
                logbook.step(state, parts, d_loss, lr=optimizer.param_groups[0]["lr"])
                if state.step % config.runtime.val_every == 0 or state.step == optim.max_steps:
                    _validate(accelerator, vae, ema, loaders.validation, config, state, logbook, run_dir)
                signalled = accelerator.reduce(torch.tensor(float(stop.signum is not None),
                                                            device=accelerator.device), "max").item() > 0
                if signalled:
                    stopped_by = "signal"
                if signalled or state.step % config.runtime.save_every == 0 or state.step >= optim.max_steps:
                    last_checkpoint = save_checkpoint(accelerator, run_dir, state, ema, config,
                                                      config.runtime.keep_checkpoints)
                if signalled or state.step >= optim.max_steps:
                    break
            else:  # the epoch ran out before max_steps
                epoch += 1
        if stopped_by == "non-finite":
            last_checkpoint = save_checkpoint(accelerator, run_dir, state, ema, config, config.runtime.keep_checkpoints)
    finally:
        stop.restore()
        logbook.close()
        accelerator.end_training()
    exported = None
    if export and stopped_by == "max_steps" and last_checkpoint is not None and accelerator.is_main_process:
        from .export import export_checkpoint

        exported = export_checkpoint(last_checkpoint, run_dir / "export").directory
    return TrainSummary(run_dir, state.step, stopped_by, last_checkpoint, exported)


def _validate(accelerator, vae, ema, images, config, state, logbook, run_dir) -> None:
    """Validate the EMA weights on the main process; the others wait."""
    if accelerator.is_main_process and images:
        ema.store(vae.parameters())
        ema.copy_to(vae.parameters())
        try:
            result = validate(vae, images, grid_images=config.data.grid_images)
        finally:
            ema.restore(vae.parameters())
        write_grid(result, run_dir / "validation" / f"step-{state.step:07d}.png")
        logbook.validation(state.step, result)
    accelerator.wait_for_everyone()

