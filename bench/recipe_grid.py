"""Run one compare config over a small learning-rate grid and warm-start recipes, several
``warmstart compare`` processes at a time, then report each arm at its own best rate.

    python bench/recipe_grid.py --config configs/compare_text_gpu.yaml --lrs 1e-5 3e-5 1e-4 \\
        --recipes head_fit=4 hold_steps=5 --jobs 9 --work_dir runs/text_grid \\
        --out bench/results/recipe_grid_text_gpu.json

The config's own arms (e.g. ``cold`` and ``theseus``) run at every rate; each ``--recipes`` entry
(``KEY=VALUE[,KEY=VALUE]``, transport options) adds a ``theseus`` arm with those options, labelled
``theseus+KEYVALUE``. The fine-tuned source is trained once, before the grid, with the config's
own settings (the grid's rate applies to the target only). Every (recipe, rate) is one compare
run in ``WORK_DIR/<recipe>/lr<rate>`` with its own report; ``--jobs`` of them run at once (on one
GPU they share it, so their wall-clock columns are not comparable: compare steps).

Fairness: every arm gets the same grid and is reported at its own best rate (highest mean AUC
over seeds); thresholds come from the reference arm at its best rate. The table, the lead counts
(evaluations above the reference, at or above the arm's own step-0 value) and every rate's
summary go to ``--out``. Extra arguments after ``--`` go to every compare run (LightningCLI
overrides, e.g. ``--trainer.max_steps=4`` for a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import yaml
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lr_grid import best_rates  # noqa: E402
from recipe_table import lead  # noqa: E402

from warmstart.experiments.compare import CompareConfig, ensure_source  # noqa: E402
from warmstart.experiments.report import print_summary  # noqa: E402
from warmstart.experiments.summary import load_runs, summarize  # noqa: E402
from warmstart.lightning.console import quiet_console  # noqa: E402


def parse_recipe(spec: str) -> tuple[str, dict]:
    """``"head_fit=4,hold_steps=5"`` -> (``"head_fit4_hold_steps5"``, options)."""
    options = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not (key and sep and value):
            raise SystemExit(f"--recipes {spec!r}: expected KEY=VALUE[,KEY=VALUE]")
        options[key] = yaml.safe_load(value)
    return "_".join(f"{k}{v}" for k, v in options.items()), options


def write_configs(config_path: str, lrs: list[str], recipes: list[str], work_dir: Path,
                  source: str) -> list[tuple[str, str, Path]]:
    """One compare YAML per (recipe, rate): ``[(recipe name, rate, yaml path)]``."""
    raw = yaml.safe_load(Path(config_path).read_text())
    raw["source"] = {**(raw.get("source") or {}), "checkpoint": source}
    plans = [("plain", {}, list(raw.get("arms", ["cold", "theseus"])))]
    plans += [(*parse_recipe(spec), ["theseus"]) for spec in recipes]
    out = []
    for name, options, arms in plans:
        for lr in lrs:
            folder = work_dir / name / f"lr{lr}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "compare.yaml"
            path.write_text(yaml.safe_dump({**raw, "arms": arms, "out_dir": str(folder),
                                            "transport": {**raw["transport"], **options}},
                                           sort_keys=False))
            out.append((name, lr, path))
    return out


def run_all(jobs: list[tuple[str, str, Path]], parallel: int, extra: list[str],
            console: Console) -> None:
    """Run the compare processes, ``parallel`` at a time; each logs to ``log.txt`` beside its
    config. Raises when any of them fails, naming its log."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    waiting, running, failed = list(jobs), [], []
    started = time.perf_counter()
    while waiting or running:
        while waiting and len(running) < parallel:
            name, lr, path = waiting.pop(0)
            log = (path.parent / "log.txt").open("w")
            cmd = [sys.executable, "-m", "warmstart", "compare", "-c", str(path), "--overwrite",
                   f"--model.init_args.lr={lr}", *extra]
            running.append((name, lr, path, subprocess.Popen(cmd, stdout=log, stderr=log, env=env)))
        time.sleep(2)
        for job in [j for j in running if j[3].poll() is not None]:
            running.remove(job)
            name, lr, path, proc = job
            status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
            console.print(f"{time.perf_counter() - started:7.1f} s  {name} lr {lr}: {status}")
            if proc.returncode:
                failed.append(str(path.parent / "log.txt"))
    if failed:
        raise SystemExit(f"{len(failed)} compare runs failed; see {', '.join(failed)}")


def collect(jobs: list[tuple[str, str, Path]]) -> dict[str, dict[tuple[str, int], Path]]:
    """``{rate: {(label, seed): curve.csv}}`` over every recipe; recipe arms are relabelled
    ``theseus+<recipe>``."""
    per_rate: dict[str, dict] = {}
    for name, lr, path in jobs:
        for curve in sorted((path.parent / "runs").glob("*_seed*/curve.csv")):
            arm, seed = curve.parent.name.rsplit("_seed", 1)
            label = arm if name == "plain" else f"{arm}+{name}"
            per_rate.setdefault(lr, {})[(label, int(seed))] = curve
    return per_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="compare config (YAML)")
    parser.add_argument("--lrs", nargs="+", required=True, help="the target's learning rates")
    parser.add_argument("--recipes", nargs="*", default=[], help="KEY=VALUE[,KEY=VALUE] ...")
    parser.add_argument("--jobs", type=int, default=1, help="compare processes at once")
    parser.add_argument("--work_dir", default="runs/recipe_grid")
    parser.add_argument("--reference", default="cold")
    parser.add_argument("--metric", default="val_acc")
    parser.add_argument("--report_only", action="store_true",
                        help="tabulate the runs already in --work_dir without training")
    parser.add_argument("--out", default="bench/results/recipe_grid.json")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    console = Console(width=100)
    work_dir = Path(args.work_dir)
    source = str(work_dir / "source.ckpt")
    if not args.report_only:
        config = CompareConfig.from_yaml(args.config, extra)
        with quiet_console():
            ensure_source(replace(config, source={**config.source, "checkpoint": source}),
                          console)
    jobs = write_configs(args.config, args.lrs, args.recipes, work_dir, source)
    if not args.report_only:
        run_all(jobs, args.jobs, extra, console)
    per_rate = collect(jobs)
    best = best_rates(per_rate, args.metric)
    chosen = {(label, seed): path for label, rate in best.items()
              for (lab, seed), path in per_rate[rate].items() if lab == label}
    runs = load_runs(chosen)
    summary = summarize(runs, metric=args.metric, reference_arm=args.reference,
                        extra={"best_rate": best})
    print_summary(summary, title="each arm at its own best learning rate: "
                  + ", ".join(f"{a} {r}" for a, r in sorted(best.items())), console=console)
    leads = lead(runs, args.reference, args.metric, summary.higher_is_better)
    for arm, row in leads.items():
        console.print(f"{arm}: above {args.reference} at {row['above_reference']} of "
                      f"{row['evaluations']} evaluations after step 0; at or above its own "
                      f"step-0 value at {row['at_or_above_own_step0']}")
    every = {rate: summarize(load_runs(paths), metric=args.metric,
                             reference_arm=args.reference).to_dict()
             for rate, paths in per_rate.items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "lrs": args.lrs, "recipes": args.recipes,
                               "overrides": extra, "best_rate": best, "lead": leads,
                               "at_best": summary.to_dict(), "every_rate": every},
                              indent=2, default=str))
    console.print(f"written {out}")


if __name__ == "__main__":
    main()
