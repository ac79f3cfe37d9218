"""Fits of a user module holding a tiny timm ViT with ``TaskVectorTransport`` over 2 CPU processes
(gloo), one per phase, in the same two processes; every rank saves the full weights training
starts from. Run by tests/test_fsdp.py in a subprocess with a timeout, so that a deadlock fails
the test instead of hanging it.

    python -m tests.fsdp_run --out DIR [--phases ddp fsdp2 fsdp1 late]

- ``ddp``: ``strategy="ddp"``, nothing sharded: the reference.
- ``fsdp2``: ``ModelParallelStrategy(data_parallel_size=2)``; ``configure_model`` applies
  ``fully_shard`` to every block and to the ViT (DTensor parameters).
- ``fsdp1``: ``FSDPStrategy``; ``configure_model`` wraps the ViT in ``FullyShardedDataParallel``
  with one unit per block (flat parameters). Lightning refuses ``FSDPStrategy`` with
  ``accelerator="cpu"`` by an exact type check, and its own wrapping passes ``device_id=None``,
  which torch's FSDP1 refuses without an accelerator; a subclass of the strategy and
  ``device_id=cpu`` are how FSDP1 runs on CPU at all.
- ``late``: the ViT is built in ``configure_model`` under ``ModelParallelStrategy``; the callback
  fails at setup, and each rank writes the error to ``late/rank{r}.txt``.
- ``fail``: as ``fsdp2``, but ``alpha_grid=(1.0, 1e300)``: the second trial overflows float32
  after the first was written into the shards; the transport fails and the shards get their
  weights back. Each rank writes the error and the full weights after it.
- ``meta``: a two-layer MLP built on the meta device (``trainer.init_module(empty_init=True)``),
  so the copy taken at setup has no storage; ``ModelParallelStrategy`` materialises the live
  module, ``fully_shard`` per layer. ``meta/before_rank{r}.pt`` holds the materialised weights.
- ``single``: one process, nothing sharded (for a manual comparison).

The first 2-process fit starts the second process, which runs this script again; later fits reuse
both processes and their process group.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from timm.models.vision_transformer import Block
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader, TensorDataset

from warmstart import TaskVectorTransport

from .test_dropin import N_CLASSES, TupleModule, _mlp, _vit

SOURCE_WIDTH, TARGET_WIDTH = 16, 24


class Fsdp2Module(TupleModule):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.net.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class Fsdp1Module(TupleModule):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        self.net = FullyShardedDataParallel(self.net, device_id=torch.device("cpu"),
                                            auto_wrap_policy=ModuleWrapPolicy({Block}))


class MlpFsdp2Module(TupleModule):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class LateModule(TupleModule):
    """Builds its network in ``configure_model``: nothing to copy at setup."""

    def __init__(self) -> None:
        L.LightningModule.__init__(self)

    def configure_model(self) -> None:
        self.net = _vit(TARGET_WIDTH, 2)


class CpuFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` as it is, past Lightning's exact-type refusal of ``accelerator="cpu"``."""


class SaveAtStart(L.Callback):
    """The full weights training starts from, and what the shards look like, on every rank;
    with ``before=True``, the weights at fit start (listed before the transport: before it)."""

    def __init__(self, out: Path, before: bool = False):
        self.out, self.before = out, before

    def on_fit_start(self, trainer, pl_module):
        if self.before:
            full = get_model_state_dict(trainer.strategy.model,
                                        options=StateDictOptions(full_state_dict=True))
            torch.save({k: v.detach().clone() for k, v in full.items()},
                       self.out / f"before_rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer, pl_module):
        if self.before:
            return
        root = trainer.strategy.model
        full = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True))
        rank = trainer.global_rank
        torch.save({k: v.detach().clone() for k, v in full.items()}, self.out / f"rank{rank}.pt")
        local = [p.to_local() if hasattr(p, "to_local") else p for p in root.parameters()]
        optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        info = {"local_numel": sum(p.numel() for p in local),
                "full_numel": sum(v.numel() for v in full.values()),
                "param_types": sorted({type(p).__name__ for p in root.parameters()}),
                "optimizer_holds_module_params": optimized == {id(p) for p in root.parameters()}}
        (self.out / f"rank{rank}.json").write_text(json.dumps(info))


