"""Accuracy right after the transport, with and without ``head_fit``, on the demo pair.

EfficientNet-Lite0 fine-tuned on MNIST 5k (the demo's source checkpoint) -> Lite2 at 48 px, the
demo's transport (alpha 4, 3 calibration batches of at most 1024 rows, BatchNorm recalibration on
3 batches, eigh), then the output layer refitted to the finetuned source's logits on N
calibration batches at each ridge. The same refit on the untouched target (``method=head_only``
without BatchNorm recalibration, and with it) shows how much of it the moved body carries.
Validation: the demo's 512 held-out images. No training anywhere.

    . .venv/bin/activate; export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    python bench/head_fit_step0.py --source runs/demo/source.ckpt   # ~4 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from warmstart.engine.transport import transport
from warmstart.lightning.data import ImageClassificationData
from warmstart.lightning.models import build_model

DEMO = dict(alpha=4.0, rows_per_batch=1024, solver="eigh")


@torch.no_grad()
def accuracy(model: torch.nn.Module, batches) -> float:
    model.eval()
    hits = sum(int((model(b["image"]).argmax(-1) == b["label"]).sum()) for b in batches)
    return hits / sum(len(b["label"]) for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="runs/demo/source.ckpt")
    parser.add_argument("--batches", nargs="+", type=int, default=[3, 8],
                        help="head_fit: calibration batches of the refit")
    parser.add_argument("--ridges", nargs="+", type=float,
                        default=[0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0])
    parser.add_argument("--out", default="bench/results/head_fit_step0.json")
    args = parser.parse_args()
    console = Console()
    torch.manual_seed(0)
    data = ImageClassificationData("mnist5k", image_size=48, batch_size=64, val_limit=512)
    data.setup("fit")
    train = [b["image"] for b, _ in zip(data.train_dataloader(), range(max(args.batches)))]
    val = list(data.val_dataloader())
    source = build_model("efficientnet_lite0", 10, pretrained=True).eval()
    torch.manual_seed(0)
    target = build_model("efficientnet_lite2", 10).eval()

    rows = []
    arms = [("theseus", dict(DEMO, bn_recalibration=3)),
            ("head_only", dict(method="head_only")),
            ("head_only + BN recalibration", dict(method="head_only", bn_recalibration=3))]
    for arm, options in arms:
        for n_fit in [0, *args.batches]:
            for ridge in (args.ridges if n_fit else [None]):
                model = copy.deepcopy(target)
                fit = dict(head_fit=n_fit, head_fit_ridge=ridge) if n_fit else {}
                started = time.perf_counter()
                report = transport(source, args.source, model, train, progress=False,
                                   calibration_batches=3, **options, **fit)
                rows.append(dict(arm=arm, head_fit=n_fit, ridge=ridge,
                                 acc=accuracy(model, val),
                                 head_norm=float(model.classifier.weight.norm()),
                                 seconds=time.perf_counter() - started,
                                 apply_seconds=report.timings["apply"]))
                console.print(rows[-1])

    table = Table(title="demo pair: accuracy right after the transport (512 validation images)")
    for col in ("arm", "head_fit batches", "ridge", "accuracy", "head weight norm"):
        table.add_column(col)
    for r in rows:
        ridge = "-" if r["ridge"] is None else f"{r['ridge']:g}"
        table.add_row(r["arm"], str(r["head_fit"]), ridge, f"{r['acc']:.3f}",
                      f"{r['head_norm']:.2f}")
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "head_fit_step0", "settings": vars(args),
                               "demo_options": DEMO, "rows": rows}, indent=2))
    console.print(f"written {out}")


if __name__ == "__main__":
    main()
