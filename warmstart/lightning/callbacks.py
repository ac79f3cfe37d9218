"""Lightning callbacks for any LightningModule: warm-start the target at the start of ``fit``;
record convergence curves from the module's own validation.

The hooks are thin: the transport's work is in :mod:`warmstart.lightning.warm`, validation runs in
:mod:`warmstart.lightning.validation`.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn

from ..engine.options import TransportOptions
from .recipe import WarmupRecipe, check_primable, prime_optimizer
from .sharding import ShardedTarget
from .validation import check_validation, scalar_metrics, validate_now
from .warm import WarmStart, calibration_loader, find_target, run_transport, training_batches


def log_dir(trainer: L.Trainer) -> Path:
    """The run's log directory (call it on every rank: under DDP it is broadcast from rank 0)."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def _unused_path(path: Path) -> Path:
    """``path``, or ``<stem>-v1<suffix>``, ``-v2``... when a file from an earlier run is there.

    Like Lightning's checkpoint names: an existing report is never overwritten silently.
    """
    candidate, version = path, 0
    while candidate.exists():
        version += 1
        candidate = path.with_name(f"{path.stem}-v{version}{path.suffix}")
    if version:
        rank_zero_warn(f"warmstart: {path} exists already (an earlier run?); writing {candidate} "
                       "instead of overwriting it.")
    return candidate


