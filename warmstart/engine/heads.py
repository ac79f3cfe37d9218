"""Attention maps built head by head.

A dense Procrustes map over a whole query, key or value projection mixes coordinates of different
heads, but softmax acts on each head's q.k scores separately and rotary embeddings (RoPE) turn each
head's coordinates in planes. A map that is to carry an attention's function must therefore keep
heads apart and, for queries and keys, commute with the rotation. This module builds such maps
from the full cross statistic of each attention space (only the sub-blocks of head pairs are read).

Pairing. Key/value heads pair by relative position, as blocks pair by depth: target kv head ``j``
takes source kv head ``round(j (K_s - 1) / (K_t - 1))``; the query heads of each kv group (the heads
``repeat_kv`` feeds from it) pair by relative position inside the group likewise. When the target
has more heads than the source, several target heads take the same source head: each of them
receives that head's query, key and value change in full, and its output-projection columns get
``1/m`` of the source head's change (``m`` = number of target heads sharing it), so the copies
together add the source head's output change once. That is exact for a target that duplicates
heads (splitting the output projection among the copies) and otherwise spreads the head's effect
over its copies. When the target has fewer heads, the unpaired source heads' changes are dropped
(they show as a rank below the narrower width in the report). ``pairing="matched"`` pairs heads by
their statistics instead (the nuclear norms of the head pairs' cross blocks, assigned one to one
with the Hungarian method, kv groups first, then the query heads inside them; extra target heads
take their best source head), for targets whose heads are not where the source's are.

Maps. Per group pair, queries and keys share one ``head_dim_s x head_dim_t`` map (estimated from the
key head pair and all query head pairs of the group together), so every q.k product of the group is
preserved; values and the output projection's input (the heads' outputs, which mix value vectors
and so share their coordinates) share another. ``mode`` chooses the map:

- ``dense``: the method's plain map, one Procrustes map per space over all heads;
- ``heads``: one Procrustes map per head pair (queries/keys and values/outputs as above);
- ``rope``: as ``heads``, but query/key maps are block-diagonal over RoPE's rotary planes, which
  HF's ``rotate_half`` forms from dimension ``i`` and ``i + head_dim / 2``. Each source plane is
  paired with the target plane of nearest frequency (for head_dim 64 -> 128 at the same base,
  source plane ``i`` has exactly the frequency of target plane ``2 i``) and mapped by a rotation of
  the plane (a complex phase), the only isometries that commute with the position rotation.
  Attentions without RoPE get the ``heads`` maps.

When head_dim changes, the score scale ``head_dim ** -0.5`` changes with it; query/key maps are then
multiplied by ``(scale_s / scale_t) ** 0.5`` so that the scores are preserved (not for attentions
whose q and k are RMS-normalised per head, where the norm's gain sets the scale).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .families.base import HeadLayout, ModelLayout, SpaceKey
from .matching import Matching, relative_depth
from .options import TransportOptions
from .procrustes import CrossStatistics, ProcrustesMap, procrustes_map

Mode = Literal["dense", "heads", "rope"]
MODES = ("dense", "heads", "rope")
DEFAULT_MODE: Mode = "rope"
Pairing = Literal["position", "matched"]
PAIRINGS = ("position", "matched")
DEFAULT_PAIRING: Pairing = "position"


@contextmanager
def head_mode(mode: Mode, pairing: Pairing | None = None) -> Iterator[None]:
    """Use ``mode`` (and ``pairing``) for the attention maps inside the block (benchmarks
    compare them)."""
    global DEFAULT_MODE, DEFAULT_PAIRING
    if mode not in MODES:
        raise ValueError(f"head map mode must be one of {MODES}, got {mode!r}.")
    if pairing is not None and pairing not in PAIRINGS:
        raise ValueError(f"head pairing must be one of {PAIRINGS}, got {pairing!r}.")
    previous = DEFAULT_MODE, DEFAULT_PAIRING
    DEFAULT_MODE, DEFAULT_PAIRING = mode, pairing or DEFAULT_PAIRING
    try:
        yield
    finally:
        DEFAULT_MODE, DEFAULT_PAIRING = previous


@dataclass(frozen=True)
class _Part:
    """Where one of q, k, v, o lies in a space's statistics: heads from ``offset`` on."""

    stats: CrossStatistics
    offset_s: int
    offset_t: int


