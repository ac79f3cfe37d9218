"""warmstart's callbacks inside plain user LightningModules, as users write them.

Each case fine-tunes its source with a real ``Trainer.fit`` of the user's own module and saves a
Lightning checkpoint (so the weights carry the module's prefix: ``net.``, ``model.``...), then
warm-starts a wider target in another fit and checks that:
- the transport moved the weights before the first optimizer step,
- the tracker's CSV holds the module's own ``val_*`` metrics from step 0,
- a run resumed from a checkpoint does not transport again.
"""

from __future__ import annotations

import copy

import lightning as L
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from warmstart import ConvergenceTracker, TaskVectorTransport, transport

N_CLASSES = 3


# ---- the users' modules ------------------------------------------------------------------------

class TupleModule(L.LightningModule):
    """``(x, y)`` batches, the network at ``self.net``, a torchmetrics accuracy."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.accuracy = MulticlassAccuracy(N_CLASSES, average="micro")

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.accuracy(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_accuracy", self.accuracy)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class Wrapper(nn.Module):
    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(x)


class NestedModule(TupleModule):
    """The network two attributes deep: ``self.model.backbone``."""

    def __init__(self, net: nn.Module):
        L.LightningModule.__init__(self)
        self.model = Wrapper(net)
        self.accuracy = MulticlassAccuracy(N_CLASSES, average="micro")

    def forward(self, x):
        return self.model(x)


class HFModule(L.LightningModule):
    """An ``AutoModelForSequenceClassification`` fed Hugging Face dict batches."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx):
        out = self.model(**batch)  # a SequenceClassifierOutput
        self.log("val_loss", out.loss)
        self.log("val_acc", (out.logits.argmax(-1) == batch["labels"]).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


# ---- networks and data -------------------------------------------------------------------------

def _vit(width: int, depth: int) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=N_CLASSES,
                             img_size=16, patch_size=8, embed_dim=width, depth=depth, num_heads=2)


def _mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, hidden), nn.GELU(), nn.Linear(hidden, N_CLASSES))


def _bert(width: int) -> nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig

    config = BertConfig(vocab_size=64, hidden_size=width, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=2 * width,
                        max_position_embeddings=16, num_labels=N_CLASSES)
    return AutoModelForSequenceClassification.from_config(config)


def _tensor_data(shape: tuple[int, ...], n: int = 96) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g)
    y = (x.flatten(1)[:, :N_CLASSES] * 3).argmax(-1)  # learnable from the inputs
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _token_data(n: int = 96) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (n, 10), generator=g)
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long),
             "labels": ids[i, 1] % N_CLASSES} for i in range(n)]
    return DataLoader(rows, batch_size=16)


CASES = {
    # name: (module class, source net, target net, data, target_attribute, checkpoint prefix)
    "tuple-timm-vit": (TupleModule, lambda: _vit(16, 2), lambda: _vit(24, 3),
                       lambda: _tensor_data((3, 16, 16)), None, "net."),
    "hf-seq-classifier": (HFModule, lambda: _bert(16), lambda: _bert(24), _token_data, "model",
                          "model."),
    "dotted-path": (NestedModule, lambda: _vit(16, 2), lambda: _vit(24, 2),
                    lambda: _tensor_data((3, 16, 16)), "model.backbone", "model.backbone."),
    "nn-sequential": (TupleModule, lambda: _mlp(16), lambda: _mlp(24),
                      lambda: _tensor_data((12,)), "net", "net."),
}


def _trainer(root, callbacks, max_steps, **kw):
    kw.setdefault("logger", False)
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1,
                     enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=2, default_root_dir=root,
                     callbacks=callbacks, **kw)


