"""Offline ViT benchmark: two ViTs pretrained here, a task vector moved between them, curves.

    python bench/vit_offline.py         # ~6 min on 2 quiet cores (far more when they are shared)
    python bench/vit_offline.py --seeds 0 --steps 20 --pretrain_steps 60 --source_steps 40 \\
        --work_dir /tmp/vit_quick --out /tmp/vit_quick.json       # smoke run, a few minutes

No hub and no downloaded weights: the pretraining is made by this script, so the ViT path of the
transport is measured on weights that carry real structure instead of on random inits.

MNIST 5k (packaged) is split by digit. Task P = digits 0-4 (pretraining), task F = digits 5-9
(fine-tuning, relabelled 0-4 in that order). The two tasks share no image, and a model pretrained
on P has learnt strokes but not the F classes.

1. Two timm VisionTransformers, random init, 28 px with 7 px patches (16 tokens + class token):
   the source (width 96, 4 blocks, 3 heads) and the target (width 192, 6 blocks, 3 heads). Both
   are pretrained on P with a Lightning Trainer; their networks are saved as safetensors.
2. The pretrained source gets a new head and is fine-tuned on F: the fine-tuned source (.ckpt).
3. The pretrained target gets a new head (timm drops the saved one because the class counts
   differ) and is fine-tuned on F by every arm with the same seed, steps and data order: cold (no
   transport), theseus (one arm per ``--alphas`` value), slice and head_only (alpha 1; head_only
   does not depend on alpha). The arms run through ``warmstart.experiments.compare.run_arm``,
   the code path of ``warmstart compare``; the compare YAML is written to
   ``<work_dir>/compare.yaml`` and read back with ``CompareConfig.from_yaml``. ``--seeds``
   change the target's new head and the data order, not the pretrained weights nor the
   validation split. ``--probe_alphas`` (default ``auto``) measure theseus at more strengths on
   the same path, stopped after one step: their step-0 accuracy only.
4. The convergence report (``warmstart.experiments.report.write_report``) goes to
   ``<work_dir>/report/``; a table is printed and the numbers are written to ``--out`` (JSON).

Validation accuracy (the ``val_acc`` that the module's own ``validation_step`` logs, through
Lightning's validation loop) is measured on a fixed split of F (20 %, data seed 0) that no arm
trains on.
``alpha=auto`` picks alpha by the loss on 4 of those validation batches, so its numbers are
slightly optimistic. The pretrained and fine-tuned checkpoints are reused from ``--work_dir`` when
they were made with the same settings (kept in a JSON sidecar next to each); ``--fresh`` retrains
them anyway.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

from warmstart.experiments.compare import CompareConfig, ensure_source, run_arm
from warmstart.experiments.report import write_report
from warmstart.experiments.summary import Run, Stat, load_runs, read_curve, summarize
from warmstart.lightning.cli import build_cli
from warmstart.lightning.models import build_model

P_CLASSES = [0, 1, 2, 3, 4]
F_CLASSES = [5, 6, 7, 8, 9]
# timm's ViT-Tiny definition, resized by model_kwargs (they override its width, depth and heads)
BACKBONE = "vit_tiny_patch16_224"
SOURCE = {"embed_dim": 96, "depth": 4, "num_heads": 3}
TARGET = {"embed_dim": 192, "depth": 6, "num_heads": 3}
IMAGE, PATCH = 28, 7
# Optimisation settings, fixed before any run (not tuned on the validation data).
PRETRAIN = {"lr": 1e-3, "warmup_steps": 20, "scheduler": "cosine"}
FINETUNE = {"lr": 5e-4, "warmup_steps": 5, "scheduler": "constant"}
TRAINER = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
           "limit_val_batches": 0, "enable_model_summary": False, "enable_progress_bar": False}
# The arms' fits: the ConvergenceTracker runs the module's validation (val_acc) on the whole
# validation split; no sanity check before the step-0 point.
ARM_VALIDATION = {"limit_val_batches": 1.0, "num_sanity_val_steps": 0}


def vit_kwargs(size: dict, weights: Path | None = None) -> dict:
    """``model_kwargs`` of a ViT of ``size``; ``weights``: safetensors loaded by timm (its head is
    dropped when the class count differs from the file's, which is always the case here)."""
    kwargs: dict[str, Any] = {"img_size": IMAGE, "patch_size": PATCH, **size}
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
    return kwargs


def fit_config(size: dict, classes: list[int], steps: int, optim: dict, batch_size: int,
               weights: Path | None = None, accelerator: str = "cpu",
               trainer: dict | None = None) -> dict:
    """A LightningCLI fit config (as a dict) for one ViT on one task (``trainer``: more Trainer
    settings, e.g. validation for the arms)."""
    model = {"backbone": BACKBONE, "num_classes": len(classes), "pretrained": weights is not None,
             "model_kwargs": vit_kwargs(size, weights), **optim}
    data = {"source": "mnist5k", "image_size": IMAGE, "batch_size": batch_size,
            "classes": list(classes), "seed": 0}  # a copy: no YAML alias
    return {"seed_everything": 0,
            "model": {"class_path": "warmstart.lightning.models.Classifier", "init_args": model},
            "data": {"class_path": "warmstart.lightning.data.ImageClassificationData",
                     "init_args": data},
            "trainer": {**TRAINER, "accelerator": accelerator, "max_steps": steps,
                        **(trainer or {})}}


def cli_of(config: dict, extra: list[str] | None = None):
    """The (not run) ``warmstart fit`` CLI of a fit config given as a dict."""
    return build_cli(["-c", yaml.safe_dump(config), *(extra or [])])


def validate(model, datamodule, accelerator: str) -> float:
    """``val_acc`` that the module's own ``validation_step`` logs, over the whole validation
    split (``Trainer.validate`` on one device, nothing logged)."""
    import lightning

    trainer = lightning.Trainer(accelerator=accelerator, devices=1, logger=False,
                                enable_checkpointing=False, enable_model_summary=False,
                                enable_progress_bar=False, limit_val_batches=1.0)
    return float(trainer.validate(model, datamodule=datamodule, verbose=False)[0]["val_acc"])


def val_accuracy(config: dict, state: dict | None = None) -> float:
    """Validation accuracy of the config's model (with ``state`` loaded) on its own task."""
    cli = cli_of(config)
    if state is not None:
        cli.model.load_state_dict(state)
    return validate(cli.model, cli.datamodule, config["trainer"]["accelerator"])


def reusable(path: Path, config: dict, fresh: bool) -> dict | None:
    """The record of ``path`` when it exists and was made from ``config`` (its sidecar says so);
    otherwise ``None``, and a stale ``path`` is removed so that it is made again."""
    sidecar = path.with_suffix(".json")
    if not fresh and path.exists() and sidecar.exists():
        record = json.loads(sidecar.read_text())
        if record.get("config") == config:
            return record
    path.unlink(missing_ok=True)
    return None


def pretrain(name: str, size: dict, args, work: Path, console: Console) -> tuple[Path, dict]:
    """Pretrain one ViT on task P (or reuse its saved weights); returns the weights and a record."""
    weights = work / f"{name}_pretrained_P.safetensors"
    config = fit_config(size, P_CLASSES, args.pretrain_steps, PRETRAIN, args.batch_size,
                        accelerator=args.accelerator)
    record = reusable(weights, config, args.fresh)
    if record is not None:
        console.print(f"[bold]{name}[/]: reusing {weights} ({record['steps']} steps)")
        record["reused"] = True  # its seconds are those of the run that made it
    else:
        console.print(f"[bold]pretraining the {name}[/] {size} on digits {P_CLASSES}")
        started = time.perf_counter()
        cli = cli_of(config, ["--trainer.default_root_dir", str(work / f"{name}_pretrain")])
        cli.trainer.fit(cli.model, cli.datamodule)
        seconds = time.perf_counter() - started
        net = cli.model.model
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, weights)
        record = {"size": size, "steps": args.pretrain_steps, "seconds": seconds, "reused": False,
                  "params": sum(p.numel() for p in net.parameters()),
                  "val_acc_P": validate(cli.model, cli.datamodule, args.accelerator),
                  "config": config}
        weights.with_suffix(".json").write_text(json.dumps(record, indent=2))
    check_loads(size, weights)
    console.print(f"  {name} accuracy on P: {record['val_acc_P']:.3f}")
    return weights, record


