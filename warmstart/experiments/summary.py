"""Loading and summarising of warm-started and cold-start fine-tuning runs.

A *curve* is what :class:`~warmstart.lightning.callbacks.ConvergenceTracker` writes, one CSV per
run, with columns ``step,seconds,metric,value``: ``step`` is the optimizer step (0 = before any
training, right after the transport), ``seconds`` the wall-clock time since fit start (transport
included). A *run* is a curve plus its ``arm`` (``cold``, ``theseus``, ``slice``, ``head_only``,
...) and ``seed``. :func:`summarize` turns runs into the measures of DESIGN.md §7: time to reach
thresholds set on the reference arm's curve, the metric at equal budgets, and a verdict;
rendering them is :mod:`warmstart.experiments.report`'s job.

Example::

    runs = load_runs({("cold", 0): "cold0.csv", ("theseus", 0): "theseus0.csv"})
    summary = summarize(runs)
    print(summary.verdict.text)
    print(summary.arm("theseus").reached("90%").steps.mean)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

CURVE_COLUMNS = ("step", "seconds", "metric", "value")
# Relative slack when comparing a value with a target that is a mean of finals: the mean of three
# identical 0.8 is 0.8000000000000002, which the runs themselves would otherwise "never reach".
REACH_RTOL = 1e-9
DEFAULT_FRACTIONS = (0.5, 0.8, 0.9, 0.95)
DEFAULT_BUDGETS = (0.25, 0.5, 1.0)
Mode = Literal["auto", "max", "min"]
# Metric names that say lower is better: substrings, and whole tokens between _ / - . separators.
_LOWER_WORDS = ("loss", "error", "perplexity")
_LOWER_TOKENS = frozenset({"err", "ppl", "nll", "mse", "mae", "rmse", "wer", "cer"})


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


@dataclass(frozen=True)
class Verdict:
    """The headline (see :func:`decide_verdict`): ``text`` is one sentence built from the numbers;
    ``arm`` is the best non-reference arm at ``threshold`` (``None`` when none reached it), the
    other fields are means over the seeds that reached it."""

    text: str
    threshold: str
    value: float
    arm: str | None = None
    steps: float | None = None
    seconds: float | None = None
    reference_steps: float | None = None
    reference_seconds: float | None = None
    speedup_steps: float | None = None
    speedup_seconds: float | None = None
    beats_reference: bool = False
    n_reached: int = 0
    n_seeds: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


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
    step0_seconds: Stat = Stat(())
    reach: tuple[Reach, ...] = ()
    at_budget: tuple[AtBudget, ...] = ()

    @property
    def n_reached(self) -> int:
        return self.steps_to_target.n

    def reached(self, threshold: str) -> Reach:
        """The :class:`Reach` of one threshold by name ("50%", ..., "final")."""
        return _by_name(self.reach, "threshold", threshold)

    def budget(self, name: str) -> AtBudget:
        """The :class:`AtBudget` of one budget by name ("25%", "50%", "100%")."""
        return _by_name(self.at_budget, "budget", name)


def _by_name(items: Sequence[Any], attr: str, name: str) -> Any:
    for item in items:
        if getattr(item, attr) == name:
            return item
    raise KeyError(f"no {attr} {name!r}; known: {[getattr(i, attr) for i in items]}")


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
    reference: ReferenceCurve | None = None
    thresholds: tuple[Threshold, ...] = ()
    budgets: tuple[Budget, ...] = ()
    verdict: Verdict | None = None

    @property
    def mode(self) -> Literal["max", "min"]:
        return "max" if self.higher_is_better else "min"

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
            "mode": self.mode,
            "reference_arm": self.reference_arm,
            "verdict": self.verdict.to_dict() if self.verdict else None,
            "reference": (self.reference.__dict__ | {"gain": self.reference.gain}
                          if self.reference else None),
            "thresholds": [self._threshold_row(t) for t in self.thresholds],
            "budgets": self._budget_table(),
            "target": self.target,
            "reference_steps_to_final": self.reference_steps_to_final.to_dict(),
            "reference_seconds_to_final": self.reference_seconds_to_final.to_dict(),
            "arms": arms,
            "extra": self.extra,
        }
        return _jsonable(out)

    def _threshold_row(self, t: Threshold) -> dict[str, Any]:
        arms = {a.arm: {"steps": a.reached(t.name).steps.to_dict(),
                        "seconds": a.reached(t.name).seconds.to_dict(),
                        "n_reached": a.reached(t.name).steps.n, "n_seeds": len(a.seeds)}
                for a in self.arms}
        return {"name": t.name, "fraction": t.fraction, "value": t.value, "arms": arms}

    def _budget_table(self) -> dict[str, Any]:
        points = [{"name": b.name, "fraction": b.fraction, "step": b.step,
                   "arms": {a.arm: a.budget(b.name).value.to_dict() for a in self.arms}}
                  for b in self.budgets]
        total = self.budgets[-1].step if self.budgets else None
        return {"total_steps": total, "points": points,
                "auc": {a.arm: a.auc.to_dict() for a in self.arms}}


_STAT_FIELDS = (
    "step0", "final", "last_step", "auc", "steps_to_target", "seconds_to_target",
    "speedup_steps", "speedup_seconds", "step0_seconds",
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


def _arm_summary(arm: str, runs: Sequence[Run], metric: str, higher: bool, target: float,
                 reference: tuple[Stat, Stat], thresholds: Sequence[Threshold],
                 budgets: Sequence[Budget]) -> ArmSummary:
    cols: dict[str, list[float | None]] = {k: [] for k in _STAT_FIELDS}
    reach: list[list[tuple[float | None, float | None]]] = [[] for _ in thresholds]
    at_budget: list[list[float | None]] = [[] for _ in budgets]
    for run in runs:
        steps, seconds, values = run.series(metric)
        reach_step, reach_sec = _first_reach(steps, seconds, values, target, higher)
        cols["step0"].append(float(values[0]))
        cols["step0_seconds"].append(float(seconds[0]))
        cols["final"].append(float(values[-1]))
        cols["last_step"].append(float(steps[-1]))
        cols["auc"].append(_auc(steps, values))
        cols["steps_to_target"].append(reach_step)
        cols["seconds_to_target"].append(reach_sec)
        cols["speedup_steps"].append(_ratio(reference[0].mean, reach_step))
        cols["speedup_seconds"].append(_ratio(reference[1].mean, reach_sec))
        for i, t in enumerate(thresholds):
            reach[i].append(_first_reach(steps, seconds, values, t.value, higher))
        for i, b in enumerate(budgets):
            at_budget[i].append(_value_at(steps, values, b.step))
    return ArmSummary(
        arm=arm, seeds=tuple(r.seed for r in runs), **{k: Stat(tuple(v)) for k, v in cols.items()},
        reach=tuple(Reach(t.name, Stat(tuple(s for s, _ in r)), Stat(tuple(x for _, x in r)))
                    for t, r in zip(thresholds, reach)),
        at_budget=tuple(AtBudget(b.name, b.step, Stat(tuple(v)))
                        for b, v in zip(budgets, at_budget)),
    )


def summarize(
    runs: Sequence[Run],
    *,
    metric: str = "val_acc",
    higher_is_better: bool | None = None,
    reference_arm: str = "cold",
    extra: dict[str, Any] | None = None,
    mode: Mode = "auto",
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    verdict_fraction: float = 0.9,
) -> Summary:
    """Compare arms over seeds on one metric (DESIGN.md §7). Each measure is per seed, then
    mean ± sample std over the arm's seeds:

    - direction: ``higher_is_better`` when given, else ``mode`` ("max" / "min"), else from the
      metric's name (:func:`metric_mode`: ``loss``, ``error``, ``perplexity``... are "min").
    - "reaches v": value >= v (higher is better) or <= v (otherwise), with a relative slack of
      ``REACH_RTOL`` so that a run whose final equals the target reaches it; the *first*
      evaluation that does counts.
    - ``Summary.reference``: the reference arm's mean curve over its seeds (one curve, not one per
      seed, so that every arm is measured against the same numbers): its step-0 value ``start``,
      its best value ``best`` and the mean of its seeds' finals ``final``.
    - ``Summary.thresholds``: ``start + f * (best - start)`` for each of ``fractions`` ("50%" ...
      "95%" of the reference's gain), then "final". ``ArmSummary.reach``: per threshold, the step
      and wall-clock seconds (transport included) of each seed's first evaluation that reaches
      it, ``None`` for a seed that never does; ``Stat.n`` counts the seeds that did.
    - ``Summary.budgets``: ``floor(f * total)`` for each of ``budgets``, where ``total`` is the
      smallest last step over all runs (the longest budget every run covers);
      ``ArmSummary.at_budget``: the value at the last evaluation at or before that step.
    - ``auc``: trapezoid integral of the value over steps divided by the step span, i.e. the mean
      metric over training (the single value when the curve has one point).
    - ``Summary.verdict``: :func:`decide_verdict` at the ``verdict_fraction`` threshold.
    - ``step0`` / ``step0_seconds``: value and seconds of the first point (right after the
      transport); ``final``: the value at the last point; ``last_step``: that step.
    - legacy measures: ``target`` = the reference's ``final``; ``steps_to_target`` /
      ``seconds_to_target`` reach it; ``reference_steps_to_final`` / ``..._seconds_...``: per
      reference seed, when it first reaches its *own* final value; ``speedup_steps`` = their mean
      / the seed's steps to target (``inf`` at step 0), ``speedup_seconds`` likewise. A threshold
      at the reference's final value hides every head start: read the thresholds first.

    Raises ``ValueError`` when the reference arm is missing, a run lacks ``metric``, an (arm,
    seed) is given twice, ``mode`` or a fraction is invalid, ``verdict_fraction`` is not among
    ``fractions``, or the reference seeds share no step range. ``extra`` (JSON-able) is carried
    into the summary as is.
    """
    higher = resolve_higher_is_better(metric, mode, higher_is_better)
    fractions, budget_fractions = _check_fractions("fractions", fractions), _check_fractions(
        "budgets", budgets)
    if float(verdict_fraction) not in fractions:
        raise ValueError(f"verdict_fraction={verdict_fraction} is not among fractions="
                         f"{list(fractions)}; add it there or pick one of them.")
    by_arm = _check_runs(runs, metric, reference_arm)
    reference = reference_curve(reference_arm, by_arm[reference_arm], metric, higher)
    thresholds = thresholds_of(reference, fractions)
    budget_list = _budgets(runs, metric, budget_fractions)
    ref_series = [r.series(metric) for r in by_arm[reference_arm]]
    ref_reach = [_first_reach(s, t, v, float(v[-1]), higher) for s, t, v in ref_series]
    ref_stats = (Stat(tuple(s for s, _ in ref_reach)), Stat(tuple(t for _, t in ref_reach)))
    arms = tuple(_arm_summary(arm, arm_runs, metric, higher, reference.final, ref_stats,
                              thresholds, budget_list) for arm, arm_runs in by_arm.items())
    key = next(t for t in thresholds if t.fraction == float(verdict_fraction))
    return Summary(
        metric=metric, higher_is_better=higher, reference_arm=reference_arm,
        target=reference.final, reference_steps_to_final=ref_stats[0],
        reference_seconds_to_final=ref_stats[1], arms=arms, extra=dict(extra or {}),
        reference=reference, thresholds=thresholds, budgets=budget_list,
        verdict=decide_verdict(metric, higher, reference, key, arms),
    )


def _num(x: float) -> str:
    """A step count: "36", "25.5"."""
    return f"{x:.1f}".removesuffix(".0")


def _times(x: float) -> str:
    return "∞x" if math.isinf(x) else f"{x:.1f}x"


def _seeds(stat: Stat) -> str:
    return "" if stat.n == len(stat.values) else f" ({stat.n} of {len(stat.values)} seeds)"


def _steps_phrase(reach: Reach) -> str:
    steps = reach.steps.mean
    return ("at step 0" if steps == 0 else f"in {_num(steps)} steps") + _seeds(reach.steps)


def _rank(arm: ArmSummary, threshold: str) -> tuple[float, float, float]:
    reach = arm.reached(threshold)
    return (-reach.steps.n / len(arm.seeds), reach.steps.mean, reach.seconds.mean)


def _wall_clause(ref: ArmSummary, arm: ArmSummary, reach: Reach, ref_reach: Reach) -> str:
    sec, ref_sec = reach.seconds.mean, ref_reach.seconds.mean
    ratio = _ratio(ref_sec, sec)
    pace = (f"{_times(ratio)} sooner" if ratio > 1 else "just as soon" if ratio == 1
            else f"{_times(1 / ratio)} later" if ratio > 0 else "later")
    return (f"counting wall-clock time from fit start, transport included (first evaluation at "
            f"{arm.step0_seconds.mean:.1f} s, {ref.arm}'s at {ref.step0_seconds.mean:.1f} s), it "
            f"got there in {sec:.1f} s ({ref.arm}: {ref_sec:.1f} s), {pace}")


def decide_verdict(metric: str, higher: bool, reference: ReferenceCurve, threshold: Threshold,
                   arms: Sequence[ArmSummary]) -> Verdict:
    """One sentence on ``threshold``: the best non-reference arm (most seeds reaching it, then
    fewest mean steps, then fewest seconds), its steps and seconds against the reference arm's
    (``arms[0]``), or why there is no such arm. Steps and seconds are means over the seeds that
    reached; the seconds count from fit start, so they include the transport."""
    ref, others = arms[0], arms[1:]
    ref_reach = ref.reached(threshold.name)
    base = {"threshold": threshold.name, "value": threshold.value,
            "reference_steps": ref_reach.steps.mean, "reference_seconds": ref_reach.seconds.mean}
    goal = (f"{threshold.name} of {ref.arm}'s gain ({metric} {'≥' if higher else '≤'} "
            f"{threshold.value:.4g})")
    if not others:
        return Verdict(f"only {ref.arm} was run: there is no other arm to compare with it.", **base)
    if reference.gain == 0:
        return Verdict(f"{ref.arm} never improved on its step-0 {metric} ({reference.start:.4g}), "
                       "so there is no gain to reach sooner; compare the arms at equal budgets.",
                       **base)
    ref_text = (f"{ref.arm} took {_num(ref_reach.steps.mean)} steps{_seeds(ref_reach.steps)}"
                if ref_reach.steps.n else f"{ref.arm} never did")
    reached = [a for a in others if a.reached(threshold.name).steps.n]
    if not reached:
        return Verdict(f"no arm reached {goal} within its steps; {ref_text}.", **base)
    best = min(reached, key=lambda a: _rank(a, threshold.name))
    reach = best.reached(threshold.name)
    found = {"arm": best.arm, "steps": reach.steps.mean, "seconds": reach.seconds.mean,
             "n_reached": reach.steps.n, "n_seeds": len(best.seeds)}
    head = f"{best.arm} reached {goal} {_steps_phrase(reach)}"
    if not ref_reach.steps.n:
        return Verdict(f"{head} and {reach.seconds.mean:.1f} s (transport included); {ref_text}.",
                       beats_reference=True, **found, **base)
    speed = {"speedup_steps": _ratio(ref_reach.steps.mean, reach.steps.mean),
             "speedup_seconds": _ratio(ref_reach.seconds.mean, reach.seconds.mean)}
    beats = reach.steps.mean < ref_reach.steps.mean
    partial = _seeds(ref_reach.steps).replace(" (", ", in ").rstrip(")")
    versus = f"({ref.arm}: {_num(ref_reach.steps.mean)}{partial})"
    if not beats:
        head = f"no arm beat {ref.arm}: the fastest, {head} {versus}"
    elif reach.steps.mean == 0:
        head = f"{head} {versus}"
    else:
        head = f"{head} {versus}, {_times(speed['speedup_steps'])} fewer steps"
    text = f"{head}; {_wall_clause(ref, best, reach, ref_reach)}."
    return Verdict(text, beats_reference=beats, **speed, **found, **base)
