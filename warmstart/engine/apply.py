"""Write an update into the target transactionally, and put the old values back on failure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from itertools import islice

import torch
from torch import Tensor, nn

from .norms import batchnorm_layers, recalibrate_batchnorm
from .update import Update


def target_tensors(target: nn.Module) -> dict[str, Tensor]:
    """Parameters and floating buffers of ``target`` by state-dict name (the live tensors)."""
    out = dict(target.named_parameters())
    out.update({n: b for n, b in target.named_buffers() if b.is_floating_point()})
    return out


def apply_update(target: nn.Module, update: Update, alpha: float) -> None:
    """Write ``theta + alpha * delta`` (computed in float64, cast once), the replaced values and
    the scaled variances ``theta * exp(alpha * log_scale)``.

    All new values are computed and checked first; the copy restores the old values if it fails.
    """
    live = target_tensors(target)
    new_values: dict[str, Tensor] = {}
    items = [*((n, d, "delta") for n, d in update.deltas.items()),
             *((n, v, "value") for n, v in update.values.items()),
             *((n, s, "scale") for n, s in (update.log_scales or {}).items())]
    for name, tensor, kind in items:
        current = live[name]
        value = tensor.to(current.device)
        if kind == "delta":
            value = current.detach().double() + alpha * value
        elif kind == "scale":
            value = current.detach().double() * torch.exp(alpha * value)
        value = value.to(dtype=current.dtype)  # checked after the cast: fp16 overflows at 65504
        if not torch.isfinite(value).all():
            raise ValueError(f"the transported value of {name} is not finite in "
                             f"{current.dtype}; nothing was written. Check alpha and the "
                             "calibration data.")
        new_values[name] = value
    backup = {name: live[name].detach().clone() for name in new_values}
    try:
        with torch.no_grad():
            for name, value in new_values.items():
                live[name].copy_(value)
    except BaseException:
        _restore(target, backup)
        raise


def _recalibration(target, layout, calibration, target_calibration, n_batches: int):
    """What to run after each write: BatchNorm recalibration on ``n_batches``, or nothing."""
    if n_batches == 0 or not batchnorm_layers(target):
        return lambda: None
    source = target_calibration if target_calibration is not None else calibration
    if source is None:
        raise ValueError("bn_recalibration needs calibration inputs; pass calibration=...")
    batches = list(islice(source, n_batches))  # re-iterable for every alpha trial
    return lambda: recalibrate_batchnorm(target, layout, batches)


def _touched(target: nn.Module, update: Update, also: Iterable[str] = ()) -> dict[str, Tensor]:
    """Backups of everything a write (and a BatchNorm recalibration) may change; ``also``: the
    names of further tensors that runs after the write change (a refitted head)."""
    live = target_tensors(target)
    names = {*update.deltas, *update.values, *(update.log_scales or {}), *also}
    names |= {n for n, b in target.named_buffers() if n.endswith(("running_mean", "running_var"))}
    return {n: live[n].detach().clone() for n in names if n in live}


@contextmanager
def _restored_on_error(target: nn.Module, update: Update, also: Iterable[str] = ()):
    backup = _touched(target, update, also)
    try:
        yield
    except BaseException:
        _restore(target, backup)
        raise


def _restore(target: nn.Module, backup: Mapping[str, Tensor]) -> None:
    live = target_tensors(target)
    with torch.no_grad():
        for name, value in backup.items():
            live[name].copy_(value)

