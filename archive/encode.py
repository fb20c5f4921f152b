"""Encode sources into an archive: decode images in worker threads while the model encodes earlier batches."""

from __future__ import annotations

import hashlib
import math
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


@dataclass(frozen=True)
class Variants:
    """What is stored per image: latents at each size policy (the first is the main one, what
    `decode` gives back), with `flip` those of the horizontally flipped sized image too, with
    `logvar` the posterior log-variance of each (diffusers-scaled: z = latents + exp(logvar / 2) * eps)."""

    policies: tuple[SizePolicy, ...]
    flip: bool = False
    logvar: bool = False

    @classmethod
    def of(cls, policy: SizePolicy, sizes: Iterable[int] = (), flip: bool = False, logvar: bool = False) -> "Variants":
        """`policy` first, then the same kind of policy at each other side in `sizes`."""
        sides = [side for side in dict.fromkeys(sizes) if side != policy.width or policy.kind not in
                 ("center-crop", "buckets")]
        return cls((policy, *(policy.with_side(side) for side in sides)), flip, logvar)

    @property
    def plain(self) -> bool:
        return len(self.policies) == 1 and not self.flip and not self.logvar

    def roles(self) -> list[str]:
        return ["latents", *(["flipped"] if self.flip else [])]


@dataclass
class View:
    """One image at one size policy."""

    pixels: np.ndarray  # uint8 HWC after the policy
    crop: tuple[int, int]  # (top, left)
    covered_width: int  # width of the scaled image the crop was taken from


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


def decode_views(data: bytes, origin: str, variants: Variants, max_pixels: int
                 ) -> tuple[tuple[int, int], list[View]]:
    """(original (width, height), the image at each of the variants' size policies)."""
    from latentd.vae.imageio import open_image

    image = open_image(data, name=origin, max_pixels=max_pixels)
    views = []
    for policy in variants.policies:
        sized, crop = policy.apply_with_crop(image)
        views.append(View(np.asarray(sized), crop, policy.plan(*image.size)[1][0]))
    return image.size, views


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
                  encoded: tuple[int, int], latents: np.ndarray, crop: tuple[int, int] = (0, 0),
                  variants: list[dict] | None = None, extras: dict[str, np.ndarray] | None = None) -> None:
    """One encoded image into the archive; `original` and `encoded` are (width, height), `crop` the
    (top, left) the size policy cropped at, `variants` and `extras` what `_variants_of` makes."""
    (width, height), item = original, admitted.item
    record = ItemRecord(item.key, item.origin, "ok", admitted.sha256, width=width, height=height,
                        encoded_width=encoded[0], encoded_height=encoded[1], extra=item.extra or None,
                        crop_top=crop[0], crop_left=crop[1], variants=variants)
    writer.add(record, np.asarray(latents, np.float32), extras)
    summary.images += 1
    summary.pixels += width * height
    summary.bytes_out += record.nbytes


@dataclass
class _Prepared:
    admitted: Admitted
    views: list[View] | None = None  # one per size policy
    original: tuple[int, int] | None = None  # (width, height)
    error: str | None = None


def _prepare(admitted: Admitted, variants: Variants, max_pixels: int) -> _Prepared:
    """Decode and size one image (in a worker thread: Pillow releases the GIL while decoding)."""
    try:
        original, views = decode_views(admitted.data, admitted.item.origin, variants, max_pixels)
        return _Prepared(admitted, views, original)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is recorded, never fatal
        return _Prepared(admitted, error=one_line(exc))


def _inputs(variants: Variants, views: list[View]) -> list[np.ndarray]:
    """The images the model encodes for one item: per view, the sized image and (flip) its mirror."""
    inputs = []
    for view in views:
        inputs.append(view.pixels)
        if variants.flip:
            inputs.append(np.ascontiguousarray(view.pixels[:, ::-1]))
    return inputs