def check_loads(size: dict, weights: Path) -> None:
    """timm loads a file non-strictly once it drops the head: make sure the body did load."""
    saved = load_file(weights)
    net = build_model(BACKBONE, len(F_CLASSES), model_kwargs=vit_kwargs(size, weights))
    body = {k: v for k, v in net.state_dict().items() if not k.startswith("head.")}
    wrong = [k for k, v in body.items() if k not in saved or not torch.equal(v, saved[k])]
    if wrong:
        raise RuntimeError(f"{weights} did not load into the ViT: {wrong[:5]} differ")


RECIPE_KEYS = {"ramp_steps": int, "hold_steps": int, "prime_steps": int, "head_fit": int,
               "head_fit_ridge": float, "head_fit_mode": str}


def parse_recipe(text: str) -> dict[str, int | float]:
    """``"ramp_steps=10,hold_steps=5"`` -> the callback's recipe keywords (and the transport's
    ``head_fit`` options)."""
    recipe = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        try:
            recipe[key] = RECIPE_KEYS[key](value)
        except (KeyError, ValueError):
            raise SystemExit(f"--recipes: {item!r} is not one of "
                             f"{', '.join(f'{k}=N' for k in RECIPE_KEYS)}") from None
    return recipe


def _recipe_label(text: str) -> str:
    """``"ramp_steps=10,hold_steps=5"`` -> ``"ramp10+hold5"``."""
    return "+".join(k.replace("_steps", "") + v
                    for k, _, v in (item.partition("=") for item in text.split(",")))


