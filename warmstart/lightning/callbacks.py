"""Lightning callbacks: warm-start the target at the start of ``fit``; record convergence curves."""

from __future__ import annotations

import csv
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ..engine.matching import check_depth_mapping
from ..engine.transport import DEFAULT_ALPHA_GRID
from .warm import TransportConfig, evaluate, run_transport


def _log_dir(trainer: L.Trainer) -> Path:
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


def _train_batches(trainer: L.Trainer):
    if trainer.datamodule is not None:
        return trainer.datamodule.train_dataloader()
    return trainer.fit_loop._data_source.dataloader()


def _val_batches(trainer: L.Trainer):
    if trainer.datamodule is not None:
        return trainer.datamodule.val_dataloader()
    source = trainer.fit_loop.epoch_loop.val_loop._data_source
    return source.dataloader() if source.is_defined() else None


class TaskVectorTransport(Callback):
    """Move a fine-tuned source's task vector into the model being fitted, once, at fit start.

    The transport runs in ``on_fit_start`` (the model is on its device and the optimizer holds its
    parameters), under ``no_grad`` and in place, so the optimizer keeps its references. Its
    ``state_dict`` records that it was applied (with a fingerprint of the configuration), so a run
    resumed from a checkpoint is not transported again.

    Example::

        from lightning import Trainer
        from warmstart import Classifier, ImageClassificationData, TaskVectorTransport

        warm = TaskVectorTransport("efficientnet_lite0", "runs/source/last.ckpt", alpha=1.0)
        model = Classifier("efficientnet_lite2", num_classes=10)
        Trainer(max_steps=100, callbacks=[warm]).fit(model, ImageClassificationData())

    Args:
        source_pretrained: the source base model: a packaged name (``minilm``, ``mpnet``,
            ``efficientnet_lite0``), a timm model name, a Hugging Face folder, or (from Python)
            the module itself.
        source_finetuned: checkpoint of the fine-tuned source (Lightning ``.ckpt`` written by
            warmstart's ``Classifier``, safetensors, ``.pt``/``.bin``, or a Hugging Face folder).
        method: ``theseus``, ``slice`` or ``head_only``.
        calibration_batches: training batches used to align activations.
        alpha: strength, or ``auto`` to pick it from ``alpha_grid`` by validation loss on
            ``alpha_val_batches`` validation batches (forward passes only).
        center, whiten, completion, solver, depthwise, embeddings, depth_mapping,
            bn_recalibration, strict: transport options (see :func:`warmstart.engine.transport`);
            ``bn_recalibration`` re-estimates BatchNorm statistics from that many of the
            calibration batches.
        source_model_kwargs: extra arguments for building the source (e.g. a tiny timm ViT's size).
        target_attribute: attribute of the LightningModule that holds the target network.
        report_name: file name of the transport report in the run's log directory; a report left
            there by an earlier run is kept (the new one goes to ``<name>-v1.json``, with a
            warning); ``report_path`` holds the path used.
    """

    def __init__(
        self,
        source_pretrained: str | nn.Module,
        source_finetuned: str,
        method: Literal["theseus", "slice", "head_only"] = "theseus",
        calibration_batches: int = 8,
        alpha: float | Literal["auto"] = 1.0,
        alpha_grid: list[float] | None = None,
        alpha_val_batches: int = 4,
        center: bool = False,
        whiten: float = 0.0,
        completion: Literal["none", "crop"] = "crop",
        solver: Literal["auto", "svd", "eigh"] = "auto",
        depthwise: Literal["diagonal", "zero"] = "diagonal",
        embeddings: Literal["zero", "map"] = "zero",
        depth_mapping: list[int] | None = None,
        bn_recalibration: int = 0,
        strict: bool = True,
        source_model_kwargs: dict[str, Any] | None = None,
        target_attribute: str = "model",
        report_name: str = "transport_report.json",
        progress: bool = True,
    ) -> None:
        if isinstance(depth_mapping, Mapping):
            raise TypeError(f"depth_mapping must be a list with one source block index per target "
                            f"block (the callback takes no dict), got {depth_mapping!r}.")
        check_depth_mapping(depth_mapping)
        self.source_module = source_pretrained if isinstance(source_pretrained, nn.Module) else None
        if self.source_module is not None:
            source_pretrained = f"<module {type(source_pretrained).__name__}>"
        self.config = TransportConfig(
            str(source_pretrained), str(source_finetuned), method, int(calibration_batches),
            alpha, tuple(alpha_grid or DEFAULT_ALPHA_GRID), int(alpha_val_batches), bool(center),
            float(whiten), completion, solver, depthwise, embeddings,
            tuple(depth_mapping) if depth_mapping else None, int(bn_recalibration), bool(strict),
            dict(source_model_kwargs or {}), target_attribute,
        )
        self.config.check()
        self.report_name = report_name
        self.progress = progress
        self.applied = False
        self.applied_fingerprint: str | None = None
        self.report = None
        self.report_path: Path | None = None  # where this run wrote its report
        self.seconds = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            from .warm import target_module

            target_module(pl_module, self.config.target_attribute)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.applied:
            if self.applied_fingerprint != self.config.fingerprint():
                rank_zero_warn("the checkpoint was warm-started with another transport "
                               "configuration; it is not transported again.")
            return
        started = time.perf_counter()
        self.report = run_transport(self.config, pl_module, _train_batches(trainer),
                                    _val_batches(trainer) if self.config.alpha == "auto" else None,
                                    progress=self.progress and trainer.is_global_zero,
                                    source_module=self.source_module)
        self.seconds = time.perf_counter() - started
        self.applied, self.applied_fingerprint = True, self.config.fingerprint()
        self._publish(trainer)

    def _publish(self, trainer: L.Trainer) -> None:
        metrics = {f"transport/{k}": v for k, v in self.report.summary().items()}
        metrics["transport/seconds"] = self.seconds
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)
        if trainer.is_global_zero:
            path = _unused_path(_log_dir(trainer) / self.report_name)
            self.report.write_json(path)
            self.report_path = path
            rank_zero_info(f"warmstart: {self.config.method} transport took {self.seconds:.1f} s "
                           f"(alpha={self.report.alpha:g}); report: {path}")

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "fingerprint": self.applied_fingerprint,
                "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = bool(state_dict.get("applied", False))
        self.applied_fingerprint = state_dict.get("fingerprint")
        self.seconds = float(state_dict.get("seconds", 0.0))


