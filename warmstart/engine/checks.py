"""Checks on a transport's inputs that run before anything is computed or written."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn


def check_models(source_pretrained: Any, target: Any) -> None:
    """Both models must be modules that hold data (not on the meta device)."""
    for arg, model, fix in (
        ("source_pretrained", source_pretrained, "build the source model and load its pretrained "
         "weights; a checkpoint path is accepted for source_finetuned only"),
        ("target", target, "pass the model itself (it is updated in place), not its state dict "
         "or a path"),
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{arg} must be an nn.Module, got "
                            f"{type(model).__name__} {_short(model)}; {fix}.")
        on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if on_meta:
            raise ValueError(
                f"{arg} has {len(on_meta)} tensor(s) on the meta device, which hold no data "
                f"(e.g. {on_meta[0]!r}); materialize the model before transporting (e.g. "
                "model.to_empty(device='cpu') and load its weights, or build it without "
                "device='meta').")


def check_calibration(arg: str, calibration: Any) -> None:
    """An iterable of batches; a lone batch (a tensor or a mapping) is the usual slip."""
    if calibration is None:
        return
    if isinstance(calibration, (Tensor, Mapping)):
        what = (f"one Tensor of shape {tuple(calibration.shape)}"
                if isinstance(calibration, Tensor) else "one mapping (a single batch)")
        raise TypeError(f"{arg} must be an iterable of batches, got {what}; wrap a single batch "
                        f"in a list ([batch]) or pass a DataLoader.")
    if not isinstance(calibration, Iterable):
        raise TypeError(f"{arg} must be an iterable of batches (a list of model inputs or a "
                        f"DataLoader), got {type(calibration).__name__} {_short(calibration)}.")


def _short(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"with {len(value)} entries"
    text = repr(value)
    if isinstance(value, (str, os.PathLike)):
        return text  # a path is worth reading in full
    return text if len(text) <= 60 else text[:57] + "..."


def _checked_finetuned(finetuned: dict[str, Tensor]) -> dict[str, Tensor]:
    """The finetuned weights must hold data and be finite (a diverged run gives NaN weights)."""
    on_meta = sorted(k for k, v in finetuned.items() if v.is_meta)
    if on_meta:
        raise ValueError(f"source_finetuned has {len(on_meta)} tensor(s) on the meta device, which "
                         f"hold no data (e.g. {on_meta[0]!r}); pass real weights.")
    bad = sorted(k for k, v in finetuned.items()
                 if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(
            f"source_finetuned holds NaN or Inf in {len(bad)} tensor(s) ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}); the fine-tuning diverged or the checkpoint is "
            "damaged: use an earlier checkpoint of the run.")
    return finetuned


def _warn_zero(tau: Mapping[str, Tensor]) -> None:
    if tau and all(not bool(v.any()) for v in tau.values()):
        warnings.warn(
            f"the task vector is zero: source_finetuned equals source_pretrained on all "
            f"{len(tau)} shared tensors, so only the task head is transported; check that "
            "source_finetuned is the fine-tuned checkpoint, not the base model.", stacklevel=4)

