"""Each arm at its own best learning rate: combine ``warmstart compare`` runs of one config made
with the same small learning-rate grid (one output folder per rate), as fairness asks: every arm
gets the same grid, each arm is reported at its own best (by mean AUC over seeds), and every run
is kept in the JSON.

    warmstart compare -c CONFIG --model.init_args.lr=0.001   (out_dir .../lr0.001)
    warmstart compare -c CONFIG --model.init_args.lr=0.0005  (out_dir .../lr0.0005)
    python bench/lr_grid.py --runs lr0.001=runs/grid/lr0.001 lr0.0005=runs/grid/lr0.0005 \\
        --out bench/results/lr_grid_demo.json

The thresholds (50/80/90/95 % of the reference arm's gain, and its final value) are those of the
reference arm at its own best rate; a table and the computed verdict are printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from warmstart.experiments.curves import load_runs
from warmstart.experiments.report import print_summary
from warmstart.experiments.summary import summarize


def curves(folder: Path) -> dict[tuple[str, int], Path]:
    """``{(arm, seed): curve.csv}`` of one compare output folder."""
    found = {}
    for path in sorted((folder / "runs").glob("*_seed*/curve.csv")):
        arm, seed = path.parent.name.rsplit("_seed", 1)
        found[(arm, int(seed))] = path
    if not found:
        raise FileNotFoundError(f"no runs/<arm>_seed<k>/curve.csv under {folder}")
    return found


def best_rates(per_rate: dict[str, dict], metric: str) -> dict[str, str]:
    """The rate with the highest mean AUC, per arm."""
    aucs: dict[str, dict[str, float]] = {}
    for rate, paths in per_rate.items():
        for arm in {a for a, _ in paths}:
            summary = summarize(load_runs({k: v for k, v in paths.items() if k[0] == arm}),
                                metric=metric, reference_arm=arm)
            aucs.setdefault(arm, {})[rate] = summary.arm(arm).auc.mean
    return {arm: max(by_rate, key=by_rate.get) for arm, by_rate in aucs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="RATE=compare_out_dir ...")
    parser.add_argument("--metric", default="val_acc")
    parser.add_argument("--reference", default="cold")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    per_rate = {}
    for item in args.runs:
        rate, folder = item.split("=", 1)
        per_rate[rate] = curves(Path(folder))
    best = best_rates(per_rate, args.metric)
    chosen = {(arm, seed): path for arm, rate in best.items()
              for (a, seed), path in per_rate[rate].items() if a == arm}
    summary = summarize(load_runs(chosen), metric=args.metric, reference_arm=args.reference,
                        extra={"best_rate": best})
    print_summary(summary, title="each arm at its own best learning rate "
                  + ", ".join(f"{a} {r}" for a, r in sorted(best.items())),
                  console=Console(width=100))
    every = {rate: summarize(load_runs(paths), metric=args.metric,
                             reference_arm=args.reference).to_dict()
             for rate, paths in per_rate.items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"best_rate": best, "at_best": summary.to_dict(),
                               "every_rate": every}, indent=2, default=str))
    print(f"written {out}")


if __name__ == "__main__":
    main()
