"""Step-0 accuracy of transported targets (right after transport, no training).

Vision: EfficientNet-Lite0 fine-tuned on MNIST-5k (runs/demo/source.ckpt) -> Lite2, 48 px, 512 val.
Text: MiniLM fine-tuned 60 steps on Rotten Tomatoes -> MPNet, 256 val examples.
Each row is measured as is and after BN recalibration (running stats reset, momentum=None,
8 train batches forwarded in train mode under no_grad; vision only).

    . .venv/bin/activate; export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    python bench/step0_sweep.py --parts vision diag text     # ~12 min on 2 CPU threads
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F

from warmstart.engine.activations import collect_statistics
from warmstart.engine.apply import apply_update
from warmstart.engine.families import describe_model
from warmstart.engine.families.base import BlockId, SpaceKey
from warmstart.engine.matching import match
from warmstart.engine.options import TransportOptions
from warmstart.engine.procrustes import procrustes_map
from warmstart.engine.task_vector import as_state_dict, fit_prefix
from warmstart.engine.update import compute_update
from warmstart.lightning.data import ImageClassificationData, TextClassificationData
from warmstart.lightning.models import build_model, tokenizer_for

VISION_GRID = [  # (name, alphas, update options)
    ("theseus", (0.5, 1.0, 2.0, 4.0), {}),
    ("slice", (1.0, 2.0), dict(method="slice")),
    ("head_only", (1.0,), dict(method="head_only")),
    ("theseus completion=none", (1.0, 2.0), dict(completion="none")),
    ("theseus depthwise=zero", (1.0, 2.0), dict(depthwise="zero")),
    ("theseus center", (1.0, 2.0), dict(center=True)),
    ("theseus calib=4", (1.0, 2.0), dict(nb=4)),
    ("theseus calib=16", (1.0, 2.0), dict(nb=16)),
    ("theseus whiten=0.25", (1.0, 2.0), dict(whiten=0.25)),
    ("theseus whiten=0.5", (1.0, 2.0), dict(whiten=0.5)),
    ("theseus center+whiten=0.5", (1.0, 2.0), dict(center=True, whiten=0.5)),
]


class Vision:
    def __init__(self, target_name: str, source_ckpt: str) -> None:
        dm = ImageClassificationData("mnist5k", image_size=48, batch_size=64, val_limit=512)
        dm.setup("fit")
        torch.manual_seed(0)
        self.train = [b for b, _ in zip(dm.train_dataloader(), range(16))]
        self.val = list(dm.val_dataloader())
        self.calib = [b["image"] for b in self.train]
        self.source = build_model("efficientnet_lite0", 10, pretrained=True).eval()
        # the Lightning checkpoint names the network "model.*": strip the wrapper prefix
        self.finetuned = fit_prefix(as_state_dict(source_ckpt), self.source.state_dict(),
                                    f"source checkpoint {source_ckpt}")
        torch.manual_seed(0)
        self.target = build_model(target_name, 10).eval()
        self.base = copy.deepcopy(self.target.state_dict())
        self.ls, self.lt = describe_model(self.source), describe_model(self.target)
        self.matching = match(self.ls, self.lt, None)
        self.cache: dict = {}

    def reset(self) -> None:
        self.target.load_state_dict(self.base)

    @torch.no_grad()
    def acc(self) -> float:
        self.target.eval()
        hits = sum(int((self.target(b["image"]).argmax(-1) == b["label"]).sum()) for b in self.val)
        return hits / sum(len(b["label"]) for b in self.val)

    @torch.no_grad()
    def bn_recal(self, k: int = 8) -> None:
        bns = [m for m in self.target.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        moms = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        self.target.train()
        for b in self.train[:k]:
            self.target(b["image"])
        self.target.eval()
        for m, mo in zip(bns, moms):
            m.momentum = mo

    def update(self, method="theseus", nb=8, center=False, whiten=0.0, completion="crop",
               depthwise="diagonal"):
        key = (method, nb, center, whiten, completion, depthwise)
        if key not in self.cache:
            self.reset()
            t0 = time.perf_counter()
            upd, _ = compute_update(
                self.source, self.finetuned, self.target, self.ls, self.lt, self.matching,
                self.calib[:nb], None,
                TransportOptions(method=method, center=center, whiten=float(whiten),
                                 completion=completion, depthwise=depthwise, solver="svd"),
                progress=False)
            self.cache[key] = (upd, time.perf_counter() - t0)
        return self.cache[key]

    def measure(self, alpha: float, keep=None, **opts) -> tuple[float, float]:
        upd, _ = self.update(**opts)
        self.reset()
        apply_update(self.target, upd, alpha)
        if keep is not None:
            self.keep_only(keep)
        a0 = self.acc()
        self.bn_recal()
        return a0, self.acc()

    def groups(self):
        return [("stem", ("conv_stem.", "bn1.")),
                *[(f"stage{s}", (f"blocks.{s}.",)) for s in range(len(self.target.blocks))],
                ("head_conv", ("conv_head.", "bn2."))]

    def keep_only(self, allowed) -> None:
        """Reset every transported tensor outside the ``allowed`` groups (the head stays)."""
        prefixes = [p for g, ps in self.groups() if g in allowed for p in ps]
        self.target.load_state_dict(
            {n: self.base[n] for n in self.target.state_dict()
             if not n.startswith("classifier.") and not any(n.startswith(p) for p in prefixes)},
            strict=False)


def run_vision(args) -> list[dict]:
    v = Vision(args.target, args.source_ckpt)
    rows = []
    v.reset()
    a0 = v.acc()
    v.bn_recal()
    rows.append(dict(part="vision", config="cold (random head)", alpha=0.0, acc=a0,
                     acc_bnrecal=v.acc()))
    for name, alphas, opts in VISION_GRID:
        for a in alphas:
            a0, a1 = v.measure(a, **opts)
            rows.append(dict(part="vision", config=name, alpha=a, acc=a0, acc_bnrecal=a1,
                             update_s=round(v.update(**opts)[1], 1)))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def run_diag(args) -> tuple[list[dict], list[dict]]:
    """Per-stage feature agreement (mapped source vs target) and per-group transport."""
    v = Vision(args.target, args.source_ckpt)
    keys = sorted(v.matching.spaces, key=str)
    stats = collect_statistics(v.source, v.target, v.ls, v.lt,
                               [v.matching.spaces[k] for k in keys], v.calib[:8], None,
                               progress=False)
    maps = {k: procrustes_map(s, completion="crop") for k, s in stats.items()}
    points = []
    for s, stage in enumerate(v.target.blocks):
        k = SpaceKey(BlockId(s, len(stage) - 1), "out")
        sk = v.matching.spaces[k].source_space
        points.append((f"stage{s}.out", k, f"blocks.{s}.{len(stage) - 1}",
                       f"blocks.{sk.block.stage}.{sk.block.index}"))
    points.append(("head(bn2)", SpaceKey(None, "head"), "bn2", "bn2"))
    src_ft = copy.deepcopy(v.source)
    src_ft.load_state_dict({**v.source.state_dict(), **v.finetuned})
    x = v.val[0]["image"]

    @torch.no_grad()
    def feats(model, col):
        mods, out = dict(model.named_modules()), {}
        hs = [mods[p[col]].register_forward_hook(
            lambda m, i, o, n=p[0]: out.__setitem__(n, o.double())) for p in points]
        model.eval()
        model(x)
        for h in hs:
            h.remove()
        return out

    def rows_of(f, size):
        if f.shape[-2:] != size:
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])

    sb, sf = feats(v.source, 3), feats(src_ft.eval(), 3)
    upd, _ = v.update()
    v.reset()
    tb = feats(v.target, 2)
    apply_update(v.target, upd, 1.0)
    tt = feats(v.target, 2)
    v.bn_recal()
    tr = feats(v.target, 2)
    out = []
    for name, k, _, _ in points:
        T, size = maps[k].map, tb[name].shape[-2:]
        a0, a1 = rows_of(sb[name], size) @ T, rows_of(sf[name], size) @ T
        b0, b1, b2 = (rows_of(t[name], size) for t in (tb, tt, tr))
        cos = lambda a, b: float(F.cosine_similarity(a, b, dim=1, eps=1e-12).mean())  # noqa
        da, db = a1 - a0, b1 - b0
        out.append(dict(point=name, width=f"{T.shape[0]}->{T.shape[1]}", rank=maps[k].rank,
                        map_residual=maps[k].residual, cos_base=cos(a0, b0),
                        cos_after=cos(a1, b1), cos_after_recal=cos(a1, b2),
                        delta_cos=float(F.cosine_similarity(da.flatten(), db.flatten(), dim=0)),
                        delta_norm_ratio=float(db.norm() / da.norm()),
                        src_delta_rel=float((rows_of(sf[name], size) - rows_of(sb[name], size)
                                             ).norm() / rows_of(sb[name], size).norm()),
                        tgt_delta_rel=float(db.norm() / b0.norm())))
        print(json.dumps(out[-1]), flush=True)
    groups = [g for g, _ in v.groups()]
    grp = []
    for n in range(len(groups) + 1):
        a0, a1 = v.measure(1.0, keep=groups[:n])
        grp.append(dict(kind="prefix", upto=groups[n - 1] if n else "none (head only)",
                        acc=a0, acc_bnrecal=a1))
        print(json.dumps(grp[-1]), flush=True)
    for g in groups:
        a0, a1 = v.measure(1.0, keep=[g])
        grp.append(dict(kind="single", upto=g, acc=a0, acc_bnrecal=a1))
        print(json.dumps(grp[-1]), flush=True)
    return out, grp


def run_text(args) -> list[dict]:
    import lightning

    from warmstart.lightning.models import Classifier

    ckpt = Path(args.text_source)
    if not ckpt.exists():
        torch.manual_seed(0)
        dm = TextClassificationData("rotten_tomatoes", tokenizer="minilm", max_length=48,
                                    batch_size=32)
        m = Classifier("minilm", 2, lr=5e-5, warmup_steps=10, scheduler="linear")
        lightning.Trainer(max_steps=60, accelerator="cpu", logger=False,
                          enable_checkpointing=False, limit_val_batches=0,
                          enable_progress_bar=False).fit(m, dm)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save(m.model.state_dict(), ckpt)
    dm = TextClassificationData("rotten_tomatoes", tokenizer="mpnet", max_length=48,
                                batch_size=32)
    dm.setup("fit")
    train = list(islice(iter(dm.train_dataloader()), 4))
    val = list(islice(iter(dm.val_dataloader()), args.text_val // 32))
    tok = tokenizer_for("minilm")

    def src_in(b):
        e = tok(list(b["text"]), padding=True, truncation=True, max_length=48,
                return_tensors="pt")
        return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}

    def tgt_in(b):
        return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}

    @torch.no_grad()
    def acc(model, inputs):
        model.eval()
        hits = sum(int((model(**inputs(b)).argmax(-1) == b["label"]).sum()) for b in val)
        return hits / sum(len(b["label"]) for b in val)

    source = build_model("minilm", 2).eval()
    finetuned = torch.load(ckpt)
    src_ft = copy.deepcopy(source)
    src_ft.load_state_dict(finetuned)
    rows = [dict(part="text", config="source MiniLM finetuned (reference)", alpha=None,
                 acc=acc(src_ft, src_in))]
    torch.manual_seed(0)
    target = build_model("mpnet", 2).eval()
    base = copy.deepcopy(target.state_dict())
    rows.append(dict(part="text", config="cold (random head)", alpha=None, acc=acc(target, tgt_in)))
    ls, lt = describe_model(source), describe_model(target)
    matching = match(ls, lt, None)
    cs, ct = [src_in(b) for b in train], [tgt_in(b) for b in train]
    for method, alphas in (("theseus", (1.0, 2.0)), ("slice", (1.0,)), ("head_only", (1.0,))):
        target.load_state_dict(base)
        t0 = time.perf_counter()
        upd, _ = compute_update(source, finetuned, target, ls, lt, matching,
                                cs if method != "slice" else None,
                                ct if method != "slice" else None,
                                TransportOptions(method=method, solver="svd"), progress=False)
        secs = time.perf_counter() - t0
        for a in alphas:
            target.load_state_dict(base)
            apply_update(target, upd, a)
            rows.append(dict(part="text", config=method, alpha=a, acc=acc(target, tgt_in),
                             update_s=round(secs, 1)))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["vision", "diag", "text"],
                   choices=["vision", "diag", "text"])
    p.add_argument("--target", default="efficientnet_lite2")
    p.add_argument("--source-ckpt", default="runs/demo/source.ckpt")
    p.add_argument("--text-source", default="/tmp/step0_sweep/minilm_rt60.pt",
                   help="MiniLM fine-tuned state dict; trained (60 steps, ~2 min) if missing")
    p.add_argument("--text-val", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/step0_sweep.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result: dict = {"rows": []}
    if "vision" in args.parts:
        result["rows"] += run_vision(args)
    if "diag" in args.parts:
        result["features"], result["groups"] = run_diag(args)
    if "text" in args.parts:
        result["rows"] += run_text(args)
    result["total_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print_tables(result)


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    fmt = lambda x: "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)  # noqa
    con = Console()
    t = Table(title="step-0 validation accuracy")
    for c in ("part", "config", "alpha", "acc", "acc after BN recal"):
        t.add_column(c)
    for r in result["rows"]:
        t.add_row(r["part"], r["config"], fmt(r["alpha"]), fmt(r["acc"]),
                  fmt(r.get("acc_bnrecal")))
    con.print(t)
    if result.get("features"):
        t = Table(title="feature agreement, Lite0 -> target, 1 val batch (theseus, alpha 1)")
        cols = ["point", "width", "rank", "cos_base", "cos_after", "cos_after_recal",
                "delta_cos", "delta_norm_ratio", "src_delta_rel"]
        for c in cols:
            t.add_column(c)
        for r in result["features"]:
            t.add_row(*(fmt(r[c]) for c in cols))
        con.print(t)
        t = Table(title="transport only some groups (others reset to the target's base)")
        for c in ("kind", "groups", "acc", "acc after BN recal"):
            t.add_column(c)
        for r in result["groups"]:
            t.add_row(r["kind"], r["upto"], fmt(r["acc"]), fmt(r["acc_bnrecal"]))
        con.print(t)


if __name__ == "__main__":
    main()
