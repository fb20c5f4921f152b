"""`latentd encode --engine ray`: the archive pipeline on Ray Data, with one model actor per GPU (or CPU slot).

The driver reads the sources (skipping what the archive already holds) and writes the archive; Ray
decodes, sizes and encodes the images in `map_batches` on actors that each hold one backend. The
archive format, the manifest and resume are the local engine's.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import numpy as np

from latentd.v1.errors import one_line

from .encode import (
    Admitted,
    EncodeSummary,
    admit,
    decode_source,
    encode_isolating,
    record_failure,
    store_encoded,
)
from .sizing import SizePolicy
from .sources import SourceItem
from .writer import ArchiveWriter

CHUNK = 512  # sources handed to Ray per dataset: bounds the driver's memory for large collections
FIELDS = ("key", "error", "width", "height", "encoded_width", "encoded_height", "shape", "latents", "crop_top",
          "crop_left")


class EncodeActor:
    """Holds one backend (a model, or a client of a server); decodes, sizes and encodes batches."""

    def __init__(self, make_backend: Callable[[], Any], policy: str) -> None:
        self.backend = make_backend()
        self.policy = SizePolicy.parse(policy)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for key, data, origin in zip(batch["key"], batch["data"], batch["origin"]):
            row = {"key": str(key), "error": "", "width": 0, "height": 0, "encoded_width": 0, "encoded_height": 0,
                   "shape": "", "latents": b"", "crop_top": 0, "crop_left": 0}
            try:
                (row["width"], row["height"]), pixels = decode_source(bytes(data), str(origin), self.policy,
                                                                      self.backend.max_pixels)
                top, left = self.policy.plan(row["width"], row["height"])[2]
                row.update(encoded_width=pixels.shape[1], encoded_height=pixels.shape[0], pixels=pixels,
                           crop_top=top, crop_left=left)
            except Exception as exc:  # noqa: BLE001 - recorded in the manifest, never fatal
                row["error"] = one_line(exc)
            rows.append(row)
        decoded = [row for row in rows if "pixels" in row]
        for row, latents in zip(decoded, encode_isolating(self.backend, [row.pop("pixels") for row in decoded])):
            if isinstance(latents, str):
                row["error"] = latents
            else:
                row["shape"] = ",".join(map(str, latents.shape))
                row["latents"] = np.ascontiguousarray(latents, np.float32).tobytes()
        return {name: np.array([row[name] for row in rows], dtype=object) for name in FIELDS}


def encode_with_ray(sources: Iterable[SourceItem], writer: ArchiveWriter, make_backend: Callable[[], Any],
                    policy: SizePolicy, *, batch_size: int = 8, actors: int = 1, gpus_per_actor: float = 0.0,
                    dedupe: bool = False, progress: Callable[[EncodeSummary], None] | None = None) -> EncodeSummary:
    """Encode every source not yet in the archive on Ray Data; connects to a running Ray cluster
    (RAY_ADDRESS) or starts a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come back in source order
    summary = EncodeSummary()
    admitted = admit(sources, writer, summary, dedupe)
    try:
        while chunk := list(itertools.islice(admitted, CHUNK)):
            by_key = {source.item.key: source for source in chunk}
            dataset = ray.data.from_items([{"key": s.item.key, "origin": s.item.origin, "data": s.data}
                                           for s in chunk])
            encoded = dataset.map_batches(EncodeActor, fn_constructor_args=(make_backend, str(policy)),
                                          batch_size=batch_size, concurrency=actors, num_gpus=gpus_per_actor,
                                          batch_format="numpy")
            for result in encoded.iter_rows():
                _store(writer, summary, by_key[result["key"]], result)
            if progress:
                progress(summary)
    finally:
        writer.flush()
    return summary


def _store(writer: ArchiveWriter, summary: EncodeSummary, source: Admitted, result: dict[str, Any]) -> None:
    if result["error"]:
        record_failure(writer, summary, source.item, source.sha256, result["error"])
        return
    shape = tuple(int(n) for n in result["shape"].split(","))
    latents = np.frombuffer(result["latents"], np.float32).reshape(shape)
    store_encoded(writer, summary, source, (int(result["width"]), int(result["height"])),
                  (int(result["encoded_width"]), int(result["encoded_height"])), latents,
                  (int(result["crop_top"]), int(result["crop_left"])))
