"""Encode sources into an archive: decode images in worker threads while the model encodes earlier batches."""

from __future__ import annotations

import hashlib
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from latentd.v1.errors import one_line

from .manifest import ItemRecord
from .sizing import SizePolicy
from .sources import SourceItem
from .writer import ArchiveWriter


@dataclass
class EncodeSummary:
    images: int = 0  # encoded in this run
    skipped: int = 0  # already in the archive (resume)
    duplicates: int = 0
    failed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    pixels: int = 0
    seconds: float = 0.0

    @property
    def bpp(self) -> float | None:
        return self.bytes_out * 8 / self.pixels if self.pixels else None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


@dataclass
class Admitted:
    """A source to encode: read once and hashed once, on the reading thread."""

    item: SourceItem
    data: bytes
    sha256: str


def admit(sources: Iterable[SourceItem], writer: ArchiveWriter, summary: EncodeSummary,
          dedupe: bool) -> Iterator[Admitted]:
    """The sources not yet in the archive, in order. Unreadable ones are recorded as failed and, with
    `dedupe`, bytes already encoded as duplicates; both engines read their sources through this."""
    claimed: set[str] = set()  # keys an item of this run stands for, its own or its legacy one
    for item in sources:
        claimed.add(item.key)
        if item.key in writer.done:
            summary.skipped += 1
            continue
        try:
            data = item.read()
            item.extra = item.load_extra() if item.load_extra else item.extra
        except Exception as exc:  # noqa: BLE001 - whatever breaks reading one item is that item's failure
            record_failure(writer, summary, item, None, f"cannot read: {read_error(exc)}")
            continue
        digest = hashlib.sha256(data).hexdigest()
        legacy = item.legacy_key
        if legacy in writer.done and legacy not in claimed and writer.manifest.sha256_of(legacy) == digest:
            claimed.add(legacy)  # these very bytes are in the archive under the key an older run gave them
            summary.skipped += 1
            continue
        if dedupe:
            if digest in writer.hashes:
                summary.duplicates += 1
                writer.add_without_latents(ItemRecord(item.key, item.origin, "duplicate", digest,
                                                      reason=f"same bytes as {writer.hashes[digest]}"))
                continue
            writer.hashes[digest] = item.key
        summary.bytes_in += len(data)
        yield Admitted(item, data, digest)


def read_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return one_line(exc)


def decode_source(data: bytes, origin: str, policy: SizePolicy, max_pixels: int) -> tuple[tuple[int, int], np.ndarray]:
    """(original (width, height), uint8 pixels after the size policy); raises for an unreadable image."""
    from latentd.vae.imageio import open_image

    image = open_image(data, name=origin, max_pixels=max_pixels)
    return image.size, np.asarray(policy.apply(image))


def item_error(exc: BaseException) -> bool:
    """Errors that belong to one image (bad pixels, too large); anything else (server down, out of
    memory) stops the run, which a re-run resumes."""
    from latentd.v1.errors import InvalidInputError  # raised in process and, as its subclass, by the SDK

    return isinstance(exc, InvalidInputError)


def call_isolating(call: Callable[[list], Iterable], inputs: list) -> list:
    """`call(inputs)` as a list; if it fails for an input's sake, each input alone, so the one at fault
    yields its error message (a str) and the others their results. Other errors raise."""
    try:
        return list(call(inputs))
    except Exception as exc:  # noqa: BLE001
        if not item_error(exc):
            raise
        if len(inputs) == 1:
            return [one_line(exc)]
        return [call_isolating(call, [one])[0] for one in inputs]


def encode_isolating(backend, pixels: list[np.ndarray]) -> list[np.ndarray | str]:
    """Latents per image in one call; the image at fault yields its error message."""
    return call_isolating(backend.encode, pixels)


def record_failure(writer: ArchiveWriter, summary: EncodeSummary, item: SourceItem, sha256: str | None,
                   reason: str) -> None:
    summary.failed += 1
    writer.add_without_latents(ItemRecord(item.key, item.origin, "failed", sha256, reason=reason))


def store_encoded(writer: ArchiveWriter, summary: EncodeSummary, admitted: Admitted, original: tuple[int, int],
                  encoded: tuple[int, int], latents: np.ndarray) -> None:
    """One encoded image into the archive; `original` and `encoded` are (width, height)."""
    (width, height), item = original, admitted.item
    record = ItemRecord(item.key, item.origin, "ok", admitted.sha256, width=width, height=height,
                        encoded_width=encoded[0], encoded_height=encoded[1], extra=item.extra or None)
    writer.add(record, np.asarray(latents, np.float32))
    summary.images += 1
    summary.pixels += width * height
    summary.bytes_out += record.nbytes


@dataclass
class _Prepared:
    admitted: Admitted
    pixels: np.ndarray | None = None  # after the size policy
    original: tuple[int, int] | None = None  # (width, height)
    error: str | None = None


def _prepare(admitted: Admitted, policy: SizePolicy, max_pixels: int) -> _Prepared:
    """Decode and size one image (in a worker thread: Pillow releases the GIL while decoding)."""
    try:
        original, pixels = decode_source(admitted.data, admitted.item.origin, policy, max_pixels)
        return _Prepared(admitted, pixels, original)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is recorded, never fatal
        return _Prepared(admitted, error=one_line(exc))


def encode_sources(sources: Iterable[SourceItem], writer: ArchiveWriter, backend, policy: SizePolicy, *,
                   batch_size: int = 8, workers: int = 4, dedupe: bool = False,
                   progress: Callable[[EncodeSummary], None] | None = None) -> EncodeSummary:
    """Encode every source not yet in the archive; failures are recorded and the run goes on."""
    summary = EncodeSummary()
    started = time.perf_counter()
    try:
        _run(admit(sources, writer, summary, dedupe), writer, backend, policy, batch_size, workers, progress,
             summary, started)
    finally:
        writer.flush()  # what was encoded before a failure stays in the archive
    summary.seconds = time.perf_counter() - started
    if progress:
        progress(summary)
    return summary


def _run(admitted: Iterator[Admitted], writer, backend, policy, batch_size, workers, progress, summary,
         started) -> None:
    ahead: deque[Future] = deque()  # decodes in flight, in source order
    batch: list[_Prepared] = []
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="latentd-decode") as pool:
        def drain(limit: int) -> None:
            while len(ahead) > limit:
                prepared = ahead.popleft().result()
                if prepared.error is not None:
                    record_failure(writer, summary, prepared.admitted.item, prepared.admitted.sha256,
                                   prepared.error)
                    continue
                batch.append(prepared)
                if len(batch) >= batch_size:
                    _encode_batch(writer, backend, batch, summary)
                    batch.clear()
                    summary.seconds = time.perf_counter() - started
                    if progress:
                        progress(summary)

        for source in admitted:
            ahead.append(pool.submit(_prepare, source, policy, backend.max_pixels))
            drain(2 * max(1, workers) + batch_size)  # keep the workers busy, memory bounded
        drain(0)
        if batch:
            _encode_batch(writer, backend, batch, summary)


def _encode_batch(writer: ArchiveWriter, backend, batch: list[_Prepared], summary: EncodeSummary) -> None:
    for prepared, latents in zip(batch, encode_isolating(backend, [p.pixels for p in batch])):
        if isinstance(latents, str):
            record_failure(writer, summary, prepared.admitted.item, prepared.admitted.sha256, latents)
            continue
        encoded = (prepared.pixels.shape[1], prepared.pixels.shape[0])
        store_encoded(writer, summary, prepared.admitted, prepared.original, encoded, latents)
