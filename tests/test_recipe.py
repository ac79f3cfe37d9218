"""The warm-start recipe of ``TaskVectorTransport``: ``hold_steps``, ``ramp_steps`` and
``prime_steps`` inside real fits of a user's module (a timm ViT at ``self.net``, ``(x, y)``
batches)."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from warmstart import TaskVectorTransport
from warmstart.lightning.recipe import WarmupRecipe, prime_optimizer

from .test_dropin import N_CLASSES, TupleModule, _finetuned_source, _tensor_data, _trainer, _vit


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


class PrimeAtStart(L.Callback):
    """Primes the optimizer at ``on_train_start`` and keeps what the test checks: the module's
    state and the random state before, the same after, and the gradients the priming steps saw,
    recomputed by hand on a copy of the network from the same random state."""

    def __init__(self, loader, steps):
        self.loader, self.steps = loader, steps

    def on_train_start(self, trainer, pl_module):
        self.before = copy.deepcopy(pl_module.state_dict())
        rng = torch.get_rng_state()
        copy_net = copy.deepcopy(pl_module.net).train()
        self.used = prime_optimizer(trainer, pl_module, self.loader, self.steps)
        self.rng_kept = torch.equal(torch.get_rng_state(), rng)
        self.after = copy.deepcopy(pl_module.state_dict())
        optimizer = trainer.optimizers[0]
        self.state = {name: {k: v.clone() for k, v in optimizer.state[p].items()}
                      for name, p in pl_module.net.named_parameters()}
        self.betas = optimizer.param_groups[0]["betas"]
        torch.set_rng_state(rng)  # the same dropout masks as the priming passes drew
        self.grads = []
        for (x, y), _ in zip(self.loader, range(self.steps)):
            copy_net.zero_grad()
            F.cross_entropy(copy_net(x), y).backward()
            self.grads.append({n: p.grad.clone() for n, p in copy_net.named_parameters()})
        torch.set_rng_state(rng)


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16), nn.Dropout(0.3),
                         nn.GELU(), nn.Linear(16, N_CLASSES))


def test_prime_optimizer_fills_adams_moments_and_moves_nothing(tmp_path):
    torch.manual_seed(0)
    data = _tensor_data((3, 4, 4))
    prime = PrimeAtStart(DataLoader(data.dataset, batch_size=16), steps=3)
    _trainer(tmp_path, [prime], max_steps=1).fit(TupleModule(_bn_net()), data)
    assert prime.used == 3 and prime.rng_kept
    for key, value in prime.before.items():  # weights and BatchNorm statistics as they were
        assert torch.equal(prime.after[key], value), key
    beta1, beta2 = prime.betas
    for name, state in prime.state.items():
        grads = [g[name] for g in prime.grads]
        mean = sum((1 - beta1) * beta1 ** (2 - k) * g for k, g in enumerate(grads))
        square = sum((1 - beta2) * beta2 ** (2 - k) * g * g for k, g in enumerate(grads))
        assert float(state["step"]) == 3
        torch.testing.assert_close(state["exp_avg"], mean, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(state["exp_avg_sq"], square, rtol=1e-4, atol=1e-12)


class FirstBatch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.x = batch[0].clone()


class Logging(TupleModule):
    """Logs its loss in ``training_step``, as most modules do (priming must not log it)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=True, prog_bar=True)
        return loss


