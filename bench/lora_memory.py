"""Peak memory of moving a LoRA adapter as factors against moving a dense task vector.

The pair has the widths of Qwen2.5-0.5B (896 wide, FFN 4864, 14 heads, 2 kv heads) and
Qwen2.5-1.5B (1536 wide, FFN 8960, 12 heads, 2 kv heads), random init, with fewer layers and a
small vocabulary so that the dense arm fits beside the others on a 24 GiB machine (the per-layer
costs scale linearly). Three arms, each in a fresh process:

- ``adapter``: ``transport_adapter`` (LoRA in, LoRA out: factors only);
- ``merge``: ``transport`` with the adapter as the source (LoRA in, the target's weights out:
  one module's dense update at a time);
- ``dense``: ``transport`` with a full fine-tune (every tensor changed) as the source.

Memory is the peak resident set size during the call above the one before it, sampled every
5 ms by a thread; ``update_bytes`` is the size of the update as each arm builds it.

``--method theseus`` (the method) gathers float64 cross statistics and computes maps: the same
work in every arm, since it depends on the pair and the calibration, not on the task vector, and
on a 2-core machine shared with others one FFN map (4864 x 8960) takes many minutes.
``--method slice`` (crop/zero-pad, no statistics) isolates what differs between the arms, the
update itself, at more layers.

    .venv/bin/python bench/lora_memory.py --method slice --layers 6 7    # bench/results/...
    .venv/bin/python bench/lora_memory.py --method theseus --layers 1 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

QWEN_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
            "num_key_value_heads": 2}
QWEN_15B = {"hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12,
            "num_key_value_heads": 2}
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Peak RSS above the value at entry, sampled by a thread."""

    def __enter__(self) -> PeakRss:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def above(self) -> int:
        return self.peak - self.start


def _model(widths: dict, layers: int, vocab: int, seed: int, dtype: str = "float32"):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**widths, num_hidden_layers=layers, vocab_size=vocab,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         use_sliding_window=False)
    # built in its dtype (a float32 build first would set the peak by itself)
    return Qwen2ForCausalLM._from_config(config, dtype=getattr(torch, dtype)).eval()


def run_arm(arm: str, layers: tuple[int, int], vocab: int, rank: int, work: Path,
            method: str, block_group: int | None = None, dtype: str = "float32") -> dict:
    import torch

    from warmstart import transport, transport_adapter

    torch.set_grad_enabled(False)
    source = _model(QWEN_05B, layers[0], vocab, 0, dtype)
    target = _model(QWEN_15B, layers[1], vocab, 1, dtype)
    g = torch.Generator().manual_seed(2)
    calibration = [{"input_ids": torch.randint(0, vocab, (4, 64), generator=g)}
                   for _ in range(2)]
    if arm == "dense":
        finetuned = {k: (v + 1e-3 * torch.randn(v.shape, generator=g)).to(v.dtype)
                     if v.is_floating_point() else v for k, v in source.state_dict().items()}
    else:
        finetuned = str(work / "source_adapter")
    out = work / f"out_{arm}"
    options = {"solver": "eigh", "progress": False, "method": method,
               "block_group": block_group}
    t0 = time.perf_counter()
    with PeakRss() as peak:
        if arm == "adapter":
            report = transport_adapter(source, finetuned, target, calibration, out, **options)
        else:
            report = transport(source, finetuned, target, calibration, **options)
    seconds = time.perf_counter() - t0
    target_params = sum(p.numel() for p in target.parameters())
    if arm == "adapter":
        update_bytes = (out / "adapter_model.safetensors").stat().st_size
    elif arm == "merge":  # one dense float64 update per LoRA module of the target
        update_bytes = sum(8 * target.get_submodule(m.name).weight.numel()
                           for m in report.modules)
    else:  # a float64 delta for every transported tensor
        update_bytes = sum(8 * target.state_dict()[p.name.split("[")[0]].numel()
                           for p in report.params)
    return {"arm": arm, "method": method, "block_group": block_group, "dtype": dtype,
            "peak_rss_above_mib": peak.above / 2**20,
            "seconds": seconds,
            "update_bytes": update_bytes, "target_params": target_params,
            "maps": len(report.maps), "lora_modules": len(getattr(report, "modules", ()))}


def make_adapter(layers: tuple[int, int], vocab: int, rank: int, work: Path,
                 modules: list[str]) -> None:
    """A rank-``rank`` LoRA on ``modules`` of the source, random factors."""
    import torch
    from peft import LoraConfig, get_peft_model

    source = _model(QWEN_05B, layers[0], vocab, 0)
    model = get_peft_model(source, LoraConfig(r=rank, lora_alpha=2 * rank,
                                              target_modules=modules))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    model.save_pretrained(work / "source_adapter")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs=2, default=(3, 4),
                        metavar=("SOURCE", "TARGET"))
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--arms", nargs="+", default=["adapter", "merge", "dense"],
                        choices=["adapter", "merge", "dense"])
    parser.add_argument("--method", choices=["slice", "theseus"], default="slice")
    parser.add_argument("--block-group", type=int, default=None,
                        help="theseus: statistics for this many target blocks at a time")
    parser.add_argument("--modules", nargs="+", default=LORA_MODULES, choices=LORA_MODULES,
                        help="the LoRA's target modules (theseus maps only the spaces they "
                        "read and write: without the MLP projections, no MLP-hidden map)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the models' dtype (bfloat16: the real checkpoints' own)")
    parser.add_argument("--out", default=None, help="default: bench/results/lora_memory_"
                        "<method>.json")
    parser.add_argument("--run-arm", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    layers = tuple(args.layers)
    if args.run_arm:  # a child process: one arm, its result as JSON on the last line
        print(json.dumps(run_arm(args.run_arm, layers, args.vocab, args.rank, Path(args.work),
                                 args.method, args.block_group, args.dtype)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        make_adapter(layers, args.vocab, args.rank, Path(work), args.modules)
        for arm in args.arms:
            done = subprocess.run(
                [sys.executable, __file__, "--run-arm", arm, "--work", work,
                 "--layers", *map(str, layers), "--vocab", str(args.vocab),
                 "--rank", str(args.rank), "--method", args.method, "--dtype", args.dtype,
                 *(["--block-group", str(args.block_group)] if args.block_group else [])],
                capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"arm {arm} failed (exit {done.returncode}):\n"
                                 f"{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"Qwen2.5-0.5B -> 1.5B widths, {layers[0]} -> {layers[1]} layers, vocab {args.vocab}, "
          f"LoRA rank {args.rank} on {', '.join(args.modules)}, method {args.method}, "
          f"{args.dtype}")
    print(f"{'arm':<8} {'peak RSS above start (MiB)':>27} {'update (MiB)':>13} {'seconds':>8}")
    for r in rows:
        print(f"{r['arm']:<8} {r['peak_rss_above_mib']:>27.0f} "
              f"{r['update_bytes'] / 2**20:>13.1f} {r['seconds']:>8.1f}")
    out = Path(args.out or f"bench/results/lora_memory_{args.method}.json")
    result = {"method": args.method,
              "pair": {"source": QWEN_05B, "target": QWEN_15B, "layers": layers,
                       "vocab": args.vocab, "rank": args.rank, "lora_modules": args.modules,
                       "dtype": args.dtype},
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
              "arms": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
