"""The warm-start recipe: how the first optimizer steps after a transport differ from the rest.

A transported network starts near a solution, and the first steps of an optimizer with fresh
moments (Adam's first update moves every weight by about the learning rate, whatever its
gradient) can throw part of that start away. Two remedies, both off by default, both applied by
:class:`~warmstart.TaskVectorTransport` only in the fit that ran the transport:

- ``ramp_steps``: the learning rate of every parameter group is scaled by ``k / (ramp_steps + 1)``
  at the ``k``-th step after the transport (``k = 1 .. ramp_steps``), on top of the module's own
  schedule, and restored after the step, so the schedule itself is left as it was;
- ``hold_steps``: for that many steps only the task head trains (the other parameters' gradients
  are dropped before the step, so the optimizer neither moves them nor starts their moments);
  the head, fitted to the moved body first, then trains with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..engine.head_hidden import HEAD_RULES
from ..engine.transport_report import TransportReport


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0 (0: off), got {value!r}.")
    return value


def head_modules(report: TransportReport) -> set[str]:
    """Module paths of the task head, from the rules the transport gave the target's tensors."""
    return {p.name.split("[")[0].rsplit(".", 1)[0] for p in report.params
            if p.rule in HEAD_RULES}


def _under(name: str, module: str) -> bool:
    # "head" holds "head.weight" and, under PEFT, "base_model.model.head.modules_to_save.x.weight"
    return f".{module}." in f".{name}"


@dataclass
class WarmupRecipe:
    """The callback's recipe state for one fit (see the module docstring)."""

    ramp_steps: int = 0
    hold_steps: int = 0
    start_step: int = 0
    held: list[nn.Parameter] = field(default_factory=list)
    pending: list[Callable[..., None]] = field(default_factory=list)  # restores not yet run

    def __post_init__(self) -> None:
        _count("ramp_steps", self.ramp_steps)
        _count("hold_steps", self.hold_steps)

    @property
    def active(self) -> bool:
        return self.ramp_steps > 0 or self.hold_steps > 0

    def start(self, global_step: int, target: nn.Module, report: TransportReport) -> None:
        """Called right after the transport: steps count from here."""
        self.start_step, self.held = global_step, []
        if not self.hold_steps:
            return
        heads = head_modules(report)
        if not heads:
            raise ValueError(
                "hold_steps trains the task head alone first, but the transport found no task "
                "head in the target (no tensor got a head rule); set hold_steps=0.")
        self.held = [p for name, p in target.named_parameters()
                     if p.requires_grad and not any(_under(name, h) for h in heads)]

    def before_step(self, global_step: int, optimizer: torch.optim.Optimizer) -> None:
        """Before ``optimizer`` steps: drop the held gradients, scale the learning rates (put
        back by a hook right after ``optimizer.step``, before any scheduler reads them)."""
        for undo in self.pending[:]:  # a step that did not run (e.g. skipped by AMP's scaler)
            undo()
        k = global_step - self.start_step  # optimizer steps taken since the transport
        if k < self.hold_steps:
            for p in self.held:
                p.grad = None
        if k >= self.ramp_steps:
            return
        saved = [g["lr"] for g in optimizer.param_groups]
        factor = (k + 1) / (self.ramp_steps + 1)
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * factor

        def restore(*_: object) -> None:
            for g, lr in zip(optimizer.param_groups, saved):
                g["lr"] = lr
            handle.remove()
            self.pending.remove(restore)

        handle = optimizer.register_step_post_hook(restore)
        self.pending.append(restore)
