"""Quality benchmark: run compare configs (arms x seeds) and tabulate what the warm start buys.

    python bench/quality.py --configs configs/compare_demo.yaml --seeds 0 1 2
    python bench/quality.py --configs configs/compare_demo.yaml --seeds 0 --set alpha=2.0

For each pair and arm: step-0 validation accuracy, final accuracy at equal budget, steps and
seconds to reach the cold arm's final accuracy, speedup, and the gap recovered at step 0,
(theseus - head_only) / (cold final - head_only), where the cold arm's final accuracy stands in
for the fine-tuned target. The fine-tuned source's own validation accuracy is given for
reference. Prints a rich table and writes JSON (not a test: it trains models).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from warmstart.experiments.compare import CompareConfig, run_compare


def source_accuracy(config: CompareConfig, checkpoint: str) -> float | None:
    """Validation accuracy of the fine-tuned source on the whole validation split of its own fit
    config: its module's ``validation_step`` (``val_acc``) through ``Trainer.validate``."""
    import torch
    import yaml

    from warmstart.lightning.cli import build_cli

    fit_configs = config.source.get("fit_config")
    if not fit_configs:
        return None
    fit_configs = fit_configs if isinstance(fit_configs, list) else [fit_configs]
    # the source's fit may run without validation (limit_val_batches: 0): score it on every
    # validation batch here, on one device, logging nothing (the CLI's config.yaml goes to
    # out_dir, not to the working directory)
    args = [a for c in fit_configs
            for a in ("-c", yaml.safe_dump(c) if isinstance(c, dict) else str(c))]
    cli = build_cli([*args, *config.overrides, "--trainer.limit_val_batches=1.0",
                     "--trainer.devices=1", "--trainer.logger=false",
                     "--trainer.enable_progress_bar=false", "--trainer.default_root_dir",
                     str(Path(config.out_dir) / "source_validation")])
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    cli.model.load_state_dict(state)
    return cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val_acc"]


def run_pair(path: str, seeds: list[int], settings: dict, out_root: Path, console: Console):
    config = CompareConfig.from_yaml(path)
    name = Path(path).stem + ("_" + "_".join(f"{k}{v}" for k, v in settings.items())
                              if settings else "")
    out_dir = out_root / name
    config = replace(config, seeds=tuple(seeds), out_dir=str(out_dir),
                     transport={**config.transport, **settings})
    started = time.perf_counter()
    summary = run_compare(config, console=console, overwrite=True)
    checkpoint = config.source.get("checkpoint") or config.transport.get("source_finetuned")
    result = {"config": path, "settings": settings, "seeds": seeds, "out_dir": str(out_dir),
              "seconds": time.perf_counter() - started, "summary": summary.to_dict(),
              "source_finetuned_acc": source_accuracy(config, checkpoint)}
    arms = {a.arm: a for a in summary.arms}
    if {"theseus", "head_only", "cold"} <= set(arms):
        head0, warm0 = arms["head_only"].step0.mean, arms["theseus"].step0.mean
        denom = arms["cold"].final.mean - head0
        result["gap_recovered"] = (warm0 - head0) / denom if denom else None
    return name, summary, result


def _fmt(stat, digits=3):
    if stat is None or stat.mean is None:
        return "not reached"
    text = f"{stat.mean:.{digits}f}"
    return text + (f" ± {stat.std:.{digits}f}" if stat.std is not None else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["configs/compare_demo.yaml"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="transport options to override, e.g. alpha=2.0 center=true")
    parser.add_argument("--out_root", default="runs/quality")
    parser.add_argument("--out", default="bench/results/quality.json")
    args = parser.parse_args()
    import yaml

    settings = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    console = Console()
    table = Table(title="warm start quality (val_acc)")
    for col in ("pair", "arm", "seeds", "step-0 acc", "final acc", "steps to cold final",
                "speedup (steps)", "speedup (s)"):
        table.add_column(col)
    results = []
    for path in args.configs:
        name, summary, result = run_pair(path, args.seeds, settings, Path(args.out_root), console)
        results.append(result)
        for arm in summary.arms:
            table.add_row(name, arm.arm, str(len(arm.seeds)), _fmt(arm.step0), _fmt(arm.final),
                          _fmt(arm.steps_to_target, 1), _fmt(arm.speedup_steps, 2),
                          _fmt(arm.speedup_seconds, 2))
        console.print(f"{name}: source fine-tuned acc {result['source_finetuned_acc']}, gap "
                      f"recovered {result.get('gap_recovered')}")
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(previous + results, indent=2, default=str))
    console.print(f"results appended to {out}")


if __name__ == "__main__":
    main()
