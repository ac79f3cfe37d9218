"""The warm-start recipe of ``TaskVectorTransport``: ``hold_steps`` and ``ramp_steps`` inside real
fits of a user's module (a timm ViT at ``self.net``, ``(x, y)`` batches)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from warmstart import TaskVectorTransport
from warmstart.lightning.recipe import WarmupRecipe

from .test_dropin import TupleModule, _finetuned_source, _tensor_data, _trainer, _vit


class Record(L.Callback):
    """After every optimizer step: the module's weights, the optimizer's state keys and its
    learning rate; at every step: the learning rate the optimizer stepped with."""

    def __init__(self):
        self.weights, self.stepped_lr, self.lr_after, self.has_state = [], [], [], []

    def on_train_start(self, trainer, pl_module):
        self.weights.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.stepped_lr.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})
        optimizer = trainer.optimizers[0]
        self.lr_after.append(optimizer.param_groups[0]["lr"])
        self.has_state.append({k for k, p in pl_module.named_parameters()
                               if p in optimizer.state})


class Scheduled(TupleModule):
    """The user's own schedule: lr 3e-3 halved after every step."""

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule,
                                                         "interval": "step"}}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return _finetuned_source(tmp_path_factory.mktemp("source"), TupleModule, lambda: _vit(16, 2),
                             lambda: _tensor_data((3, 16, 16)))


def _fit(tmp_path, source, module, steps, **recipe):
    net, checkpoint = source
    torch.manual_seed(1)
    warm = TaskVectorTransport(net, checkpoint, calibration_batches=2, progress=False, **recipe)
    record = Record()  # after warm: it sees the learning rates warm set
    _trainer(tmp_path, [warm, record], max_steps=steps).fit(
        module, _tensor_data((3, 16, 16)), _tensor_data((3, 16, 16)))
    return warm, record


def test_hold_steps_train_the_head_alone_first(tmp_path, source):
    torch.manual_seed(1)
    warm, record = _fit(tmp_path, source, TupleModule(_vit(24, 3)), steps=3, hold_steps=2)
    start = record.weights[0]
    head = {k for k in start if k.startswith("net.head.")}
    body = set(start) - head
    assert head == {"net.head.weight", "net.head.bias"}
    for step in (1, 2):  # held: the body as the transport left it, with no optimizer state
        after = record.weights[step]
        assert all(torch.equal(after[k], start[k]) for k in body)
        assert all(not torch.equal(after[k], record.weights[step - 1][k]) for k in head)
        assert record.has_state[step - 1] == head
    moved = [k for k in body if not torch.equal(record.weights[3][k], start[k])]
    assert len(moved) == len(body)  # step 3: everything trains
    assert record.has_state[2] == set(start)


def test_ramp_steps_scale_the_modules_own_schedule_and_leave_it_intact(tmp_path, source):
    torch.manual_seed(1)
    _, plain = _fit(tmp_path / "plain", source, Scheduled(_vit(24, 3)), steps=4)
    torch.manual_seed(1)
    _, ramped = _fit(tmp_path / "ramp", source, Scheduled(_vit(24, 3)), steps=4, ramp_steps=2)
    assert plain.stepped_lr == pytest.approx([3e-3, 1.5e-3, 7.5e-4, 3.75e-4])
    factors = [1 / 3, 2 / 3, 1, 1]
    assert ramped.stepped_lr == pytest.approx([f * lr for f, lr in zip(factors, plain.stepped_lr)])
    assert ramped.lr_after == pytest.approx(plain.lr_after)  # the schedule itself untouched


def test_a_resumed_fit_is_not_ramped_again(tmp_path, source):
    net, checkpoint = source
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    torch.manual_seed(1)
    first = TaskVectorTransport(net, checkpoint, calibration_batches=2, progress=False,
                                ramp_steps=3)
    _trainer(tmp_path / "first", [first, saver], max_steps=1).fit(
        TupleModule(_vit(24, 3)), _tensor_data((3, 16, 16)), _tensor_data((3, 16, 16)))
    resumed = TaskVectorTransport(net, checkpoint, calibration_batches=2, progress=False,
                                  ramp_steps=3)
    record = Record()
    _trainer(tmp_path / "resumed", [resumed, record], max_steps=3).fit(
        TupleModule(_vit(24, 3)), _tensor_data((3, 16, 16)), _tensor_data((3, 16, 16)),
        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.applied and resumed.report is None
    assert record.stepped_lr == pytest.approx([3e-3, 3e-3])  # the module's own rate


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_recipe_counts_must_be_whole_numbers(bad):
    with pytest.raises(ValueError, match="hold_steps must be an integer >= 0"):
        WarmupRecipe(hold_steps=bad)
    with pytest.raises(ValueError, match="ramp_steps must be an integer >= 0"):
        WarmupRecipe(ramp_steps=bad)