class ConvergenceTracker(Callback):
    """Validation metrics against optimizer step and wall-clock seconds, written as CSV.

    Evaluates ``pl_module(batch)`` (logits) against ``batch["label"]`` on the validation data at
    step 0 (after any transport, before training), every ``every_n_steps`` optimizer steps and at
    the end. Seconds count from ``setup`` (so a transport is included) and exclude the tracker's
    own evaluations. Rows: ``step,seconds,metric,value`` (``val_loss``, ``val_acc``).

    Args:
        every_n_steps: evaluation interval in optimizer steps.
        max_val_batches: validation batches per evaluation (``None``: all).
        filename: CSV name inside the run's log directory (or ``path`` to place it anywhere).
            A file left there by an earlier run is kept: the CSV then goes to ``<name>-v1.csv``
            (``-v2``...) with a warning; ``written`` holds the path used.
    """

    def __init__(self, every_n_steps: int = 10, max_val_batches: int | None = None,
                 filename: str = "curve.csv", path: str | None = None) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        if max_val_batches is not None and max_val_batches < 1:
            raise ValueError(f"max_val_batches must be >= 1 or None, got {max_val_batches}.")
        self.every_n_steps = every_n_steps
        self.max_val_batches = max_val_batches
        self.filename = filename
        self.path = path
        self.rows: list[tuple[int, float, str, float]] = []
        self._clock = 0.0
        self._started = 0.0
        self._last_step = -1
        self.written: Path | None = None  # where this run wrote its CSV

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._started = time.perf_counter()

    def seconds(self) -> float:
        return self._clock + time.perf_counter() - self._started

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._clock = self.seconds()  # the clock stops while the tracker itself evaluates
        metrics = evaluate(pl_module, _val_batches(trainer) or [], self.max_val_batches)
        self._started = time.perf_counter()
        self.rows += [(step, self._clock, k, v) for k, v in metrics.items()]
        self._last_step = step
        for logger in trainer.loggers:
            logger.log_metrics({f"tracker/{k}": v for k, v in metrics.items()}, step=step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._record(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, pl_module)
        if trainer.is_global_zero:
            path = Path(self.path) if self.path else _log_dir(trainer) / self.filename
            self.written = self.write(_unused_path(path))

    def write(self, path: Path) -> Path:
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
        self._last_step = self.rows[-1][0] if self.rows else -1
