"""Thresholds on the reference curve, equal budgets and the verdict, on planted linear curves whose
answers are known exactly."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from warmstart.experiments.summary import (
    Run,
    Stat,
    decide_verdict,
    metric_mode,
    resolve_higher_is_better,
    summarize,
)

STEPS = np.arange(0, 41)  # one evaluation per step, 40 steps


def line(y0, y1, *, transport_s=0.0, steps=STEPS, sec_per_step=0.5, metric="val_acc"):
    """A curve going linearly from y0 at step 0 to y1 at the last step; with metric="both" it holds
    val_acc and val_loss = 1 - val_acc."""
    acc = np.interp(steps, [steps[0], steps[-1]], [y0, y1])
    seconds = transport_s + sec_per_step * steps
    pairs = [("val_acc", acc), ("val_loss", 1 - acc)] if metric == "both" else [(metric, acc)]
    return pd.concat([pd.DataFrame({"step": steps, "seconds": seconds, "metric": m, "value": v})
                      for m, v in pairs], ignore_index=True)


def cold(seed=0, **kw):
    """cold: 0.1 -> 0.9 over 40 steps, 0.5 s a step from 0 s: it reaches v at (v - 0.1) / 0.02."""
    return Run("cold", seed, line(0.1, 0.9, **kw))


def planted(metric="val_acc"):
    """Two identical cold seeds; theseus starts at 0.8 (0.005 a step) after a 3 s transport."""
    return [cold(0, metric=metric), cold(1, metric=metric),
            Run("theseus", 0, line(0.8, 1.0, transport_s=3, metric=metric))]


def test_thresholds_on_the_reference_curve():
    s = summarize(planted())
    ref = s.reference
    assert (ref.arm, ref.n_seeds, ref.start_step, ref.best_step) == ("cold", 2, 0.0, 40.0)
    assert (ref.start, ref.best, ref.final, ref.gain) == pytest.approx((0.1, 0.9, 0.9, 0.8))
    assert [t.name for t in s.thresholds] == ["50%", "80%", "90%", "95%", "final"]
    assert [t.fraction for t in s.thresholds] == [0.5, 0.8, 0.9, 0.95, None]
    assert [t.value for t in s.thresholds] == pytest.approx([0.5, 0.74, 0.82, 0.86, 0.9])


def test_best_is_the_peak_not_the_final_value():
    # cold overfits: 0.1 -> 0.9 at step 30, back to 0.8 at step 40.
    peaked = np.interp(STEPS, [0, 30, 40], [0.1, 0.9, 0.8])
    runs = [Run("cold", 0, pd.DataFrame({"step": STEPS, "seconds": 0.5 * STEPS,
                                         "metric": "val_acc", "value": peaked}))]
    s = summarize(runs)
    assert (s.reference.best, s.reference.best_step) == pytest.approx((0.9, 30))
    assert s.thresholds[2].value == pytest.approx(0.82) and s.thresholds[-1].value == 0.8
    assert s.arm("cold").reached("90%").steps.mean == 27  # 0.1 + 0.8 * 27 / 30 = 0.82
    assert s.arm("cold").reached("final").steps.mean == 27  # first time at 0.8 is step 26.25


def test_steps_and_seconds_to_each_threshold():
    s = summarize(planted())
    names = [t.name for t in s.thresholds]
    c, th = s.arm("cold"), s.arm("theseus")
    assert [c.reached(n).steps.values for n in names] == [(v, v) for v in (20, 32, 36, 38, 40)]
    assert [c.reached(n).seconds.mean for n in names] == [10, 16, 18, 19, 20]
    assert c.reached("90%").steps.std == 0.0
    # theseus is past 50% and 80% at step 0; 0.8 + 0.005 s reaches 0.82 at 4, 0.86 at 12, 0.9 at 20
    assert [th.reached(n).steps.values for n in names] == [(0,), (0,), (4,), (12,), (20,)]
    assert [th.reached(n).seconds.values for n in names] == [(3,), (3,), (5,), (9,), (13,)]
    assert th.reached("90%").steps.std is None  # one seed
    assert th.step0_seconds.values == (3.0,) and c.step0_seconds.mean == 0.0


def test_budgets_and_auc():
    s = summarize(planted())
    assert [(b.name, b.fraction, b.step) for b in s.budgets] == [
        ("25%", 0.25, 10), ("50%", 0.5, 20), ("100%", 1.0, 40)]
    c, th = s.arm("cold"), s.arm("theseus")
    assert [c.budget(b.name).value.mean for b in s.budgets] == pytest.approx([0.3, 0.5, 0.9])
    assert [th.budget(b.name).value.mean for b in s.budgets] == pytest.approx([0.85, 0.9, 1.0])
    assert c.budget("25%").step == 10
    assert c.auc.mean == pytest.approx(0.5) and th.auc.mean == pytest.approx(0.9)


def test_budget_takes_the_evaluation_at_or_before_and_the_shortest_run():
    every10 = np.arange(0, 51, 10)
    runs = [Run("cold", 0, line(0.0, 0.5, steps=every10)),
            Run("warm", 0, line(0.5, 1.0, steps=np.arange(0, 61, 10)))]
    s = summarize(runs)
    assert [b.step for b in s.budgets] == [12, 25, 50]  # 50 = the shorter run's last step
    assert [s.arm("cold").budget(b.name).value.mean for b in s.budgets] == pytest.approx(
        [0.1, 0.2, 0.5])  # values at steps 10, 20, 50
    assert s.arm("warm").budget("100%").value.mean == pytest.approx(0.5 + 0.5 * 50 / 60)


def test_verdict_numbers_and_text():
    v = summarize(planted()).verdict
    assert (v.arm, v.threshold, v.beats_reference) == ("theseus", "90%", True)
    assert v.value == pytest.approx(0.82)
    assert (v.steps, v.reference_steps, v.seconds, v.reference_seconds) == (4, 36, 5, 18)
    assert v.speedup_steps == pytest.approx(9.0) and v.speedup_seconds == pytest.approx(3.6)
    assert (v.n_reached, v.n_seeds) == (1, 1)
    assert v.text == (
        "theseus reached 90% of cold's gain (val_acc ≥ 0.82) in 4 steps (cold: 36), 9.0x fewer "
        "steps; counting wall-clock time from fit start, transport included (first evaluation at "
        "3.0 s, cold's at 0.0 s), it got there in 5.0 s (cold: 18.0 s), 3.6x sooner.")


def test_head_start_shows_where_the_final_value_target_hides_it():
    # The issue: theseus leads all along but meets cold's final only at the last step, so the
    # legacy speedup is 1.00x for both arms. The thresholds still show the head start.
    knees = np.interp(STEPS, [0, 5, 40], [0.77, 0.85, 0.9])
    late = pd.DataFrame({"step": STEPS, "seconds": 0.5 * STEPS, "metric": "val_acc",
                         "value": knees})
    s = summarize([cold(), Run("theseus", 0, late)])
    assert s.arm("theseus").speedup_steps.mean == pytest.approx(1.0)
    assert s.arm("theseus").reached("90%").steps.mean == 4  # 0.77 + 0.016 * 4 >= 0.82
    assert s.verdict.beats_reference and s.verdict.speedup_steps == pytest.approx(9.0)


def test_seed_spread_and_partial_reach():
    runs = planted() + [Run("theseus", 1, line(0.7, 1.0, transport_s=3)),
                        Run("theseus", 2, line(0.6, 0.6, transport_s=3))]
    s = summarize(runs)
    th = s.arm("theseus")
    assert th.reached("90%").steps.values == (4, 16, None)  # 0.7 + 0.0075 s >= 0.82 at 16
    assert th.reached("90%").steps.mean == 10 and th.reached("90%").steps.n == 2
    assert th.reached("90%").steps.std == pytest.approx(math.sqrt(72))
    assert th.reached("90%").seconds.values == (5, 11, None)
    assert th.reached("50%").steps.values == (0, 0, 0)
    assert th.budget("25%").value.values == pytest.approx((0.85, 0.775, 0.6))
    assert th.budget("25%").value.std == pytest.approx(np.std([0.85, 0.775, 0.6], ddof=1))
    v = s.verdict
    assert (v.arm, v.steps, v.seconds, v.n_reached, v.n_seeds) == ("theseus", 10, 8, 2, 3)
    assert v.text.startswith(
        "theseus reached 90% of cold's gain (val_acc ≥ 0.82) in 10 steps (2 of 3 seeds) "
        "(cold: 36), 3.6x fewer steps;")


def test_verdict_prefers_the_arm_whose_seeds_all_reach():
    runs = planted() + [Run("lucky", 0, line(0.9, 0.9)), Run("lucky", 1, line(0.2, 0.3))]
    v = summarize(runs).verdict
    assert v.arm == "theseus"  # lucky is there at step 0, but in 1 of 2 seeds only


def test_arm_that_never_reaches_and_no_arm_reaching():
    runs = [cold(), Run("head_only", 0, line(0.3, 0.3, transport_s=1))]
    s = summarize(runs)
    ho = s.arm("head_only")
    assert [ho.reached(t.name).steps.values for t in s.thresholds] == [(None,)] * 5
    assert ho.reached("final").seconds.mean is None and ho.reached("final").steps.n == 0
    assert s.verdict.arm is None and not s.verdict.beats_reference
    assert s.verdict.reference_steps == 36
    assert s.verdict.text == ("no arm reached 90% of cold's gain (val_acc ≥ 0.82) within its "
                              "steps; cold took 36 steps.")


def test_verdict_when_no_arm_beats_the_reference():
    runs = [cold(), Run("slow", 0, line(0.0, 0.9))]  # 0.0225 a step: 0.82 at step 37
    v = summarize(runs).verdict
    assert (v.arm, v.steps, v.beats_reference) == ("slow", 37, False)
    assert v.text == (
        "no arm beat cold: the fastest, slow reached 90% of cold's gain (val_acc ≥ 0.82) in 37 "
        "steps (cold: 36); counting wall-clock time from fit start, transport included (first "
        "evaluation at 0.0 s, cold's at 0.0 s), it got there in 18.5 s (cold: 18.0 s), 1.0x "
        "later.")


def test_verdict_counts_a_transport_that_costs_more_than_it_saves():
    runs = [cold(), Run("theseus", 0, line(0.8, 1.0, transport_s=30))]
    v = summarize(runs).verdict
    assert v.beats_reference and v.speedup_steps == pytest.approx(9.0)
    assert v.seconds == 32 and v.speedup_seconds == pytest.approx(18 / 32)
    assert v.text.endswith("it got there in 32.0 s (cold: 18.0 s), 1.8x later.")


def test_verdict_when_the_reference_never_reaches_or_never_improves():
    ref = [cold(0, metric="both"), cold(1, metric="both")]
    shaky = [Run("cold", 0, line(0.1, 0.9)), Run("cold", 1, line(0.1, 0.5)),
             Run("theseus", 0, line(0.8, 1.0, transport_s=3))]
    v = summarize(shaky).verdict  # mean curve 0.1 -> 0.7: 90% = 0.64; cold seed 1 stops at 0.5
    assert v.value == pytest.approx(0.64) and v.reference_steps == 27 and v.arm == "theseus"
    assert "at step 0 (cold: 27, in 1 of 2 seeds);" in v.text
    flat = summarize(ref + [Run("theseus", 0, line(0.8, 1.0, metric="both"))], metric="val_loss",
                     mode="max")  # loss read as higher-is-better: cold's best is its start
    assert flat.reference.gain == 0 and flat.verdict.arm is None
    assert flat.verdict.text == ("cold never improved on its step-0 val_loss (0.9), so there is "
                                 "no gain to reach sooner; compare the arms at equal budgets.")
    alone = summarize(ref).verdict
    assert alone.text == "only cold was run: there is no other arm to compare with it."
    # The mean curve's best is always reached by some reference seed, so "cold never did" needs
    # a hand-made reference arm.
    s = summarize(planted())
    never = Stat((None, None))
    ref = replace(s.arm("cold"), reach=tuple(replace(r, steps=never, seconds=never)
                                             for r in s.arm("cold").reach))
    v = decide_verdict("val_acc", True, s.reference, s.thresholds[2], (ref, s.arm("theseus")))
    assert v.arm == "theseus" and v.beats_reference and v.reference_steps is None
    assert v.text == ("theseus reached 90% of cold's gain (val_acc ≥ 0.82) in 4 steps and 5.0 s "
                      "(transport included); cold never did.")


def test_loss_metric_is_lower_is_better():
    runs = planted(metric="both")
    s = summarize(runs, metric="val_loss")
    assert (s.mode, s.higher_is_better) == ("min", False)
    assert (s.reference.start, s.reference.best) == pytest.approx((0.9, 0.1))
    assert [t.value for t in s.thresholds] == pytest.approx([0.5, 0.26, 0.18, 0.14, 0.1])
    assert s.arm("cold").reached("90%").steps.mean == 36
    assert s.arm("theseus").reached("90%").steps.mean == 4
    assert [s.arm("theseus").budget(b.name).value.mean for b in s.budgets] == pytest.approx(
        [0.15, 0.1, 0.0])
    assert s.verdict.text.startswith(
        "theseus reached 90% of cold's gain (val_loss ≤ 0.18) in 4 steps (cold: 36), 9.0x")
    assert summarize(runs, metric="val_loss", higher_is_better=False).to_dict() == s.to_dict()


@pytest.mark.parametrize("metric, mode", [
    ("val_loss", "min"), ("train/loss_epoch", "min"), ("val_error_rate", "min"),
    ("val/err", "min"), ("test_ppl", "min"), ("Perplexity", "min"), ("val-nll", "min"),
    ("val_acc", "max"), ("f1", "max"), ("terrain_acc", "max"), ("accuracy", "max"),
])
def test_metric_mode_from_the_name(metric, mode):
    assert metric_mode(metric) == mode
    assert resolve_higher_is_better(metric) == (mode == "max")
    assert resolve_higher_is_better(metric, "max") is True
    assert resolve_higher_is_better(metric, "auto", False) is False


def test_direction_errors():
    with pytest.raises(ValueError, match=r"mode='best' is not one of 'auto', 'max', 'min'"):
        summarize(planted(), mode="best")
    with pytest.raises(ValueError, match=r"higher_is_better=True contradicts mode='min'; pass "
                                         r"only one"):
        summarize(planted(), higher_is_better=True, mode="min")


def test_fraction_errors():
    with pytest.raises(ValueError, match=r"fractions=\[0.5, 1.5\] must be distinct numbers in "
                                         r"\(0, 1\], e.g. \[0.5, 0.8, 0.9, 0.95\]"):
        summarize(planted(), fractions=(0.5, 1.5))
    with pytest.raises(ValueError, match=r"budgets=\[\] must be distinct.*\[0.25, 0.5, 1.0\]"):
        summarize(planted(), budgets=())
    with pytest.raises(ValueError, match=r"verdict_fraction=0.75 is not among fractions=\[0.5, "
                                         r"0.8, 0.9, 0.95\]; add it there"):
        summarize(planted(), verdict_fraction=0.75)
    s = summarize(planted(), fractions=(0.75, 0.25), verdict_fraction=0.75)
    assert [t.name for t in s.thresholds] == ["25%", "75%", "final"]
    assert s.verdict.threshold == "75%"


def test_reference_seeds_without_common_steps():
    runs = [Run("cold", 0, line(0.1, 0.5, steps=np.arange(0, 11))),
            Run("cold", 1, line(0.5, 0.9, steps=np.arange(20, 41)))]
    with pytest.raises(ValueError, match=r"seeds of reference arm 'cold' cover no common step "
                                         r"range \(\[\(0, 10\), \(20, 40\)\]\).*reference_arm="):
        summarize(runs)


def test_summary_json_holds_verdict_and_tables():
    runs = planted() + [Run("head_only", 0, line(0.3, 0.3))]
    d = summarize(runs).to_dict()
    json.dumps(d, allow_nan=False)
    assert d["mode"] == "max" and d["verdict"]["arm"] == "theseus"
    assert d["verdict"]["text"].startswith("theseus reached 90% of cold's gain")
    assert d["reference"]["gain"] == pytest.approx(0.8) and d["reference"]["n_seeds"] == 2
    ninety = d["thresholds"][2]
    assert (ninety["name"], ninety["fraction"]) == ("90%", 0.9)
    assert ninety["arms"]["theseus"]["steps"]["values"] == [4.0]
    assert ninety["arms"]["cold"]["seconds"]["mean"] == 18.0
    assert ninety["arms"]["head_only"] == {
        "steps": {"mean": None, "std": None, "n": 0, "values": [None]},
        "seconds": {"mean": None, "std": None, "n": 0, "values": [None]},
        "n_reached": 0, "n_seeds": 1}
    assert d["thresholds"][-1]["name"] == "final" and d["thresholds"][-1]["fraction"] is None
    budgets = d["budgets"]
    assert budgets["total_steps"] == 40 and [p["step"] for p in budgets["points"]] == [10, 20, 40]
    assert budgets["points"][0]["arms"]["cold"]["mean"] == pytest.approx(0.3)
    assert budgets["auc"]["theseus"]["mean"] == pytest.approx(0.9)
    # the legacy keys stay for the bench scripts
    assert d["arms"]["theseus"]["speedup_steps"]["mean"] == pytest.approx(2.0)
    assert d["target"] == pytest.approx(0.9) and d["arms"]["cold"]["n_reached"] == 2


def test_summary_module_still_exports_the_split_out_names():
    from warmstart.experiments import curves, measures, summary, verdict

    for module in (curves, measures, verdict):
        for name in summary.__all__:
            if hasattr(module, name):
                assert getattr(summary, name) is getattr(module, name), name
    assert {"Run", "Stat", "load_runs", "read_curve", "band_over_seeds", "decide_verdict",
            "metric_mode", "resolve_higher_is_better", "summarize"} <= set(summary.__all__)
