"""The demo's transport cost against the cold arm's training time, and what cheaper settings cost
in step-0 accuracy.

For the embedded demo pair (EfficientNet-Lite0 -> Lite2 on MNIST 5k, the fit config of
``warmstart/configs/demo.yaml``): one cold fit of the demo's budget with ``ConvergenceTracker``
(its training seconds, validation excluded, are the yardstick), then for every setting in the grid
a ``TaskVectorTransport`` in a zero-step fit of the same config (the demo's own code path), its
report's time split, and the transported target's validation accuracy at step 0 (the demo's
``limit_val_batches``). Prints a table and writes JSON.

    python bench/demo_cost.py --source runs/demo/source.ckpt --out bench/results/demo_cost.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import yaml

from warmstart import ConvergenceTracker, TaskVectorTransport
from warmstart.experiments.compare import DEMO_CONFIG, CompareConfig
from warmstart.lightning.cli import build_cli
from warmstart.lightning.console import quiet_console

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _cli(config: CompareConfig, root: Path, extra: list[str]):
    args = [a for c in config.fit_config for a in ("-c", yaml.safe_dump(c))]
    return build_cli([*args, *QUIET, "--seed_everything=0",
                      f"--trainer.default_root_dir={root}", *extra])


def cold_seconds(config: CompareConfig, root: Path) -> float:
    cli = _cli(config, root / "cold", [])
    tracker = ConvergenceTracker(every_n_steps=config.tracker.get("every_n_steps", 5))
    cli.trainer.callbacks.append(tracker)
    cli.trainer.fit(cli.model, cli.datamodule)
    return max(row[1] for row in tracker.rows)


def transported(config: CompareConfig, root: Path, source: str, **options) -> dict:
    cli = _cli(config, root / "warm", ["--trainer.max_steps=0"])
    transport = {**config.transport, **options}
    warm = TaskVectorTransport(source_finetuned=source, progress=False, **transport)
    cli.trainer.callbacks.append(warm)
    started = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    wall = time.perf_counter() - started
    accuracy = cli.trainer.validate(cli.model, cli.datamodule, verbose=False)[0]["val_acc"]
    return {"options": options, "timings": warm.report.timings, "callback_seconds": warm.seconds,
            "fit_wall": wall, "step0_acc": accuracy, "maps": len(warm.report.maps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="the demo's fine-tuned source checkpoint")
    parser.add_argument("--calibration_batches", type=int, nargs="+", default=[8, 4, 2])
    parser.add_argument("--solvers", nargs="+", default=["svd", "eigh"])
    parser.add_argument("--rows_per_batch", nargs="+", default=["all"],
                        help="rows_per_batch values to try ('all': every row)")
    parser.add_argument("--work_dir", default="runs/demo_cost")
    parser.add_argument("--out", default="bench/results/demo_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    config = CompareConfig.from_yaml(DEMO_CONFIG)
    root = Path(args.work_dir)
    rows = []
    with quiet_console():
        cold = cold_seconds(config, root)
        for nb, solver, cap in itertools.product(args.calibration_batches, args.solvers,
                                                 args.rows_per_batch):
            rows.append(transported(config, root, args.source, calibration_batches=nb,
                                    bn_recalibration=nb, solver=solver,
                                    rows_per_batch=None if cap == "all" else int(cap)))
    print(f"cold arm: {cold:.1f} s of training ({config.fit_config[0]['trainer']['max_steps']} "
          "steps, validation excluded)")
    print(f"{'batches':>8} {'solver':>6} {'rows/batch':>10} {'stats s':>8} {'maps s':>7} "
          f"{'total s':>8} {'/ cold':>7} {'step-0 acc':>10}")
    for r in rows:
        t = r["timings"]
        cap = r["options"]["rows_per_batch"] or "all"
        print(f"{r['options']['calibration_batches']:>8} {r['options']['solver']:>6} {cap:>10} "
              f"{t.get('statistics', 0):>8.2f} {t.get('maps', 0):>7.2f} "
              f"{r['callback_seconds']:>8.2f} {r['callback_seconds'] / cold:>7.2f} "
              f"{r['step0_acc']:>10.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cold_training_seconds": cold, "threads": torch.get_num_threads(),
                               "rows": rows}, indent=2, default=str))
    print(f"written {out}")


if __name__ == "__main__":
    main()
