"""Run arms (cold, theseus, slice, head_only, lora_cold, lora_theseus) x seeds from one fit config,
then write the report.

A compare config (YAML)::

    fit_config: [configs/demo/target.yaml]   # LightningCLI fit config(s) of the target run
    arms: [cold, theseus, slice, head_only]
    seeds: [0, 1, 2]
    source:                                  # the fine-tuned source
      checkpoint: runs/demo/source.ckpt      # used when it exists ...
      fit_config: [configs/demo/source.yaml] # ... otherwise made by this fit first
    transport: {source_pretrained: efficientnet_lite0, calibration_batches: 8, alpha: 1.0}
    tracker: {every_n_steps: 10}             # validation: the fit config's limit_val_batches
    out_dir: runs/demo/compare
    metric: val_acc                          # the curve metric the report compares (default)
    mode: auto                               # auto | max | min: is higher better? auto decides
                                             # from the name (loss, error, ppl... are "min")

Every arm uses the same fit config and seed; only the transport differs.

LoRA fine-tuning: the arms ``lora_cold`` (PEFT's default init) and ``lora_theseus`` (the source's
LoRA adapter moved into the target's adapter at fit start) wrap the target network with PEFT
before fitting, so only the adapter (and ``modules_to_save``) trains::

    arms: [lora_cold, lora_theseus]
    lora: {r: 8, lora_alpha: 16, target_modules: [query, value], modules_to_save: [head]}
    source: {adapter: runs/source_lora}      # the source's trained LoRA adapter (a PEFT folder)
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from rich.console import Console

from ..lightning.callbacks import ConvergenceTracker, TaskVectorTransport
from ..lightning.cli import build_cli
from ..lightning.console import StepProgress

ARMS = ("cold", "theseus", "slice", "head_only", "lora_cold", "lora_theseus")
FULL_SOURCE_ARMS = ("theseus", "slice", "head_only")  # arms that read source.checkpoint
DEFAULT_ARMS = ("cold", *FULL_SOURCE_ARMS)  # the lora arms run only when asked for


@dataclass(frozen=True)
class CompareConfig:
    fit_config: tuple[str, ...]
    out_dir: str
    transport: dict[str, Any]
    arms: tuple[str, ...] = DEFAULT_ARMS
    seeds: tuple[int, ...] = (0,)
    source: dict[str, Any] = field(default_factory=dict)
    tracker: dict[str, Any] = field(default_factory=dict)
    title: str = "warm start vs cold start"
    overrides: tuple[str, ...] = ()
    metric: str = "val_acc"
    mode: Literal["auto", "max", "min"] = "auto"
    lora: dict[str, Any] = field(default_factory=dict)  # LoraConfig fields for the lora arms

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> CompareConfig:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"compare config {path} does not exist.")
        raw = yaml.safe_load(path.read_text()) or {}
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: "
                             f"{sorted(cls.__dataclass_fields__)}.")
        for key in ("fit_config", "out_dir", "transport"):
            if key not in raw:
                raise ValueError(f"{path}: missing required key {key!r}.")
        as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,)  # noqa: E731
        config = cls(
            fit_config=as_tuple(raw["fit_config"]), out_dir=str(raw["out_dir"]),
            transport=dict(raw["transport"]), arms=as_tuple(raw.get("arms", DEFAULT_ARMS)),
            seeds=tuple(int(s) for s in as_tuple(raw.get("seeds", [0]))),
            source=dict(raw.get("source") or {}), tracker=dict(raw.get("tracker") or {}),
            title=str(raw.get("title", cls.title)), overrides=tuple(overrides or ()),
            metric=str(raw.get("metric", cls.metric)), mode=raw.get("mode", cls.mode),
            lora=dict(raw.get("lora") or {}),
        )
        bad = [a for a in config.arms if a not in ARMS]
        if bad:
            raise ValueError(f"{path}: unknown arms {bad}; allowed: {list(ARMS)}.")
        if any(a.startswith("lora_") for a in config.arms) and not config.lora:
            raise ValueError(f"{path}: the lora arms need a lora: section with the target's "
                             "LoraConfig fields, e.g. {r: 8, lora_alpha: 16, target_modules: "
                             "[query, value], modules_to_save: [head]}.")
        if "lora_theseus" in config.arms and not config.source.get("adapter"):
            raise ValueError(f"{path}: the lora_theseus arm needs source.adapter, the source's "
                             "trained LoRA adapter (a PEFT adapter folder).")
        if config.mode not in ("auto", "max", "min"):
            raise ValueError(f"{path}: mode: {config.mode!r} is not one of auto, max, min; use "
                             "max for accuracy-like metrics, min for losses, auto to decide from "
                             "the metric name.")
        return config


def _config_arg(config: str | dict) -> str:
    # A dict is passed inline: LightningCLI's -c accepts a YAML string as well as a path.
    return yaml.safe_dump(config) if isinstance(config, dict) else str(config)


# Each fit shows one StepProgress bar instead of Lightning's own bar and model summary.
_QUIET = ("--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false")


def _cli(fit_configs, extra_args: list[str]):
    return build_cli([a for c in fit_configs for a in ("-c", _config_arg(c))] + extra_args)


def ensure_source(config: CompareConfig, console: Console) -> str:
    """Path of the fine-tuned source checkpoint, training it first when it is missing."""
    checkpoint = config.source.get("checkpoint") or config.transport.get("source_finetuned")
    if not checkpoint:
        raise ValueError("the compare config needs source.checkpoint (the fine-tuned source).")
    if Path(checkpoint).exists():
        return str(checkpoint)
    fit_configs = config.source.get("fit_config")
    if not fit_configs:
        raise FileNotFoundError(f"source checkpoint {checkpoint} does not exist and the compare "
                                "config gives no source.fit_config to make it.")
    fit_configs = fit_configs if isinstance(fit_configs, list) else [fit_configs]
    console.print(f"[bold]fine-tuning the source[/] -> {checkpoint}")
    root = Path(checkpoint).parent / "source_run"
    cli = _cli(fit_configs, [*config.overrides, *_QUIET, "--trainer.default_root_dir", str(root)])
    cli.trainer.callbacks.append(StepProgress("source"))
    cli.trainer.fit(cli.model, cli.datamodule)
    Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
    cli.trainer.save_checkpoint(checkpoint, weights_only=True)
    return str(checkpoint)


def run_arm(config: CompareConfig, arm: str, seed: int, source_checkpoint: str) -> Path:
    """Fit one arm with one seed; returns its curve CSV."""
    run_dir = Path(config.out_dir) / "runs" / f"{arm}_seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cli = _cli(config.fit_config, [*config.overrides, *_QUIET, "--seed_everything", str(seed),
                                   "--trainer.default_root_dir", str(run_dir)])
    tracker = ConvergenceTracker(path=str(run_dir / "curve.csv"), **config.tracker)
    callbacks = [tracker, StepProgress(f"{arm} (seed {seed})")]
    if arm.startswith("lora_"):
        wrap_lora(cli.model, config.transport.get("target_attribute"), config.lora)
    if arm not in ("cold", "lora_cold"):
        source = config.source["adapter"] if arm == "lora_theseus" else source_checkpoint
        options = {**config.transport, "source_finetuned": source,
                   "method": arm.removeprefix("lora_")}
        callbacks.insert(0, TaskVectorTransport(**options))
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, cli.datamodule)
    return tracker.written


def wrap_lora(module, target_attribute: str | None, lora: dict[str, Any]) -> None:
    """Replace the target network inside ``module`` by its PEFT LoRA wrapper (``lora``: the
    ``LoraConfig`` fields), so that only the adapter and ``modules_to_save`` train."""
    from peft import LoraConfig, get_peft_model

    from ..lightning.warm import find_target

    target = find_target(module, target_attribute)
    for parent in module.modules():
        for name, child in parent.named_children():
            if child is target:
                setattr(parent, name, get_peft_model(target, LoraConfig(**lora)))
                return
    raise ValueError("the lora arms wrap the target network, which must be a child module of "
                     "the LightningModule (set transport.target_attribute to its path).")


def run_compare(config: CompareConfig, console: Console | None = None, overwrite: bool = False):
    """All arms x seeds, then the convergence report in ``out_dir``. Returns the summary."""
    from .report import write_report
    from .summary import load_runs

    console = console or Console()
    out = Path(config.out_dir)
    if (out / "summary.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a report; pass --overwrite or choose another "
                              "out_dir.")
    needs_source = any(a in FULL_SOURCE_ARMS for a in config.arms)
    source = ensure_source(config, console) if needs_source else ""
    curves = {}
    for seed in config.seeds:
        for arm in config.arms:
            console.print(f"[bold]arm {arm}[/], seed {seed}")
            curves[(arm, seed)] = run_arm(config, arm, seed, source)
    # each transported arm's TaskVectorTransport wrote its report into the run's log directory:
    # the run directory itself with logger: false, a logger's version folder below it otherwise
    transports = {}
    for arm, seed in sorted(curves, key=lambda key: (config.arms.index(key[0]), key[1])):
        found = sorted((out / "runs" / f"{arm}_seed{seed}").rglob("transport_report.json"))
        if found:
            transports[f"{arm} seed {seed}"] = found[0]
    reference = next((a for a in ("cold", "lora_cold") if a in config.arms), config.arms[0])
    return write_report(load_runs(curves), out, title=config.title,
                        config=dataclasses.asdict(config), overwrite=True, console=console,
                        reference_arm=reference, metric=config.metric, mode=config.mode,
                        transports=transports)


DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def run_demo(out_dir: str = "runs/demo", overwrite: bool = False):
    """``warmstart demo``: the embedded default compare config, written to ``out_dir``."""
    config = CompareConfig.from_yaml(DEMO_CONFIG)
    config = dataclasses.replace(
        config, out_dir=out_dir,
        source={**config.source, "checkpoint": str(Path(out_dir) / "source.ckpt")})
    summary = run_compare(config, overwrite=overwrite)
    if summary.verdict is not None:
        print(f"\n{summary.verdict.text}")
    print(f"demo report: {Path(out_dir) / 'report.html'}")
    return summary
