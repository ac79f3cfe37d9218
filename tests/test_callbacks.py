"""TaskVectorTransport and ConvergenceTracker inside real Lightning fits, on tiny real models."""

from __future__ import annotations

import copy
import json

import lightning as L
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from warmstart.experiments.report import write_report
from warmstart.experiments.summary import load_runs
from warmstart.lightning.callbacks import ConvergenceTracker, TaskVectorTransport

from .test_transport import TinyMLP, _signed_partial_permutation, _widen


class MLPModule(L.LightningModule):
    """A plain user LightningModule: the network at ``model``, dict batches ``{"x", "label"}``,
    ``val_loss`` / ``val_acc`` logged in ``validation_step``."""

    def __init__(self, model: torch.nn.Module, lr: float = 0.05):
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["x"]), batch["label"])

    def validation_step(self, batch, batch_idx):
        logits = self(batch["x"])
        self.log("val_loss", F.cross_entropy(logits, batch["label"]))
        self.log("val_acc", (logits.argmax(-1) == batch["label"]).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _task(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    rule = torch.randn(20, 3, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, 20, generator=g)
    return [{"x": x[i], "label": (x[i] @ rule).argmax()} for i in range(n)]


def _loaders():
    train = DataLoader(_task(512, 0), batch_size=64, shuffle=False)
    val = DataLoader(_task(256, 1), batch_size=128)
    return train, val


@pytest.fixture(scope="module")
def source_pair(tmp_path_factory):
    """A source base model and its fine-tuned weights (trained here, a few hundred SGD steps)."""
    torch.manual_seed(0)
    base = TinyMLP()
    finetuned = copy.deepcopy(base)
    opt = torch.optim.Adam(finetuned.parameters(), lr=1e-2)
    data = _task(2048, 2)
    x = torch.stack([d["x"] for d in data])
    y = torch.stack([d["label"] for d in data])
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(finetuned(x), y).backward()
        opt.step()
    path = tmp_path_factory.mktemp("source") / "finetuned.safetensors"
    save_file({k: v.contiguous() for k, v in finetuned.state_dict().items()}, str(path))
    return base, str(path)


def _target(base: TinyMLP) -> TinyMLP:
    torch.manual_seed(1)
    return _widen(base, _signed_partial_permutation(16, 24, seed=3))


def _trainer(tmp_path, callbacks, max_steps=20, **kw):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False,
                     enable_checkpointing=kw.pop("enable_checkpointing", False),
                     enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=callbacks,
                     **kw)


def test_warm_start_beats_cold_start_and_the_report_is_written(tmp_path, source_pair):
    base, finetuned = source_pair
    train, val = _loaders()
    curves = {}
    for arm in ("cold", "theseus"):
        callbacks = [ConvergenceTracker(every_n_steps=5, path=str(tmp_path / f"{arm}.csv"))]
        if arm == "theseus":
            callbacks.insert(0, TaskVectorTransport(base, finetuned, calibration_batches=4,
                                                    progress=False))
        _trainer(tmp_path / arm, callbacks).fit(MLPModule(_target(base)), train, val)
        curves[(arm, 0)] = tmp_path / f"{arm}.csv"
    step0 = {arm: pd.read_csv(p).query("step == 0 and metric == 'val_acc'")["value"].item()
             for (arm, _), p in curves.items()}
    assert step0["theseus"] > step0["cold"] + 0.3
    assert step0["theseus"] > 0.85  # the target computes the fine-tuned source's function
    report_json = tmp_path / "theseus" / "transport_report.json"
    assert json.loads(report_json.read_text())["method"] == "theseus"
    summary = write_report(load_runs(curves), tmp_path / "report", title="tiny")
    for name in ("report.md", "report.html", "convergence.png", "convergence.svg", "curves.csv",
                 "summary.json"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["reference_arm"] == "cold"
    assert summary.arm("theseus").step0.mean == pytest.approx(step0["theseus"])


def test_transport_keeps_the_optimizer_references(tmp_path, source_pair):
    base, finetuned = source_pair
    train, val = _loaders()
    module = MLPModule(_target(base))
    ids = {id(p) for p in module.parameters()}

    class Check(L.Callback):
        def on_train_start(self, trainer, pl_module):
            params = {
                id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]
            }
            assert params == ids
            self.weight = pl_module.model.fc1.weight.detach().clone()

    check = Check()
    _trainer(tmp_path, [TaskVectorTransport(base, finetuned, progress=False), check],
             max_steps=1).fit(module, train, val)
    assert not torch.equal(check.weight, _target(base).fc1.weight)


def test_resume_does_not_transport_again(tmp_path, source_pair):
    base, finetuned = source_pair
    train, val = _loaders()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=5)
    first = TaskVectorTransport(base, finetuned, progress=False)
    trainer = _trainer(tmp_path, [first, ckpt], max_steps=5, enable_checkpointing=True)
    trainer.fit(MLPModule(_target(base)), train, val)
    assert first.applied and first.report is not None
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]

    class Start(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}

    second, start = TaskVectorTransport(base, finetuned, progress=False), Start()
    fresh = MLPModule(_target(base))  # untransported weights; the checkpoint must win
    _trainer(tmp_path, [second, start], max_steps=8).fit(
        fresh, train, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert second.applied and second.report is None  # restored, not applied again
    for name, value in saved.items():
        torch.testing.assert_close(start.state[name], value)


def test_alpha_auto_uses_validation_batches(tmp_path, source_pair):
    base, finetuned = source_pair
    train, val = _loaders()
    warm = TaskVectorTransport(base, finetuned, alpha="auto", alpha_grid=[0.0, 1.0],
                               progress=False)
    _trainer(tmp_path, [warm], max_steps=1).fit(MLPModule(_target(base)), train, val)
    assert [a for a, _ in warm.report.alpha_scores] == [0.0, 1.0]
    assert warm.report.alpha == 1.0  # the fine-tuned direction lowers the validation loss


def test_callback_errors(tmp_path, source_pair):
    base, finetuned = source_pair
    with pytest.raises(FileNotFoundError, match="source_finetuned checkpoint 'missing.ckpt'"):
        TaskVectorTransport(base, "missing.ckpt")
    with pytest.raises(ValueError, match="calibration_batches must be None .* >= 1, got 0"):
        TaskVectorTransport(base, finetuned, calibration_batches=0)
    with pytest.raises(ValueError, match="alpha must be a finite number or 'auto'"):
        TaskVectorTransport(base, finetuned, alpha="big")
    with pytest.raises(ValueError, match="every_n_steps must be an integer >= 1 or None"):
        ConvergenceTracker(every_n_steps=0)
    train, val = _loaders()
    warm = TaskVectorTransport(base, finetuned, target_attribute="network", progress=False)
    module = MLPModule(_target(base))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(AttributeError, match="has no module at target_attribute='network'"):
        _trainer(tmp_path, [warm], max_steps=1).fit(module, train, val)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())


def test_reports_of_an_earlier_run_are_not_overwritten(tmp_path, source_pair, recwarn):
    base, finetuned = source_pair
    train, val = _loaders()
    written = []
    for _ in range(2):  # two fits into the same log directory
        warm = TaskVectorTransport(base, finetuned, progress=False)
        tracker = ConvergenceTracker(every_n_steps=5)
        _trainer(tmp_path, [warm, tracker], max_steps=2).fit(MLPModule(_target(base)), train, val)
        written.append((warm.report_path, tracker.written))
    assert written[0] == (tmp_path / "transport_report.json", tmp_path / "curve.csv")
    assert written[1] == (tmp_path / "transport_report-v1.json", tmp_path / "curve-v1.csv")
    assert all(p.stat().st_size > 0 for pair in written for p in pair)
    said = [str(w.message) for w in recwarn if "exists already" in str(w.message)]
    assert len(said) == 2 and "transport_report-v1.json" in said[0] + said[1]
