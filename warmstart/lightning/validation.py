"""Run the LightningModule's own validation (``validation_step`` and what it logs) from a callback.

Two uses, both through Lightning's validation loop, so ``limit_val_batches``, precision plugins,
``sync_dist`` metrics, distributed samplers and the module's own hooks all apply:

- :func:`quiet_validation` scores a trial (``alpha="auto"``) on a few batches the way Lightning's
  sanity check runs (``trainer.sanity_checking`` is true): nothing reaches the loggers,
  checkpointing and early stopping ignore it, the random generators are restored afterwards and
  the loop's progress and logged results are cleared, as after Lightning's own sanity check.
- :func:`validate_now` runs one ordinary validation between training steps (e.g. at step 0), as
  the training loop itself does every ``val_check_interval``; its metrics are logged as usual.
"""

from __future__ import annotations

import math

import lightning as L
from lightning.pytorch.loops.utilities import _reset_progress
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor


def check_validation(trainer: L.Trainer, why: str) -> None:
    """Raise when the fit has no validation to run (``why`` names the option that needs it)."""
    if not trainer.enable_validation:
        raise ValueError(
            f"{why} needs the LightningModule's validation: a validation_step, validation data "
            "(a val_dataloader or a DataModule with one) and limit_val_batches > 0.")


def quiet_validation(trainer: L.Trainer, n_batches: int) -> dict[str, float]:
    """The module's logged validation metrics over ``n_batches`` batches, with nothing logged.

    Returns ``trainer.callback_metrics`` as floats (scalars only).
    """
    check_validation(trainer, "scoring by validation")
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    stage, steps = trainer.state.stage, trainer.num_sanity_val_steps
    connector = trainer._logger_connector
    trainer.sanity_checking = True  # loggers, checkpoints and early stopping stay out of it
    trainer.num_sanity_val_steps = n_batches
    connector.reset_results()
    connector.reset_metrics()
    try:
        with isolate_rng():
            val_loop.run()
        return scalar_metrics(trainer.callback_metrics)
    finally:
        connector.reset_results()
        connector.reset_metrics()
        _reset_progress(val_loop)
        trainer.num_sanity_val_steps = steps
        trainer.state.stage = stage


def validate_now(trainer: L.Trainer) -> None:
    """One validation run now, inside ``fit``, exactly as the training loop runs it."""
    connector = trainer._logger_connector
    first_iter = connector._first_loop_iter
    trainer.validating = True
    try:
        trainer.fit_loop.epoch_loop.val_loop.run()
    finally:
        trainer.training = True
        connector._first_loop_iter = first_iter


def scalar_metrics(metrics: dict) -> dict[str, float]:
    out = {}
    for name, value in metrics.items():
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def monitored(metrics: dict[str, float], monitor: str, where: str) -> float:
    """``metrics[monitor]``; the error lists the metrics that exist (as EarlyStopping does)."""
    if monitor not in metrics:
        raise ValueError(
            f"{where}: monitor={monitor!r} is not among the metrics the module logged in "
            f"validation ({sorted(metrics) or 'none'}); log it in validation_step (self.log("
            f"{monitor!r}, ...)) or set monitor to one of these. (These runs are quiet "
            "validations with trainer.sanity_checking set, like Lightning's sanity check: a "
            "validation_step that skips logging during the sanity check logs nothing here.)")
    value = metrics[monitor]
    if not math.isfinite(value):
        return math.inf
    return value
