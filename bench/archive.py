"""`latentd bench archive`: end-to-end `latentd encode` throughput against the model alone, and the storage stage
of each latent format (quantize and code, decode) in MB/s of latents, in one run."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from latentd.archive.encode import encode_sources
from latentd.archive.quantize import LatentFormat, entropy_format, get_format, load, store
from latentd.archive.sizing import SizePolicy
from latentd.archive.sources import iter_sources
from latentd.archive.writer import ArchiveSettings, ArchiveWriter


@dataclass
class ArchiveThroughput:
    images: int
    batch_size: int
    model_images_per_s: float  # backend.encode on decoded pixels, batches of batch_size
    archive_images_per_s: float  # files -> decode -> encode -> quantize -> shards -> manifest
    stages: list["StageThroughput"] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.archive_images_per_s / self.model_images_per_s if self.model_images_per_s else 0.0


@dataclass
class StageThroughput:
    """One format's storage stage on the calling thread: float32 latents in MB (1e6 bytes) per second."""

    format: str
    encode_mb_per_s: float
    decode_mb_per_s: float
    bits_per_value: float


def bench_stage(latents: list[np.ndarray], fmt: LatentFormat, repeats: int = 3) -> StageThroughput:
    """`store` then `load` of every latent, `repeats` times, timed apart; best pass of each (the machine
    may be shared). numpy, zstd and constriction run on the calling thread: one core."""
    megabytes = sum(np.asarray(a, np.float32).nbytes for a in latents) / 1e6
    best_store = best_load = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        stored = [store(a, fmt) for a in latents]
        best_store = min(best_store, time.perf_counter() - started)
        started = time.perf_counter()
        for array, item in zip(latents, stored):
            load(item, fmt, array.shape)
        best_load = min(best_load, time.perf_counter() - started)
    bits = sum(item.nbytes for item in stored) * 8 / sum(a.size for a in latents)
    return StageThroughput(fmt.label, megabytes / best_store, megabytes / best_load, bits)


def write_photos(folder: Path, count: int, width: int, height: int) -> list[Path]:
    """Kodak-sized synthetic photos as JPEG files (gradients plus noise, so they compress like photos)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    paths = []
    for index in range(count):
        base = np.stack([x * 200 + index, y * 180, (x + y) * 90], axis=-1)
        pixels = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
        paths.append(folder / f"photo{index:04d}.jpg")
        Image.fromarray(pixels).save(paths[-1], quality=92)
    return paths


def bench_archive(backend, sources: list[Path] | None = None, *, images: int = 16, size: tuple[int, int] = (768, 512),
                  batch_size: int = 8, workers: int = 4, fmt: str = "q8-zstd",
                  coder=None) -> ArchiveThroughput:
    """Time the model on pre-decoded pixels, then `encode_sources` on the same files, same batch size; then
    the storage stage of q8-zstd and, with a `coder` (an EntropyCoder or IndexCoder, coding.coder_for), of
    its format, on the model's latents."""
    coded = entropy_format(coder) if coder is not None else None
    if get_format(fmt).entropy and (coded is None or coded.name != fmt):
        raise ValueError(f"format {fmt} needs its entropy model")
    from latentd.vae.imageio import open_image

    with tempfile.TemporaryDirectory(prefix="latentd-bench-") as scratch:
        root = Path(scratch)
        files = sources or write_photos(root / "photos", images, *size)
        pixels = [np.asarray(open_image(path)) for path in files]
        backend.encode(pixels[:batch_size])  # warm-up at this shape
        latents = []
        started = time.perf_counter()
        for start in range(0, len(pixels), batch_size):
            latents += [np.asarray(a, np.float32) for a in backend.encode(pixels[start:start + batch_size])]
        model_rate = len(pixels) / (time.perf_counter() - started)

        settings = ArchiveSettings(fmt, "native", backend.name, backend.scaling_factor, backend.shift_factor,
                                   backend.factor)
        writer = ArchiveWriter(root / "archive", settings, coded if get_format(fmt).entropy else get_format(fmt))
        started = time.perf_counter()
        summary = encode_sources(iter_sources(files), writer, backend, SizePolicy.parse("native"),
                                 batch_size=batch_size, workers=workers)
        writer.close()
        archive_rate = summary.images / (time.perf_counter() - started)
    stages = [bench_stage(latents, get_format("q8-zstd"))] + ([bench_stage(latents, coded)] if coded else [])
    return ArchiveThroughput(len(pixels), batch_size, model_rate, archive_rate, stages)