def _label(alpha: float | str) -> str:
    return f"theseus_a{alpha:g}" if alpha != "auto" else "theseus_auto"


def arm_variants(alphas: list[float | str], recipes: list[str] = ()
                 ) -> list[tuple[str, str, dict]]:
    """(label, compare arm, transport overrides) of every arm, cold first (the reference);
    each recipe adds a theseus arm at the first alpha with those callback options."""
    theseus = [(_label(a), "theseus", {"alpha": a}) for a in alphas]
    theseus += [(f"{_label(alphas[0])}+{_recipe_label(r)}", "theseus",
                 {"alpha": alphas[0], **parse_recipe(r)}) for r in recipes]
    return [("cold", "cold", {}), *theseus, ("slice", "slice", {"alpha": 1.0}),
            ("head_only", "head_only", {"alpha": 1.0})]


def run_variant(config: CompareConfig, label: str, arm: str, transport: dict, seed: int,
                source: str, cli_args: tuple[str, ...] = ()) -> tuple[Path, dict | None]:
    """One arm with one seed through ``run_arm``: its curve and its transport's alpha / seconds
    (``None`` for cold). ``cli_args`` are extra LightningCLI overrides of the fit config."""
    variant = replace(config, transport={**config.transport, **transport},
                      out_dir=str(Path(config.out_dir) / "arms" / label),
                      overrides=(*config.overrides, *cli_args))
    curve = run_arm(variant, arm, seed, source)
    report = curve.parent / "transport_report.json"
    if not report.exists():
        return curve, None
    summary = json.loads(report.read_text())["summary"]
    return curve, {"alpha": summary["alpha"], "seconds": summary["seconds"]}


def run_arms(config: CompareConfig, variants, source: str, console: Console,
             lr: float | None = None) -> tuple[dict, dict]:
    """Every arm x seed (at learning rate ``lr``, else the fit config's); returns the curves and
    each run's transport record."""
    curves, transports = {}, {}
    cli_args = () if lr is None else (f"--model.init_args.lr={lr:g}",)
    for seed in config.seeds:
        for label, arm, overrides in variants:
            console.print(f"[bold]arm {label}[/], seed {seed}" + (f", lr {lr:g}" if lr else ""))
            folder = label if lr is None else f"{label}/lr{lr:g}"
            curves[(label, seed)], transports[(label, seed)] = run_variant(
                config, folder, arm, overrides, seed, source, cli_args)
    return curves, transports


