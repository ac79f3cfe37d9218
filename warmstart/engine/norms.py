"""Re-estimate BatchNorm running statistics of a transported target from calibration inputs.

A fine-tuned CNN's accuracy can live largely in its BatchNorm running statistics, which describe the
task's data rather than a direction in weight space; after a transport they are re-estimated with
forward passes only (no gradients): BatchNorm layers in train mode, every other layer in eval mode,
cumulative averages over the batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .activations import move_to, prepare_inputs, run_batch
from .families.base import ModelLayout

_BN = nn.modules.batchnorm._BatchNorm


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, layout: ModelLayout, batches: Iterable[Any]) -> int:
    """Replace every BatchNorm's running mean/variance by their average over ``batches``.

    Returns the number of batches used. Training flags and momenta are restored afterwards.
    """
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in layers]
    used = 0
    try:
        model.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch weighs the same
            m.train()
        for batch in batches:
            inputs, _ = prepare_inputs(model, layout, move_to(batch, model))
            run_batch(model, inputs, "target", used)
            used += 1
    finally:
        for m, training in flags:
            m.training = training
        for m, momentum in momenta:
            m.momentum = momentum
    if used == 0:
        raise ValueError("BatchNorm recalibration got no batches: the calibration inputs were "
                         "used up; pass a re-iterable (a list or a DataLoader), not a generator.")
    return used
