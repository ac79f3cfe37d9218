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

from warmstart.experiments.curves import load_runs
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", action="append", required=True, help="LABEL=FOLDER:ARM")
    parser.add_argument("--reference", required=True, help="the label the thresholds come from")
    parser.add_argument("--metric", default="val_acc")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    curves, sources = {}, {}
    for spec in args.arm:
        label, found = arm_curves(spec)
        curves.update(found)
        sources[label] = spec.partition("=")[2]
    summary = summarize(load_runs(curves), metric=args.metric, reference_arm=args.reference)
    print_summary(summary, title=args.title, console=Console(width=100))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"title": args.title, "arms": sources,
                               "summary": summary.to_dict()}, indent=2, default=str))
    print(f"written {out}")


if __name__ == "__main__":
    main()