@pytest.mark.parametrize("seeded", [False, True], ids=["global_rng", "loader_generator"])
def test_prime_steps_through_the_callback_keep_the_start_and_the_data_order(tmp_path, source,
                                                                            seeded):
    net, checkpoint = source
    runs = {}
    for prime_steps in (0, 2):
        torch.manual_seed(1)
        warm = TaskVectorTransport(net, checkpoint, calibration_batches=2, progress=False,
                                   prime_steps=prime_steps)
        record, first = Record(), FirstBatch()
        generator = torch.Generator().manual_seed(3) if seeded else None
        shuffled = DataLoader(_tensor_data((3, 16, 16)).dataset, batch_size=16, shuffle=True,
                              generator=generator)
        trainer = _trainer(tmp_path / str(prime_steps), [warm, record, first], max_steps=1)
        trainer.fit(Logging(_vit(24, 3)), shuffled, _tensor_data((3, 16, 16)))
        optimizer = trainer.optimizers[0]
        steps = {float(optimizer.state[p]["step"]) for p in trainer.lightning_module.parameters()}
        runs[prime_steps] = (record, first.x, steps)
    (plain, x_plain, steps_plain), (primed, x_primed, steps_primed) = runs[0], runs[2]
    assert steps_plain == {1.0} and steps_primed == {3.0}
    assert torch.equal(x_plain, x_primed)  # the same first batch: the data order is unchanged
    assert primed.stepped_lr == pytest.approx(plain.stepped_lr)  # the rates were put back
    start, after_plain, after_primed = plain.weights[0], plain.weights[1], primed.weights[1]
    assert all(torch.equal(primed.weights[0][k], v) for k, v in start.items())  # nothing moved
    moved_plain = {k: float((after_plain[k] - start[k]).norm()) for k in start}
    moved_primed = {k: float((after_primed[k] - start[k]).norm()) for k in start}
    assert all(v > 0 for v in moved_primed.values())
    assert moved_plain != moved_primed  # the primed moments change the first update


class DictBatches(TupleModule):
    """Dict batches made into ``(x, y)`` by the module's ``on_before_batch_transfer``; its first
    ``training_step`` asks Lightning to skip the batch (returns ``None``)."""

    skipped = False

    def on_before_batch_transfer(self, batch, dataloader_idx):
        return batch["x"], batch["y"]

    def training_step(self, batch, batch_idx):
        if not self.skipped:
            self.skipped = True
            return None
        return super().training_step(batch, batch_idx)


def test_prime_steps_use_the_loops_batch_hooks_and_skip_none(tmp_path, source):
    net, checkpoint = source
    data = _tensor_data((3, 16, 16)).dataset
    rows = [{"x": x, "y": y} for x, y in data]
    torch.manual_seed(1)
    warm = TaskVectorTransport(net, checkpoint, calibration_batches=2, progress=False,
                               prime_steps=2)
    trainer = _trainer(tmp_path, [warm], max_steps=1)
    trainer.fit(DictBatches(_vit(24, 3)), DataLoader(rows, batch_size=16))
    optimizer = trainer.optimizers[0]
    # the skipped batch took no priming step: 2 primed + 1 trained
    assert {float(s["step"]) for s in optimizer.state.values()} == {3.0}


class Adadelta(TupleModule):
    def configure_optimizers(self):
        return torch.optim.Adadelta(self.parameters())


class Manual(TupleModule):
    def __init__(self, net):
        super().__init__(net)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(F.cross_entropy(self(batch[0]), batch[1]))
        optimizer.step()


@pytest.mark.parametrize(("module_cls", "message"), [
    (Adadelta, "prime_steps supports torch.optim's Adam, .* uses Adadelta"),
    (Manual, "manual optimization"),
])
def test_prime_steps_refuses_before_the_transport(tmp_path, source, module_cls, message):
    net, checkpoint = source
    torch.manual_seed(1)
    module = module_cls(_vit(24, 3))
    before = copy.deepcopy(module.state_dict())
    warm = TaskVectorTransport(net, checkpoint, calibration_batches=2, progress=False,
                               prime_steps=2)
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path, [warm], max_steps=1).fit(module, _tensor_data((3, 16, 16)))
    assert warm.report is None
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_recipe_counts_must_be_whole_numbers(bad):
    with pytest.raises(ValueError, match="hold_steps must be an integer >= 0"):
        WarmupRecipe(hold_steps=bad)
    with pytest.raises(ValueError, match="ramp_steps must be an integer >= 0"):
        WarmupRecipe(ramp_steps=bad)
    with pytest.raises(ValueError, match="prime_steps must be an integer >= 0"):
        WarmupRecipe(prime_steps=bad)
