"""Training checkpoints: accelerate state plus EMA weights (safetensors) and trainer counters (JSON).

A checkpoint is written into `step-NNNNNNN.tmp` and renamed when complete, so a crash mid-save never
leaves a folder that looks finished. Everything is read back with safetensors or
`torch.load(weights_only=True)`: accelerate's own loader for its files, ours for the EMA.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import InvalidInputError
from ..fileio import follow_umask

_STEP_DIR = re.compile(r"^step-(\d{7})$")
EMA_FILE = "ema.safetensors"
STATE_FILE = "trainer_state.json"
# Beside exported weights: the step they were trained to, so `model.continue_schedule` can go on from it.
EXPORTED_STATE_FILE = "training_state.json"
CONFIG_FILE = "config.yaml"


@dataclass
class TrainerState:
    """Counters that make a resumed run continue exactly where it stopped."""

    step: int = 0
    skipped_files: int = 0
    bad_steps_total: int = 0
    bad_steps_in_a_row: int = 0
    train_seconds: float = 0.0
    fresh_from: int = 0  # the step at which the optimizer's moments started from zero (warm-up counts from it)


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def resolve_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """`latest` (the newest complete checkpoint of the run), `auto` (latest, or None to start fresh)
    or a checkpoint folder path."""
    if resume in ("latest", "auto"):
        found = list_checkpoints(run_dir)
        if not found and resume == "auto":
            return None
        if not found:
            raise InvalidInputError(f"--resume latest: no checkpoint under {checkpoints_dir(run_dir)}", field="resume")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise InvalidInputError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE})", field="resume")
    return path


def save_ema(ema, path: Path) -> None:
    """The EMA's shadow weights as safetensors, its counters in the metadata."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    tensors = {f"shadow.{i:04d}": t.detach().cpu().contiguous() for i, t in enumerate(state["shadow_params"])}
    scalars = {k: v for k, v in state.items() if k != "shadow_params" and isinstance(v, (int, float, bool))}
    save_file(tensors, str(path), metadata={"scalars": json.dumps(scalars)})
    follow_umask(path)  # safetensors creates 0600


def load_ema(ema, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        scalars = json.loads(handle.metadata()["scalars"])
        shadow = [handle.get_tensor(key) for key in sorted(handle.keys())]
    ema.load_state_dict({**ema.state_dict(), **scalars, "shadow_params": shadow})


def ema_weights(path: Path, parameter_names: list[str]) -> dict[str, torch.Tensor]:
    """The EMA shadow weights of a checkpoint keyed by the model's parameter names."""
    from safetensors.torch import load_file

    shadow = load_file(str(path))
    ordered = [shadow[key] for key in sorted(shadow)]
    if len(ordered) != len(parameter_names):
        raise InvalidInputError(f"{path}: {len(ordered)} EMA tensors for {len(parameter_names)} parameters",
                                field="checkpoint")
    return dict(zip(parameter_names, ordered))


def save_checkpoint(accelerator, run_dir: Path, state: TrainerState, ema, config, keep: int) -> Path:
    """Every process calls this; the main process writes the extras, renames and prunes."""
    final = checkpoints_dir(run_dir) / f"step-{state.step:07d}"
    temp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    accelerator.wait_for_everyone()  # every process has written its random states before the rename
    if accelerator.is_main_process:
        save_ema(ema, temp / EMA_FILE)
        config.save(temp / CONFIG_FILE)
        (temp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        temp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, ema) -> TrainerState:
    accelerator.load_state(str(path))
    if (path / EMA_FILE).is_file():
        load_ema(ema, path / EMA_FILE)
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))


def exported_step(model_dir: str | Path) -> int:
    """The training step recorded beside exported weights (0 when there is no record)."""
    path = Path(model_dir) / EXPORTED_STATE_FILE
    if not path.is_file():
        return 0
    try:
        step = json.loads(path.read_text())["step"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"{path} is not a training state record: {exc}", field="model.init_from") from exc
    if not isinstance(step, int) or step < 0:
        raise InvalidInputError(f"{path}: step must be a non-negative integer", field="model.init_from")
    return step
