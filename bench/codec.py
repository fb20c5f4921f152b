"""Benchmarks that time latentd against plain diffusers on the same weights in the same run."""

from __future__ import annotations

import contextlib
import copy
import statistics
from dataclasses import dataclass

import torch

from .baseline import BaselineProcess, diffusers_call, load_for_bench, timed
from latentd.vae.codec import Codec, CodecOptions

# Agreement required between latentd's and diffusers' outputs (relative L2 error), both in float32.
AGREEMENT_TOLERANCE = 1e-4
# In half precision the two differ by rounding in different kernels (memory format, fused operations).
HALF_AGREEMENT_TOLERANCE = {"float16": 5e-3, "bfloat16": 3e-2}


def agreement_tolerance(dtype: str) -> float:
    return HALF_AGREEMENT_TOLERANCE.get(dtype, AGREEMENT_TOLERANCE)


@dataclass(frozen=True)
class Timing:
    """Median milliseconds per image of one operation: plain diffusers in this process (with whatever the
    process set, such as the CLI's malloc setting), plain diffusers alone in a process of its own, latentd."""

    operation: str
    baseline_ms: float
    latentd_ms: float
    alone_ms: float | None = None

    @property
    def speedup(self) -> float:
        """Over plain diffusers as a program that uses it alone runs it (this process's if not measured)."""
        return (self.alone_ms or self.baseline_ms) / self.latentd_ms

    @property
    def same_process_speedup(self) -> float:
        """Like for like: one process, the same process-wide settings; what latentd's module rewrites add."""
        return self.baseline_ms / self.latentd_ms


@dataclass
class CodecBenchResult:
    model: str
    size: int
    batch: int
    device: str
    dtype: str
    threads: int
    runs: int
    timings: list[Timing]
    latent_rel_error: float
    image_rel_error: float
    alone_rel_error: float | None = None  # the separate process's latents against this process's diffusers
    profile: str | None = None

    @property
    def tolerance(self) -> float:
        return agreement_tolerance(self.dtype)

    @property
    def agrees(self) -> bool:
        errors = [self.latent_rel_error, self.image_rel_error, self.alone_rel_error]
        return max(error for error in errors if error is not None) < self.tolerance


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def bench_codec(
    model: str = "sd",
    *,
    size: int = 512,
    batch: int = 1,
    runs: int = 3,
    warmup: int = 1,
    seed: int = 0,
    device: str | None = None,
    dtype: str | None = None,
    profile: bool = False,
    alone: bool = True,
) -> CodecBenchResult:
    """Time diffusers' `encode(x).latent_dist.mode()` / `decode(z).sample` (latentd's compute dtype, default
    memory format, no_grad) against latentd's `Codec.encode` / `Codec.decode` on copies of one model, and
    (`alone`) the same diffusers calls in a separate process (BaselineProcess), run by run interleaved.

    `model` is anything `load_model` accepts; registered architectures without weights here get
    seeded random weights, which time the same as trained ones.
    """
    baseline = load_for_bench(model, seed)
    codec = Codec(copy.deepcopy(baseline), name=model, device=device, dtype=dtype,
                  options=CodecOptions(max_batch_pixels=max(batch * size * size, 1)))
    place, dtype = codec.placement.device, codec.placement.dtype
    # Like for like: the dtype latentd runs in (after its force_upcast choice).
    baseline = torch.nn.Module.to(baseline, place, dtype)
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    samples: dict[str, list[tuple[float, float, float | None]]] = {"encode": [], "decode": []}
    with contextlib.ExitStack() as stack:
        separate = stack.enter_context(BaselineProcess(model, seed, place, dtype)) if alone else None
        for run in range(warmup + runs):
            t_base, latents_base = timed(lambda: diffusers_call(baseline, "encode", images, place))
            t_alone, latents_alone = separate.run("encode", images) if separate else (None, None)
            t_ours, latents_ours = timed(lambda: codec.encode(images, scaled=False))
            t_base_d, decoded_base = timed(lambda: diffusers_call(baseline, "decode", latents_base, place))
            t_alone_d = separate.run("decode", latents_base)[0] if separate else None
            t_ours_d, decoded_ours = timed(lambda: codec.decode(latents_base, scaled=False, output="tensor"))
            if run >= warmup:
                samples["encode"].append((t_base, t_ours, t_alone))
                samples["decode"].append((t_base_d, t_ours_d, t_alone_d))
    timings = []
    for op, triples in samples.items():
        base, ours, alone_s = zip(*triples)
        timings.append(Timing(op, baseline_ms=_median_ms(base, batch), latentd_ms=_median_ms(ours, batch),
                              alone_ms=_median_ms(alone_s, batch)))
    return CodecBenchResult(
        model=model,
        size=size,
        batch=batch,
        device=str(place),
        dtype=str(codec.placement.dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        runs=runs,
        timings=timings,
        latent_rel_error=relative_error(latents_ours, latents_base),
        image_rel_error=relative_error(decoded_ours, decoded_base),
        alone_rel_error=relative_error(latents_alone, latents_base) if separate else None,
        profile=_profile_decode(codec, latents_base) if profile else None,
    )


def _median_ms(seconds: tuple[float | None, ...], batch: int) -> float | None:
    """Median milliseconds per image, None for a baseline that was not run."""
    return None if None in seconds else statistics.median(seconds) * 1e3 / batch


def _profile_decode(codec: Codec, latents: torch.Tensor, rows: int = 12) -> str:
    """The profiler's table of where one latentd decode spends its time, by operator."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if codec.placement.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        codec.decode(latents, scaled=False, output="tensor")
    sort_by = "self_cuda_time_total" if codec.placement.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows)
