"""Step-0 accuracy of Hugging Face sequence classifiers moved across families (issue 12).

The packaged MiniLM, loaded as ``BertForSequenceClassification`` (pooler + classifier), is
fine-tuned on Rotten Tomatoes by a plain LightningModule, then moved into the packaged MPNet loaded
as ``MPNetForSequenceClassification`` (``classifier.dense -> tanh -> classifier.out_proj``),
which has its own tokenizer. Every arm is scored by Lightning's validation loop on the same
validation examples, right after the transport (no training):

- ``cold``: the MPNet classifier as loaded (random head);
- ``head_only``: only the fine-tuned head, mapped on its input side;
- ``theseus`` with the head's hidden units kept as units (``head_hidden="units"``, the default)
  or mapped like the residual stream (``"stream"``), at alpha 1 and 2.

    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    .venv/bin/python bench/hf_heads.py            # ~10 min on 2 CPU threads
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import lightning as L
import torch
import torchmetrics
from transformers import AutoModelForSequenceClassification

import warmstart
from warmstart.lightning.assets import minilm_dir, mpnet_dir
from warmstart.lightning.console import quiet_console
from warmstart.lightning.data import TextClassificationData

RESULTS = Path(__file__).parent / "results" / "hf_heads.json"
ARMS = {"head_only": ("head_only", dict(method="head_only"))}  # --arms name: (row, options)
ARMS |= {f"{h}:{a:g}": (f"theseus head_hidden={h} alpha={a}", dict(head_hidden=h, alpha=a))
         for h in ("units", "stream") for a in (1.0, 2.0)}


class SequenceClassifier(L.LightningModule):
    """What a user writes around ``AutoModelForSequenceClassification``."""

    def __init__(self, model: torch.nn.Module, lr: float = 5e-5) -> None:
        super().__init__()
        self.model, self.lr = model, lr
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(2, average="micro")

    def forward(self, batch):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["label"])

    def training_step(self, batch, batch_idx):
        loss = self(batch).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        out = self(batch)
        self.accuracy(out.logits, batch["label"])
        self.log("val_loss", out.loss, batch_size=len(batch["label"]))
        self.log("val_acc", self.accuracy, batch_size=len(batch["label"]))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_model_summary=False, enable_progress_bar=False, **kwargs)


def _validate(model: torch.nn.Module, data: TextClassificationData) -> dict[str, float]:
    metrics = _trainer().validate(SequenceClassifier(model), datamodule=data, verbose=False)[0]
    return {k: round(float(v), 4) for k, v in metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--val", type=int, default=512)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", default=None, metavar="NAME",
                        help="run only these arms (head_only, units:1, units:2, stream:1, "
                             "stream:2); rows of earlier runs with the same settings are kept")
    args = parser.parse_args()
    if args.arms and set(args.arms) - set(ARMS):
        parser.error(f"unknown arms {sorted(set(args.arms) - set(ARMS))}; choose from "
                     f"{list(ARMS)}")
    L.seed_everything(args.seed, verbose=False)

    def data(tokenizer: str) -> TextClassificationData:
        dm = TextClassificationData(tokenizer=tokenizer, batch_size=32, val_limit=args.val,
                                    seed=args.seed)
        dm.setup("fit")
        return dm

    data_s, data_t = data("minilm"), data("mpnet")
    with quiet_console():
        source = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
        target = AutoModelForSequenceClassification.from_pretrained(mpnet_dir(), num_labels=2)
    pretrained = copy.deepcopy(source)
    t0 = time.perf_counter()
    _trainer(max_steps=args.steps).fit(SequenceClassifier(source), datamodule=data_s)
    rows = {"source (MiniLM, fine-tuned)": {**_validate(source, data_s),
                                            "seconds": round(time.perf_counter() - t0, 1)}}
    print("source", rows["source (MiniLM, fine-tuned)"])
    # the same training examples, in order, tokenized by each model's own tokenizer
    calibration = [b for _, b in zip(range(args.calibration_batches),
                                     data_s._loader("train", shuffle=False))]
    target_calibration = [b for _, b in zip(range(args.calibration_batches),
                                            data_t._loader("train", shuffle=False))]
    rows["cold (MPNet as loaded)"] = _validate(target, data_t)
    print("cold", rows["cold (MPNet as loaded)"])
    arms = {k: ARMS[k] for k in args.arms or ARMS}
    if args.arms:
        if RESULTS.exists():
            earlier = json.loads(RESULTS.read_text())
            if earlier.get("args", {}).get("steps") == args.steps and \
                    earlier["args"].get("val") == args.val:
                rows = {**earlier["rows"], **rows}
    for name, options in arms.values():
        moved = copy.deepcopy(target)
        t0 = time.perf_counter()
        report = warmstart.transport(pretrained, source, moved, calibration,
                                     target_calibration=target_calibration, progress=False,
                                     **options)
        seconds = time.perf_counter() - t0
        rows[name] = {**_validate(moved, data_t), "transport_seconds": round(seconds, 1),
                      "parameters": len(report.params), "skipped": len(report.skipped),
                      "token_pairing": getattr(report, "token_pairing", None)}
        print(name, rows[name], flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)  # kept if a later arm is stopped
        saved = {k: v for k, v in vars(args).items() if k != "arms"}
        RESULTS.write_text(json.dumps({"args": saved, "rows": rows}, indent=2))
    print(f"\n{'arm':42s} {'val_acc':>8s} {'val_loss':>9s}")
    for name, row in rows.items():
        print(f"{name:42s} {row['val_acc']:8.4f} {row['val_loss']:9.4f}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
