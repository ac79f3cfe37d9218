"""A small Lightning fit with warm start that can kill itself with SIGKILL, for test_faults.py.

    python -m tests.fault_run --root DIR --base BASE.safetensors --finetuned FT.safetensors \
        [--kill transport|epoch1|epoch2]

The fit resumes from ``DIR/ckpt/last.ckpt`` when that file exists. Each process that applies the
transport appends a line to ``DIR/transports.log``; the final weights go to
``DIR/final.safetensors``. Checkpoints every 2 steps (epochs are 4 steps), through a stateful
loader as in warmstart's DataModules, so a mid-epoch checkpoint resumes at the right batch.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file
from torchdata.stateful_dataloader import StatefulDataLoader

from warmstart.lightning.callbacks import TaskVectorTransport

from .test_callbacks import MLPModule, _target, _task
from .test_transport import TinyMLP

KILL_STEP = {"epoch1": 3, "epoch2": 7}  # global steps; checkpoints every 2 steps


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillingInputs:
    """The transport's ``inputs`` rule; dies on the second calibration batch when asked to."""

    def __init__(self, kill: str):
        self.kill, self.calls = kill, 0

    def __call__(self, batch):
        self.calls += 1
        if self.kill == "transport" and self.calls == 2:
            _die()
        return batch["x"]


class Probe(L.Callback):
    def __init__(self, root: Path, warm: TaskVectorTransport, kill: str):
        self.root, self.warm, self.kill = root, warm, kill

    def on_train_start(self, trainer, pl_module):
        if self.warm.report is not None:  # applied in this process, not restored
            with open(self.root / "transports.log", "a") as f:
                f.write(f"applied pid={os.getpid()}\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if KILL_STEP.get(self.kill) == trainer.global_step:
            _die()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--base", required=True)
    parser.add_argument("--finetuned", required=True)
    parser.add_argument("--kill", choices=["none", "transport", *KILL_STEP], default="none")
    args = parser.parse_args()

    L.seed_everything(0, verbose=False)
    base = TinyMLP()
    base.load_state_dict(load_file(args.base))
    warm = TaskVectorTransport(base, args.finetuned, calibration_batches=3, progress=False,
                               inputs=KillingInputs(args.kill))
    module = MLPModule(_target(base))
    last = args.root / "ckpt" / "last.ckpt"
    trainer = L.Trainer(
        max_steps=12, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=args.root,
        callbacks=[warm, Probe(args.root, warm, args.kill),
                   ModelCheckpoint(dirpath=args.root / "ckpt", save_last=True,
                                   every_n_train_steps=2)])
    train = StatefulDataLoader(_task(256, 0), batch_size=64, shuffle=False)
    trainer.fit(module, train, ckpt_path=str(last) if last.exists() else None)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()},
              str(args.root / "final.safetensors"))


if __name__ == "__main__":
    main()
