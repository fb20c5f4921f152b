"""Rate-distortion points of latent storage formats, Pillow's classic codecs and published results, and the report."""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from latentd.archive.quantize import LatentFormat, get_format, load, store

MEASURED = "measured"
PUBLISHED = "published"
LATENT_CODEC_PREFIX = "latentd "  # latent points are codec "latentd <model>", setting <format>
CSV_COLUMNS = ("codec", "setting", "bpp", "psnr", "ms_ssim", "source")
DEFAULT_QUALITIES = (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95)
# Pillow format name and the `PIL.features` name that says whether this Pillow can write it.
CLASSIC_CODECS = {"jpeg": ("JPEG", "jpg"), "webp": ("WEBP", "webp"), "avif": ("AVIF", "avif")}
# Shown the way CompressAI's result files name them, so measured and published curves line up in the legend.
CLASSIC_LABELS = {"jpeg": "JPEG", "webp": "WebP", "avif": "AVIF"}
ANCHOR_BPPS = (0.25, 0.5, 1.0)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")  # one per curve, after its colour  # where the markdown compares published curves (as in the reference README)


@dataclass
class ImageRD:
    """One image at one setting."""

    bpp: float
    psnr: float
    ms_ssim: float | None = None


@dataclass
class RDPoint:
    """One point of a rate-distortion curve: `codec` names the curve, `setting` the point on it."""

    codec: str
    setting: str
    bpp: float
    psnr: float | None
    ms_ssim: float | None = None
    source: str = MEASURED
    images: list[ImageRD] = field(default_factory=list)  # per-image values behind the means (measured only)

    def row(self) -> dict[str, object]:
        return {"codec": self.codec, "setting": self.setting, "bpp": self.bpp, "psnr": self.psnr,
                "ms_ssim": self.ms_ssim, "source": self.source}


@dataclass
class RDResult:
    """Points plus what was left out and why (a codec this Pillow lacks, a missing reference file)."""

    points: list[RDPoint] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Outputs:
    """Where `write_outputs` put the report, and the notes it carries."""

    csv: Path
    markdown: Path
    plot: Path | None  # None when matplotlib is not installed
    notes: list[str] = field(default_factory=list)


def measure_image(original: np.ndarray, reconstruction: np.ndarray, nbytes: int) -> ImageRD:
    """bpp of `nbytes` over the original's pixels, PSNR and MS-SSIM of the reconstruction."""
    from latentd.vae.metrics import ms_ssim_if_available, psnr

    height, width = original.shape[:2]
    return ImageRD(bpp=nbytes * 8 / (height * width), psnr=psnr(original, reconstruction),
                   ms_ssim=ms_ssim_if_available(original, reconstruction))


def mean_point(codec: str, setting: str, images: list[ImageRD]) -> RDPoint:
    """The mean of per-image values (CompressAI's convention, not the PSNR of the mean MSE)."""
    from latentd.vae.metrics import mean_of

    return RDPoint(codec=codec, setting=setting, bpp=mean_of([r.bpp for r in images]),
                   psnr=mean_of([r.psnr for r in images]), ms_ssim=mean_of([r.ms_ssim for r in images]),
                   images=images)


def _latent_image(backend, image: np.ndarray, formats: Sequence[LatentFormat], tiling: str) -> list[ImageRD]:
    """One encode, then per format: store, load, decode and measure."""
    size = image.shape[:2]
    latents = backend.encode([image], tiling=tiling)[0]
    results = []
    for fmt in formats:
        stored = store(latents, fmt)
        restored = load(stored, fmt, latents.shape)
        reconstruction = backend.decode([restored], [size], tiling=tiling)[0]
        results.append(measure_image(image, reconstruction, stored.nbytes))
    return results


def latent_points(backend, images: Sequence[np.ndarray], formats: Iterable[str | LatentFormat], *,
                  tiling: str = "auto", on_error: Callable[[int, Exception], None] | None = None) -> list[RDPoint]:
    """One mean point per latent storage format over `images` (uint8 HWC), codec "latentd <model>" (bound
    entropy formats: "latentd <model> entropy", setting entropy@STEP).

    With `on_error`, an image the backend rejects is reported as `on_error(index, exc)` and left out of
    every format, so all formats average over the same images; without it the error propagates.
    """
    fmts = [f if isinstance(f, LatentFormat) else get_format(f) for f in formats]
    per_format: list[list[ImageRD]] = [[] for _ in fmts]
    for index, image in enumerate(images):
        try:
            results = _latent_image(backend, image, fmts, tiling)
        except Exception as exc:
            if on_error is None:
                raise
            on_error(index, exc)
            continue
        for collected, result in zip(per_format, results):
            collected.append(result)
    codec = f"{LATENT_CODEC_PREFIX}{backend.name}"
    # The entropy format at its steps is a curve of its own, beside the fixed-rate formats' points.
    return [mean_point(f"{codec} entropy" if fmt.name == "entropy" else codec, fmt.label, collected)
            for fmt, collected in zip(fmts, per_format) if collected]