class TaskVectorTransport(Callback):
    """Move a fine-tuned source's task vector into the network being fitted, once, at fit start.

    Works with any LightningModule: the target network is found by a dotted attribute path (by
    default the one child module that holds all parameters), the model inputs are taken from any
    batch format (see :mod:`warmstart.lightning.batches`), and ``alpha="auto"`` is scored by the
    module's own ``validation_step`` through a logged ``monitor`` metric. The transport runs in
    ``on_fit_start`` (the model is on its device and the optimizer holds its parameters), under
    ``no_grad`` and in place, so the optimizer keeps its references. Under DDP every rank
    calibrates on its own shard and the statistics are all-reduced, so all ranks write the same
    weights. Under ``FSDPStrategy`` and ``ModelParallelStrategy`` (``fully_shard``) the target is
    copied whole at ``setup``, before it is sharded; the engine runs on that copy, filled with the
    gathered weights, and the result is written back into the shards (see
    :mod:`warmstart.lightning.sharding`). The ``state_dict`` records that the transport was applied
    (with a fingerprint), so a run resumed from a checkpoint is not transported again.

    Example::

        import lightning as L
        from warmstart import TaskVectorTransport

        warm = TaskVectorTransport(source_vit, "source_finetuned.ckpt", target_attribute="net",
                                   alpha=2.0)
        L.Trainer(max_steps=100, callbacks=[warm]).fit(MyModule(target_vit), train, val)

    Args:
        source_pretrained: the source base model: the module (from Python), or a name that
            :func:`~warmstart.build_model` knows (packaged name, timm name, Hugging Face folder;
            a Hugging Face folder is loaded with the target's own ``AutoModelFor...`` class).
        source_finetuned: the fine-tuned source: a checkpoint path (Lightning ``.ckpt`` from any
            module, safetensors, ``.pt``/``.bin``, a Hugging Face folder), a module or a state
            dict. A wrapper prefix (``net.``, ``model.model.``) is found and stripped. Or a LoRA
            adapter (a PEFT adapter folder or ``PeftModel``): merged into a plain target, or,
            when the module wraps the target with PEFT (``get_peft_model``), written into the
            target's own LoRA factors in place (a warm-started LoRA fine-tuning).
        options: the transport options (:class:`~warmstart.TransportOptions`); keyword
            ``option_values`` (e.g. ``alpha=2.0``) replace single fields. Calibration uses
            ``options.calibration_batches`` training batches (8 when unset).
        target_attribute: dotted path of the target network inside the LightningModule
            (``"net"``, ``"model.backbone"``); ``""`` is the module itself; ``None`` (default)
            takes the one child module that holds all parameters.
        inputs: ``inputs(batch) -> model inputs`` (from YAML, an import path); default: the rule
            of :func:`~warmstart.lightning.batches.default_inputs`.
        source_inputs: ``source_inputs(batch) -> the source's inputs`` for the same examples,
            when the source reads other inputs (another tokenizer).
        source_tokenizer: shortcut for ``source_inputs``: re-tokenize ``batch[text_key]`` with
            this tokenizer (a Hugging Face folder or a packaged name).
        text_key: the batch key holding raw text, for ``source_tokenizer``.
        monitor: the validation metric ``alpha="auto"`` reads (the module must log it).
        mode: ``min`` when lower ``monitor`` is better, ``max`` otherwise.
        alpha_val_batches: validation batches per ``alpha="auto"`` trial.
        source_model_kwargs: extra arguments for building the source from a name.
        report_name: file name of the transport report in the run's log directory; a report left
            there by an earlier run is kept (the new one goes to ``<name>-v1.json``, with a
            warning); ``report_path`` holds the path used.
        progress: show progress bars (rank zero only).
        ramp_steps: the warm-start recipe (see :mod:`warmstart.lightning.recipe`): scale the
            learning rates of the first ``ramp_steps`` steps after the transport by ``k /
            (ramp_steps + 1)`` on top of the module's schedule (0: off).
        hold_steps: the recipe: for the first ``hold_steps`` steps after the transport only the
            task head trains (0: off).
        prime_steps: the recipe: before the first step, the optimizer steps at learning rate 0
            on this many training batches, so its moments start from the warm network's
            gradients; weights, buffers and the data order are left as they were (0: off; see
            :mod:`warmstart.lightning.recipe` for what it needs and refuses).
    """

    def __init__(
        self,
        source_pretrained: str | nn.Module,
        source_finetuned: str | nn.Module | dict,
        options: TransportOptions = TransportOptions(),  # noqa: B008 (frozen, shared safely)
        *,
        target_attribute: str | None = None,
        inputs: Callable[[Any], Any] | None = None,
        source_inputs: Callable[[Any], Any] | None = None,
        source_tokenizer: str | None = None,
        text_key: str = "text",
        monitor: str = "val_loss",
        mode: Literal["min", "max"] = "min",
        alpha_val_batches: int = 4,
        source_model_kwargs: dict[str, Any] | None = None,
        report_name: str = "transport_report.json",
        progress: bool = True,
        ramp_steps: int = 0,
        hold_steps: int = 0,
        prime_steps: int = 0,
        **option_values: Any,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}.")
        if isinstance(alpha_val_batches, bool) or not isinstance(alpha_val_batches, int) \
                or alpha_val_batches < 1:
            raise ValueError(f"alpha_val_batches must be >= 1, got {alpha_val_batches!r}.")
        if isinstance(source_finetuned, (str, os.PathLike)) \
                and not Path(source_finetuned).exists():
            raise FileNotFoundError(
                f"source_finetuned checkpoint {str(source_finetuned)!r} does not exist; give the "
                "path of the fine-tuned source (a Lightning .ckpt, safetensors, .pt/.bin or a "
                "Hugging Face folder).")
        if isinstance(options, Mapping):  # e.g. a compare config's transport section
            options = TransportOptions(**options)
        options = options.replace(**option_values)
        self.plan = WarmStart(
            source_pretrained, source_finetuned, options, target_attribute, inputs,
            source_inputs, source_tokenizer, text_key, monitor, mode, alpha_val_batches,
            dict(source_model_kwargs or {}))
        self.report_name = report_name
        self.progress = progress
        self.recipe = WarmupRecipe(ramp_steps, hold_steps, prime_steps)
        self._recipe_live = False  # the recipe applies only in the fit that transported
        self._prime_pending = False
        self.applied = False
        self.applied_fingerprint: str | None = None
        self.report = None
        self.report_path: Path | None = None  # where this run wrote its report
        self.seconds = 0.0
        self._sharded: ShardedTarget | None = None  # under FSDP: the target's full copy

    @property
    def options(self) -> TransportOptions:
        return self.plan.options

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # A new fit starts unapplied (a callback reused for another fit transports again);
        # resuming from a checkpoint restores the state after this, in load_state_dict.
        self.applied, self.applied_fingerprint, self.seconds = False, None, 0.0
        self.report = self.report_path = None
        self._recipe_live = self._prime_pending = False
        # under FSDP: the target copied whole now, before the strategy shards it
        self._sharded = ShardedTarget.at_setup(trainer, pl_module, self.plan.target_attribute)
        for name in ("hold_steps", "prime_steps"):
            if self._sharded is not None and getattr(self.recipe, name):
                raise ValueError(f"{name} is not supported on a sharded (FSDP) target; set "
                                 f"{name}=0 (ramp_steps works under every strategy).")
        find_target(pl_module, self.plan.target_attribute)
        if self.options.alpha == "auto":
            check_validation(trainer, "alpha='auto'")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sharded, self._sharded = self._sharded, None  # the copy is not kept past this hook
        if self.applied:
            if self.applied_fingerprint != self.plan.fingerprint():
                rank_zero_warn("the checkpoint was warm-started with another transport "
                               "configuration; it is not transported again.")
            return
        if self.recipe.prime_steps:  # refused before the transport's work, not after it
            check_primable(trainer, pl_module)
        started = time.perf_counter()
        self.report = run_transport(trainer, pl_module, self.plan,
                                    progress=self.progress and trainer.is_global_zero,
                                    sharded=sharded)
        self.seconds = time.perf_counter() - started
        self.applied, self.applied_fingerprint = True, self.plan.fingerprint()
        self._publish(trainer)
        if self.recipe.active:
            self.recipe.start(trainer.global_step,
                              find_target(pl_module, self.plan.target_attribute), self.report)
            self._recipe_live = True
            self._prime_pending = self.recipe.prime_steps > 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._prime_pending:
            return
        self._prime_pending = False
        wanted = self.recipe.prime_steps
        steps = _agreed_steps(trainer, wanted)
        with training_batches(trainer) as batches:
            taken = prime_optimizer(trainer, pl_module, batches, steps)
        if taken < wanted:
            rank_zero_warn(f"prime_steps={wanted}, but the optimizer was primed on {taken} "
                           "batches (the training data is shorter, a training_step returned "
                           "None or gradients were not finite).")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer) -> None:
        if self._recipe_live:
            self.recipe.before_step(trainer.global_step, optimizer)

    def _publish(self, trainer: L.Trainer) -> None:
        metrics = {f"transport/{k}": v for k, v in self.report.summary().items()}
        metrics["transport/seconds"] = self.seconds
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)
        self.report_path = _write_report(self.report, log_dir(trainer) / self.report_name)
        rank_zero_info(f"warmstart: {self.options.method} transport took {self.seconds:.1f} s "
                       f"(alpha={self.report.alpha:g}); report: {self.report_path}")

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "fingerprint": self.applied_fingerprint,
                "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = bool(state_dict.get("applied", False))
        if self.applied:  # a resumed fit: the recipe belonged to the fit that transported
            self._recipe_live = self._prime_pending = False
        self.applied_fingerprint = state_dict.get("fingerprint")
        self.seconds = float(state_dict.get("seconds", 0.0))


