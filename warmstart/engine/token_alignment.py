"""Pairing the token rows of two tokenizations of the same texts.

Token i of the source pairs with token i of the target only when both tokenizers split every text
identically. When they do not (WordPiece against BPE), rows are paired in one of two ways:

- ``offsets``: each target token is paired with the mean of the source tokens that cover any of
  its characters (``offset_mapping`` of fast tokenizers). Special tokens (``[CLS]``/``<s>``,
  ``[SEP]``/``</s>``: real tokens with an empty character span) are paired with each other in
  order: the ones before the text from the start, the ones after it from the end, the ones inside
  it (sentence-pair separators) in order when both sides have as many. A target token that no
  source token covers (the source's truncation cut it off, or its span is only whitespace) has no
  row. Padding never has one.
- ``example``: each example's real tokens are mean-pooled on each side, one row per example (as a
  mean-pooling classifier reads them); needs no offsets, but a batch gives only as many rows as it
  has examples.

Everything here is a pure function of the two activations and the two
:class:`~warmstart.engine.families.base.SequenceInfo`; the pairing of one batch is computed once
and applied to every observed point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .families.base import SequenceInfo

TokenPairing = Literal["auto", "one_to_one", "offsets", "example"]
TOKEN_PAIRINGS = ("auto", "one_to_one", "offsets", "example")
# What ``auto`` uses when the two tokenizations differ (measured: bench/token_pairing.py).
DIFFERENT_SPLITS = "offsets"

_FIX = ("tokenize both sides with a fast tokenizer and return_offsets_mapping=True (the "
        "'offset_mapping' key is kept out of the model's inputs), or set token_pairing='example' "
        "to pair mean-pooled examples instead")


@dataclass(frozen=True)
class TokenAlignment:
    """How the token rows of one batch pair: ``kind`` and, for ``offsets``, the averaging matrix
    ``weights`` [B, N_target, N_source] (each kept row sums to 1) and ``keep`` [B, N_target], the
    target tokens that have a pair."""

    kind: Literal["one_to_one", "offsets", "example"]
    weights: Tensor | None = None
    keep: Tensor | None = None
    source_mask: Tensor | None = None
    target_mask: Tensor | None = None

    def rows(self, source: Tensor, target: Tensor, where: str = "") -> tuple[Tensor, Tensor]:
        """Paired rows ``([n, d_source], [n, d_target])`` of activations [B, N, D] (``offsets``
        or ``example``; ``one_to_one`` rows are the masked tokens, see ``activations``)."""
        if (self.source_mask.shape != source.shape[:2]
                or self.target_mask.shape != target.shape[:2]):
            raise ValueError(
                f"{where}: attention masks {tuple(self.source_mask.shape)} / "
                f"{tuple(self.target_mask.shape)} do not match activations "
                f"{tuple(source.shape)} / {tuple(target.shape)}.")
        if self.kind == "offsets":
            weights = self.weights.to(source.device, source.dtype)
            return (torch.bmm(weights, source)[self.keep.to(source.device)],
                    target[self.keep.to(target.device)])
        if self.kind == "example":
            both = (self.source_mask.any(1) & self.target_mask.any(1)).cpu()
            return (mean_pool(source, self.source_mask)[both.to(source.device)],
                    mean_pool(target, self.target_mask)[both.to(target.device)])
        raise ValueError(f"a {self.kind!r} alignment pairs tokens by the attention masks; "
                         "use activations.pair_rows.")


def mean_pool(act: Tensor, mask: Tensor) -> Tensor:
    """[B, N, D] -> [B, D]: the mean over each example's real tokens (``mask`` [B, N])."""
    weights = mask.to(act.device, act.dtype).unsqueeze(-1)
    return (act * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def check_token_pairing(value: object) -> None:
    if value not in TOKEN_PAIRINGS:
        raise ValueError(f"token_pairing must be one of {TOKEN_PAIRINGS}, got {value!r}.")


def align_tokens(source: SequenceInfo, target: SequenceInfo,
                 pairing: TokenPairing = "auto") -> TokenAlignment | None:
    """The pairing of one batch's token rows; ``None`` when either side has no attention mask
    (not text: rows pair by patch grid or position).

    ``auto``: one to one when every example has as many real tokens on both sides and, where
    both sides carry offsets, the same character spans; otherwise :data:`DIFFERENT_SPLITS`.
    Without offsets on both sides ``auto`` stays one to one (and the row pairing names the
    examples whose counts differ).
    """
    check_token_pairing(pairing)
    if source.mask is None or target.mask is None:
        return None
    mask_s, mask_t = source.mask.bool(), target.mask.bool()
    if mask_s.shape[0] != mask_t.shape[0]:
        raise ValueError(f"source batch has {mask_s.shape[0]} examples, target "
                         f"{mask_t.shape[0]}; feed both models the same calibration examples.")
    have_offsets = source.offsets is not None and target.offsets is not None
    if pairing == "auto":
        if same_split(source, target) or (not have_offsets and DIFFERENT_SPLITS == "offsets"):
            pairing = "one_to_one"
        else:
            pairing = DIFFERENT_SPLITS
    if pairing == "one_to_one":
        return TokenAlignment("one_to_one", source_mask=mask_s, target_mask=mask_t)
    if pairing == "example":
        return TokenAlignment("example", source_mask=mask_s, target_mask=mask_t)
    if not have_offsets:
        sides = [side for side, info in (("source", source), ("target", target))
                 if info.offsets is None]
        raise ValueError(f"token_pairing='offsets' needs the character offsets of both "
                         f"tokenizations, but the {' and the '.join(sides)} calibration batches "
                         f"have none; {_FIX}.")
    weights, keep = offset_weights(_offsets(source, "source"), mask_s,
                                   _offsets(target, "target"), mask_t)
    device = mask_t.device  # the statistics' device: moved once per batch, not per point
    return TokenAlignment("offsets", weights.to(device), keep.to(device), mask_s, mask_t)


def same_split(source: SequenceInfo, target: SequenceInfo) -> bool:
    """Every example has as many real tokens on both sides (and, where both sides carry
    offsets, the same character spans in the same order)."""
    mask_s, mask_t = source.mask.bool().cpu(), target.mask.bool().cpu()
    if not torch.equal(mask_s.sum(1), mask_t.sum(1)):
        return False
    if source.offsets is None or target.offsets is None:
        return True
    spans_s = _offsets(source, "source").cpu()[mask_s]
    spans_t = _offsets(target, "target").cpu()[mask_t]
    return torch.equal(spans_s, spans_t)


def _offsets(info: SequenceInfo, side: str) -> Tensor:
    offsets = torch.as_tensor(info.offsets)
    if offsets.shape != (*info.mask.shape, 2):
        raise ValueError(f"the {side} offset_mapping has shape {tuple(offsets.shape)}, but its "
                         f"attention mask {tuple(info.mask.shape)}; expected [batch, tokens, 2] "
                         "(character start, end) from the same tokenizer call.")
    return offsets.long()


def offset_weights(offsets_s: Tensor, mask_s: Tensor, offsets_t: Tensor,
                   mask_t: Tensor) -> tuple[Tensor, Tensor]:
    """The averaging matrix [B, N_t, N_s] (float32) and the kept target tokens [B, N_t].

    Target token t and source token s of one example pair when their character spans overlap, or
    when both are special tokens of the same place and rank (see the module docstring); each
    target row averages its source tokens with equal weights.
    """
    offsets_s, offsets_t = offsets_s.cpu(), offsets_t.cpu()
    mask_s, mask_t = mask_s.bool().cpu(), mask_t.bool().cpu()
    start_s, end_s = offsets_s[..., 0], offsets_s[..., 1]
    start_t, end_t = offsets_t[..., 0], offsets_t[..., 1]
    text_s, text_t = mask_s & (end_s > start_s), mask_t & (end_t > start_t)
    overlap = ((start_t.unsqueeze(2) < end_s.unsqueeze(1))
               & (start_s.unsqueeze(1) < end_t.unsqueeze(2))
               & text_t.unsqueeze(2) & text_s.unsqueeze(1))
    pairs = overlap | _special_pairs(mask_s & ~text_s, text_s, mask_t & ~text_t, text_t)
    counts = pairs.sum(-1)
    keep = mask_t & (counts > 0)
    weights = pairs.float() / counts.clamp(min=1).unsqueeze(-1).float()
    return weights, keep


def _special_pairs(special_s: Tensor, text_s: Tensor, special_t: Tensor,
                   text_t: Tensor) -> Tensor:
    """[B, N_t, N_s]: special tokens paired by place (before, inside, after the text) and rank."""
    place_s, rank_s, count_s = _special_places(special_s, text_s)
    place_t, rank_t, count_t = _special_places(special_t, text_t)
    same = ((place_t.unsqueeze(2) == place_s.unsqueeze(1))
            & (rank_t.unsqueeze(2) == rank_s.unsqueeze(1))
            & special_t.unsqueeze(2) & special_s.unsqueeze(1))
    inside = (place_t == 1).unsqueeze(2) & (place_s == 1).unsqueeze(1)
    # separators inside the text pair in order only when both sides have as many
    equal_inside = (count_t == count_s).view(-1, 1, 1)
    return same & (~inside | equal_inside)


def _special_places(special: Tensor, text: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per token: place (0 before the first text token, 1 inside, 2 after the last), rank among
    the specials of its place (from the end for place 2), and the count of inside specials."""
    seen_before = text.long().cumsum(1) > 0
    seen_after = text.flip(1).long().cumsum(1).flip(1) > 0
    place = torch.where(~seen_before, 0, torch.where(seen_after, 1, 2))
    place = torch.where(text.any(1, keepdim=True), place, 0)  # no text: all specials lead
    rank = torch.zeros_like(place)
    for p in (0, 1):
        here = (special & (place == p)).long()
        rank = torch.where(place == p, here.cumsum(1) - 1, rank)
    tail = (special & (place == 2)).long()
    rank = torch.where(place == 2, tail.flip(1).cumsum(1).flip(1) - 1, rank)
    count_inside = (special & (place == 1)).sum(1)
    return place, rank, count_inside


def describe_pairings(used: dict[str, int]) -> str:
    """The report's words for the pairings that ran: ``"offsets"``, or ``"one_to_one (3 of 8
    batches), offsets (5 of 8 batches)"`` when batches differed, ``"none"`` without token rows."""
    used = {k: v for k, v in used.items() if v}
    if not used:
        return "none"
    if len(used) == 1:
        return next(iter(used))
    total = sum(used.values())
    return ", ".join(f"{k} ({v} of {total} batches)" for k, v in sorted(used.items()))