def classic_available(codec: str) -> bool:
    """Whether this Pillow can write `codec` (AVIF needs Pillow >= 11.3 built with libavif)."""
    from PIL import features

    with warnings.catch_warnings():  # older Pillow warns about feature names it does not know
        warnings.simplefilter("ignore")
        try:
            return bool(features.check(CLASSIC_CODECS[codec][1]))
        except (ValueError, KeyError):
            return False


def classic_roundtrip(image: np.ndarray, codec: str, quality: int) -> tuple[int, np.ndarray]:
    """(file size in bytes, decoded RGB) of `image` saved by Pillow at `quality` with its other defaults,
    as CompressAI measured JPEG and WebP."""
    from PIL import Image

    from latentd.vae.imageio import encode_image

    data = encode_image(image, CLASSIC_CODECS[codec][0], quality)
    with Image.open(io.BytesIO(data)) as decoded:
        return len(data), np.array(decoded.convert("RGB"))  # writable: torch warns on read-only arrays


def classic_points(images: Sequence[np.ndarray], codecs: Iterable[str] = ("jpeg", "webp", "avif"),
                   qualities: Sequence[int] = DEFAULT_QUALITIES) -> RDResult:
    """Mean bpp (whole file, headers included), PSNR and MS-SSIM per codec and quality; a codec this
    Pillow cannot write is skipped with a note."""
    result = RDResult()
    for codec in codecs:
        if codec not in CLASSIC_CODECS:
            raise ValueError(f"unknown classic codec {codec!r} (known: {', '.join(CLASSIC_CODECS)})")
        if not classic_available(codec):
            result.notes.append(f"{CLASSIC_LABELS[codec]} skipped: this Pillow cannot write it")
            continue
        for quality in qualities:
            measured = []
            for image in images:
                nbytes, decoded = classic_roundtrip(image, codec, quality)
                measured.append(measure_image(image, decoded, nbytes))
            result.points.append(mean_point(CLASSIC_LABELS[codec], f"q={quality}", measured))
    return result


def _float_or_none(text: str | None) -> float | None:
    return float(text) if text not in (None, "") else None


def reference_points(csv_path: str | os.PathLike) -> RDResult:
    """Published points from a `file,name,bpp,psnr_rgb,ms_ssim_rgb` CSV (see shared/reference/README.md).

    Each result file is one curve; a name published in several files (MSE and MS-SSIM training, CPU and
    CUDA runs) is told apart by its file name. A missing file gives no points and a note.
    """
    path = Path(csv_path)
    if not path.is_file():
        return RDResult(notes=[f"published points skipped: {path} not found"])
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    files_per_name: dict[str, set[str]] = {}
    for row in rows:
        files_per_name.setdefault(row["name"], set()).add(row["file"])
    points, empty = [], 0
    for row in rows:
        if not row["psnr_rgb"] and not row.get("ms_ssim_rgb"):
            empty += 1  # a rate without a quality: nothing to plot or compare
            continue
        unique = len(files_per_name[row["name"]]) == 1
        points.append(RDPoint(codec=row["name"] if unique else Path(row["file"]).stem, setting=row["file"],
                              bpp=float(row["bpp"]), psnr=_float_or_none(row["psnr_rgb"]),
                              ms_ssim=_float_or_none(row.get("ms_ssim_rgb")), source=PUBLISHED))
    notes = [f"{empty} published points without PSNR or MS-SSIM left out"] if empty else []
    return RDResult(points=points, notes=notes)


def curves(points: Iterable[RDPoint]) -> dict[tuple[str, str], list[RDPoint]]:
    """Points grouped by (source, codec), each curve sorted by bpp, in first-seen order."""
    grouped: dict[tuple[str, str], list[RDPoint]] = {}
    for point in points:
        grouped.setdefault((point.source, point.codec), []).append(point)
    return {key: sorted(group, key=lambda p: p.bpp) for key, group in grouped.items()}


def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def interpolate(curve: list[RDPoint], bpp: float, metric: str) -> float | None:
    """`metric` of a bpp-sorted curve at `bpp` (linear), None outside the curve's range."""
    known = [(p.bpp, getattr(p, metric)) for p in curve if getattr(p, metric) is not None]
    if len(known) < 2 or not known[0][0] <= bpp <= known[-1][0]:
        return None
    xs, ys = zip(*known)
    return float(np.interp(bpp, xs, ys))


