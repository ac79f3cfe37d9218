"""Curves and runs: reading the CSVs that
:class:`~warmstart.lightning.callbacks.ConvergenceTracker` writes, and averaging seeds' curves.

A *curve* is one CSV per run, with columns ``step,seconds,metric,value``: ``step`` is the optimizer
step (0 = before any training, right after the transport), ``seconds`` the wall-clock time since
fit start (transport included). A *run* is a curve plus its ``arm`` (``cold``, ``theseus``,
``slice``, ``head_only``, ...) and ``seed``.

Example::

    runs = load_runs({("cold", 0): "cold0.csv", ("theseus", 0): "theseus0.csv"})
    steps, seconds, values = runs[0].series("val_acc")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

CURVE_COLUMNS = ("step", "seconds", "metric", "value")


def _normalize_curve(frame: pd.DataFrame, where: str) -> pd.DataFrame:
    missing = [c for c in CURVE_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(
            f"curve {where} lacks columns {missing}; found {list(frame.columns)}, expected "
            f"{list(CURVE_COLUMNS)} as written by ConvergenceTracker. Fix the header or the file."
        )
    frame = frame.loc[:, list(CURVE_COLUMNS)].dropna(subset=["value"])
    frame = frame.astype({"step": "int64", "seconds": "float64", "metric": str, "value": "float64"})
    # A tracker may log the same step twice (interval and epoch end): keep the later point.
    frame = frame.drop_duplicates(subset=["metric", "step"], keep="last")
    return frame.sort_values(["metric", "step"], kind="stable").reset_index(drop=True)


def read_curve(path: str | Path) -> pd.DataFrame:
    """Read one curve CSV into a frame with columns ``step, seconds, metric, value``.

    Rows are sorted by (metric, step); NaN values are dropped; a repeated (metric, step) keeps its
    last row. Raises ``ValueError`` when a column is missing.
    """
    return _normalize_curve(pd.read_csv(path), str(path))


@dataclass(frozen=True, eq=False)
class Run:
    """One fine-tuning run: its ``arm``, its ``seed`` and its curve (see :func:`read_curve`)."""

    arm: str
    seed: int
    curve: pd.DataFrame

    def __post_init__(self) -> None:
        object.__setattr__(self, "curve",
                           _normalize_curve(self.curve, f"({self.arm!r}, {self.seed})"))

    def series(self, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(steps, seconds, values)`` of one metric, sorted by step, each of shape [n_points]."""
        rows = self.curve[self.curve["metric"] == metric]
        return rows["step"].to_numpy(), rows["seconds"].to_numpy(), rows["value"].to_numpy()


def load_runs(paths: Mapping[tuple[str, int], str | Path]) -> list[Run]:
    """Read ``{(arm, seed): csv_path}`` into runs, in the mapping's order."""
    return [Run(arm, int(seed), read_curve(path)) for (arm, seed), path in paths.items()]


def band_over_seeds(
    curves: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Interpolate seeds' curves ``(x [n_i], y [n_i])`` onto a common grid.

    The grid is the union of the seeds' x values inside the range that every seed covers (no
    extrapolation). Returns ``(grid, mean, low, high)``, each [n_grid], where low/high are the min
    and max over seeds. An empty overlap gives empty arrays.
    """
    lo = max(float(x[0]) for x, _ in curves)
    hi = min(float(x[-1]) for x, _ in curves)
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    ys = np.stack([np.interp(grid, x, y) for x, y in curves]) if grid.size else np.empty((1, 0))
    return grid, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)
