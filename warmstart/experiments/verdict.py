"""The plain-language verdict of a summary: which arm reaches the reference arm's threshold first,
in how many steps and seconds, against the reference's, or why no arm does.

Example::

    verdict = decide_verdict("val_acc", True, summary.reference, threshold, summary.arms)
    print(verdict.text)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from warmstart.experiments.measures import Reach, ReferenceCurve, Stat, Threshold, _ratio

if TYPE_CHECKING:
    from warmstart.experiments.summary import ArmSummary

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
