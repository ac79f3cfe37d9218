"""Why does a warm-started target lose accuracy in its first fine-tuning steps? Each variant
changes one candidate cause and keeps everything else of a compare config's warm arm.

    . .venv/bin/activate; export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    python bench/dip_probe.py --seeds 0 1 --transport head_fit=3,head_fit_ridge=0.3
    # ~45 s per run on 2 CPU cores with the demo config

Variants (all start from the same transported target, same seed, same data order):

- ``plain``: the config's own fit (the module's AdamW and schedule);
- ``bn_frozen``: BatchNorm layers stay in eval mode while training (running statistics fixed,
  batch statistics unused), so only the weights move;
- ``primed``: the recipe option ``prime_steps=--prime_batches``: AdamW steps at learning rate 0
  on that many training batches before step 1 (no weight moves, buffers restored), so the first
  updates are not the sign-like steps of fresh moments;
- ``lr_div5``: the module's learning rate divided by 5;
- ``sgd``: ``torch.optim.SGD`` with momentum 0.9 at 50 x the rate, same schedule shape (a
  gradient-proportional step instead of Adam's per-coordinate normalisation).

Writes each run's curve (``WORK_DIR/<variant>_seed<k>/curve.csv``), a table of the step-0 value,
the lowest value in the first ``--window`` steps, the values at the window's end and at the last
step, and the AUC per variant (mean over seeds), and the JSON at ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import lightning as L
import torch
import yaml
from rich.console import Console
from rich.table import Table
from torch.nn.modules.batchnorm import _BatchNorm

from warmstart.experiments.compare import _QUIET, DEMO_CONFIG, CompareConfig, _cli, ensure_source
from warmstart.experiments.curves import Run, read_curve
from warmstart.lightning.callbacks import ConvergenceTracker, TaskVectorTransport
from warmstart.lightning.console import quiet_console

VARIANTS = ("plain", "bn_frozen", "primed", "lr_div5", "sgd")
# sgd: momentum SGD at 50 x the module's rate diverged on the demo pair (both seeds fell to chance
# in 6 steps), so it says nothing about the dip; it is kept for other pairs and rates.


class FreezeBatchNorm(L.Callback):
    """Keep every BatchNorm layer in eval mode during training steps."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for module in pl_module.modules():
            if isinstance(module, _BatchNorm):
                module.eval()


def run(config: CompareConfig, variant: str, seed: int, source: str, transport: dict,
        work_dir: Path, every: int, prime_batches: int) -> Path:
    run_dir = work_dir / f"{variant}_seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    extra = [*config.overrides, *_QUIET, "--seed_everything", str(seed),
             "--trainer.default_root_dir", str(run_dir)]
    fit = config.fit_config[0]
    lr = fit["model"]["init_args"]["lr"]
    if variant == "lr_div5":
        extra.append(f"--model.init_args.lr={lr / 5}")
    cli = _cli(config.fit_config, extra)
    if variant == "sgd":
        build = cli.model.configure_optimizers

        def sgd_instead():
            out = build()
            scheduler = out["lr_scheduler"]["scheduler"]
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"],
                       "initial_lr": g["initial_lr"] * 50} for g in out["optimizer"].param_groups]
            sgd = torch.optim.SGD(groups, lr=0.0, momentum=0.9)
            for group, schedule in zip(sgd.param_groups, scheduler.lr_lambdas):
                group["lr"] = group["initial_lr"] * schedule(0)
            scheduler.optimizer = sgd
            scheduler.base_lrs = [g["initial_lr"] for g in sgd.param_groups]
            return {"optimizer": sgd, "lr_scheduler": out["lr_scheduler"]}

        cli.model.configure_optimizers = sgd_instead
    tracker = ConvergenceTracker(path=str(run_dir / "curve.csv"), every_n_steps=every)
    prime = {"prime_steps": prime_batches} if variant == "primed" else {}
    callbacks = [TaskVectorTransport(**{**config.transport, **transport, **prime,
                                        "source_finetuned": source, "method": "theseus"}),
                 tracker]
    if variant == "bn_frozen":
        callbacks.append(FreezeBatchNorm())
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, cli.datamodule)
    return tracker.written


def row(curves: list[Path], metric: str, window: int) -> dict[str, float]:
    stats: dict[str, list[float]] = {}
    for path in curves:
        steps, _, values = Run("", 0, read_curve(path)).series(metric)
        early = values[(steps > 0) & (steps <= window)]
        last = int(steps[-1])
        auc = float(values.mean())
        for key, value in (("step0", values[0]), ("lowest_early", early.min()),
                           (f"step{window}", values[steps == window][0]),
                           (f"step{last}", values[-1]), ("auc", auc)):
            stats.setdefault(key, []).append(float(value))
    return {k: sum(v) / len(v) for k, v in stats.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEMO_CONFIG))
    parser.add_argument("--source", default="runs/demo/source.ckpt")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--transport", default="",
                        help="extra transport options, KEY=VALUE[,KEY=VALUE]")
    parser.add_argument("--every", type=int, default=2, help="evaluation every N steps")
    parser.add_argument("--window", type=int, default=10, help="the early steps looked at")
    parser.add_argument("--prime_batches", type=int, default=8)
    parser.add_argument("--work_dir", default="runs/dip_probe")
    parser.add_argument("--report_only", action="store_true",
                        help="tabulate the curves already in --work_dir without training")
    parser.add_argument("--out", default="bench/results/dip_probe.json")
    args, overrides = parser.parse_known_args()
    console = Console(width=100)
    transport = {k: yaml.safe_load(v) for k, _, v in
                 (item.partition("=") for item in args.transport.split(",") if item)}
    config = CompareConfig.from_yaml(args.config, overrides)
    config.source["checkpoint"] = args.source
    work_dir = Path(args.work_dir)
    curves: dict[str, list[Path]] = {}
    if args.report_only:
        curves = {v: [work_dir / f"{v}_seed{s}" / "curve.csv" for s in args.seeds]
                  for v in args.variants}
    else:
        with quiet_console():
            source = ensure_source(config, console)
            for variant in args.variants:
                for seed in args.seeds:
                    console.print(f"{variant}, seed {seed}")
                    curves.setdefault(variant, []).append(
                        run(config, variant, seed, source, transport, work_dir, args.every,
                            args.prime_batches))
    rows = {v: row(paths, config.metric, args.window) for v, paths in curves.items()}
    table = Table(title=f"{config.title}: theseus {args.transport or ''} "
                        f"(mean of seeds {args.seeds})")
    keys = list(next(iter(rows.values())))
    table.add_column("variant")
    for key in keys:
        table.add_column(key.replace("lowest_early", f"lowest, steps 1-{args.window}"))
    for variant, stats in rows.items():
        table.add_row(variant, *(f"{stats[k]:.3f}" for k in keys))
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "overrides": overrides, "rows": rows,
                               "curves": {v: [str(p) for p in ps] for v, ps in curves.items()}},
                              indent=2))
    console.print(f"written {out}")
    assert all(math.isfinite(s["auc"]) for s in rows.values())


if __name__ == "__main__":
    main()
