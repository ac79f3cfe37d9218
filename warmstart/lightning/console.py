"""What warmstart's own commands print: one progress display per run and the summary.

:func:`quiet_console` hides what third-party libraries print on every run (Lightning's tips and
accelerator banners, known deprecation warnings, the progress bars of datasets and of
transformers' weight loading);
``warmstart demo --verbose`` (and ``compare``, ``transport``) brings them back.
:class:`StepProgress` is the one progress display of a fit: optimizer steps and the last
validation metrics.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
from lightning.pytorch.callbacks import Callback
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .validation import scalar_metrics

# Loggers whose INFO lines are banners or tips ("GPU available: ...", "💡 Tip: ...").
_CHATTY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning_fabric",
                   "pytorch_lightning")
# Warnings known to come from third-party code on every run, with nothing for the user to do.
_KNOWN_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*does not have many workers which may be a bottleneck.*",
    r".*is smaller than the logging interval.*",
    r".*`tensorboardX` has been removed as a dependency.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r"No seed found, seed set to 0",
)


@contextmanager
def quiet_console(verbose: bool = False) -> Iterator[None]:
    """Silence the chatter above while the block runs (nothing changes when ``verbose``)."""
    if verbose:
        yield
        return
    import datasets
    import transformers

    levels = {name: logging.getLogger(name).level for name in _CHATTY_LOGGERS}
    bars = datasets.utils.logging.is_progress_bar_enabled()
    hf_bars = transformers.utils.logging.is_progress_bar_enabled()
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    datasets.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars
    try:
        with warnings.catch_warnings():
            for pattern in _KNOWN_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()
        if hf_bars:
            transformers.utils.logging.enable_progress_bar()


class StepProgress(Callback):
    """One rich progress bar for a fit: optimizer steps out of ``max_steps`` and the last
    validation metrics (``monitor`` names, default every ``val*`` metric)."""

    def __init__(self, description: str, monitor: list[str] | None = None) -> None:
        self.description, self.monitor = description, monitor
        self._progress: Progress | None = None
        self._task = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(),
                                  TextColumn("{task.fields[metrics]}"))
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=total, metrics="")
        self._progress.update(self._task, completed=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=trainer.global_step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._progress is None or trainer.sanity_checking:
            return
        metrics = scalar_metrics(trainer.callback_metrics)
        names = self.monitor or sorted(k for k in metrics if k.startswith("val"))
        shown = "  ".join(f"{k} {metrics[k]:.3f}" for k in names if k in metrics)
        self._progress.update(self._task, metrics=shown)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=trainer.global_step)
            self._progress.stop()
            self._progress = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_train_end(trainer, pl_module)