@dataclass(frozen=True)
class _Attention:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope: tuple[float, ...] | None
    scale: float
    normed: bool

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads


def head_maps(stats: MutableMapping[SpaceKey, CrossStatistics], layout_s: ModelLayout,
              layout_t: ModelLayout, matching: Matching, options: TransportOptions,
              mode: Mode | None = None) -> dict[SpaceKey, ProcrustesMap]:
    """Maps of the target spaces that declare attention heads; their statistics leave ``stats``.

    Spaces without heads are left in ``stats`` for the plain Procrustes map.
    """
    mode = DEFAULT_MODE if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"head map mode must be one of {MODES}, got {mode!r}.")
    attentions: dict[object, dict[str, tuple[SpaceKey, HeadLayout, HeadLayout]]] = {}
    for key in sorted(stats, key=str):
        space_t = layout_t.space(key)
        if space_t is None or space_t.heads is None or key not in matching.spaces:
            continue
        key_s = matching.spaces[key].source_space
        space_s = layout_s.space(key_s)
        heads_s = space_s.heads if space_s is not None else None
        if heads_s is None or heads_s.kind != space_t.heads.kind:
            raise ValueError(
                f"the target space {key} holds attention heads ({space_t.heads.kind}) but the "
                f"source space {key_s} ({layout_s.family}) declares "
                f"{'no heads' if heads_s is None else heads_s.kind + ' heads'}; pair models whose "
                "families both describe their attention heads.")
        attentions.setdefault(key.block, {})[space_t.heads.kind] = (key, heads_s, space_t.heads)
    maps: dict[SpaceKey, ProcrustesMap] = {}
    for spaces in attentions.values():
        found = {kind: stats.pop(key) for kind, (key, _, _) in spaces.items()}
        maps.update(_attention_maps(spaces, found, options, mode))
    return maps


def _attention(layouts: list[HeadLayout], where: str) -> _Attention:
    first = layouts[0]
    for other in layouts[1:]:
        if (other.n_heads, other.n_kv_heads, other.head_dim) != \
                (first.n_heads, first.n_kv_heads, first.head_dim):
            raise ValueError(f"{where}: the spaces of one attention disagree on its heads "
                             f"({first} vs {other}); the family adapter is inconsistent.")
    if first.n_kv_heads < 1 or first.n_heads % first.n_kv_heads:
        raise ValueError(f"{where}: {first.n_heads} query heads cannot be grouped over "
                         f"{first.n_kv_heads} key/value heads (not a multiple).")
    if first.rope is not None and 2 * len(first.rope) != first.head_dim:
        raise ValueError(f"{where}: {len(first.rope)} rotary frequencies do not cover head_dim "
                         f"{first.head_dim} (partial rotary embeddings are not supported).")
    scale = first.scale if first.scale is not None else first.head_dim ** -0.5
    return _Attention(first.n_heads, first.n_kv_heads, first.head_dim, first.rope, scale,
                      first.normed)


_WIDTH = {"query": lambda a: a.n_heads, "output": lambda a: a.n_heads,
          "key": lambda a: a.n_kv_heads, "value": lambda a: a.n_kv_heads,
          "qkv": lambda a: a.n_heads + 2 * a.n_kv_heads, "head_dim": lambda a: 1}


def _parts(spaces, found, att_s: _Attention, att_t: _Attention) -> dict[str, _Part]:
    """q, k, v, o views into the statistics, checking each space's width against its heads."""
    parts: dict[str, _Part] = {}
    for kind, (key, _, _) in spaces.items():
        acc = found[kind]
        for side, att, width in (("source", att_s, acc.d_source), ("target", att_t, acc.d_target)):
            expected = _WIDTH[kind](att) * att.head_dim
            if width != expected:
                raise ValueError(
                    f"{key}: the {side} space is {width} wide but its {kind} heads "
                    f"({att.n_heads} query / {att.n_kv_heads} key-value heads of {att.head_dim}) "
                    f"need {expected}; head_dim must divide the projection's width.")
        if kind == "qkv":
            q_s, q_t = att_s.n_heads * att_s.head_dim, att_t.n_heads * att_t.head_dim
            kv_s, kv_t = att_s.n_kv_heads * att_s.head_dim, att_t.n_kv_heads * att_t.head_dim
            parts["q"] = _Part(acc, 0, 0)
            parts["k"] = _Part(acc, q_s, q_t)
            parts["v"] = _Part(acc, q_s + kv_s, q_t + kv_t)
        elif kind != "head_dim":
            parts[kind[0]] = _Part(acc, 0, 0)
    return parts


