"""Loading and summarising of warm-started and cold-start fine-tuning runs.

A *curve* is what :class:`~warmstart.lightning.callbacks.ConvergenceTracker` writes, one CSV per run, with
columns ``step,seconds,metric,value``: ``step`` is the optimizer step (0 = before any training,
right after the transport), ``seconds`` the wall-clock time since fit start (transport included).
A *run* is a curve plus its ``arm`` (``cold``, ``theseus``, ``slice``, ``head_only``, ...) and
``seed``. :func:`summarize` turns runs into the measures of DESIGN.md §7; rendering them is
:mod:`warmstart.experiments.report`'s job.

Example::

    runs = load_runs({("cold", 0): "cold0.csv", ("theseus", 0): "theseus0.csv"})
    print(summarize(runs).arm("theseus").speedup_steps.mean)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

CURVE_COLUMNS = ("step", "seconds", "metric", "value")
# Relative slack when comparing a value with a target that is a mean of finals: the mean of three
# identical 0.8 is 0.8000000000000002, which the runs themselves would otherwise "never reach".
REACH_RTOL = 1e-9


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
class ArmSummary:
    """Measures of one arm; every :class:`Stat` is aligned with ``seeds``. See :func:`summarize`."""

    arm: str
    seeds: tuple[int, ...]
    step0: Stat
    final: Stat
    last_step: Stat
    auc: Stat
    steps_to_target: Stat
    seconds_to_target: Stat
    speedup_steps: Stat
    speedup_seconds: Stat

    @property
    def n_reached(self) -> int:
        return self.steps_to_target.n


@dataclass(frozen=True)
class Summary:
    """Result of :func:`summarize`. ``to_dict()`` is JSON-able (infinities become ``"inf"``)."""

    metric: str
    higher_is_better: bool
    reference_arm: str
    target: float
    reference_steps_to_final: Stat
    reference_seconds_to_final: Stat
    arms: tuple[ArmSummary, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    def arm(self, name: str) -> ArmSummary:
        for arm in self.arms:
            if arm.arm == name:
                return arm
        raise KeyError(f"no arm {name!r}; arms: {[a.arm for a in self.arms]}")

    def to_dict(self) -> dict[str, Any]:
        arms = {
            a.arm: {"seeds": list(a.seeds), "n_reached": a.n_reached}
            | {k: getattr(a, k).to_dict() for k in _STAT_FIELDS}
            for a in self.arms
        }
        out = {
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "reference_arm": self.reference_arm,
            "target": self.target,
            "reference_steps_to_final": self.reference_steps_to_final.to_dict(),
            "reference_seconds_to_final": self.reference_seconds_to_final.to_dict(),
            "arms": arms,
            "extra": self.extra,
        }
        return _jsonable(out)


_STAT_FIELDS = (
    "step0", "final", "last_step", "auc", "steps_to_target", "seconds_to_target",
    "speedup_steps", "speedup_seconds",
)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else str(float(obj))  # "inf", "-inf", "nan"
    return int(obj) if isinstance(obj, np.integer) else obj


def _first_reach(
    steps: np.ndarray, seconds: np.ndarray, values: np.ndarray, target: float, higher: bool
) -> tuple[float | None, float | None]:
    tol = REACH_RTOL * max(1.0, abs(target))
    hit = values >= target - tol if higher else values <= target + tol
    if not hit.any():
        return None, None
    i = int(np.argmax(hit))
    return float(steps[i]), float(seconds[i])


def _auc(steps: np.ndarray, values: np.ndarray) -> float:
    span = float(steps[-1] - steps[0])
    if span == 0:
        return float(values[-1])
    return float(np.trapezoid(values, steps) / span)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None:
        return None
    return math.inf if den == 0 else num / den


def _check_runs(runs: Sequence[Run], metric: str, reference_arm: str) -> dict[str, list[Run]]:
    by_arm: dict[str, list[Run]] = {}
    for run in runs:
        if any(r.seed == run.seed for r in by_arm.get(run.arm, [])):
            raise ValueError(f"run ({run.arm!r}, {run.seed}) is given twice; pass each run once.")
        if not (run.curve["metric"] == metric).any():
            raise ValueError(
                f"run ({run.arm!r}, {run.seed}) has no {metric!r} points; its metrics are "
                f"{sorted(run.curve['metric'].unique())}. Pass metric= one of them."
            )
        by_arm.setdefault(run.arm, []).append(run)
    if reference_arm not in by_arm:
        raise ValueError(
            f"reference arm {reference_arm!r} is not among the runs; arms present: "
            f"{sorted(by_arm)}. Add its runs or pass reference_arm= one of the arms present."
        )
    # Reference first, then the arms in the order they were given.
    return {reference_arm: by_arm.pop(reference_arm)} | by_arm


def summarize(
    runs: Sequence[Run],
    *,
    metric: str = "val_acc",
    higher_is_better: bool = True,
    reference_arm: str = "cold",
    extra: dict[str, Any] | None = None,
) -> Summary:
    """Compare arms over seeds on one metric (DESIGN.md §7). Each measure is per seed, then
    mean ± sample std over the arm's seeds:

    - ``step0``: the value at the first recorded step (step 0, i.e. right after the transport and
      before any training, for ConvergenceTracker curves).
    - ``final``: the value at the last recorded step; ``last_step`` is that step (the budget).
    - ``target``: the reference arm's ``final``, averaged over its seeds (one number).
    - "reaches v": value >= v (``higher_is_better``) or <= v (otherwise), with a relative slack of
      ``REACH_RTOL`` so that a run whose final equals the target reaches it.
    - ``steps_to_target`` / ``seconds_to_target``: step and wall-clock seconds (transport included)
      of the first point that reaches ``target``; ``None`` for a seed that never does ("not
      reached"). Means are over the seeds that reached; ``ArmSummary.n_reached`` counts them.
    - ``reference_steps_to_final`` / ``..._seconds_...``: per reference seed, the first step (and
      its seconds) at which that seed reaches its *own* final value, i.e. when the cold run had done
      its useful work; the mean over reference seeds is the numerator of the speedups.
    - ``speedup_steps``: mean reference steps-to-final / this seed's steps-to-target (``inf`` when
      reached at step 0, ``None`` when never reached); ``speedup_seconds`` likewise in seconds.
    - ``auc``: trapezoid integral of the value over steps divided by the step span, i.e. the mean
      metric over training (the single value when the curve has one point).

    Raises ``ValueError`` when the reference arm is missing, a run lacks ``metric``, or an
    (arm, seed) is given twice. ``extra`` (JSON-able) is carried into the summary as is.
    """
    by_arm = _check_runs(runs, metric, reference_arm)
    ref_series = [r.series(metric) for r in by_arm[reference_arm]]
    target = float(np.mean([v[-1] for _, _, v in ref_series]))
    ref_reach = [_first_reach(s, t, v, float(v[-1]), higher_is_better) for s, t, v in ref_series]
    ref_steps = Stat(tuple(s for s, _ in ref_reach))
    ref_seconds = Stat(tuple(t for _, t in ref_reach))
    arms = []
    for arm, arm_runs in by_arm.items():
        cols: dict[str, list[float | None]] = {k: [] for k in _STAT_FIELDS}
        for run in arm_runs:
            steps, seconds, values = run.series(metric)
            reach_step, reach_sec = _first_reach(steps, seconds, values, target, higher_is_better)
            cols["step0"].append(float(values[0]))
            cols["final"].append(float(values[-1]))
            cols["last_step"].append(float(steps[-1]))
            cols["auc"].append(_auc(steps, values))
            cols["steps_to_target"].append(reach_step)
            cols["seconds_to_target"].append(reach_sec)
            cols["speedup_steps"].append(_ratio(ref_steps.mean, reach_step))
            cols["speedup_seconds"].append(_ratio(ref_seconds.mean, reach_sec))
        stats = {k: Stat(tuple(v)) for k, v in cols.items()}
        arms.append(ArmSummary(arm=arm, seeds=tuple(r.seed for r in arm_runs), **stats))
    return Summary(
        metric=metric,
        higher_is_better=higher_is_better,
        reference_arm=reference_arm,
        target=target,
        reference_steps_to_final=ref_steps,
        reference_seconds_to_final=ref_seconds,
        arms=tuple(arms),
        extra=dict(extra or {}),
    )