def fit(out: Path, phase: str) -> None:
    torch.manual_seed(0)
    source, finetuned = _vit(SOURCE_WIDTH, 1), _vit(SOURCE_WIDTH, 1)
    finetuned.load_state_dict(source.state_dict())
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(128, 3, 16, 16)
    y = x[:, 0, :2, :2].flatten(1)[:, :N_CLASSES].argmax(-1)
    data = DataLoader(TensorDataset(x, y), batch_size=16)
    torch.manual_seed(1)
    devices = 1 if phase == "single" else 2
    strategy = {"ddp": lambda: "ddp", "single": lambda: "auto", "fsdp1": CpuFSDPStrategy,
                "fsdp2": lambda: ModelParallelStrategy(data_parallel_size=2,
                                                       tensor_parallel_size=1),
                "late": lambda: ModelParallelStrategy(data_parallel_size=2,
                                                      tensor_parallel_size=1)}
    strategy["fail"] = strategy["fsdp2"]
    strategy = strategy[phase]()
    kind = {"fsdp2": Fsdp2Module, "fail": Fsdp2Module, "fsdp1": Fsdp1Module}.get(phase,
                                                                                TupleModule)
    module = LateModule() if phase == "late" else kind(_vit(TARGET_WIDTH, 2))
    # every rank calibrates and scores on 128 / devices of the 128 examples: all of them together
    warm = TaskVectorTransport(source, finetuned.state_dict(), progress=False,
                               calibration_batches=8 // devices, alpha="auto",
                               alpha_grid=(1.0, 1e300) if phase == "fail" else (0.5, 1.0, 2.0),
                               alpha_val_batches=8 // devices)
    (out / phase).mkdir(parents=True, exist_ok=True)
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", devices=devices, strategy=strategy, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=out / phase, limit_val_batches=8 // devices,
        callbacks=[warm, SaveAtStart(out / phase)])
    if phase not in ("late", "fail"):
        trainer.fit(module, data, data)
        return
    try:
        trainer.fit(module, data, data)
    except (AttributeError, ValueError) as err:
        (out / phase / f"rank{trainer.global_rank}.txt").write_text(str(err))
    if phase == "fail":  # the weights the shards hold after the failed transport
        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
        torch.save({k: v.detach().clone() for k, v in full.items()},
                   out / phase / f"rank{trainer.global_rank}.pt")


def mlp_case() -> tuple:
    """The ``meta`` phase's source, fine-tuned source and data (the test rebuilds them)."""
    torch.manual_seed(0)
    source, finetuned = _mlp(16), _mlp(16)
    finetuned.load_state_dict(source.state_dict())
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(128, 12)
    return source, finetuned, DataLoader(TensorDataset(x, (x[:, :3] * 3).argmax(-1)),
                                         batch_size=16)


def fit_meta(out: Path) -> None:
    source, finetuned, data = mlp_case()
    (out / "meta").mkdir(parents=True, exist_ok=True)
    warm = TaskVectorTransport(source, finetuned.state_dict(), progress=False,
                               calibration_batches=4)
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=out / "meta", limit_val_batches=1,
        callbacks=[SaveAtStart(out / "meta", before=True), warm, SaveAtStart(out / "meta")])
    with trainer.init_module(empty_init=True):
        module = MlpFsdp2Module(_mlp(24))
    assert all(p.is_meta for p in module.parameters())
    trainer.fit(module, data, data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--phases", nargs="+",
                        default=["ddp", "fsdp2", "fsdp1", "fail", "meta", "late"],
                        choices=("ddp", "fsdp2", "fsdp1", "fail", "meta", "late", "single"))
    args = parser.parse_args()
    for phase in args.phases:
        fit_meta(args.out) if phase == "meta" else fit(args.out, phase)


if __name__ == "__main__":
    main()
