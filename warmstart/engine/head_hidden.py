"""The map of a task head's hidden layer, chosen without calibration statistics.

Both base models' heads are untrained (the target's is new), so activations at the head's hidden
layer say nothing about how the two align. What is known is the function to move: the fine-tuned
source head ``out(tanh(dense(x)))``. ``units`` keeps hidden units as units (a partial identity),
which commutes with the elementwise activation, so the target head computes the source head's
function on the transported features exactly. ``stream`` reuses the last residual stream's map
(a rotation, which does not commute with the activation); it is kept for comparison.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .families.base import SpaceKey
from .procrustes import ProcrustesMap

HEAD_RULES = ("head", "head_bias", "head_linear", "head_vector")


def unit_map(d_source: int, d_target: int, importance: Tensor | None = None) -> Tensor:
    """``[d_source, d_target]`` partial identity: source unit ``i`` -> target unit ``i``.

    With fewer target units, the ``d_target`` source units of largest ``importance`` are kept
    (in their original order).
    """
    keep = torch.arange(d_source)
    if d_target < d_source:
        if importance is None:
            keep = keep[:d_target]
        else:
            keep = torch.topk(importance.double().cpu(), d_target).indices.sort().values
    out = torch.zeros(d_source, d_target, dtype=torch.float64)
    out[keep, torch.arange(len(keep))] = 1.0
    return out


def head_hidden_map(key: SpaceKey, d_target: int, pairs: Sequence,
                    finetuned: Mapping[str, Tensor], maps: Mapping[SpaceKey, ProcrustesMap],
                    mode: str) -> ProcrustesMap:
    """The map of the fixed space ``key`` (a head's hidden layer, ``d_target`` units)."""
    dense = next(pp for pp in pairs if pp.target.space_out == key
                 and pp.target.rule == "head_linear")
    d_source = finetuned[dense.source.name].shape[0]
    importance = None
    for pp in pairs:
        if pp.target.space_in == key:  # the output layer, [n_classes, d_target_hidden]
            importance = finetuned[pp.source.name].double().norm(dim=0)
    if mode == "stream":
        stream = maps.get(dense.target.space_in)
        if stream is None or tuple(stream.map.shape)[0] != d_source:
            raise ValueError(
                f"head_hidden='stream' needs the head's hidden layer {key} to be as wide as the "
                "residual stream it reads on both sides; use head_hidden='units'.")
        return stream
    t = unit_map(d_source, d_target, importance if d_target < d_source else None)
    n = min(d_source, d_target)
    device = next(iter(maps.values())).map.device if maps else torch.device("cpu")
    return ProcrustesMap(t.to(device), rank=n, n_rows=0, residual=0.0, alignment=1.0)



# The target's first head layer starts as ``PASS_THROUGH_SCALE * identity``: ``tanh(c x)`` is
# ``c x`` to within (c x)^2 / 3 relative for the O(1) features of a normed stream.
PASS_THROUGH_SCALE = 0.05


def pass_through(key: SpaceKey, layout_t, maps: Mapping[SpaceKey, ProcrustesMap],
                 target_state: Mapping[str, Tensor]
                 ) -> tuple[ProcrustesMap, dict[str, Tensor], list[tuple[str, str]]]:
    """The target has a two-layer head and the source one layer: the target's ``dense`` is set
    to pass the transported features through (``c * I``, zero bias, so that ``tanh(c x) ~ c x``)
    and its output layer reads them through the stream's map divided by ``c``.

    Returns the map of the head's hidden space, the values of the dense layer and, for the
    report, ``(parameter, decision)`` pairs.
    """
    dense = [p for p in layout_t.params if p.space_out == key and p.rule == "head_linear"]
    bias = [p for p in layout_t.params if p.space_out == key and p.rule == "head_vector"]
    weight = target_state[dense[0].name]
    stream = maps.get(dense[0].space_in)
    if stream is None or weight.shape[0] != weight.shape[1]:
        raise ValueError(
            f"the target's task head has a hidden layer ({dense[0].name}, shape "
            f"{tuple(weight.shape)}) that the source's one-layer head lacks; it can be "
            "initialised to pass the transported features through only when it is square and "
            "reads the residual stream. Give the source a head of the target's shape, or pass "
            "strict=False to keep the target's head as it is.")
    c = PASS_THROUGH_SCALE
    values = {dense[0].name: c * torch.eye(weight.shape[0], dtype=torch.float64,
                                           device=stream.map.device)}
    values.update({b.name: torch.zeros(weight.shape[0], dtype=torch.float64,
                                       device=stream.map.device) for b in bias})
    decision = (f"no counterpart in the source's one-layer head: initialised to pass the "
                f"transported features through ({c} * identity, zero bias); the output layer "
                f"reads them through the stream's map / {c}")
    mapped = ProcrustesMap(stream.map / c, stream.rank, stream.n_rows, stream.residual,
                           stream.alignment, stream.completed)
    return mapped, values, [(name, decision) for name in values]
