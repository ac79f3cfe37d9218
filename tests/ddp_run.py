"""One fit of a plain user module with ``TaskVectorTransport`` under ``ddp_spawn`` (2 CPU
processes) or in one process; every rank saves its weights as training starts. Run by
tests/test_distributed.py in a subprocess with a timeout, so that a deadlock fails the test
instead of hanging it.

    python -m tests.ddp_run --out DIR --devices 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from warmstart import ConvergenceTracker, TaskVectorTransport

from .test_dropin import TupleModule, _mlp


class SaveAtStart(L.Callback):
    """Each rank's weights when training starts; with ``moments``, also the optimizer's second
    moments then (after any priming) and the weights after the first step."""

    def __init__(self, out: Path, moments: bool = False):
        self.out, self.moments = out, moments

    def on_train_start(self, trainer, pl_module):
        rank = trainer.global_rank
        torch.save(pl_module.state_dict(), self.out / f"rank{rank}.pt")
        if self.moments:
            optimizer = trainer.optimizers[0]
            torch.save({name: optimizer.state[p]["exp_avg_sq"]
                        for name, p in pl_module.named_parameters() if p in optimizer.state},
                       self.out / f"rank{rank}_moments.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.moments and batch_idx == 0:
            torch.save(pl_module.state_dict(), self.out / f"rank{trainer.global_rank}_step1.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--prime_steps", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(0)
    source, finetuned = _mlp(16), _mlp(16)
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(128, 12)
    data = DataLoader(TensorDataset(x, (x[:, :3] * 3).argmax(-1)), batch_size=16)
    torch.manual_seed(1)
    module = TupleModule(_mlp(24))
    # every rank calibrates on 64 / devices... of the 128 examples: all of them together
    warm = TaskVectorTransport(source, finetuned.state_dict(), progress=False,
                               calibration_batches=8 // args.devices,
                               prime_steps=args.prime_steps)
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", devices=args.devices,
        strategy="ddp_spawn" if args.devices > 1 else "auto", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=args.out, limit_val_batches=2,
        callbacks=[warm, SaveAtStart(args.out, moments=args.prime_steps > 0),
                   ConvergenceTracker(every_n_steps=1, path=str(args.out / "curve.csv"))])
    trainer.fit(module, data, data)


if __name__ == "__main__":
    main()