def _attention_maps(spaces, found, options: TransportOptions, mode: Mode
                    ) -> dict[SpaceKey, ProcrustesMap]:
    where = str(next(iter(spaces.values()))[0])
    att_s = _attention([s for _, s, _ in spaces.values()], where + " (source)")
    att_t = _attention([t for _, _, t in spaces.values()], where + " (target)")
    parts = _parts(spaces, found, att_s, att_t)
    if mode == "dense":
        return _dense_maps(spaces, found, parts, att_s, att_t, options)
    if DEFAULT_PAIRING == "matched":
        kv_pair, q_pair = _matched_pairs(parts, att_s, att_t, options)
    else:
        kv_pair = relative_depth(att_s.n_kv_heads, att_t.n_kv_heads)
        in_group = relative_depth(att_s.group, att_t.group)
        q_pair = [kv_pair[h // att_t.group] * att_s.group + in_group[h % att_t.group]
                  for h in range(att_t.n_heads)]
    shared = [q_pair.count(h) for h in range(att_s.n_heads)]
    rope = mode == "rope" and att_s.rope is not None and att_t.rope is not None
    planes = _pair_planes(att_s.rope, att_t.rope) if rope else None
    factor = 1.0 if att_s.normed or att_t.normed else (att_s.scale / att_t.scale) ** 0.5
    hd_s, hd_t = att_s.head_dim, att_t.head_dim
    qk_maps, vo_maps = [], []
    qk_total = None
    for j in range(att_t.n_kv_heads):
        heads_q = [(q_pair[h], h) for h in range(j * att_t.group, (j + 1) * att_t.group)]
        qk = _summed(parts, [("k", kv_pair[j], j)] + [("q", s, t) for s, t in heads_q],
                     hd_s, hd_t, options)
        vo = _summed(parts, [("v", kv_pair[j], j)] + [("o", s, t) for s, t in heads_q],
                     hd_s, hd_t, options)
        qk_total = qk if qk_total is None else qk_total + qk
        qk_maps.append(_fit(qk, planes, options))
        vo_maps.append(_fit(vo, None, options))
    out: dict[SpaceKey, ProcrustesMap] = {}
    blocks: dict[str, list[tuple[int, int, _Fit, float]]] = {
        "q": [(q_pair[h], h, qk_maps[h // att_t.group], factor) for h in range(att_t.n_heads)],
        "k": [(kv_pair[j], j, qk_maps[j], factor) for j in range(att_t.n_kv_heads)],
        "v": [(kv_pair[j], j, vo_maps[j], 1.0) for j in range(att_t.n_kv_heads)],
        "o": [(q_pair[h], h, vo_maps[h // att_t.group], 1.0 / shared[q_pair[h]])
              for h in range(att_t.n_heads)],
    }
    for kind, (key, _, _) in spaces.items():
        acc = found[kind]
        if kind == "head_dim":
            fit = _fit(qk_total, planes, options) if qk_total is not None else \
                _fit(_processed(acc, slice(None), slice(None), options), planes, options)
            out[key] = _report(acc, fit.map, fit.rank, fit.completed, options)
            continue
        names = ("q", "k", "v") if kind == "qkv" else (kind[0],)
        transport = torch.zeros(acc.d_source, acc.d_target, dtype=torch.float64,
                                device=acc.cross.device)
        rank = completed = 0
        for name in names:
            part = parts[name]
            seen = set()
            for s, t, fit, weight in blocks[name]:
                rows = slice(part.offset_s + s * hd_s, part.offset_s + (s + 1) * hd_s)
                cols = slice(part.offset_t + t * hd_t, part.offset_t + (t + 1) * hd_t)
                transport[rows, cols] = weight * fit.map
                if s not in seen:  # a source head shared by several target heads counts once
                    seen.add(s)
                    rank, completed = rank + fit.rank, completed + fit.completed
        out[key] = _report(acc, transport, rank, completed, options)
    return out


def _head_scores(part: _Part | None, n_s: int, n_t: int, hd_s: int, hd_t: int,
                 options: TransportOptions) -> Tensor:
    """``[n_s, n_t]``: the nuclear norm of every head pair's cross block (how much of the two
    heads' rows one isometry can align; 0 where the part is absent)."""
    if part is None:
        return torch.zeros(n_s, n_t, dtype=torch.float64)
    rows = slice(part.offset_s, part.offset_s + n_s * hd_s)
    cols = slice(part.offset_t, part.offset_t + n_t * hd_t)
    cross = _processed(part.stats, rows, cols, options)
    blocks = cross.reshape(n_s, hd_s, n_t, hd_t).permute(0, 2, 1, 3)
    return torch.linalg.svdvals(blocks).sum(-1).cpu()


def _assign(scores: Tensor) -> list[int]:
    """Source index for every target column: the best one-to-one assignment, and for target
    columns left over (more targets than sources) their best-scoring source."""
    rows, cols = linear_sum_assignment(scores.numpy(), maximize=True)
    out = scores.argmax(0).tolist()
    for r, c in zip(rows.tolist(), cols.tolist()):
        out[c] = r
    return out


def _matched_pairs(parts, att_s: _Attention, att_t: _Attention, options: TransportOptions
                   ) -> tuple[list[int], list[int]]:
    """Heads paired by their statistics instead of their positions.

    Query heads score by their query and output blocks, kv heads by their key and value blocks;
    a kv group pair scores its kv heads plus the best assignment of its query heads. Groups are
    assigned one to one where possible (extra target groups take their best source group), then
    the query heads inside each paired group likewise.
    """
    hd_s, hd_t, g_s, g_t = att_s.head_dim, att_t.head_dim, att_s.group, att_t.group
    q = (_head_scores(parts.get("q"), att_s.n_heads, att_t.n_heads, hd_s, hd_t, options)
         + _head_scores(parts.get("o"), att_s.n_heads, att_t.n_heads, hd_s, hd_t, options))
    kv = (_head_scores(parts.get("k"), att_s.n_kv_heads, att_t.n_kv_heads, hd_s, hd_t, options)
          + _head_scores(parts.get("v"), att_s.n_kv_heads, att_t.n_kv_heads, hd_s, hd_t,
                         options))
    inner: dict[tuple[int, int], list[int]] = {}
    groups = kv.clone()
    for i in range(att_s.n_kv_heads):
        for j in range(att_t.n_kv_heads):
            block = q[i * g_s:(i + 1) * g_s, j * g_t:(j + 1) * g_t]
            inner[i, j] = _assign(block)
            rows, cols = linear_sum_assignment(block.numpy(), maximize=True)
            groups[i, j] += float(block[rows, cols].sum())
    kv_pair = _assign(groups)
    q_pair = [kv_pair[h // g_t] * g_s + inner[kv_pair[h // g_t], h // g_t][h % g_t]
              for h in range(att_t.n_heads)]
    return kv_pair, q_pair


@dataclass(frozen=True)
class _Fit:
    map: Tensor
    rank: int
    completed: int


def _processed(acc: CrossStatistics, rows: slice, cols: slice, options: TransportOptions
               ) -> Tensor:
    """The cross moment of one head pair, centred and whitened as the options ask."""
    cross = acc.cross[rows, cols]
    if options.center:
        n = max(acc.n_rows, 1)
        cross = cross - torch.outer(acc.sum_source[rows], acc.sum_target[cols]) / n
    if options.whiten > 0:
        cross = (_inverse_root(_gram(acc.gram_source, acc.sum_source, rows, acc, options),
                               options.whiten) @ cross
                 @ _inverse_root(_gram(acc.gram_target, acc.sum_target, cols, acc, options),
                                 options.whiten))
    return cross


def _gram(gram: Tensor | None, sums: Tensor, idx: slice, acc: CrossStatistics,
          options: TransportOptions) -> Tensor:
    if gram is None:
        raise ValueError(f"whiten={options.whiten} needs Gram matrices; accumulate "
                         "CrossStatistics(with_grams=True).")
    block = gram[idx, idx]
    if options.center:
        block = block - torch.outer(sums[idx], sums[idx]) / max(acc.n_rows, 1)
    return block


def _inverse_root(gram: Tensor, power: float, floor: float = 1e-6) -> Tensor:
    values, vectors = torch.linalg.eigh(gram)
    values = values.clamp_min(max(floor * float(values.max()), 1e-300))
    return (vectors * values.pow(-power)) @ vectors.T


def _summed(parts: Mapping[str, _Part], pairs, hd_s: int, hd_t: int,
            options: TransportOptions) -> Tensor | None:
    """Sum of the processed cross blocks of ``pairs`` (part, source head, target head)."""
    total = None
    for name, s, t in pairs:
        part = parts.get(name)
        if part is None:
            continue
        rows = slice(part.offset_s + s * hd_s, part.offset_s + (s + 1) * hd_s)
        cols = slice(part.offset_t + t * hd_t, part.offset_t + (t + 1) * hd_t)
        block = _processed(part.stats, rows, cols, options)
        total = block if total is None else total + block
    return total


def _fit(cross: Tensor | None, planes, options: TransportOptions) -> _Fit:
    if cross is None:
        raise ValueError("an attention has no statistics for one of its head groups; the "
                         "family adapter must declare the query/key and value/output spaces.")
    if planes is not None:
        return _rotation_fit(cross, planes, options)
    acc = CrossStatistics(*cross.shape, device=cross.device)
    acc.cross = cross
    acc.n_rows = 1
    result = procrustes_map(acc, completion=options.completion, rank_rtol=options.rank_rtol,
                            solver=options.solver)
    return _Fit(result.map, result.rank, result.completed)


def _pair_planes(rope_s: tuple[float, ...], rope_t: tuple[float, ...]) -> list[tuple[int, int]]:
    """Source plane -> target plane of nearest frequency (log scale), each plane used once."""
    f_s = torch.tensor(rope_s, dtype=torch.float64).log()
    f_t = torch.tensor(rope_t, dtype=torch.float64).log()
    rows, cols = linear_sum_assignment((f_s[:, None] - f_t[None, :]).abs().numpy())
    return sorted(zip(rows.tolist(), cols.tolist()))


def _rotation_fit(cross: Tensor, planes: list[tuple[int, int]], options: TransportOptions
                  ) -> _Fit:
    """Per paired plane, the rotation (complex phase) best aligning source with target rows.

    With plane coordinates ``z = x_i + i x_{i+h}``, the phase maximising ``trace(T^T C)`` is that
    of ``(C_11 + C_22) + i (C_12 - C_21)`` over the plane's 2 x 2 block of the cross moment.
    """
    hd_s, hd_t = cross.shape
    h_s, h_t = hd_s // 2, hd_t // 2
    src = torch.tensor([i for i, _ in planes], device=cross.device)
    dst = torch.tensor([j for _, j in planes], device=cross.device)
    re = cross[src, dst] + cross[src + h_s, dst + h_t]
    im = cross[src, dst + h_t] - cross[src + h_s, dst]
    size = torch.sqrt(re.square() + im.square())
    kept = size > options.rank_rtol * float(size.max()) if float(size.max()) > 0 else \
        torch.zeros_like(size, dtype=torch.bool)
    cos = torch.where(kept, re / torch.where(kept, size, 1.0), 0.0)
    sin = torch.where(kept, im / torch.where(kept, size, 1.0), 0.0)
    completed = 0
    if options.completion == "crop":  # undetermined planes keep their coordinates (no turn)
        completed = 2 * int((~kept).sum())
        cos = torch.where(kept, cos, 1.0)
    transport = torch.zeros(hd_s, hd_t, dtype=torch.float64, device=cross.device)
    transport[src, dst] = cos
    transport[src + h_s, dst + h_t] = cos
    transport[src, dst + h_t] = sin
    transport[src + h_s, dst] = -sin
    return _Fit(transport, 2 * int(kept.sum()), completed)


def _report(acc: CrossStatistics, transport: Tensor, rank: int, completed: int,
            options: TransportOptions) -> ProcrustesMap:
    """The assembled map with its fit over the space's own rows.

    ``||A T||^2`` needs the source Gram, which is not kept; it is estimated as
    ``||A||^2 ||T||_F^2 / d_source`` (exact for a partial permutation, and for source energy spread
    evenly over the heads), which accounts for heads that are shared (``T`` lengthens rows) or
    dropped. ``alignment`` is then the cosine between ``A T`` and ``B``.
    """
    n = max(acc.n_rows, 1)
    cross, sq_s, sq_t = acc.cross, float(acc.sq_source), float(acc.sq_target)
    if options.center:
        cross = cross - torch.outer(acc.sum_source, acc.sum_target) / n
        sq_s -= float(acc.sum_source.square().sum()) / n
        sq_t -= float(acc.sum_target.square().sum()) / n
    aligned = float((transport * cross).sum())
    mapped = max(sq_s, 0.0) * float(transport.square().sum()) / transport.shape[0]
    residual = max(mapped - 2 * aligned + sq_t, 0.0) / max(sq_t, 1e-300)
    alignment = aligned / max((mapped * max(sq_t, 0.0)) ** 0.5, 1e-300)
    narrow = min(transport.shape)
    return ProcrustesMap(transport, min(rank, narrow), acc.n_rows, residual, alignment,
                         min(completed, narrow - min(rank, narrow)))


def _sub_statistics(acc: CrossStatistics, rows: slice, cols: slice) -> CrossStatistics:
    """The statistics of a slice of the source and target features (a fused space's part)."""
    d_s = len(range(*rows.indices(acc.d_source)))
    d_t = len(range(*cols.indices(acc.d_target)))
    sub = CrossStatistics(d_s, d_t, acc.with_grams, acc.cross.device)
    sub.cross = acc.cross[rows, cols]
    sub.sum_source, sub.sum_target = acc.sum_source[rows], acc.sum_target[cols]
    if acc.with_grams:
        sub.gram_source, sub.gram_target = acc.gram_source[rows, rows], acc.gram_target[cols, cols]
        sub.sq_source = sub.gram_source.diagonal().sum()
        sub.sq_target = sub.gram_target.diagonal().sum()
    else:  # per-feature energies are not kept: split the totals by width (report only)
        sub.sq_source = acc.sq_source * d_s / acc.d_source
        sub.sq_target = acc.sq_target * d_t / acc.d_target
    sub.n_rows = acc.n_rows
    return sub


def _dense_maps(spaces, found, parts, att_s: _Attention, att_t: _Attention,
                options: TransportOptions) -> dict[SpaceKey, ProcrustesMap]:
    """The plain method: one Procrustes map per projection over all its heads; values and the
    output projection's input share one map when their widths agree (no grouped queries)."""
    kw = {"center": options.center, "whiten": options.whiten, "completion": options.completion,
          "rank_rtol": options.rank_rtol, "solver": options.solver}

    def part_stats(name: str) -> CrossStatistics:
        part = parts[name]
        n_s = (att_s.n_heads if name in "qo" else att_s.n_kv_heads) * att_s.head_dim
        n_t = (att_t.n_heads if name in "qo" else att_t.n_kv_heads) * att_t.head_dim
        if part.offset_s == 0 and part.offset_t == 0 and \
                (part.stats.d_source, part.stats.d_target) == (n_s, n_t):
            return part.stats
        return _sub_statistics(part.stats, slice(part.offset_s, part.offset_s + n_s),
                               slice(part.offset_t, part.offset_t + n_t))

    fits: dict[str, ProcrustesMap] = {}
    value = part_stats("v") if "v" in parts else None
    if value is not None and "o" in parts and \
            (att_s.n_heads, att_t.n_heads) == (att_s.n_kv_heads, att_t.n_kv_heads):
        joined = _sub_statistics(value, slice(None), slice(None))
        output = parts["o"].stats
        joined.cross = joined.cross + output.cross
        joined.sum_source = joined.sum_source + output.sum_source
        joined.sum_target = joined.sum_target + output.sum_target
        joined.sq_source, joined.sq_target = (joined.sq_source + output.sq_source,
                                              joined.sq_target + output.sq_target)
        if joined.with_grams:
            joined.gram_source = joined.gram_source + output.gram_source
            joined.gram_target = joined.gram_target + output.gram_target
        joined.n_rows = value.n_rows + output.n_rows
        fits["v"] = fits["o"] = procrustes_map(joined, **kw)
    for name in parts:
        if name not in fits:
            fits[name] = procrustes_map(part_stats(name), **kw)
    out: dict[SpaceKey, ProcrustesMap] = {}
    for kind, (key, _, _) in spaces.items():
        acc = found[kind]
        if kind == "head_dim":
            out[key] = procrustes_map(acc, **kw)
        elif kind == "qkv":
            transport = torch.block_diag(fits["q"].map, fits["k"].map, fits["v"].map)
            out[key] = _report(acc, transport, sum(fits[n].rank for n in "qkv"),
                               sum(fits[n].completed for n in "qkv"), options)
        else:
            out[key] = fits[kind[0]]
    return out
