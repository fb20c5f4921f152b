"""Plain diffusers as a program that uses it alone runs it: the codec bench's baseline in a process of its own."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import torch

# A spawned child loads torch and the model: allow for a slow disk or a Hub download.
START_TIMEOUT_S = 600.0


def load_for_bench(model: str, seed: int) -> torch.nn.Module:
    """The bench's model: registered architectures without packaged weights get seeded random ones."""
    from latentd.vae.loading import load_model
    from latentd.vae.registry import get_spec, is_registered

    if is_registered(model) and get_spec(model).packaged_path() is None:
        return load_model(model, random_seed=seed).model
    return load_model(model).model


def timed(fn) -> tuple[float, Any]:
    """(seconds, fn()) with the GPU's queue drained at both ends."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


def diffusers_call(model: torch.nn.Module, op: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """diffusers' own API, nothing else: `encode(x).latent_dist.mode()` or `decode(z).sample`, under no_grad,
    in the model's dtype; float32 out."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        if op == "encode":
            return model.encode(tensor.to(device, dtype)).latent_dist.mode().float().cpu()
        return model.decode(tensor.to(device, dtype)).sample.float().cpu()


class BaselineProcess:
    """diffusers in a spawned process that never runs latentd's process-wide settings (the malloc setting of
    vae/allocator.py), on the same weights; it waits on a pipe while the caller times latentd, so the two
    never share the cores and their runs can be interleaved."""

    def __init__(self, model: str, seed: int, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self._args = (model, seed, str(device), str(dtype).removeprefix("torch."))
        self._conn = None
        self._process = None

    def __enter__(self) -> "BaselineProcess":
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, *self._args), name="bench-baseline", daemon=True)
        self._process.start()
        child.close()
        try:
            if not self._conn.poll(START_TIMEOUT_S):
                raise RuntimeError("the baseline process did not load the model in time")
            self._reply()  # "ready"
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def run(self, op: str, tensor: torch.Tensor) -> tuple[float, torch.Tensor]:
        """(seconds, output) of one diffusers call in the child, timed there (the pipe is not counted)."""
        self._conn.send((op, tensor))
        return self._reply()

    def _reply(self) -> Any:
        try:
            kind, value = self._conn.recv()
        except EOFError:
            raise RuntimeError("the baseline process exited unexpectedly") from None
        if kind == "error":
            raise RuntimeError(f"baseline process: {value}")
        return value

    def __exit__(self, *exc_info) -> None:
        try:
            self._conn.send(None)
        except (OSError, ValueError):
            pass  # the child is gone already
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()


def _serve(conn, model_name: str, seed: int, device_name: str, dtype_name: str = "float32") -> None:
    """The child: load the model, then answer (op, tensor) requests with (seconds, output) until None."""
    try:
        device = torch.device(device_name)
        model = torch.nn.Module.to(load_for_bench(model_name, seed), device, getattr(torch, dtype_name))
        conn.send(("ok", "ready"))
        while (request := conn.recv()) is not None:
            op, tensor = request
            conn.send(("ok", timed(lambda: diffusers_call(model, op, tensor, device))))
    except Exception as exc:  # reported to the parent, which raises it with this message
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()
