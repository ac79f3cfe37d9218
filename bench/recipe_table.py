"""One convergence table for arms taken from several ``warmstart compare`` output folders: e.g. a
recipe arm (``transport: {ramp_steps: 5}``, run with ``arms: [theseus]``) against the cold and
plain theseus arms of another folder, or the same arm at two learning rates.

    python bench/recipe_table.py --reference cold \\
        --arm cold=runs/demo_grid/plain:cold --arm theseus=runs/demo_grid/plain:theseus \\
        --arm theseus+ramp10=runs/demo_grid/ramp10:theseus --out bench/results/recipe_demo.json

Each ``--arm LABEL=FOLDER:ARM`` reads ``FOLDER/runs/ARM_seed<k>/curve.csv`` for every seed
there. The table (thresholds on the reference arm's mean curve, equal budgets, AUC, the
computed verdict) is printed and written to ``--out`` with each label's source folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from warmstart.experiments.curves import Run, load_runs
from warmstart.experiments.report import print_summary
from warmstart.experiments.summary import summarize


def arm_curves(spec: str) -> tuple[str, dict[tuple[str, int], Path]]:
    """``LABEL=FOLDER:ARM`` -> (label, {(label, seed): curve.csv})."""
    label, _, where = spec.partition("=")
    folder, _, arm = where.rpartition(":")
    if not (label and folder and arm):
        raise SystemExit(f"--arm {spec!r}: expected LABEL=FOLDER:ARM")
    found = {(label, int(p.parent.name.rsplit("_seed", 1)[1])): p
             for p in sorted(Path(folder, "runs").glob(f"{arm}_seed*/curve.csv"))}
    if not found:
        raise SystemExit(f"--arm {spec!r}: no {folder}/runs/{arm}_seed<k>/curve.csv")
    return label, found


def lead(runs: list[Run], reference: str, metric: str, higher: bool) -> dict[str, dict]:
    """Per arm, over its seeds' evaluations after step 0 (paired with the reference's run of
    the same seed, at the same steps): how many were better than the reference, and how many
    were at least as good as the arm's own step-0 value (the issue's "keeps its lead")."""
    better = (lambda a, b: a > b) if higher else (lambda a, b: a < b)
    ref = {r.seed: dict(zip(*r.series(metric)[::2])) for r in runs if r.arm == reference}
    out: dict[str, dict] = {}
    for run in runs:
        if run.arm == reference or run.seed not in ref:
            continue
        steps, _, values = run.series(metric)
        start = values[steps == 0][0] if (steps == 0).any() else None
        row = out.setdefault(run.arm, {"evaluations": 0, "above_reference": 0,
                                       "at_or_above_own_step0": 0})
        for step, value in zip(steps, values):
            if step == 0 or step not in ref[run.seed]:
                continue
            row["evaluations"] += 1
            row["above_reference"] += int(better(value, ref[run.seed][step]))
            row["at_or_above_own_step0"] += int(start is not None
                                                and not better(start, value))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", action="append", required=True, help="LABEL=FOLDER:ARM")
    parser.add_argument("--reference", required=True, help="the label the thresholds come from")
    parser.add_argument("--metric", default="val_acc")
    parser.add_argument("--title", default="")
    parser.add_argument("--seeds", nargs="*", type=int, default=None,
                        help="only these seeds (default: every seed found in the folders)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    curves, sources = {}, {}
    for spec in args.arm:
        label, found = arm_curves(spec)
        curves.update({k: v for k, v in found.items() if args.seeds is None or k[1] in args.seeds})
        sources[label] = spec.partition("=")[2]
    runs = load_runs(curves)
    summary = summarize(runs, metric=args.metric, reference_arm=args.reference)
    print_summary(summary, title=args.title, console=Console(width=100))
    leads = lead(runs, args.reference, args.metric, summary.higher_is_better)
    for arm, row in leads.items():
        print(f"{arm}: above {args.reference} at {row['above_reference']} of "
              f"{row['evaluations']} evaluations after step 0; at or above its own step-0 "
              f"value at {row['at_or_above_own_step0']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"title": args.title, "arms": sources, "lead": leads,
                               "summary": summary.to_dict()}, indent=2, default=str))
    print(f"written {out}")


if __name__ == "__main__":
    main()
