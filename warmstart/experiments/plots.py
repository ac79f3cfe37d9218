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


def layer_norms(params: Sequence[dict], key: str) -> dict[str, float]:
    """Root sum of squares of ``param[key]`` per layer (the parameter name without its last
    component and row block: ``blocks.0.attn.qkv.weight[0:64]`` -> ``blocks.0.attn.qkv``), in
    the order the layers first appear."""
    sums: dict[str, float] = {}
    for p in params:
        layer = p["name"].split("[", 1)[0].rsplit(".", 1)[0]
        sums[layer] = sums.get(layer, 0.0) + float(p.get(key) or 0.0) ** 2
    return {layer: total**0.5 for layer, total in sums.items()}


def plot_update_norms(reports: dict[str, dict], title: str = "") -> Figure:
    """Per-layer ``||tau_B||`` (``norm_target``) of each transport report (a
    ``TransportReport.to_dict()``, keyed by run name, e.g. ``"theseus seed 0"``) and the
    source's ``||tau_A||`` (``norm_source``, from the first report) on the target's layers in
    report order. One colour per arm (the name's first word), one line style per run of an arm;
    a log scale when the norms span more than two decades."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    norms = {name: layer_norms(r.get("params", ()), "norm_target") for name, r in reports.items()}
    first = next(iter(reports.values()), {})
    source = layer_norms(first.get("params", ()), "norm_source")
    layers = list(dict.fromkeys(layer for n in (source, *norms.values()) for layer in n))
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.arange(len(layers))

    def series(values: dict[str, float]):
        y = np.array([values.get(layer, np.nan) for layer in layers], dtype=float)
        return np.where(y > 0, y, np.nan)

    colors = arm_colors(list(dict.fromkeys(name.split()[0] for name in norms)))
    styles, seen = ["-", "--", "-.", ":"], {}
    ax.plot(x, series(source), color="#999999", lw=2.5, alpha=0.6, label="source ||τ_A||")
    for name, values in norms.items():
        arm = name.split()[0]
        i = seen[arm] = seen.get(arm, -1) + 1
        ax.plot(x, series(values), color=colors[arm], ls=styles[i % len(styles)], lw=1.3,
                marker=".", label=f"{name} ||τ_B||")
    finite = np.concatenate([series(v) for v in (source, *norms.values())])
    finite = finite[np.isfinite(finite)]
    if finite.size and finite.max() > 100 * finite.min():
        ax.set_yscale("log")
    step = max(1, len(layers) // 40)
    labels = [layers[i] for i in range(0, len(layers), step)]
    turn = max(map(len, labels), default=0) > 4
    ax.set_xticks(x[::step], labels, rotation=70 if turn else 0, ha="right" if turn else "center",
                  fontsize=7)
    ax.set_xlabel("target layer (report order)")
    ax.set_ylabel("update norm")
    ax.grid(alpha=0.3)
    if not layers:
        ax.text(0.5, 0.5, "no parameters in the transport reports", ha="center", va="center",
                transform=ax.transAxes, color="gray")
    if norms:
        ax.legend(fontsize=8, ncols=min(4, len(norms) + 1))
    ax.set_title(title or "per-layer update norms")
    return fig
