"""A real decoder LoRA moved into a wider (or deeper) decoder: SmolLM2-135M LoRA -> target LoRA.

The source is SmolLM2-135M-Instruct as ``LlamaForSequenceClassification`` (see
``bench/decoder_smollm2.py`` for the weights), with a rank-``r`` LoRA on every attention and MLP
projection and the ``score`` head in ``modules_to_save``, trained on Rotten Tomatoes by a
Lightning ``Trainer``. The targets are the pretrained models that ``decoder_smollm2.py`` builds
from SmolLM2 itself (``wide``: 576 -> 768, 9/3 -> 12/4 heads, MLP 1536 -> 2048; ``wide+noise``;
``deep``: 30 -> 40 layers), each with a newly initialised ``score`` head.

``transport_adapter`` writes a PEFT adapter of the same rank for each target; it is loaded with
``PeftModel.from_pretrained`` and scored by Lightning's ``validate`` on the validation split,
against the target with a fresh adapter (PEFT's default init, ``B = 0``: the target and its new
head).

``--curve_seeds`` also fine-tunes a LoRA of the first target (PEFT-wrapped, a new head) from
both starts, per seed: ``lora_cold`` (PEFT's init) and ``lora_theseus`` (``TaskVectorTransport``
writes the moved source adapter into the target's own LoRA at fit start, from the first training
batches, so its wall clock includes the transport), the same steps, learning rate and data
order, with warmstart's ``ConvergenceTracker`` on the module's own validation; the convergence
report goes to ``--curve_dir``.

    . .venv/bin/activate; export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    python bench/lora_smollm2.py                 # bench/results/lora_smollm2.json
    python bench/lora_smollm2.py --steps 4 --val_rows 32 --calib_batches 2 --out /tmp/s.json
    python bench/lora_smollm2.py --curve_seeds 0 1 2     # + LoRA curves on the widened target
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

import lightning
import torch
from decoder_smollm2 import (  # the bench folder is on sys.path when run
    ROOT,
    SequenceTask,
    _trainer,
    _write,
    deepen,
    fresh_head,
    load_source,
    model_inputs,
    perturb,
    smollm2_folder,
    sorted_batches,
    validate,
    widen,
)
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from warmstart import ConvergenceTracker, TaskVectorTransport, transport_adapter
from warmstart.experiments.curves import load_runs
from warmstart.experiments.report import write_report
from warmstart.lightning.data import TextClassificationData

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_adapter(source: nn.Module, data: TextClassificationData, folder: Path, args
                  ) -> tuple[PeftModel, str]:
    """``source`` wrapped by PEFT with its LoRA (and head) trained by a Lightning ``Trainer``, or
    read back from the folder an earlier run with the same settings saved."""
    key = (f"r{args.rank}-steps{args.steps}-b{args.batch}-lr{args.lr:g}-len{args.max_length}-"
           f"val{args.val_rows}-seed{args.seed}")
    saved = folder.parent / f"smollm2-rt-lora-{key}"
    if (saved / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(source, saved).eval(), f"{saved} (read)"
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=MODULES,
                        modules_to_save=["score"])
    model = get_peft_model(source, config)
    task = SequenceTask(model.train(), lr=args.lr)
    _trainer(max_steps=args.steps, limit_val_batches=0, num_sanity_val_steps=0,
             gradient_clip_val=1.0).fit(task, train_dataloaders=data.train_dataloader())
    model.save_pretrained(saved)
    return model.eval(), f"{saved} (written)"


def build_target(name: str, source: nn.Module, args) -> nn.Module:
    if name == "deep":
        target, _ = deepen(source, args.deep_every)
    else:
        target, _ = widen(source, args.seed)
        if name == "wide+noise":
            target = perturb(target, args.noise, args.seed + 1)
    return fresh_head(target, args.seed + 7).eval()  # a new task head, as a new model has


def curves(target: nn.Module, base: nn.Module, adapter: PeftModel,
           data: TextClassificationData, args) -> dict:
    """LoRA fine-tuning of ``target`` from PEFT's init and from the moved adapter, per seed."""
    runs = {}
    for seed in args.curve_seeds:
        for arm in ("lora_cold", "lora_theseus"):
            lightning.seed_everything(seed, verbose=False)  # head, LoRA init and data order
            model = get_peft_model(fresh_head(copy.deepcopy(target), seed), LoraConfig(
                r=args.rank, lora_alpha=2 * args.rank, target_modules=MODULES,
                modules_to_save=["score"]))
            run_dir = Path(args.curve_dir) / "runs" / f"{arm}_seed{seed}"
            tracker = ConvergenceTracker(every_n_steps=args.curve_every,
                                         path=str(run_dir / "curve.csv"))
            callbacks = [tracker]
            if arm == "lora_theseus":
                callbacks.insert(0, TaskVectorTransport(
                    base, adapter, target_attribute="model", progress=False,
                    calibration_batches=args.calib_batches))
            print(f"curve {arm}, seed {seed}", flush=True)
            _trainer(max_steps=args.curve_steps, limit_val_batches=args.curve_val_batches,
                     num_sanity_val_steps=0, gradient_clip_val=1.0, callbacks=callbacks,
                     default_root_dir=str(run_dir)).fit(
                SequenceTask(model.train(), lr=args.curve_lr, warmup=args.curve_warmup),
                train_dataloaders=data.train_dataloader(), val_dataloaders=data.val_dataloader())
            runs[(arm, seed)] = tracker.written
    summary = write_report(load_runs(runs), args.curve_dir, title=(
        f"LoRA fine-tuning of the {args.targets[0]} SmolLM2 target: moved adapter vs PEFT's init"),
        config={k: v for k, v in vars(args).items() if k.startswith("curve") or k == "rank"},
        overwrite=True, reference_arm="lora_cold", metric="val_acc")
    return summary.to_dict()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="LoRA training steps of the source")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--val_rows", type=int, default=256, help="validation examples")
    p.add_argument("--calib_batches", type=int, default=8, help="calibration batches (x batch)")
    p.add_argument("--alphas", type=float, nargs="+", default=[1.0])
    p.add_argument("--noise", type=float, default=0.02, help="wide+noise: times each RMS")
    p.add_argument("--deep_every", type=int, default=3)
    p.add_argument("--targets", nargs="+", default=["wide"],
                   choices=["wide", "wide+noise", "deep"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--curve_seeds", type=int, nargs="*", default=[],
                   help="LoRA fine-tuning curves on the first target, these seeds")
    p.add_argument("--curve_steps", type=int, default=30)
    p.add_argument("--curve_every", type=int, default=10, help="validation every N steps")
    p.add_argument("--curve_lr", type=float, default=1e-3)
    p.add_argument("--curve_warmup", type=int, default=3)
    p.add_argument("--curve_val_batches", type=int, default=8, help="x batch examples")
    p.add_argument("--curves_only", action="store_true", help="skip the step-0 table")
    p.add_argument("--curve_dir", default=str(ROOT.parent / "runs" / "lora_smollm2"))
    p.add_argument("--out", default=str(ROOT / "results" / "lora_smollm2.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lightning.seed_everything(args.seed, verbose=False)
    timings: dict[str, float] = {}
    result: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "args": vars(args),
                              "timings": timings, "loadavg_start": os.getloadavg()[0],
                              "rows": []}
    rows = result["rows"]

    folder = smollm2_folder(args.cache_dir)
    source = load_source(folder)
    base = copy.deepcopy(source)  # get_peft_model wraps the module it is given
    data = TextClassificationData("rotten_tomatoes", tokenizer=str(folder),
                                  max_length=args.max_length, batch_size=args.batch,
                                  val_size=args.val_rows, seed=args.seed)
    data.setup("fit")
    val = sorted_batches(data.split("val"), data.collate, 32)
    calibration = [model_inputs(b) for b in islice(iter(data.train_dataloader()),
                                                   args.calib_batches)]

    t0 = time.perf_counter()
    adapter, result["adapter_cache"] = train_adapter(source, data, folder, args)
    timings["train"] = time.perf_counter() - t0
    if not args.curves_only:
        rows.append({"target": "source", "arm": "base (its new head)", **validate(base, val)})
        rows.append({"target": "source", "arm": "with its LoRA", **validate(adapter, val)})
    for r in rows:
        print(r, flush=True)

    for name in [] if args.curves_only else args.targets:
        target = build_target(name, base, args)
        rows.append({"target": name, "arm": "fresh adapter (B = 0)",
                     **validate(copy.deepcopy(target), val)})
        print(rows[-1], flush=True)
        with tempfile.TemporaryDirectory() as work:
            for alpha in args.alphas:
                out = Path(work) / f"alpha{alpha:g}"
                t0 = time.perf_counter()
                report = transport_adapter(base, adapter, target, calibration, out, alpha=alpha,
                                           progress=False)
                seconds = time.perf_counter() - t0
                moved = PeftModel.from_pretrained(copy.deepcopy(target), out).eval()
                config = json.loads((out / "adapter_config.json").read_text())
                rows.append({
                    "target": name, "arm": "moved adapter", "alpha": alpha,
                    **validate(moved, val), "transport_s": seconds,
                    "rank": config["r"], "modules": len(report.modules),
                    "maps": len(report.maps), "timings": report.timings,
                    "maps_rank_deficient": report.summary()["maps_rank_deficient"]})
                print(rows[-1], flush=True)
                _write(result, args.out)
        del target
    if args.curve_seeds:
        t0 = time.perf_counter()
        result["curves"] = curves(build_target(args.targets[0], base, args), base, adapter,
                                  data, args)
        timings["curves"] = time.perf_counter() - t0
    result["loadavg_end"] = os.getloadavg()[0]
    _write(result, args.out)
    print("\n| target | model | alpha | val acc | val loss |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        alpha = f"{r['alpha']:g}" if "alpha" in r else ""
        print(f"| {r['target']} | {r['arm']} | {alpha} | {r['acc']:.4f} | {r['loss']:.4f} |")
    return result


if __name__ == "__main__":
    main()
