"""Encode sources into an archive: decode images in worker threads while the model encodes earlier batches."""

from __future__ import annotations

import hashlib
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

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
class _Prepared:
    item: SourceItem
    sha256: str
    size: int
    pixels: np.ndarray | None = None  # after the size policy
    original: tuple[int, int] | None = None  # (width, height)
    error: str | None = None


def _prepare(item: SourceItem, data: bytes, policy: SizePolicy, max_pixels: int) -> _Prepared:
    """Decode and size one image (in a worker thread: Pillow releases the GIL while decoding)."""
    from latentd.vae.imageio import open_image

    prepared = _Prepared(item, hashlib.sha256(data).hexdigest(), len(data))
    try:
        image = open_image(data, name=item.origin, max_pixels=max_pixels)
        prepared.original = image.size
        prepared.pixels = np.asarray(policy.apply(image))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is recorded, never fatal
        prepared.error = " ".join(str(exc).split()) or type(exc).__name__
    return prepared


def encode_sources(sources: Iterable[SourceItem], writer: ArchiveWriter, backend, policy: SizePolicy, *,
                   batch_size: int = 8, workers: int = 4, dedupe: bool = False,
                   progress: Callable[[EncodeSummary], None] | None = None) -> EncodeSummary:
    """Encode every source not yet in the archive; failures are recorded and the run goes on."""
    summary = EncodeSummary()
    started = time.perf_counter()
    try:
        _run(sources, writer, backend, policy, batch_size, workers, dedupe, progress, summary, started)
    finally:
        writer.flush()  # what was encoded before a failure stays in the archive
    summary.seconds = time.perf_counter() - started
    if progress:
        progress(summary)
    return summary


def _run(sources, writer, backend, policy, batch_size, workers, dedupe, progress, summary, started) -> None:
    ahead: deque[Future] = deque()  # decodes in flight, in source order
    batch: list[_Prepared] = []
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="latentd-decode") as pool:
        def drain(limit: int) -> None:
            while len(ahead) > limit:
                prepared = ahead.popleft().result()
                summary.bytes_in += prepared.size
                if prepared.error is not None:
                    _fail(writer, summary, prepared, prepared.error)
                    continue
                batch.append(prepared)
                if len(batch) >= batch_size:
                    _encode_batch(writer, backend, batch, summary)
                    batch.clear()
                    summary.seconds = time.perf_counter() - started
                    if progress:
                        progress(summary)

        for item in sources:
            if item.key in writer.done:
                summary.skipped += 1
                continue
            try:
                data = item.read()
            except OSError as exc:
                _fail(writer, summary, _Prepared(item, "", 0), f"cannot read: {exc.strerror or exc}")
                continue
            if dedupe:
                digest = hashlib.sha256(data).hexdigest()
                if digest in writer.hashes:
                    summary.duplicates += 1
                    writer.add_without_latents(ItemRecord(item.key, item.origin, "duplicate", digest,
                                                          reason=f"same bytes as {writer.hashes[digest]}"))
                    continue
                writer.hashes[digest] = item.key
            ahead.append(pool.submit(_prepare, item, data, policy, backend.max_pixels))
            drain(2 * max(1, workers) + batch_size)  # keep the workers busy, memory bounded
        drain(0)
        if batch:
            _encode_batch(writer, backend, batch, summary)


def _fail(writer: ArchiveWriter, summary: EncodeSummary, prepared: _Prepared, reason: str) -> None:
    summary.failed += 1
    writer.add_without_latents(ItemRecord(prepared.item.key, prepared.item.origin, "failed",
                                          prepared.sha256 or None, reason=reason))


def _item_error(exc: BaseException) -> bool:
    """Errors that belong to one image (bad pixels, too large); anything else (server down, out of
    memory) stops the run, which a re-run resumes."""
    from latentd.client.errors import InvalidInputError as RemoteInvalid

    try:
        from latentd.vae.errors import InvalidInputError as LocalInvalid
    except ImportError:  # pragma: no cover - the vae package always ships with the client
        LocalInvalid = RemoteInvalid
    return isinstance(exc, (RemoteInvalid, LocalInvalid))


def _encode_batch(writer: ArchiveWriter, backend, batch: list[_Prepared], summary: EncodeSummary) -> None:
    try:
        latents = backend.encode([p.pixels for p in batch])
    except Exception as exc:  # noqa: BLE001
        if not _item_error(exc):
            raise
        if len(batch) == 1:
            _fail(writer, summary, batch[0], " ".join(str(exc).split()) or type(exc).__name__)
            return
        for prepared in batch:  # find the item at fault; the others still go in
            _encode_batch(writer, backend, [prepared], summary)
        return
    for prepared, z in zip(batch, latents):
        width, height = prepared.original
        record = ItemRecord(prepared.item.key, prepared.item.origin, "ok", prepared.sha256, width=width,
                            height=height, encoded_width=prepared.pixels.shape[1],
                            encoded_height=prepared.pixels.shape[0], extra=prepared.item.extra or None)
        writer.add(record, np.asarray(z, np.float32))
        summary.images += 1
        summary.pixels += width * height
        summary.bytes_out += record.nbytes
