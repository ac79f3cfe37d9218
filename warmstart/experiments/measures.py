"""The measures :func:`~warmstart.experiments.summary.summarize` takes of each arm: the metric's
direction, per-seed statistics (:class:`Stat`), the reference arm's mean curve and the thresholds
set on it, the steps and seconds to reach them, the metric at equal step budgets and the AUC.

Example::

    ref = reference_curve("cold", cold_runs, "val_acc", higher=True)
    [t.name for t in thresholds_of(ref, DEFAULT_FRACTIONS)]  # ["50%", "80%", "90%", "95%", "final"]
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from warmstart.experiments.curves import band_over_seeds

if TYPE_CHECKING:
    from warmstart.experiments.curves import Run

# Relative slack when comparing a value with a target that is a mean of finals: the mean of three
# identical 0.8 is 0.8000000000000002, which the runs themselves would otherwise "never reach".
REACH_RTOL = 1e-9
DEFAULT_FRACTIONS = (0.5, 0.8, 0.9, 0.95)
DEFAULT_BUDGETS = (0.25, 0.5, 1.0)
Mode = Literal["auto", "max", "min"]
# Metric names that say lower is better: substrings, and whole tokens between _ / - . separators.
_LOWER_WORDS = ("loss", "error", "perplexity")
_LOWER_TOKENS = frozenset({"err", "ppl", "nll", "mse", "mae", "rmse", "wer", "cer"})


def metric_mode(metric: str) -> Literal["max", "min"]:
    """``"min"`` when the name says lower is better, else ``"max"``.

    Lower is better when the lower-cased name contains ``loss``, ``error`` or ``perplexity``, or
    has a token (split on anything but letters and digits) among ``err, ppl, nll, mse, mae, rmse,
    wer, cer``: ``val_loss``, ``val/err``, ``test_ppl`` are "min"; ``val_acc``, ``f1`` are "max".
    """
    name = metric.lower()
    tokens = set(re.split(r"[^a-z0-9]+", name))
    return "min" if any(w in name for w in _LOWER_WORDS) or tokens & _LOWER_TOKENS else "max"


def resolve_higher_is_better(metric: str, mode: str = "auto",
                             higher_is_better: bool | None = None) -> bool:
    """Direction of ``metric``: ``higher_is_better`` when given, else ``mode`` ("max" / "min"),
    else (``mode="auto"``) :func:`metric_mode` of the name. Raises ``ValueError`` on an unknown
    ``mode`` or when ``higher_is_better`` contradicts an explicit ``mode``."""
    if mode not in ("auto", "max", "min"):
        raise ValueError(f"mode={mode!r} is not one of 'auto', 'max', 'min'; pass 'max' for "
                         "accuracy-like metrics, 'min' for losses, or 'auto' to decide from the "
                         "metric name.")
    if higher_is_better is None:
        return (metric_mode(metric) if mode == "auto" else mode) == "max"
    if mode != "auto" and bool(higher_is_better) != (mode == "max"):
        raise ValueError(f"higher_is_better={higher_is_better} contradicts mode={mode!r}; pass "
                         "only one of them.")
    return bool(higher_is_better)


@dataclass(frozen=True)
class Stat:
    """Per-seed values of one measure; ``None`` marks a seed where it is undefined (not reached).

    ``mean`` and ``std`` are over the defined values; ``std`` is the sample standard deviation
    (ddof=1), ``None`` with fewer than two values. ``mean`` is ``None`` when no value is defined.
    """

    values: tuple[float | None, ...]

    @property
    def defined(self) -> list[float]:
        return [v for v in self.values if v is not None]

    @property
    def n(self) -> int:
        return len(self.defined)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.defined)) if self.defined else None

    @property
    def std(self) -> float | None:
        vals = self.defined
        if len(vals) < 2 or not all(math.isfinite(v) for v in vals):
            return None
        return float(np.std(vals, ddof=1))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": list(self.values)}


@dataclass(frozen=True)
class ReferenceCurve:
    """The reference arm's mean curve over its seeds (interpolated on the steps every seed covers,
    :func:`band_over_seeds`): ``start`` is its first value, at ``start_step`` (0 for tracker
    curves), ``best`` its best value (max, or min when lower is better) at ``best_step``;
    ``final`` is the mean of the seeds' finals."""

    arm: str
    n_seeds: int
    start_step: float
    start: float
    best: float
    best_step: float
    final: float

    @property
    def gain(self) -> float:
        """``best - start``: positive when higher is better, negative for a loss, 0 if no gain."""
        return self.best - self.start


