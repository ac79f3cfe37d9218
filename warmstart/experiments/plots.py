"""Convergence plots of runs grouped by arm: metric against steps and against wall-clock seconds.

Uses matplotlib's object API with the Agg canvas only (no ``pyplot``), so it works headless and
never switches the backend of a notebook or GUI session that imports warmstart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from warmstart.experiments.curves import band_over_seeds

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from warmstart.experiments.curves import Run

# Fixed colours for the arms the toolkit ships; any other arm takes the next free tab10 colour.
ARM_COLORS = {"cold": "#4d4d4d", "theseus": "#1f77b4", "slice": "#ff7f0e", "head_only": "#2ca02c"}
_SPARE = ["#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]


def arm_colors(arms: Sequence[str]) -> dict[str, str]:
    """One colour per arm, stable for the shipped arms."""
    spare = iter(c for c in _SPARE * (len(arms) // len(_SPARE) + 1) if c not in ARM_COLORS.values())
    return {arm: ARM_COLORS.get(arm) or next(spare) for arm in arms}


def _panel(ax: Axes, runs: Sequence[Run], metric: str | None, x_key: str, colors: dict) -> None:
    x_label = "optimizer step" if x_key == "step" else "wall-clock seconds (transport included)"
    ax.set_xlabel(x_label)
    ax.set_ylabel(metric or "")
    ax.grid(alpha=0.3)
    if metric is None or not any((r.curve["metric"] == metric).any() for r in runs):
        ax.text(0.5, 0.5, f"no {metric!r} in the curves", ha="center", va="center",
                transform=ax.transAxes, color="gray")
        return
    for arm, color in colors.items():
        curves = []
        for run in (r for r in runs if r.arm == arm):
            steps, seconds, values = run.series(metric)
            if values.size:
                curves.append((steps if x_key == "step" else seconds, values))
        if not curves:
            continue
        grid, mean, low, high = band_over_seeds(curves)
        label = f"{arm} (n={len(curves)})"
        if grid.size < 2:  # seeds do not overlap: show each one instead of a band
            for i, (x, y) in enumerate(curves):
                ax.plot(x, y, color=color, lw=1, marker=".", label=label if i == 0 else None)
            continue
        ax.plot(grid, mean, color=color, lw=1.8, label=label)
        ax.fill_between(grid, low, high, color=color, alpha=0.18, lw=0)


def _reference_lines(ax: Axes, target: float | None,
                     thresholds: Sequence[tuple[str, float]]) -> None:
    if target is not None:
        ax.axhline(target, color="black", ls="--", lw=0.8, label=f"target {target:.4g}")
    for label, value in thresholds:
        ax.axhline(value, color="black", ls=":", lw=0.8, label=f"{label} {value:.4g}")


def plot_convergence(
    runs: Sequence[Run],
    *,
    metric: str = "val_acc",
    loss_metric: str | None = "val_loss",
    target: float | None = None,
    thresholds: Sequence[tuple[str, float]] = (),
    title: str = "",
) -> Figure:
    """2x2 grid: ``metric`` and ``loss_metric`` against steps (left) and seconds (right).

    One colour per arm; the line is the mean over seeds and the shaded band spans min..max over
    seeds on a common grid (:func:`band_over_seeds`). ``target`` draws the dashed reference line on
    the metric panels; each ``(label, value)`` of ``thresholds`` a dotted one. A metric absent
    from every curve leaves its panels empty with a note.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    colors = arm_colors(list(dict.fromkeys(r.arm for r in runs)))
    for row, name in enumerate((metric, loss_metric)):
        for col, x_key in enumerate(("step", "seconds")):
            ax = axes[row, col]
            _panel(ax, runs, name, x_key, colors)
            ax.set_title(f"{name or 'loss'} vs {'steps' if x_key == 'step' else 'seconds'}")
            if row == 0:
                _reference_lines(ax, target, thresholds)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6))
    if title:
        fig.suptitle(title)
    return fig