def _encode_group(backend, variants: Variants, group: list[_Prepared]) -> list[list[tuple]]:
    """Per item, (latents, scaled log-variance or None) of each of its inputs, in one model call."""
    inputs = [one for prepared in group for one in _inputs(variants, prepared.views)]
    if variants.logvar:
        scale, shift = backend.scaling_factor, backend.shift_factor or 0.0
        results = [((mean - shift) * scale, logvar + 2 * math.log(scale))
                   for mean, logvar in backend.posterior(inputs)]
    else:
        results = [(latents, None) for latents in backend.encode(inputs)]
    per_item, at = [], 0
    for prepared in group:
        count = len(variants.policies) * len(variants.roles())
        per_item.append(results[at:at + count])
        at += count
    return per_item


def _variants_of(variants: Variants, views: list[View], results: list[tuple]
                 ) -> tuple[np.ndarray, list[dict] | None, dict[str, np.ndarray]]:
    """(main latents, the record's `variants`, tag -> the other arrays) of one item."""
    main = np.asarray(results[0][0], np.float32)
    if variants.plain:
        return main, None, {}
    described, extras, results = [], {}, iter(results)
    for index, (policy, view) in enumerate(zip(variants.policies, views)):
        height, width = view.pixels.shape[:2]
        entry = {"size_policy": str(policy), "encoded_width": width, "encoded_height": height,
                 "crop_top": view.crop[0], "crop_left": view.crop[1],
                 # the mirror's crop, in the mirrored scaled image
                 "flipped_crop_left": view.covered_width - view.crop[1] - width, "tensors": {}}
        for role in variants.roles():
            latents, logvar = next(results)
            entry["latent_shape"] = list(np.shape(latents))
            for name, array in ((role, latents), (f"{role}_logvar" if role == "flipped" else "logvar", logvar)):
                if array is None:
                    continue
                tag = "" if (index, name) == (0, "latents") else f"s{index}.{name}"
                entry["tensors"][name] = tag
                if tag:
                    extras[tag] = np.asarray(array, np.float32)
        described.append(entry)
    return main, described, extras


def encode_sources(sources: Iterable[SourceItem], writer: ArchiveWriter, backend, policy: SizePolicy | Variants, *,
                   batch_size: int = 8, workers: int = 4, dedupe: bool = False,
                   progress: Callable[[EncodeSummary], None] | None = None) -> EncodeSummary:
    """Encode every source not yet in the archive; failures are recorded and the run goes on.
    `policy`: one size policy, or `Variants` (several sizes, flips, log-variances)."""
    variants = policy if isinstance(policy, Variants) else Variants((policy,))
    summary = EncodeSummary()
    started = time.perf_counter()
    try:
        _run(admit(sources, writer, summary, dedupe), writer, backend, variants, batch_size, workers, progress,
             summary, started)
    finally:
        writer.flush()  # what was encoded before a failure stays in the archive
    summary.seconds = time.perf_counter() - started
    if progress:
        progress(summary)
    return summary


def _run(admitted: Iterator[Admitted], writer, backend, variants, batch_size, workers, progress, summary,
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
                    _encode_batch(writer, backend, variants, batch, summary)
                    batch.clear()
                    summary.seconds = time.perf_counter() - started
                    if progress:
                        progress(summary)

        for source in admitted:
            ahead.append(pool.submit(_prepare, source, variants, backend.max_pixels))
            drain(2 * max(1, workers) + batch_size)  # keep the workers busy, memory bounded
        drain(0)
        if batch:
            _encode_batch(writer, backend, variants, batch, summary)


def _encode_batch(writer: ArchiveWriter, backend, variants: Variants, batch: list[_Prepared],
                  summary: EncodeSummary) -> None:
    encoded_items = call_isolating(lambda group: _encode_group(backend, variants, group), batch)
    for prepared, results in zip(batch, encoded_items):
        if isinstance(results, str):
            record_failure(writer, summary, prepared.admitted.item, prepared.admitted.sha256, results)
            continue
        main, described, extras = _variants_of(variants, prepared.views, results)
        view = prepared.views[0]
        encoded = (view.pixels.shape[1], view.pixels.shape[0])
        store_encoded(writer, summary, prepared.admitted, prepared.original, encoded, main, view.crop,
                      described, extras)
