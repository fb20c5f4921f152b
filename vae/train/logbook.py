"""Training observability: a progress bar, metrics.csv and TensorBoard, fed one step at a time."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch

from .losses import LossParts

COLUMNS = (
    "step", "loss", "reconstruction", "kl", "beta", "lr", "ms_ssim_loss", "lpips", "gan", "gan_weight", "d_loss",
    "steps_per_s", "skipped_files", "bad_steps", "val_psnr", "val_ms_ssim", "val_active_units", "val_kl_per_channel",
    "codebook_loss", "commitment_loss", "perplexity", "codes_used", "val_perplexity", "val_codes_used",
)


def _number(value) -> float | None:
    if value is None:
        return None
    return float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows up to `step` (the checkpoint a run resumes from), so no step is logged twice."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    kept = [row for row in rows if row.get("step") and int(row["step"]) <= step]
    if len(kept) == len(rows):
        return
    temp = path.with_suffix(".csv.tmp")
    with temp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({key: row.get(key, "") for key in COLUMNS} for row in kept)
    temp.replace(path)


class Logbook:
    """Writes on the main process only; other processes call the same methods and nothing happens."""

    def __init__(self, run_dir: Path, accelerator, *, total: int, start: int, log_every: int = 1,
                 progress: bool = True):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.log_every = max(1, log_every)
        self._last_time = time.perf_counter()
        self._last_step = start
        self._rate = 0.0
        self._bar = None
        self._file = None
        if not self.main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.csv"
        if path.exists():
            _drop_rows_after(path, start)  # a resumed run logs those steps again
        new = not path.exists()
        self._file = path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
        if new:
            self._writer.writeheader()
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def step(self, state, parts: LossParts, d_loss, *, lr: float) -> None:
        if not self.main:
            return
        if self._bar is not None:
            self._bar.update(1)
        if state.step % self.log_every:
            return
        now = time.perf_counter()
        self._rate = (state.step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, state.step
        row = {
            "step": state.step, "loss": _number(parts.total), "reconstruction": _number(parts.reconstruction),
            "kl": _number(parts.kl), "beta": parts.beta, "lr": lr, "ms_ssim_loss": _number(parts.ms_ssim),
            "lpips": _number(parts.lpips), "gan": _number(parts.gan), "gan_weight": _number(parts.gan_weight),
            "d_loss": _number(d_loss), "steps_per_s": self._rate, "skipped_files": state.skipped_files,
            "bad_steps": state.bad_steps_total, "codebook_loss": _number(parts.codebook),
            "commitment_loss": _number(parts.commitment), "perplexity": _number(parts.perplexity),
            "codes_used": parts.codes_used,
        }
        self._write(row)
        if self._bar is not None:
            latent = {"kl": f"{row['kl']:.1f}"} if parts.kl is not None else {"codes": parts.codes_used}
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", **latent, it_s=f"{self._rate:.2f}")

    def validation(self, step: int, result) -> None:
        if not self.main:
            return
        row = {"step": step, "val_psnr": result.psnr, "val_ms_ssim": result.ms_ssim}
        if result.codes_used is not None:
            row.update(val_perplexity=result.perplexity, val_codes_used=result.codes_used)
            latent = f"{result.codes_used} codes used, perplexity {result.perplexity:.1f}"
        else:
            row.update(val_active_units=result.active_units,
                       val_kl_per_channel=" ".join(f"{v:.4g}" for v in result.kl_per_channel))
            latent = f"active units {result.active_units}/{len(result.kl_per_channel)}"
        self._write(row)
        if self._bar is not None:
            ms_ssim = result.ms_ssim or float("nan")
            self._bar.write(f"step {step}: val PSNR {result.psnr:.2f} dB, MS-SSIM {ms_ssim:.4f}, {latent}")

    def _write(self, row: dict) -> None:
        self._writer.writerow(row)
        self._file.flush()
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and v is not None}
        if self.accelerator.log_with and scalars:
            self.accelerator.log(scalars, step=row["step"])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
