"""Learning curve: quality of a model's weights against their training steps, a log-linear fit and the steps it
projects to a goal."""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

METRICS = ("psnr", "ms_ssim")


@dataclass(frozen=True)
class CurvePoint:
    """One model's weights: its total training steps and the mean quality measured on the images."""

    model: str
    steps: int
    psnr: float
    ms_ssim: float | None
    images: int


@dataclass(frozen=True)
class LogFit:
    """value = intercept + per_doubling * log2(steps), least squares over the points."""

    metric: str
    intercept: float
    per_doubling: float
    rms_residual: float
    points: int

    def at(self, steps: float) -> float:
        return self.intercept + self.per_doubling * math.log2(steps)

    def steps_for(self, value: float) -> float | None:
        """Total steps at which the fit reaches `value`; None when it never does (flat or falling)."""
        if self.per_doubling <= 0:
            return None
        exponent = (value - self.intercept) / self.per_doubling
        return math.inf if exponent > 1000 else 2.0 ** exponent


@dataclass
class Curve:
    points: list[CurvePoint]
    fits: dict[str, LogFit] = field(default_factory=dict)  # by metric; absent where under two distinct steps
    goals: dict[str, float] = field(default_factory=dict)


def parse_model_arg(text: str) -> tuple[str, int | None]:
    """'FOLDER@STEP' -> (FOLDER, STEP); 'FOLDER' -> (FOLDER, None): its step is the one exported beside it."""
    path, at, step = text.rpartition("@")
    if at and step.isdigit() and path:
        return path, int(step)
    return text, None


def fit_log2(metric: str, points: Sequence[CurvePoint]) -> LogFit | None:
    """Least-squares fit of the metric against log2(steps); None with fewer than two distinct step counts."""
    import numpy as np

    usable = [(p.steps, getattr(p, metric)) for p in points
              if p.steps > 0 and getattr(p, metric) is not None and math.isfinite(getattr(p, metric))]
    if len({steps for steps, _ in usable}) < 2:
        return None
    x = np.log2([steps for steps, _ in usable])
    y = np.array([value for _, value in usable])
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    return LogFit(metric, float(intercept), float(slope), float(np.sqrt(np.mean(residual ** 2))), len(usable))


def build_curve(points: Sequence[CurvePoint], goals: dict[str, float]) -> Curve:
    ordered = sorted(points, key=lambda p: p.steps)
    fits = {metric: fit for metric in METRICS if (fit := fit_log2(metric, ordered)) is not None}
    return Curve(ordered, fits, dict(goals))


def _format_steps(steps: float | None) -> str:
    if steps is None:
        return "never (the fit does not rise)"
    if math.isinf(steps):
        return "beyond any count"
    return f"{steps:,.0f}"


def projection_lines(curve: Curve) -> list[str]:
    """One sentence per fitted metric: its gain per doubling of the steps and the steps to its goal."""
    lines = []
    last = curve.points[-1].steps if curve.points else 0
    for metric, fit in curve.fits.items():
        decimals = 2 if metric == "psnr" else 4
        line = (f"{metric}: {fit.intercept:+.{decimals}f} {fit.per_doubling:+.{decimals}f} x log2(steps) over "
                f"{fit.points} points, {fit.per_doubling:+.{decimals}f} per doubling of the steps "
                f"(rms residual {fit.rms_residual:.{decimals}f})")
        goal = curve.goals.get(metric)
        if goal is not None:
            reach = fit.steps_for(goal)
            line += f"; goal {goal:g} at about {_format_steps(reach)} steps"
            if reach is not None and math.isfinite(reach):
                line += f" ({max(reach - last, 0):,.0f} after the last point)"
        lines.append(line)
    return lines


def markdown_table(curve: Curve) -> str:
    rows = ["| steps | PSNR (dB) | MS-SSIM | images | model |", "|---|---|---|---|---|"]
    for p in curve.points:
        ms_ssim = "-" if p.ms_ssim is None else f"{p.ms_ssim:.4f}"
        rows.append(f"| {p.steps:,} | {p.psnr:.2f} | {ms_ssim} | {p.images} | {p.model} |")
    return "\n".join(rows + [""] + [f"- {line}" for line in projection_lines(curve)]) + "\n"


def csv_text(curve: Curve) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("model", "steps", "psnr", "ms_ssim", "images"))
    for p in curve.points:
        writer.writerow((p.model, p.steps, p.psnr, "" if p.ms_ssim is None else p.ms_ssim, p.images))
    return buffer.getvalue()


def plot_png(curve: Curve) -> bytes:
    """PSNR and MS-SSIM against steps on a log axis: the points, the fit extended to the goal, the goal."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    figure = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    for ax, metric, label in zip(axes, METRICS, ("PSNR (dB)", "MS-SSIM")):
        xy = [(p.steps, getattr(p, metric)) for p in curve.points if getattr(p, metric) is not None]
        if xy:
            ax.plot(*zip(*xy), "o", label="measured")
        fit, goal = curve.fits.get(metric), curve.goals.get(metric)
        if fit is not None and xy:
            end = max(x for x, _ in xy)
            reach = fit.steps_for(goal) if goal is not None else None
            if reach is not None and math.isfinite(reach):
                end = max(end, min(reach, end * 64))  # the projection, within six doublings of the data
            steps = np.geomspace(min(x for x, _ in xy), end, 100)
            ax.plot(steps, [fit.at(s) for s in steps], "--", label=f"fit: {fit.per_doubling:+.3g} per doubling")
        if goal is not None:
            ax.axhline(goal, color="grey", linewidth=0.8, label=f"goal {goal:g}")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
        ax.set_xlabel("training steps")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle("Learning curve (mean over images)")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def write_outputs(curve: Curve, out_dir: str | os.PathLike) -> dict[str, Path | None]:
    """curve.csv, curve.md and curve.png (skipped without matplotlib) in `out_dir`."""
    from latentd.vae.fileio import write_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path | None] = {"csv": out / "curve.csv", "markdown": out / "curve.md", "plot": out / "curve.png"}
    write_atomic(written["csv"], csv_text(curve).encode())
    write_atomic(written["markdown"], markdown_table(curve).encode())
    try:
        png = plot_png(curve)
    except ImportError:
        written["plot"] = None
    else:
        write_atomic(written["plot"], png)
    return written