def _agreed_steps(trainer: L.Trainer, wanted: int) -> int:
    """``wanted``, or fewer when a rank has fewer training batches; every rank takes the
    smallest count, so the gradients' all-reduce never waits for a rank that ran out."""
    try:
        steps = min(wanted, len(calibration_loader(trainer)))
    except TypeError:  # an iterable dataset without a length
        steps = wanted
    if trainer.world_size > 1:
        counts = trainer.strategy.all_gather(
            torch.tensor(steps, device=trainer.strategy.root_device))
        steps = int(counts.min())
    return steps


@rank_zero_only
def _write_report(report, path: Path) -> Path:
    path = _unused_path(path)
    report.write_json(path)
    return path


class ConvergenceTracker(Callback):
    """The module's own validation metrics against optimizer step and wall-clock seconds, as CSV.

    The metrics are what the LightningModule logs in ``validation_step`` (``trainer.callback_
    metrics``): the ``monitor`` names, or by default every metric whose name starts with
    ``val``. They come from Lightning's own validation loop, which the tracker runs once before
    the first optimizer step (step 0, after any transport) and which the Trainer runs every
    ``every_n_steps`` optimizer steps (the tracker sets ``val_check_interval`` for that; ``None``
    keeps the Trainer's own schedule), and once more at the end when the last step was not
    validated. So ``limit_val_batches``, precision plugins, ``sync_dist`` metrics and DDP apply as
    in any validation, and the metrics reach every logger the Trainer has (with
    ``tracker/seconds``). Seconds count from ``setup`` (a transport is included) and exclude the
    validations. Rows: ``step,seconds,metric,value``.

    Example::

        tracker = ConvergenceTracker(every_n_steps=10, monitor=["val_acc"])
        L.Trainer(max_steps=100, limit_val_batches=8, callbacks=[tracker]).fit(model, data)
        tracker.written  # <log_dir>/curve.csv

    Args:
        every_n_steps: validation interval in optimizer steps (``None``: the Trainer's own).
        monitor: metric names to record (default: every logged metric starting with ``val``).
        filename: CSV name inside the run's log directory (or ``path`` to place it anywhere).
            A file left there by an earlier run is kept: the CSV then goes to ``<name>-v1.csv``
            (``-v2``...) with a warning; ``written`` holds the path used.
    """

    def __init__(self, every_n_steps: int | None = 10, monitor: list[str] | None = None,
                 filename: str = "curve.csv", path: str | None = None) -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool)
                                          or not isinstance(every_n_steps, int)
                                          or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be an integer >= 1 or None, got "
                             f"{every_n_steps!r}.")
        if isinstance(monitor, str):
            monitor = [monitor]
        self.every_n_steps = every_n_steps
        self.monitor = list(monitor) if monitor else None
        self.filename = filename
        self.path = path
        self.rows: list[tuple[int, float, str, float]] = []
        self._clock = 0.0
        self._started: float | None = None
        self.written: Path | None = None  # where this run wrote its CSV

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_validation(trainer, "ConvergenceTracker")
        # a new fit starts a new curve (a checkpoint's rows are restored after this)
        self.rows, self._clock, self.written = [], 0.0, None
        if self.every_n_steps is not None:
            # Lightning counts training batches; an optimizer step takes accumulate_grad_batches
            interval = self.every_n_steps * trainer.accumulate_grad_batches
            if trainer.val_check_interval not in (1.0, interval):
                rank_zero_info(f"ConvergenceTracker(every_n_steps={self.every_n_steps}) replaces "
                               f"the Trainer's val_check_interval={trainer.val_check_interval}; "
                               "every_n_steps=None keeps the Trainer's own schedule.")
            trainer.val_check_interval = interval
            trainer.check_val_every_n_epoch = None
        self._started = time.perf_counter()

    def seconds(self) -> float:
        running = 0.0 if self._started is None else time.perf_counter() - self._started
        return self._clock + running

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._recorded(trainer.global_step):
            validate_now(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:  # the clock stops while validation runs
            self._clock, self._started = self.seconds(), None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = self._metrics(trainer)
        step = trainer.global_step
        self.rows = [r for r in self.rows if r[0] != step]  # a step validated twice keeps the last
        self.rows += [(step, self._clock, k, v) for k, v in metrics.items()]
        for logger in trainer.loggers:
            logger.log_metrics({"tracker/seconds": self._clock}, step=step)
        self._started = time.perf_counter()

    def _metrics(self, trainer: L.Trainer) -> dict[str, float]:
        logged = scalar_metrics(trainer.callback_metrics)
        if self.monitor is None:
            found = {k: v for k, v in sorted(logged.items()) if k.startswith("val")}
            if not found:
                rank_zero_warn(f"ConvergenceTracker: the module logged no metric whose name "
                               f"starts with 'val' (it logged {sorted(logged) or 'none'}); "
                               "pass monitor=[...] with the names to record.")
            return found
        missing = [m for m in self.monitor if m not in logged]
        if missing:
            raise ValueError(f"ConvergenceTracker: monitor {missing} not among the metrics the "
                             f"module logged in validation ({sorted(logged) or 'none'}); log "
                             "them in validation_step or change monitor.")
        return {k: logged[k] for k in self.monitor}

    def _recorded(self, step: int) -> bool:
        return any(r[0] == step for r in self.rows)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._recorded(trainer.global_step):
            validate_now(trainer)
        path = Path(self.path) if self.path else log_dir(trainer) / self.filename
        self.written = self._write(path)

    @rank_zero_only
    def _write(self, path: Path) -> Path:
        path = _unused_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "seconds", "metric", "value"])
            writer.writerows(self.rows)
        return path

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows), "clock": self.seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [tuple(r) for r in state_dict.get("rows", [])]
        self._clock = float(state_dict.get("clock", 0.0))
