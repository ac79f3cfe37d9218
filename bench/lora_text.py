"""A real LoRA moved across families: all-MiniLM-L6-v2 LoRA -> all-mpnet-base-v2 LoRA, step 0.

The source is the project's text classifier (``TextClassifierNet``: encoder, mean pooling,
linear head) over MiniLM, fine-tuned with a rank-``r`` LoRA on the attention and MLP projections
(the head trained in full as ``modules_to_save``) on Rotten Tomatoes. ``transport_adapter`` moves
that adapter into a LoRA adapter of the same rank for the MPNet classifier (768 x 12, another
family, another tokenizer's special tokens), which is loaded with ``PeftModel.from_pretrained``
and scored on the validation split, against the MPNet classifier with a fresh adapter (PEFT's
default init: ``B = 0``, so the base model and its new head).

    .venv/bin/python bench/lora_text.py                 # table + bench/results/lora_text.json
    .venv/bin/python bench/lora_text.py --train-steps 40 --val-limit 128   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

MODULES = ["query", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _data(tokenizer: str, args):
    from warmstart.lightning.data import TextClassificationData

    data = TextClassificationData(tokenizer=tokenizer, max_length=64, batch_size=args.batch,
                                  train_limit=args.train_limit, val_limit=args.val_limit, seed=0)
    data.setup("fit")
    return data


def _inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    right = total = 0
    for batch in loader:
        right += int((model(**_inputs(batch)).argmax(-1) == batch["label"]).sum())
        total += len(batch["label"])
    return right / total


def train_source(model: nn.Module, loader, steps: int, lr: float, rank: int):
    """``model`` wrapped by PEFT, its LoRA (and head) trained for ``steps`` AdamW steps."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=MODULES,
                        modules_to_save=["head"])
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    peft_model.train()
    step, losses = 0, []
    while step < steps:
        for batch in loader:
            loss = nn.functional.cross_entropy(peft_model(**_inputs(batch)), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if step % 20 == 0:
                print(f"  source step {step}: loss {sum(losses[-20:]) / 20:.3f}", flush=True)
            if step == steps:
                break
    return peft_model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train-limit", type=int, default=4096)
    parser.add_argument("--val-limit", type=int, default=512)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/lora_text.json")
    parser.add_argument("--save-adapter", help="also keep the trained source adapter here")
    parser.add_argument("--source-adapter", help="a source adapter saved by --save-adapter: "
                        "skip the training")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from peft import PeftModel
    from transformers import AutoModel

    from warmstart import transport_adapter
    from warmstart.lightning.assets import minilm_dir, mpnet_dir
    from warmstart.lightning.models import TextClassifierNet

    data_s, data_t = _data("minilm", args), _data("mpnet", args)
    torch.manual_seed(0)
    source = TextClassifierNet(AutoModel.from_pretrained(minilm_dir()), 2).eval()
    base = copy.deepcopy(source)  # get_peft_model wraps the model it is given
    t0 = time.perf_counter()
    if args.source_adapter:
        adapter = PeftModel.from_pretrained(source, args.source_adapter).eval()
    else:
        adapter = train_source(source, data_s.train_dataloader(), args.train_steps, args.lr,
                               args.rank)
    if args.save_adapter:
        adapter.save_pretrained(args.save_adapter)
    train_seconds = time.perf_counter() - t0
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "rank": args.rank, "train_steps": args.train_steps, "lr": args.lr,
              "train_seconds": train_seconds,
              "val_examples": len(data_s.val_dataloader().dataset),
              "source_base_acc": accuracy(base, data_s.val_dataloader()),
              "source_lora_acc": accuracy(adapter, data_s.val_dataloader())}
    print(f"source: base {result['source_base_acc']:.3f}, with its LoRA "
          f"{result['source_lora_acc']:.3f}", flush=True)

    torch.manual_seed(1)
    target = TextClassifierNet(AutoModel.from_pretrained(mpnet_dir()), 2).eval()
    result["target_fresh_acc"] = accuracy(target, data_t.val_dataloader())  # B = 0: the base
    print(f"target with a fresh adapter (B = 0): {result['target_fresh_acc']:.3f}", flush=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # the same training examples through each model's own tokenizer
    tokenizer_t = data_t.tokenizer
    source_in, target_in = [], []
    for batch, _ in zip(data_s.train_dataloader(), range(args.calibration_batches)):
        source_in.append(_inputs(batch))
        tokens = tokenizer_t(batch["text"], truncation=True, max_length=64, padding=True,
                             return_tensors="pt")
        target_in.append(_inputs(tokens))
    result["theseus"] = []
    with tempfile.TemporaryDirectory() as work:
        for alpha in args.alphas:
            out = Path(work) / f"alpha{alpha:g}"
            t0 = time.perf_counter()
            report = transport_adapter(base, adapter, target, source_in, out,
                                       target_calibration=target_in, alpha=alpha,
                                       progress=False)
            seconds = time.perf_counter() - t0
            moved = PeftModel.from_pretrained(copy.deepcopy(target), out).eval()
            acc = accuracy(moved, data_t.val_dataloader())
            result["theseus"].append({
                "alpha": alpha, "acc": acc, "seconds": seconds,
                "modules": len(report.modules), "maps": len(report.maps),
                "maps_rank_deficient": report.summary()["maps_rank_deficient"],
                "token_pairing": getattr(report, "token_pairing", None)})
            print(f"target with the moved adapter, alpha {alpha:g}: {acc:.3f} "
                  f"({seconds:.1f} s, {len(report.modules)} modules)", flush=True)
            out_path.write_text(json.dumps(result, indent=2))  # kept if a later alpha fails
    print(f"\nMiniLM LoRA (rank {args.rank}, {args.train_steps} steps) -> MPNet LoRA, "
          f"{result['val_examples']} validation sentences")
    print(f"{'model':<40} {'val acc':>8}")
    print(f"{'MiniLM base (its new head)':<40} {result['source_base_acc']:>8.3f}")
    print(f"{'MiniLM + trained LoRA':<40} {result['source_lora_acc']:>8.3f}")
    print(f"{'MPNet + fresh LoRA (cold)':<40} {result['target_fresh_acc']:>8.3f}")
    for row in result["theseus"]:
        print(f"{'MPNet + moved LoRA, alpha ' + format(row['alpha'], 'g'):<40} "
              f"{row['acc']:>8.3f}")
    out_path.write_text(json.dumps(result, indent=2))
    print(f"written {out_path}")


if __name__ == "__main__":
    main()
