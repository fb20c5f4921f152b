"""`latentd encode --engine ray`: the archive pipeline on Ray Data, with one model actor per GPU (or CPU slot).

The driver reads the sources (skipping what the archive already holds) and writes the archive; Ray
decodes, sizes and encodes the images in `map_batches` on actors that each hold one backend. The
archive format, the manifest and resume are the local engine's.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .encode import EncodeSummary, _item_error
from .manifest import ItemRecord
from .sizing import SizePolicy
from .sources import SourceItem
from .writer import ArchiveWriter

CHUNK = 512  # sources handed to Ray per dataset: bounds the driver's memory for large collections


class EncodeActor:
    """Holds one backend (a model, or a client of a server); decodes, sizes and encodes batches."""

    def __init__(self, make_backend: Callable[[], Any], policy: str) -> None:
        self.backend = make_backend()
        self.policy = SizePolicy.parse(policy)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from latentd.vae.imageio import open_image

        count = len(batch["key"])
        out: dict[str, list] = {"key": [], "error": [], "width": [], "height": [], "encoded_width": [],
                                "encoded_height": [], "shape": [], "latents": []}
        pixels, slots = [], []
        for index in range(count):
            error, size, image = "", (0, 0), None
            try:
                opened = open_image(bytes(batch["data"][index]), name=str(batch["origin"][index]),
                                    max_pixels=self.backend.max_pixels)
                size, image = opened.size, np.asarray(self.policy.apply(opened))
            except Exception as exc:  # noqa: BLE001 - recorded in the manifest, never fatal
                error = " ".join(str(exc).split()) or type(exc).__name__
            out["key"].append(str(batch["key"][index]))
            out["error"].append(error)
            out["width"].append(size[0])
            out["height"].append(size[1])
            out["encoded_width"].append(0 if image is None else image.shape[1])
            out["encoded_height"].append(0 if image is None else image.shape[0])
            out["shape"].append("")
            out["latents"].append(b"")
            if image is not None:
                pixels.append(image)
                slots.append(index)
        for index, latents in zip(slots, self._encode(pixels, slots, out)):
            if latents is not None:
                out["shape"][index] = ",".join(map(str, latents.shape))
                out["latents"][index] = np.ascontiguousarray(latents, np.float32).tobytes()
        return {name: np.array(values, dtype=object) for name, values in out.items()}

    def _encode(self, pixels: list[np.ndarray], slots: list[int], out: dict[str, list]) -> list[Any]:
        """Latents per image; an image the model refuses fails alone (its error noted, None returned)."""
        if not pixels:
            return []
        try:
            return list(self.backend.encode(pixels))
        except Exception as exc:  # noqa: BLE001
            if not _item_error(exc):
                raise
            if len(pixels) == 1:
                out["error"][slots[0]] = " ".join(str(exc).split()) or type(exc).__name__
                return [None]
            return [self._encode([p], [s], out)[0] for p, s in zip(pixels, slots)]


def _rows(sources: Iterable[SourceItem], writer: ArchiveWriter, dedupe: bool,
          summary: EncodeSummary) -> Iterator[dict[str, Any]]:
    for item in sources:
        if item.key in writer.done:
            summary.skipped += 1
            continue
        try:
            data = item.read()
        except OSError as exc:
            summary.failed += 1
            writer.add_without_latents(ItemRecord(item.key, item.origin, "failed", reason=f"cannot read: {exc}"))
            continue
        digest = hashlib.sha256(data).hexdigest()
        if dedupe and digest in writer.hashes:
            summary.duplicates += 1
            writer.add_without_latents(ItemRecord(item.key, item.origin, "duplicate", digest,
                                                  reason=f"same bytes as {writer.hashes[digest]}"))
            continue
        writer.hashes[digest] = item.key
        summary.bytes_in += len(data)
        yield {"key": item.key, "origin": item.origin, "data": data, "sha256": digest, "extra": item.extra}


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
    rows = _rows(sources, writer, dedupe, summary)
    try:
        while chunk := list(itertools.islice(rows, CHUNK)):
            meta = {row["key"]: row for row in chunk}
            dataset = ray.data.from_items([{k: row[k] for k in ("key", "origin", "data")} for row in chunk])
            encoded = dataset.map_batches(EncodeActor, fn_constructor_args=(make_backend, str(policy)),
                                          batch_size=batch_size, concurrency=actors, num_gpus=gpus_per_actor,
                                          batch_format="numpy")
            for result in encoded.iter_rows():
                _store(writer, summary, meta[result["key"]], result)
            if progress:
                progress(summary)
    finally:
        writer.flush()
    return summary


def _store(writer: ArchiveWriter, summary: EncodeSummary, row: dict[str, Any], result: dict[str, Any]) -> None:
    if result["error"]:
        summary.failed += 1
        writer.add_without_latents(ItemRecord(row["key"], row["origin"], "failed", row["sha256"],
                                              reason=result["error"]))
        return
    shape = tuple(int(n) for n in result["shape"].split(","))
    latents = np.frombuffer(result["latents"], np.float32).reshape(shape)
    record = ItemRecord(row["key"], row["origin"], "ok", row["sha256"], width=int(result["width"]),
                        height=int(result["height"]), encoded_width=int(result["encoded_width"]),
                        encoded_height=int(result["encoded_height"]), extra=row["extra"] or None)
    writer.add(record, latents)
    summary.images += 1
    summary.pixels += record.width * record.height
    summary.bytes_out += record.nbytes