class Snapshot(L.Callback):
    """The module's weights when training starts (after the transport, before any step)."""

    def on_train_start(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _finetuned_source(tmp_path, module_cls, make_source, make_data):
    torch.manual_seed(0)
    source = make_source()
    module = module_cls(copy.deepcopy(source))
    trainer = _trainer(tmp_path / "source", [], max_steps=6, enable_checkpointing=False)
    trainer.fit(module, make_data())
    path = tmp_path / "source.ckpt"
    trainer.save_checkpoint(path)  # keys carry the module's own prefix
    return source, str(path)


@pytest.mark.parametrize("case", list(CASES))
def test_callbacks_in_a_user_module(tmp_path, case):
    module_cls, make_source, make_target, make_data, attribute, prefix = CASES[case]
    source, checkpoint = _finetuned_source(tmp_path, module_cls, make_source, make_data)
    assert any(k.startswith(prefix) for k in torch.load(checkpoint)["state_dict"])
    torch.manual_seed(1)
    module = module_cls(make_target())
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    warm = TaskVectorTransport(source, checkpoint, target_attribute=attribute,
                               calibration_batches=3, progress=False)
    tracker, snapshot = ConvergenceTracker(every_n_steps=2), Snapshot()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    _trainer(tmp_path / "run", [warm, tracker, snapshot, ckpt], max_steps=4).fit(
        module, make_data(), make_data())

    moved = [k for k, v in initial.items()
             if v.is_floating_point() and not torch.equal(v, snapshot.state[k])]
    weights = [k for k in initial if k.endswith("weight")]
    assert len(moved) > len(weights) // 2, f"the transport moved only {moved}"
    assert warm.report.options["method"] == "theseus" and warm.report.params

    curve = pd.read_csv(tracker.written)
    logged = {"val_loss", "val_accuracy"} if module_cls is not HFModule else {"val_loss", "val_acc"}
    assert set(curve.metric) == logged  # the module's own metric names
    assert sorted(curve.step.unique()) == [0, 2, 4]
    assert set(curve.query("step == 0").metric) == logged

    resumed_warm, resumed_start = TaskVectorTransport(
        source, checkpoint, target_attribute=attribute, progress=False), Snapshot()
    fresh = module_cls(make_target())  # untransported weights; the checkpoint must win
    _trainer(tmp_path / "resumed", [resumed_warm, resumed_start], max_steps=6).fit(
        fresh, make_data(), make_data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed_warm.applied and resumed_warm.report is None
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt")["state_dict"]
    for name, value in saved.items():
        torch.testing.assert_close(resumed_start.state[name], value)


def test_the_callback_equals_the_engine_on_the_same_batches(tmp_path):
    """``TaskVectorTransport`` is ``warmstart.transport`` on the first calibration batches."""
    source, checkpoint = _finetuned_source(tmp_path, TupleModule, lambda: _vit(16, 2),
                                           lambda: _tensor_data((3, 16, 16)))
    torch.manual_seed(1)
    module = TupleModule(_vit(24, 3))
    expected = copy.deepcopy(module.net)
    finetuned = {k[len("net."):]: v for k, v in torch.load(checkpoint)["state_dict"].items()
                 if k.startswith("net.")}
    batches = [x for x, _ in list(_tensor_data((3, 16, 16)))[:3]]
    transport(source, finetuned, expected, batches, progress=False)
    snapshot = Snapshot()
    warm = TaskVectorTransport(source, checkpoint, calibration_batches=3, progress=False)
    _trainer(tmp_path / "run", [warm, snapshot], max_steps=1).fit(
        module, _tensor_data((3, 16, 16)), _tensor_data((3, 16, 16)))
    for name, value in expected.state_dict().items():
        torch.testing.assert_close(snapshot.state[f"net.{name}"], value, rtol=0, atol=0)


def test_alpha_auto_reads_the_modules_own_monitor(tmp_path):
    source, checkpoint = _finetuned_source(tmp_path, TupleModule, lambda: _mlp(16),
                                           lambda: _tensor_data((12,)))
    module = TupleModule(_mlp(24))
    rng_after = {}
    for alpha in ("auto", 1.0):
        torch.manual_seed(5)
        warm = TaskVectorTransport(source, checkpoint, alpha=alpha, alpha_grid=[0.0, 1.0, 2.0],
                                   monitor="val_accuracy", mode="max", alpha_val_batches=2,
                                   progress=False)
        _trainer(tmp_path / "run", [warm], max_steps=0).fit(
            copy.deepcopy(module), _tensor_data((12,)), _tensor_data((12,)))
        rng_after[alpha] = torch.get_rng_state()
        if alpha == "auto":
            warm_auto, scores = warm, dict(warm.report.alpha_scores)
    assert list(scores) == [0.0, 1.0, 2.0]
    assert all(0.0 <= s <= 1.0 for s in scores.values())  # accuracies, as the module logs them
    assert len(set(scores.values())) > 1
    assert warm_auto.report.alpha == max(scores, key=scores.get)  # mode="max"
    assert (warm_auto.report.options["monitor"], warm_auto.report.options["mode"]) == (
        "val_accuracy", "max")
    # the trials ran inside isolate_rng: the run's random stream is what it is without them
    assert torch.equal(rng_after["auto"], rng_after[1.0])

    bad = TaskVectorTransport(source, checkpoint, alpha="auto", monitor="val_f1", progress=False)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"monitor='val_f1' is not among the metrics the module "
                                         r"logged in validation \(\['val_accuracy', 'val_loss'\]"):
        _trainer(tmp_path / "bad", [bad], max_steps=0).fit(
            module, _tensor_data((12,)), _tensor_data((12,)))
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())


def test_alpha_auto_without_validation_is_refused_at_setup(tmp_path):
    source, checkpoint = _finetuned_source(tmp_path, TupleModule, lambda: _mlp(16),
                                           lambda: _tensor_data((12,)))
    warm = TaskVectorTransport(source, checkpoint, alpha="auto", progress=False)
    with pytest.raises(ValueError, match=r"alpha='auto' needs the LightningModule's validation"):
        _trainer(tmp_path / "run", [warm], max_steps=1).fit(
            TupleModule(_mlp(24)), _tensor_data((12,)))


def test_unfitting_checkpoint_shows_keys_of_both_sides(tmp_path):
    from safetensors.torch import save_file

    source = _mlp(16)
    path = tmp_path / "other.safetensors"
    save_file({"encoder.layer.weight": torch.zeros(2, 2)}, str(path))
    module = TupleModule(_mlp(24))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    warm = TaskVectorTransport(source, str(path), progress=False)
    with pytest.raises(ValueError, match=r"no key of source_finetuned .*fits the source model.*"
                                         r"checkpoint keys: 'encoder.layer.weight'.*source model "
                                         r"keys: '0.bias'"):
        _trainer(tmp_path / "run", [warm], max_steps=1).fit(module, _tensor_data((12,)))
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())


