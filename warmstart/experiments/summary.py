"""Summaries of warm-started and cold-start fine-tuning runs.

:func:`summarize` turns runs (:mod:`warmstart.experiments.curves`) into the measures of DESIGN.md
§7: time to reach thresholds set on the reference arm's curve, the metric at equal budgets
(:mod:`warmstart.experiments.measures`), and a verdict (:mod:`warmstart.experiments.verdict`);
rendering them is :mod:`warmstart.experiments.report`'s job. The names of those modules that
callers use are importable from here as well.

Example::

    runs = load_runs({("cold", 0): "cold0.csv", ("theseus", 0): "theseus0.csv"})
    summary = summarize(runs)
    print(summary.verdict.text)
    print(summary.arm("theseus").reached("90%").steps.mean)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from warmstart.experiments.curves import CURVE_COLUMNS, Run, band_over_seeds, load_runs, read_curve
from warmstart.experiments.measures import (
    DEFAULT_BUDGETS,
    DEFAULT_FRACTIONS,
    REACH_RTOL,
    AtBudget,
    Budget,
    Mode,
    Reach,
    ReferenceCurve,
    Stat,
    Threshold,
    _auc,
    _budgets,
    _check_fractions,
    _first_reach,
    _ratio,
    _value_at,
    metric_mode,
    reference_curve,
    resolve_higher_is_better,
    thresholds_of,
)
from warmstart.experiments.verdict import Verdict, decide_verdict

__all__ = [
    "CURVE_COLUMNS", "DEFAULT_BUDGETS", "DEFAULT_FRACTIONS", "REACH_RTOL", "ArmSummary", "AtBudget",
    "Budget", "Mode", "Reach", "ReferenceCurve", "Run", "Stat", "Summary", "Threshold", "Verdict",
    "band_over_seeds", "decide_verdict", "load_runs", "metric_mode", "read_curve",
    "reference_curve", "resolve_higher_is_better", "summarize", "thresholds_of",
]

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