@dataclass(frozen=True)
class Threshold:
    """``start + fraction * gain`` of the reference curve (``name`` "90%"), or, with ``fraction``
    ``None``, its final value (``name`` "final")."""

    name: str
    fraction: float | None
    value: float


@dataclass(frozen=True)
class Reach:
    """Step and wall-clock seconds of each seed's first evaluation that reaches ``threshold``."""

    threshold: str
    steps: Stat
    seconds: Stat


@dataclass(frozen=True)
class Budget:
    """``fraction`` of the steps: ``step = floor(fraction * total)``; ``name`` is "25%" etc."""

    name: str
    fraction: float
    step: int


@dataclass(frozen=True)
class AtBudget:
    """Each seed's value at its last evaluation at or before ``step`` (``None``: none there)."""

    budget: str
    step: int
    value: Stat


def _first_reach(
    steps: np.ndarray, seconds: np.ndarray, values: np.ndarray, target: float, higher: bool
) -> tuple[float | None, float | None]:
    tol = REACH_RTOL * max(1.0, abs(target))
    hit = values >= target - tol if higher else values <= target + tol
    if not hit.any():
        return None, None
    i = int(np.argmax(hit))
    return float(steps[i]), float(seconds[i])


def _value_at(steps: np.ndarray, values: np.ndarray, step: int) -> float | None:
    i = int(np.searchsorted(steps, step, side="right")) - 1
    return float(values[i]) if i >= 0 else None


def _auc(steps: np.ndarray, values: np.ndarray) -> float:
    span = float(steps[-1] - steps[0])
    if span == 0:
        return float(values[-1])
    return float(np.trapezoid(values, steps) / span)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None:
        return None
    return math.inf if den == 0 else num / den


def _check_fractions(name: str, fractions: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(f) for f in fractions)
    if not out or any(not 0 < f <= 1 for f in out) or len(set(out)) != len(out):
        raise ValueError(f"{name}={list(fractions)} must be distinct numbers in (0, 1], e.g. "
                         f"{list(DEFAULT_FRACTIONS if name == 'fractions' else DEFAULT_BUDGETS)}.")
    return tuple(sorted(out))


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def reference_curve(arm: str, runs: Sequence[Run], metric: str, higher: bool) -> ReferenceCurve:
    """The mean curve of ``runs`` (one arm's seeds) over steps; see :class:`ReferenceCurve`.
    Raises ``ValueError`` when the seeds share no step range."""
    series = [r.series(metric) for r in runs]
    grid, mean, _, _ = band_over_seeds([(s, v) for s, _, v in series])
    if not grid.size:
        ranges = [(int(s[0]), int(s[-1])) for s, _, _ in series]
        raise ValueError(f"the seeds of reference arm {arm!r} cover no common step range "
                         f"({ranges}), so they have no mean curve to set thresholds on; pass "
                         "runs that overlap in steps or another reference_arm=.")
    i = int(np.argmax(mean) if higher else np.argmin(mean))
    final = float(np.mean([v[-1] for _, _, v in series]))
    return ReferenceCurve(arm, len(runs), float(grid[0]), float(mean[0]), float(mean[i]),
                          float(grid[i]), final)


def thresholds_of(reference: ReferenceCurve, fractions: Sequence[float]) -> tuple[Threshold, ...]:
    """One :class:`Threshold` per fraction of the reference's gain, then its final value."""
    gains = [Threshold(_percent(f), f, reference.start + f * reference.gain) for f in fractions]
    return (*gains, Threshold("final", None, reference.final))


def _budgets(runs: Sequence[Run], metric: str, fractions: Sequence[float]) -> tuple[Budget, ...]:
    # The longest budget that every run covers, so that each arm is measured inside its own curve.
    total = min(int(r.series(metric)[0][-1]) for r in runs)
    return tuple(Budget(_percent(f), f, int(math.floor(f * total + 1e-9))) for f in fractions)