def test_target_is_found_alone_or_named(tmp_path):
    source, checkpoint = _finetuned_source(tmp_path, TupleModule, lambda: _mlp(16),
                                           lambda: _tensor_data((12,)))

    class TwoNets(TupleModule):
        def __init__(self):
            super().__init__(_mlp(24))
            self.teacher = _mlp(24)

    warm = TaskVectorTransport(source, checkpoint, progress=False)
    with pytest.raises(AttributeError, match=r"parameters sit in 2 child module\(s\) "
                                             r"\(net, teacher\); set target_attribute"):
        _trainer(tmp_path / "run", [warm], max_steps=1).fit(TwoNets(), _tensor_data((12,)))


def test_metrics_reach_csv_and_tensorboard_loggers(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoardLogger needs the tensorboard package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    source, checkpoint = _finetuned_source(tmp_path, TupleModule, lambda: _mlp(16),
                                           lambda: _tensor_data((12,)))
    loggers = [CSVLogger(tmp_path / "logs", name="csv"),
               TensorBoardLogger(tmp_path / "logs", name="tb")]
    warm = TaskVectorTransport(source, checkpoint, progress=False)
    _trainer(tmp_path / "run", [warm, ConvergenceTracker(every_n_steps=2)], max_steps=4,
             logger=loggers).fit(TupleModule(_mlp(24)), _tensor_data((12,)), _tensor_data((12,)))
    frame = pd.read_csv(loggers[0].log_dir + "/metrics.csv")
    assert frame["transport/seconds"].notna().sum() == 1
    assert frame["transport/maps"].dropna().item() > 0
    steps_with_acc = frame.dropna(subset=["val_accuracy"])["step"].tolist()
    assert 0 in steps_with_acc and len(steps_with_acc) == 3  # steps 0, 2 and 4
    assert frame["tracker/seconds"].notna().sum() == 3
    events = EventAccumulator(loggers[1].log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"transport/seconds", "transport/maps", "val_accuracy", "tracker/seconds"} <= tags
    assert [e.step for e in events.Scalars("val_accuracy")][0] == 0


def test_callbacks_under_a_precision_plugin(tmp_path):
    """bf16 mixed precision: the transport writes float32 weights, the tracker reads the
    metrics the module logs under autocast."""
    source, checkpoint = _finetuned_source(tmp_path, TupleModule, lambda: _mlp(16),
                                           lambda: _tensor_data((12,)))
    module, snapshot = TupleModule(_mlp(24)), Snapshot()
    initial = module.net[0].weight.detach().clone()
    warm = TaskVectorTransport(source, checkpoint, progress=False)
    tracker = ConvergenceTracker(every_n_steps=2)
    _trainer(tmp_path / "run", [warm, tracker, snapshot], max_steps=2,
             precision="bf16-mixed").fit(module, _tensor_data((12,)), _tensor_data((12,)))
    assert snapshot.state["net.0.weight"].dtype == torch.float32
    assert not torch.equal(snapshot.state["net.0.weight"], initial)
    curve = pd.read_csv(tracker.written)
    assert sorted(curve.step.unique()) == [0, 2]
    assert set(curve.metric) == {"val_loss", "val_accuracy"}


def test_callbacks_reused_for_another_fit_start_afresh(tmp_path):
    """A loop over seeds with the same callback objects: every fit is transported and gets its
    own curve."""
    source, checkpoint = _finetuned_source(tmp_path, TupleModule, lambda: _mlp(16),
                                           lambda: _tensor_data((12,)))
    warm = TaskVectorTransport(source, checkpoint, progress=False)
    tracker = ConvergenceTracker(every_n_steps=2)
    curves = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        module = TupleModule(_mlp(24))
        initial = module.net[0].weight.detach().clone()
        snapshot = Snapshot()
        _trainer(tmp_path / f"run{seed}", [warm, tracker, snapshot], max_steps=2).fit(
            module, _tensor_data((12,)), _tensor_data((12,)))
        assert warm.report is not None and warm.applied
        assert not torch.equal(snapshot.state["net.0.weight"], initial)
        curves.append(pd.read_csv(tracker.written))
    assert sorted(curves[1].step.unique()) == [0, 2]
    assert not curves[0].equals(curves[1])  # the second fit's own rows, not the first's


def test_tracker_warns_when_no_metric_is_recorded(tmp_path):
    class OtherNames(TupleModule):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("loss/valid", F.cross_entropy(self(x), y))

    with pytest.warns(UserWarning, match=r"logged no metric whose name starts with 'val' \(it "
                                         r"logged \['loss/valid'\]\); pass monitor"):
        _trainer(tmp_path, [ConvergenceTracker(every_n_steps=1)], max_steps=1).fit(
            OtherNames(_mlp(8)), _tensor_data((12,)), _tensor_data((12,)))