def at_best_rate(per_rate: dict[float, tuple[dict, dict]], metric: str = "val_acc"
                 ) -> tuple[dict, dict, dict[str, float], dict[str, dict[str, float]]]:
    """Each arm at the rate with its highest mean AUC (the same grid for every arm)."""
    aucs: dict[str, dict[float, float]] = {}
    for rate, (curves, _) in per_rate.items():
        summary = summarize(load_runs(curves), metric=metric, reference_arm="cold")
        for label, arm in summary.to_dict()["arms"].items():
            aucs.setdefault(label, {})[rate] = arm["auc"]["mean"]
    best = {label: max(by_rate, key=by_rate.get) for label, by_rate in aucs.items()}
    curves = {k: v for label, rate in best.items() for k, v in per_rate[rate][0].items()
              if k[0] == label}
    transports = {k: v for label, rate in best.items() for k, v in per_rate[rate][1].items()
                  if k[0] == label}
    return curves, transports, best, aucs


def probe_step0(config: CompareConfig, alphas, source: str, console: Console) -> dict:
    """Step-0 accuracy of theseus at more alphas: the arms' code path, stopped after one step."""
    probes = {}
    for alpha in alphas:
        label = "theseus_auto" if alpha == "auto" else f"theseus_a{alpha:g}"
        values, chosen = [], []
        for seed in config.seeds:
            console.print(f"[bold]step-0 probe {label}[/], seed {seed}")
            curve, transport = run_variant(config, f"probe_{label}", "theseus", {"alpha": alpha},
                                           seed, source, ("--trainer.max_steps=1",))
            steps, _, acc = Run(label, seed, read_curve(curve)).series("val_acc")
            values.append(float(acc[steps == 0][0]))
            chosen.append(transport["alpha"])
        probes[label] = {"step0": Stat(tuple(values)).to_dict(), "alpha": chosen}
    return probes


