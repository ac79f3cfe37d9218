"""The warm-start recipe: how the first optimizer steps after a transport differ from the rest.

A transported network starts near a solution, and the first steps of an optimizer with fresh
moments (Adam's first update moves every weight by about the learning rate, whatever its
gradient) can throw part of that start away. Three remedies, all off by default, all applied by
:class:`~warmstart.TaskVectorTransport` only in the fit that ran the transport:

- ``ramp_steps``: the learning rate of every parameter group is scaled by ``k / (ramp_steps + 1)``
  at the ``k``-th step after the transport (``k = 1 .. ramp_steps``), on top of the module's own
  schedule, and restored after the step, so the schedule itself is left as it was;
- ``hold_steps``: for that many steps only the task head trains (the other parameters' gradients
  are dropped before the step, so the optimizer neither moves them nor starts their moments);
  the head, fitted to the moved body first, then trains with it;
- ``prime_steps``: before the first step, the optimizer takes that many steps at learning rate 0
  on this rank's first training batches (unshuffled under a distributed sampler; each through
  the loop's batch hooks, ``training_step``, the strategy's backward and the module's gradient
  clipping), so its moments (Adam's running means of the gradient and of its square, SGD's
  momentum) start from the warm network's gradients instead of zero. The weights do not move;
  buffers such as BatchNorm's running statistics, the random state and the loader's generators
  are put back, so the fit's data order is unchanged. The priming losses are not logged. Each
  priming step takes one batch (no gradient accumulation), the moments of weights that
  ``hold_steps`` holds are primed too, and metrics a ``training_step`` updates itself (a
  torchmetrics object) count the priming batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import lightning as L
import torch
from lightning.pytorch.utilities.seed import isolate_rng
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
    prime_steps: int = 0
    start_step: int = 0
    held: list[nn.Parameter] = field(default_factory=list)
    pending: list[Callable[..., None]] = field(default_factory=list)  # restores not yet run

    def __post_init__(self) -> None:
        _count("ramp_steps", self.ramp_steps)
        _count("hold_steps", self.hold_steps)
        _count("prime_steps", self.prime_steps)

    @property
    def active(self) -> bool:
        return self.ramp_steps > 0 or self.hold_steps > 0 or self.prime_steps > 0

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


# optimizers whose step at learning rate 0 leaves every weight exactly where it was (checked by
# exact type: a subclass may step differently)
PRIMABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam,
            torch.optim.Adamax, torch.optim.SGD, torch.optim.RMSprop)


def check_primable(trainer: L.Trainer, pl_module: L.LightningModule) -> torch.optim.Optimizer:
    """The one optimizer ``prime_steps`` can prime, or ``ValueError`` naming the fix."""
    if not pl_module.automatic_optimization:
        raise ValueError("prime_steps steps the optimizer itself, which a module with manual "
                         "optimization drives on its own; set prime_steps=0.")
    if len(trainer.optimizers) != 1:
        raise ValueError(f"prime_steps needs exactly one optimizer, the module configured "
                         f"{len(trainer.optimizers)}; set prime_steps=0.")
    if "16-mixed" in str(trainer.precision) and "bf16" not in str(trainer.precision):
        raise ValueError("prime_steps cannot prime under precision='16-mixed' (its gradient "
                         "scaler would scale the primed moments); use 'bf16-mixed' or 32, or set "
                         "prime_steps=0.")
    optimizer = trainer.optimizers[0]
    if type(optimizer) not in PRIMABLE:
        names = ", ".join(c.__name__ for c in PRIMABLE)
        raise ValueError(f"prime_steps supports torch.optim's {names}, whose step at learning "
                         f"rate 0 moves no weight; the module uses {type(optimizer).__name__}. "
                         "Set prime_steps=0.")
    return optimizer


@contextmanager
def _not_logging(pl_module: L.LightningModule) -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` do nothing inside (the priming losses are not part of
    the run's metrics, and Lightning refuses step logging outside the training loop)."""
    pl_module.log = pl_module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict


def prime_optimizer(trainer: L.Trainer, pl_module: L.LightningModule, batches,
                    steps: int) -> int:
    """Take up to ``steps`` optimizer steps at learning rate 0 on ``batches`` (ready for
    ``training_step``: see :func:`~warmstart.lightning.warm.training_batches`) through the
    module's own ``training_step``, the strategy's backward (so gradients are synchronised across
    ranks as in training) and the module's gradient clipping. Weights, buffers and the random
    state are left as they were. A batch whose ``training_step`` returns ``None`` (Lightning's
    "skip") or whose gradients are not finite takes no step. Returns the number of steps taken.
    """
    optimizer = check_primable(trainer, pl_module)
    rates = [group["lr"] for group in optimizer.param_groups]
    buffers = {name: b.detach().clone() for name, b in pl_module.named_buffers()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    taken = 0
    try:
        with isolate_rng(), _not_logging(pl_module):
            for index, batch in enumerate(batches):
                if taken == steps:
                    break
                out = trainer.strategy.training_step(batch, index)
                loss = out.get("loss") if isinstance(out, Mapping) else out
                if loss is None:
                    continue
                if not isinstance(loss, torch.Tensor):
                    raise ValueError("prime_steps needs training_step to return the loss (a "
                                     "tensor, or a dict with 'loss'); it returned "
                                     f"{type(out).__name__}. Set prime_steps=0.")
                pl_module.zero_grad(set_to_none=True)
                trainer.strategy.backward(loss, optimizer)
                if not all(torch.isfinite(p.grad).all() for p in params if p.grad is not None):
                    continue  # 0 x inf is NaN: such a step would write NaN into the weights
                pl_module.configure_gradient_clipping(
                    optimizer, gradient_clip_val=trainer.gradient_clip_val,
                    gradient_clip_algorithm=trainer.gradient_clip_algorithm)
                for group in optimizer.param_groups:
                    group["lr"] = 0.0
                optimizer.step()
                for group, rate in zip(optimizer.param_groups, rates):
                    group["lr"] = rate
                taken += 1
    finally:
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        pl_module.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, b in pl_module.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    return taken
