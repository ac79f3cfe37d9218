"""Pair the source's blocks, coordinate spaces and parameters with the target's."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .activations import SpacePairing
from .families.base import BlockId, ModelLayout, ParamRole, SpaceKey

DepthMapping = Sequence[int] | Mapping[int, int] | None


@dataclass(frozen=True)
class ParamPairing:
    """Target parameter role ``target`` receives the delta of ``source``."""

    target: ParamRole
    source: ParamRole


@dataclass(frozen=True)
class Matching:
    block_map: Mapping[BlockId, BlockId]  # target block -> source block
    spaces: Mapping[SpaceKey, SpacePairing]  # target space -> its pairing
    params: tuple[ParamPairing, ...]
    unmatched_target: tuple[tuple[str, str], ...]  # (target parameter, reason)
    unmatched_source: tuple[tuple[str, str], ...]  # (source parameter, reason)


def relative_depth(n_source: int, n_target: int) -> list[int]:
    """Source block for each target block: ``i(j) = round(j (D_s - 1) / (D_t - 1))``, half up."""
    if n_target == 1:
        return [0]
    return [int(j * (n_source - 1) / (n_target - 1) + 0.5) for j in range(n_target)]


def map_blocks(source: ModelLayout, target: ModelLayout,
               mapping: DepthMapping = None) -> dict[BlockId, BlockId]:
    """Target block -> source block, stage by stage.

    ``mapping`` (optional) gives, for every target block in order (all stages flattened), the index
    of its source block in the same flattened order; a dict may give only some target blocks, the
    rest follow relative position.
    """
    if len(source.blocks) != len(target.blocks):
        raise ValueError(
            f"source ({source.family}) has {len(source.blocks)} stages of blocks, target "
            f"({target.family}) has {len(target.blocks)}; only models with the same stage "
            "structure can be paired."
        )
    result: dict[BlockId, BlockId] = {}
    for stage_s, stage_t in zip(source.blocks, target.blocks):
        if stage_t and not stage_s:
            raise ValueError(
                f"target ({target.family}) has {len(stage_t)} blocks in stage "
                f"{stage_t[0].stage}, the source ({source.family}) none; only models with the "
                "same stage structure can be paired (choose a source of the target's family)."
            )
        for bid_t, i in zip(stage_t, relative_depth(len(stage_s), len(stage_t))):
            result[bid_t] = stage_s[i]
    if mapping is not None:
        result.update(_explicit(source, target, mapping))
    return result


def check_depth_mapping(mapping: Any) -> None:
    """Types of an explicit depth mapping; its ranges are checked against the models later."""
    if mapping is None:
        return
    if isinstance(mapping, Mapping):
        pairs = list(mapping.items())
    elif isinstance(mapping, (list, tuple)):
        pairs = list(enumerate(mapping))
    else:
        raise TypeError(
            f"depth_mapping must be a list with one source block index per target block, or a "
            f"dict {{target block: source block}}, got {type(mapping).__name__} {mapping!r}."
        )
    bad = [(j, i) for j, i in pairs if not (_is_index(j) and _is_index(i))]
    if bad:
        shown = ", ".join(f"{j!r} -> {i!r}" for j, i in bad[:3])
        raise TypeError(
            f"depth_mapping entries must be integer block indices (target -> source), got "
            f"{shown}; write e.g. [0, 0, 1] or {{2: 1}}."
        )


def _is_index(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _explicit(source: ModelLayout, target: ModelLayout, mapping: DepthMapping) -> dict:
    check_depth_mapping(mapping)
    flat_s = [b for stage in source.blocks for b in stage]
    flat_t = [b for stage in target.blocks for b in stage]
    if not isinstance(mapping, Mapping):
        if len(mapping) != len(flat_t):
            raise ValueError(
                f"depth_mapping lists {len(mapping)} source blocks but the target has "
                f"{len(flat_t)} blocks; give one source index per target block, or a dict."
            )
        mapping = dict(enumerate(mapping))
    out = {}
    for j, i in mapping.items():
        j, i = int(j), int(i)
        if not 0 <= j < len(flat_t) or not 0 <= i < len(flat_s):
            raise ValueError(
                f"depth_mapping entry {j} -> {i} is out of range: target blocks are 0.."
                f"{len(flat_t) - 1}, source blocks 0..{len(flat_s) - 1}."
            )
        if flat_t[j].stage != flat_s[i].stage:
            raise ValueError(
                f"depth_mapping entry {j} -> {i} crosses stages ({flat_t[j].stage} vs "
                f"{flat_s[i].stage}); blocks can only be paired within a stage."
            )
        out[flat_t[j]] = flat_s[i]
    return out


def _source_block(block: BlockId | None, block_map: Mapping[BlockId, BlockId]) -> BlockId | None:
    return None if block is None else block_map[block]


def match(source: ModelLayout, target: ModelLayout, mapping: DepthMapping = None) -> Matching:
    """Pair parameters by role and spaces by name, through the block map."""
    block_map = map_blocks(source, target, mapping)
    source_params = {p.key: p for p in source.params}
    pairs: list[ParamPairing] = []
    unmatched_t: list[tuple[str, str]] = []
    used_source: set[tuple] = set()
    for p_t in target.params:
        key_s = (_source_block(p_t.block, block_map), p_t.role)
        p_s = source_params.get(key_s)
        if p_s is None:
            unmatched_t.append((p_t.name, f"the source ({source.family}) has no {p_t.role!r}"))
            continue
        pairs.append(ParamPairing(p_t, p_s))
        used_source.add(key_s)
    roles_t = {p.role for p in target.params}
    unmatched_s = [(p.name, f"the target ({target.family}) has no {p.role!r}")
                   for p in source.params if p.role not in roles_t]
    spaces = _pair_spaces(source, target, block_map, pairs)
    return Matching(block_map, spaces, tuple(pairs), tuple(unmatched_t), tuple(unmatched_s))


def _pair_spaces(source: ModelLayout, target: ModelLayout, block_map, pairs) -> dict:
    needed = {k for pp in pairs for k in (pp.target.space_in, pp.target.space_out) if k}
    out = {}
    for key_t in sorted(needed, key=str):
        space_t = target.space(key_t)
        key_s = SpaceKey(_source_block(key_t.block, block_map), key_t.name)
        space_s = source.space(key_s)
        if space_t is None or space_s is None:
            continue
        points_s = {p.role: p for p in space_s.points}
        points = tuple((points_s[p.role], p) for p in space_t.points if p.role in points_s)
        if points:
            out[key_t] = SpacePairing(key_t, key_s, space_s.width, space_t.width, points)
    return out