def fmt(stat: dict, digits: int = 3) -> str:
    """``mean ± std`` of a JSON-ed Stat (infinities are the string ``"inf"`` there)."""
    mean, std = stat["mean"], stat["std"]
    if mean is None:
        return "not reached"
    text = mean if isinstance(mean, str) else f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if isinstance(std, float) else "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="seeds of the F fine-tuning arms (new head, data order)")
    parser.add_argument("--steps", type=int, default=50, help="F fine-tuning steps per arm")
    parser.add_argument("--every", type=int, default=5, help="curve point every N steps")
    parser.add_argument("--pretrain_steps", type=int, default=300,
                        help="P pretraining steps of each ViT")
    parser.add_argument("--source_steps", type=int, default=150,
                        help="F fine-tuning steps of the source")
    parser.add_argument("--alphas", nargs="+", default=["1.0", "2.0"],
                        help="theseus strengths, one arm each (numbers or 'auto')")
    parser.add_argument("--probe_alphas", nargs="*", default=["auto"],
                        help="theseus strengths measured at step 0 only (transport, no training)")
    parser.add_argument("--calibration_batches", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"),
                        help="Lightning accelerator of every fit (default cpu)")
    parser.add_argument("--work_dir", default="runs/vit_offline",
                        help="checkpoints, compare YAML, runs and the report")
    parser.add_argument("--fresh", action="store_true",
                        help="retrain the pretrained and fine-tuned checkpoints in work_dir")
    parser.add_argument("--recipes", nargs="*", default=[],
                        help="more theseus arms (first alpha) with the callback's warm-start "
                        "recipe, e.g. ramp_steps=10 hold_steps=5 ramp_steps=10,hold_steps=5")
    parser.add_argument("--lrs", nargs="*", type=float, default=[],
                        help="a learning-rate grid run by every arm; each arm is reported at "
                        "its best rate by mean AUC (default: the fine-tuning rate alone)")
    parser.add_argument("--arms", nargs="*", default=[],
                        help="run only these arm labels (e.g. theseus_a2+head_fit3); cold, the "
                        "reference, always runs (default: every arm)")
    parser.add_argument("--out", default="bench/results/vit_offline.json")
    args = parser.parse_args()
    alphas, probe_alphas = ([a if a == "auto" else float(a) for a in values]
                            for values in (args.alphas, args.probe_alphas))
    torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 150)  # logs: no wrapped columns
    started, load_start = time.perf_counter(), os.getloadavg()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    # 1. pretraining on P
    source_weights, source_pre = pretrain("source", SOURCE, args, work, console)
    target_weights, target_pre = pretrain("target", TARGET, args, work, console)

    # 2.-3. the compare config: the source fine-tuning and the target arms, both on F
    source_fit = fit_config(SOURCE, F_CLASSES, args.source_steps, FINETUNE, args.batch_size,
                            source_weights, args.accelerator)
    target_fit = fit_config(TARGET, F_CLASSES, args.steps, FINETUNE, args.batch_size,
                            target_weights, args.accelerator, trainer=ARM_VALIDATION)
    title = (f"ViT {SOURCE['embed_dim']}x{SOURCE['depth']} -> {TARGET['embed_dim']}x"
             f"{TARGET['depth']}, pretrained on MNIST digits 0-4, fine-tuned on 5-9")
    compare = {
        "title": title, "out_dir": str(work / "compare"), "seeds": args.seeds,
        "arms": ["cold", "theseus", "slice", "head_only"],
        "source": {"checkpoint": str(work / "source_finetuned_F.ckpt"),
                   "fit_config": [source_fit]},
        "fit_config": [target_fit],
        "transport": {"source_pretrained": BACKBONE,
                      "source_model_kwargs": vit_kwargs(SOURCE, source_weights),
                      "calibration_batches": args.calibration_batches, "alpha": alphas[0],
                      "progress": False},
        "tracker": {"every_n_steps": args.every},  # on the fit config's limit_val_batches
    }
    compare_yaml = work / "compare.yaml"
    compare_yaml.write_text("# written by bench/vit_offline.py; `warmstart compare -c` runs its "
                            "four arms (theseus at the first alpha)\n" + yaml.safe_dump(compare))
    config = CompareConfig.from_yaml(compare_yaml)

    checkpoint = Path(config.source["checkpoint"])
    # made from the fit config and from these very pretrained weights (they may have been remade)
    made_from = {"fit_config": source_fit,
                 "pretrained_sha256": hashlib.sha256(source_weights.read_bytes()).hexdigest()}
    source_ft = reusable(checkpoint, made_from, args.fresh)
    if source_ft is not None:
        source_ft["reused"] = True
    if source_ft is None:  # ensure_source fine-tunes it (its compare code path) when missing
        source_started = time.perf_counter()
        source_ckpt = ensure_source(config, console)
        source_ft = {"steps": args.source_steps, "config": made_from, "reused": False,
                     "seconds": time.perf_counter() - source_started}
        state = torch.load(source_ckpt, map_location="cpu", weights_only=False)["state_dict"]
        source_ft["val_acc_F"] = val_accuracy(source_fit, state)
        checkpoint.with_suffix(".json").write_text(json.dumps(source_ft, indent=2))
    source_ckpt = str(checkpoint)
    console.print(f"source fine-tuned accuracy on F: {source_ft['val_acc_F']:.3f}")

    arms_started = time.perf_counter()
    variants = arm_variants(alphas, args.recipes)
    if args.arms:
        unknown = set(args.arms) - {label for label, _, _ in variants}
        if unknown:
            raise SystemExit(f"--arms: no arm {sorted(unknown)}; the arms are "
                             f"{[label for label, _, _ in variants]}")
        variants = [v for v in variants if v[0] == "cold" or v[0] in args.arms]
    best_rate = auc_by_rate = None
    if args.lrs:
        per_rate = {lr: run_arms(config, variants, source_ckpt, console, lr) for lr in args.lrs}
        curves, transports, best_rate, auc_by_rate = at_best_rate(per_rate)
    else:
        curves, transports = run_arms(config, variants, source_ckpt, console)
    arms_seconds = time.perf_counter() - arms_started
    probes = probe_step0(config, probe_alphas, source_ckpt, console)
    probes_seconds = time.perf_counter() - arms_started - arms_seconds

    # 4. the convergence report (reference: cold) and the benchmark's own table / JSON
    settings = {"compare_yaml": str(compare_yaml), "alphas": args.alphas,
                "arms": [label for label, _, _ in variants], "seeds": args.seeds,
                "recipes": args.recipes, "lrs": args.lrs, "best_rate": best_rate}
    summary = write_report(load_runs(curves), work / "report", title=title, config=settings,
                           overwrite=True, console=console, reference_arm="cold")
    summary_json = summary.to_dict()
    cold_final = summary_json["arms"]["cold"]["final"]["mean"]
    head0 = summary_json["arms"].get("head_only", {}).get("step0", {}).get("mean")
    arms = {}
    for label, arm in summary_json["arms"].items():
        runs = [transports.get((label, s)) for s in arm["seeds"]]
        arms[label] = {k: arm[k] for k in ("seeds", "n_reached", "step0", "final",
                                           "steps_to_target", "seconds_to_target",
                                           "speedup_steps", "speedup_seconds")}
        arms[label]["alpha"] = [r["alpha"] if r else None for r in runs]
        arms[label]["transport_seconds"] = [r["seconds"] if r else None for r in runs]
        arms[label]["auc"] = arm["auc"]
        if best_rate:
            arms[label]["lr"] = best_rate[label]
            arms[label]["auc_by_lr"] = auc_by_rate[label]
    for label, entry in [*arms.items(), *probes.items()]:
        if label.startswith("theseus") and head0 is not None and cold_final != head0:
            # DESIGN.md section 7, with cold's final accuracy standing in for the fine-tuned target
            entry["gap_recovered"] = (entry["step0"]["mean"] - head0) / (cold_final - head0)

    result = {
        "benchmark": "vit_offline", "title": title,
        "settings": {**vars(args), "source": SOURCE, "target": TARGET, "image_size": IMAGE,
                     "patch_size": PATCH, "pretrain": PRETRAIN, "finetune": FINETUNE,
                     "P_classes": P_CLASSES, "F_classes": F_CLASSES},
        "pretraining": {"source": source_pre, "target": target_pre},
        "source_finetuned": source_ft,
        "cold_final_acc": cold_final,
        "arms": arms,
        "step0_probes": probes,
        "report_dir": str(work / "report"),
        "seconds": {"total": time.perf_counter() - started, "arms": arms_seconds,
                    "probes": probes_seconds},
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "summary": summary_json,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))

    table = Table(title=f"{title} (val_acc on F, {len(args.seeds)} seeds, {args.steps} steps)")
    for col in ("arm", "lr", "alpha", "step-0 acc", "final acc", "AUC",
                "steps to cold final (reached)", "speedup (steps)", "speedup (s)",
                "gap recovered"):
        table.add_column(col)
    rate = f"{FINETUNE['lr']:g}"
    for label, a in arms.items():
        alpha = sorted({x for x in a["alpha"] if x is not None})
        table.add_row(label, f"{a['lr']:g}" if "lr" in a else rate,
                      ", ".join(f"{x:g}" for x in alpha) or "-", fmt(a["step0"]),
                      fmt(a["final"]), fmt(a["auc"]),
                      f"{fmt(a['steps_to_target'], 1)} ({a['n_reached']})",
                      fmt(a["speedup_steps"], 2), fmt(a["speedup_seconds"], 2),
                      f"{a['gap_recovered']:.2f}" if "gap_recovered" in a else "-")
    for label, a in probes.items():  # step 0 only: no training columns
        alpha = ", ".join(sorted({f"{x:g}" for x in a["alpha"]}))
        table.add_row(f"{label} (step 0 only)", rate, alpha, fmt(a["step0"]), *["-"] * 5,
                      f"{a['gap_recovered']:.2f}" if "gap_recovered" in a else "-")
    console.print(f"pretraining on P (digits 0-4): source {source_pre['val_acc_P']:.3f}, "
                  f"target {target_pre['val_acc_P']:.3f}; source fine-tuned on F (5-9): "
                  f"{source_ft['val_acc_F']:.3f}")
    console.print(table)
    console.print(f"report: {work / 'report'}; results: {out}; "
                  f"{result['seconds']['total']:.0f} s in all")


if __name__ == "__main__":
    main()