def markdown_table(points: Sequence[RDPoint], notes: Sequence[str] = ()) -> str:
    """Measured points one row each; published curves as PSNR / MS-SSIM at 0.25, 0.5 and 1 bpp."""
    lines = ["| codec | setting | bpp | PSNR (dB) | MS-SSIM |", "|---|---|---:|---:|---:|"]
    measured = [p for p in points if p.source == MEASURED]
    for point in measured:
        lines.append(f"| {point.codec} | {point.setting} | {_fmt(point.bpp, '.4f')} | {_fmt(point.psnr, '.2f')} "
                     f"| {_fmt(point.ms_ssim, '.4f')} |")
    published = {codec: curve for (source, codec), curve in curves(points).items() if source == PUBLISHED}
    if published:
        anchors = " | ".join(f"{bpp:g} bpp" for bpp in ANCHOR_BPPS)
        lines += ["", "Published (PSNR dB / MS-SSIM, linearly interpolated):", "",
                  f"| published codec | {anchors} |", "|---" + "|---:" * len(ANCHOR_BPPS) + "|"]
        for codec, curve in published.items():
            cells = [f"{_fmt(interpolate(curve, bpp, 'psnr'), '.2f')} / "
                     f"{_fmt(interpolate(curve, bpp, 'ms_ssim'), '.3f')}" for bpp in ANCHOR_BPPS]
            lines.append(f"| {codec} | {' | '.join(cells)} |")
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def csv_text(points: Iterable[RDPoint]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for point in points:
        writer.writerow({key: "" if value is None else value for key, value in point.row().items()})
    return buffer.getvalue()


def _colours(keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], object]:
    """Measured curves in strong colours; a published curve of the same codec (JPEG, WebP) shares its colour,
    the others cycle through a paler palette."""
    from matplotlib import colormaps

    strong, pale = colormaps["tab10"].colors, colormaps["tab20b"].colors + colormaps["tab20c"].colors
    measured = [codec for source, codec in keys if source == MEASURED]
    colours, others = {}, 0
    for source, codec in keys:
        if codec in measured:
            colours[(source, codec)] = strong[measured.index(codec) % len(strong)]
        else:
            colours[(source, codec)] = pale[others % len(pale)]
            others += 1
    return colours


def _annotate(ax, labelled: Sequence[tuple[float, float | None, str]], digits: int) -> None:
    """Label dots with their setting; dots that coincide to `digits` (float16 and bfloat16) share one label."""
    names: dict[tuple[float, float], list[str]] = {}
    for x, y, name in labelled:
        if y is not None and math.isfinite(y):
            names.setdefault((round(x, 2), round(y, digits)), []).append(name)
    for (x, y), together in names.items():
        ax.annotate(" / ".join(together), (x, y), fontsize=7, textcoords="offset points", xytext=(4, 4))


def plot_png(points: Sequence[RDPoint]) -> bytes:
    """Two panels, PSNR and MS-SSIM against bpp; measured curves bold, published ones thin and dashed."""
    # A bare Figure on the Agg canvas: renders to a file without a display and leaves pyplot's global
    # state (and a caller's interactive backend) alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(17, 7), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    grouped = curves(points)
    colours = _colours(list(grouped))
    legend: dict[str, object] = {}
    for number, ((source, codec), curve) in enumerate(grouped.items()):
        measured = source == MEASURED
        marker = MARKERS[number % len(MARKERS)]
        style = dict(marker=marker, linewidth=2, markersize=6) if measured else \
            dict(marker=marker, linewidth=0.8, markersize=3, linestyle="--", alpha=0.7)
        label = codec if measured else f"{codec} (published)"
        for ax, metric, digits in zip(axes, ("psnr", "ms_ssim"), (1, 3)):
            xy = [(p.bpp, getattr(p, metric)) for p in curve
                  if getattr(p, metric) is not None and math.isfinite(getattr(p, metric))]
            if xy:
                legend[label] = ax.plot(*zip(*xy), color=colours[(source, codec)], **style)[0]
            if measured and codec.startswith(LATENT_CODEC_PREFIX):  # which latent format is which dot
                _annotate(ax, [(p.bpp, getattr(p, metric), p.setting.removeprefix("entropy@")) for p in curve],
                          digits)
    for ax, ylabel in zip(axes, ("PSNR (dB, RGB)", "MS-SSIM (RGB)")):
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    if legend:
        figure.legend(list(legend.values()), list(legend), loc="outside right upper", fontsize=6,
                      ncol=1 + len(legend) // 45)
    figure.suptitle("Rate-distortion (mean over images)")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def write_outputs(points: Sequence[RDPoint], out_dir: str | os.PathLike, notes: Sequence[str] = ()) -> Outputs:
    """rd.csv, rd.md and rd.png in `out_dir`; without matplotlib the plot is skipped with a note."""
    from latentd.vae.fileio import write_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes = list(notes)
    outputs = Outputs(csv=out / "rd.csv", markdown=out / "rd.md", plot=out / "rd.png")
    try:
        png = plot_png(points)
    except ImportError:
        outputs.plot = None
        notes.append("plot skipped: matplotlib is not installed (pip install 'matplotlib>=3.7')")
    else:
        write_atomic(outputs.plot, png)
    outputs.notes = notes
    write_atomic(outputs.csv, csv_text(points).encode())
    write_atomic(outputs.markdown, markdown_table(points, notes).encode())
    return outputs
