"""Prepares one training run: data loaders, model, accelerator, optimizers and EMA, restored from a checkpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import InvalidInputError
from .checkpoint import TrainerState, exported_step, load_checkpoint, resolve_checkpoint
from .config import TrainConfig
from .data import CropDataset, EpochSampler, collate_crops, load_validation_images, scan_images
from .losses import PatchDiscriminator

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
                        pin_memory=torch.cuda.is_available(),  # page-locked batches copy to the GPU asynchronously
                        worker_init_fn=ignore_stop_signals if data.workers > 0 else None)
    if len(loader) == 0:  # drop_last: fewer images than one batch would give an epoch without steps
        raise InvalidInputError(f"{len(dataset)} readable training images make no full batch of {data.batch_size}",
                                field="data.batch_size")
    return Loaders(loader, len(scan.skipped), load_validation_images(data.val_dir, data.val_max_images))


def ignore_stop_signals(worker_id: int) -> None:
    """Data workers leave SIGTERM/SIGINT to the main process: a signal sent to the whole process group
    (Ctrl-C, `kill -- -PGID`, a container runtime) must end in a checkpoint, not in a dead worker
    crashing the loop. The main process stops the workers when it is done."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_model(config: TrainConfig) -> nn.Module:
    """The AutoencoderKL or VQModel to train: `model.init_from`'s weights, else a fresh `architecture`."""
    from diffusers import AutoencoderKL, VQModel

    wanted = "VQModel" if config.model.type == "vq" else "AutoencoderKL"
    if config.model.init_from:
        from ..loading import load_model
        from ..model_info import model_class_name

        model = load_model(config.model.init_from).model
        if wanted == "VQModel" and model_class_name(model) == "AutoencoderKL":
            from .vq_init import vq_from_kl

            return vq_from_kl(model.float(), config.model.architecture).train()
        if model_class_name(model) != wanted:
            raise InvalidInputError(f"model.init_from is a {model_class_name(model)}; model.type "
                                    f"{config.model.type} trains a {wanted}", field="model.init_from")
        return model.train()
    cls = VQModel if config.model.type == "vq" else AutoencoderKL
    try:
        return cls(**config.model.architecture).train()
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"model.architecture does not build a {wanted}: {exc}",
                                field="model.architecture") from exc


def wrap_for_training(vae: nn.Module, config: TrainConfig) -> nn.Module:
    if config.model.type == "vq":
        from .quantizer import VQAutoencoderForTraining

        return VQAutoencoderForTraining(vae, config.loss.vq)
    return AutoencoderForTraining(vae)


def _precision(requested: str, device: torch.device) -> str:
    """Mixed precision for training on `device`: bf16 where it runs natively, else fp16; none on the CPU."""
    from ..devices import native_bf16

    if device.type != "cuda":
        if requested in ("fp16", "bf16"):
            logger.warning("precision %s needs a GPU; training in float32 on the CPU", requested)
        return "no"
    if requested == "auto":
        return "bf16" if native_bf16(device) else "fp16"
    if requested == "bf16" and not native_bf16(device):
        logger.warning("bf16 is emulated on %s (compute capability below %d.%d): slow", device, 8, 0)
    return requested


def _make_accelerator(config: TrainConfig, run_dir: Path):
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration

    trackers = None
    if config.runtime.tensorboard:
        try:
            import tensorboard  # noqa: F401

            trackers = "tensorboard"
        except ImportError:
            logger.warning("tensorboard is not installed; metrics go to metrics.csv only")
    # Without a GPU, accelerate joins torchrun's processes into one CPU (gloo) group only when told it
    # runs on the CPU; otherwise every process would train alone.
    cpu = not torch.cuda.is_available()
    return Accelerator(
        cpu=cpu,
        mixed_precision=_precision(config.runtime.precision, PartialState(cpu=cpu).device),
        gradient_accumulation_steps=config.optim.grad_accum,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
    )


@dataclass
class TrainingRun:
    """What one run holds, built once by `start_run` and used by every step."""

    config: TrainConfig
    accelerator: Any
    module: nn.Module  # the prepared AutoencoderForTraining: what DDP synchronises
    vae: nn.Module  # the AutoencoderKL or VQModel inside it
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    validation: list
    ema: Any
    state: TrainerState
    lpips: nn.Module | None = None
    discriminator: nn.Module | None = None
    d_optimizer: torch.optim.Optimizer | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.config.runtime.output_dir)


def start_run(config: TrainConfig, resume: str | None) -> TrainingRun:
    """Accelerator, model, optimizers, data and EMA, prepared; restored from a checkpoint with `resume`."""
    from accelerate.utils import set_seed
    from diffusers.training_utils import EMAModel

    run_dir = Path(config.runtime.output_dir)
    accelerator = _make_accelerator(config, run_dir)
    set_seed(config.runtime.seed)
    module = wrap_for_training(build_model(config), config)
    if config.runtime.channels_last:
        module = module.to(memory_format=torch.channels_last)
    optim = config.optim
    trained = [p for p in module.parameters() if p.requires_grad]  # not an EMA-updated codebook
    optimizer = torch.optim.AdamW(trained, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    loaders = get_dataloaders(config)
    lpips = None
    if config.loss.lpips_weight > 0:
        from .lpips import LPIPS

        lpips = LPIPS.from_file(config.loss.lpips_weights).to(accelerator.device)
    discriminator = d_optimizer = None
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
    if config.model.continue_schedule:
        state.step = state.fresh_from = exported_step(config.model.init_from)
        logger.info("continuing the schedule at step %d of %s", state.step, config.model.init_from)
    checkpoint = resolve_checkpoint(run_dir, resume) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, ema)
        logger.info("resumed at step %d", state.step)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
    if accelerator.log_with:
        accelerator.init_trackers("latentd-vae")
    return TrainingRun(config, accelerator, module, vae, optimizer, train_loader, loaders.validation, ema,
                       state, lpips, discriminator, d_optimizer)
