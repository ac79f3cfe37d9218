"""Move a LoRA adapter's factors (and its ``modules_to_save``) into a target model.

Every source LoRA module pairs with the target module(s) whose role it plays through the block
map; ``A' = A T_in`` and ``B' = alpha T_out^T B`` (row block by row block for fused projections)
with the maps of :func:`.update.compute_maps`, computed for the needed spaces only (a few blocks
at a time with ``block_group``). ``modules_to_save`` parameters go through the ordinary rules
(:func:`.update._transport_params`); a task head moves as a whole.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import rules
from .families.base import ModelLayout, ParamRole
from .head_hidden import HEAD_RULES, head_hidden_map, pass_through
from .lora import LoraFactors, LoraSource
from .matching import Matching, ParamPairing
from .options import TransportOptions
from .procrustes import ProcrustesMap
from .token_alignment import describe_pairings
from .transport_report import MapReport, ParamReport
from .update import (
    _display_name,
    _map_report,
    _transport_params,
    block_groups,
    compute_maps,
)

_KINDS = ("linear", "conv", "embedding")  # the rules a LoRA module may play
_SHOWN = 8


@dataclass(frozen=True)
class LoraModuleReport:
    """One target module's moved LoRA: rank, scale and ``||s B A||`` before and after (alpha
    included after)."""

    name: str
    source: str
    kind: str
    rank: int
    scaling: float
    norm_source: float
    norm_target: float
    space_out: str | None = None
    space_in: str | None = None
    residual_out: float | None = None
    residual_in: float | None = None


@dataclass(frozen=True)
class MovedAdapter:
    """The adapter moved into the target, nothing written yet.

    ``modules``: target module -> factors (``alpha`` already in ``B``, scaling as the source's);
    ``saved``: the target's ``modules_to_save`` parameters, full new values (alpha applied);
    ``deltas`` / ``values`` / ``log_scales``: the same as an update (alpha not applied) for
    writing into weights.
    """

    modules: Mapping[str, LoraFactors]
    saved: Mapping[str, Tensor]
    saved_modules: tuple[str, ...]
    deltas: Mapping[str, Tensor]
    values: Mapping[str, Tensor]
    log_scales: Mapping[str, Tensor]
    module_reports: tuple[LoraModuleReport, ...]
    param_reports: tuple[ParamReport, ...]
    maps: tuple[MapReport, ...]
    skipped: tuple[tuple[str, str], ...]
    token_pairing: str = "none"


def module_of(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def move_adapter(source: nn.Module, lora: LoraSource, target: nn.Module,
                 layout_s: ModelLayout, layout_t: ModelLayout, matching: Matching,
                 calibration, target_calibration, options: TransportOptions, alpha: float,
                 progress: bool = True, target_state: Mapping[str, Tensor] | None = None,
                 timings: dict[str, float] | None = None,
                 check: Callable[[list[str]], None] | None = None) -> MovedAdapter:
    """Move every LoRA module and ``modules_to_save`` parameter of ``lora`` into ``target``.

    ``target_state`` gives the target's tensors by the names of ``layout_t`` when they differ
    from ``target.state_dict()`` (a target already wrapped by PEFT); ``check(target modules)``
    runs before any statistics are gathered, to refuse early.
    """
    timings = {} if timings is None else timings
    state_t = dict(target_state) if target_state is not None else target.state_dict()
    method = options.method
    skipped: list[tuple[str, str]] = []
    problems: list[tuple[str, str]] = []
    lora = _heads_as_saved(lora, layout_s, source)
    lora_pairs, saved_pairs = _pairs(lora, layout_s, layout_t, matching, options, skipped,
                                     problems)
    if problems and options.strict:
        listed = "; ".join(f"{n}: {r}" for n, r in problems[:_SHOWN])
        raise ValueError(
            f"{len(problems)} part(s) of {lora.origin} cannot be moved into the target "
            f"({layout_t.family}): {listed}{' ...' if len(problems) > _SHOWN else ''}. Pass "
            "strict=False to leave them out (they are listed in the report), or choose a target "
            "of a compatible family.")
    skipped += problems
    if check is not None:
        check(sorted(lora_pairs))
    all_pairs = [pp for pairs in lora_pairs.values() for pp in pairs] + saved_pairs
    maps: dict[Any, ProcrustesMap] = {}
    pairings_used: dict[str, int] = {}
    passed: dict[str, Tensor] = {}  # a target head layer the source lacks: passes through
    needed = {k for pp in all_pairs for k in (pp.target.space_in, pp.target.space_out) if k}
    fixed = {k for k in needed if getattr(layout_t.space(k), "fixed", False)}
    through = {k for k in fixed if not any(pp.target.space_out == k for pp in saved_pairs)}
    needed |= {p.space_in for p in layout_t.params
               if p.space_out in through and p.rule == "head_linear" and p.space_in}
    keep = {k for pp in saved_pairs for k in (pp.target.space_in, pp.target.space_out)} | {
        p.space_in for p in layout_t.params if p.space_out in through}
    groups = (block_groups(needed - fixed, layout_t, options.block_group)
              if method != "slice" and all_pairs else [set()])
    pending = sorted(lora_pairs)
    modules, module_reports, map_reports = {}, [], []
    for i, group in enumerate(groups):  # block_group: statistics a few blocks at a time
        last = i == len(groups) - 1
        if group:
            group_maps, _ = compute_maps(source, target, layout_s, layout_t, matching, group,
                                         calibration, target_calibration, options, progress,
                                         timings, pairings_used=pairings_used,
                                         stop_early=not last)
            maps.update(group_maps)
        if last and method != "slice":
            finetuned = _saved_values(lora, saved_pairs, source)
            for key in sorted(fixed, key=str):
                if key in through:
                    maps[key], values_k, decisions = pass_through(key, layout_t, maps, state_t)
                    passed.update(values_k)
                    skipped += decisions
                else:
                    maps[key] = head_hidden_map(key, layout_t.space(key).width, saved_pairs,
                                                finetuned, maps, options.head_hidden)
        ready = [n for n in pending if last or all(
            k in maps for pp in lora_pairs[n] for k in (pp.target.space_in, pp.target.space_out)
            if k)]
        pending = [n for n in pending if n not in ready]
        for name_t in ready:
            pairs = lora_pairs[name_t]
            factors = lora.modules[module_of(pairs[0].source.name)]
            moved = _move_factors(name_t, factors, pairs, maps, method, state_t, alpha)
            modules[name_t] = moved
            role = pairs[0].target
            t_out, t_in = maps.get(role.space_out), maps.get(role.space_in)
            module_reports.append(LoraModuleReport(
                name_t, module_of(pairs[0].source.name), factors.kind, factors.rank,
                factors.scaling, factors.norm(), moved.norm(),
                str(role.space_out) if role.space_out else None,
                str(role.space_in) if role.space_in else None,
                t_out.residual if t_out else None, t_in.residual if t_in else None))
        if not last:  # maps no pending module needs are reported and freed
            wanted = keep | {k for n in pending for pp in lora_pairs[n]
                             for k in (pp.target.space_in, pp.target.space_out)}
            for key in [k for k in maps if k not in wanted]:
                map_reports.append(_report_map(key, matching, maps.pop(key)))
    deltas, values, scales, reports = {}, {}, {}, ()
    if saved_pairs:
        finetuned = _saved_values(lora, saved_pairs, source)
        pretrained = source.state_dict()
        tau = {k: v.double() - pretrained[k].detach().cpu().double() for k, v in finetuned.items()}
        deltas, values, scales, reports = _transport_params(
            saved_pairs, tau, finetuned, _StateView(state_t), maps, method, {})
    values = {**values, **passed}
    reports = (*reports, *(ParamReport(n, "head.dense", "head_pass_through", None, 0.0,
                                       float(v.norm())) for n, v in passed.items()))
    saved, saved_modules = _saved_state(deltas, values, scales, state_t, alpha)
    map_reports += [_report_map(k, matching, m) for k, m in maps.items()]
    return MovedAdapter(modules, saved, saved_modules, deltas, values, scales,
                        tuple(sorted(module_reports, key=lambda m: m.name)), tuple(reports),
                        tuple(sorted(map_reports, key=lambda m: m.target_space)), tuple(skipped),
                        describe_pairings(pairings_used))


def _report_map(key, matching: Matching, m: ProcrustesMap) -> MapReport:
    pairing = matching.spaces.get(key)
    return _map_report(key, pairing.source_space if pairing is not None else key, m)


def _heads_as_saved(lora: LoraSource, layout_s: ModelLayout, source: nn.Module) -> LoraSource:
    """LoRA on a task head layer becomes that layer's merged weight (one small module): the
    target's head is new, so it takes the whole trained head, as ``modules_to_save`` does."""
    heads = {p.name for p in layout_s.params if p.rule in HEAD_RULES}
    merged = [m for m in lora.modules if f"{m}.weight" in heads]
    if not merged:
        return lora
    pretrained = source.state_dict()
    saved = dict(lora.saved)
    for m in merged:
        weight = pretrained[f"{m}.weight"].detach().cpu()
        merged_weight = weight.double() + lora.modules[m].dense()
        saved.setdefault(f"{m}.weight", merged_weight.to(weight.dtype))
    modules = {m: f for m, f in lora.modules.items() if m not in merged}
    return dataclasses.replace(lora, modules=modules, saved=saved)


class _StateView:
    """What :func:`.update._transport_params` reads of a target: its state dict (here possibly by
    the names of the unwrapped model, for a target already wrapped by PEFT)."""

    def __init__(self, state: Mapping[str, Tensor]) -> None:
        self._state = state

    def state_dict(self) -> Mapping[str, Tensor]:
        return self._state


def _pairs(lora: LoraSource, layout_s: ModelLayout, layout_t: ModelLayout, matching: Matching,
           options: TransportOptions, skipped: list, problems: list
           ) -> tuple[dict[str, list[ParamPairing]], list[ParamPairing]]:
    """Target module -> its (target role, source role) pairs of LoRA weights, and the pairs of
    ``modules_to_save`` parameters; what cannot move goes to ``problems`` (refused when strict)
    or ``skipped`` (an explicit choice)."""
    roles_s: dict[str, list[ParamRole]] = defaultdict(list)
    for p in layout_s.params:
        roles_s[p.name].append(p)
    for name in lora.modules:
        found = roles_s.get(f"{name}.weight", [])
        if not found:
            problems.append((name, f"no rule of the source family ({layout_s.family}) describes "
                                   "this LoRA module"))
        for role in found:
            if role.rule not in _KINDS:
                raise ValueError(f"{lora.origin}: LoRA module {name!r} plays {role.role!r} (rule "
                                 f"{role.rule!r}), which has no LoRA rule.")
    missing = sorted(n for n in lora.saved if n not in roles_s)
    problems += [(n, f"no rule of the source family ({layout_s.family}) describes this "
                     "modules_to_save parameter") for n in missing]
    used_blocks = set(matching.block_map.values())
    by_target: dict[str, list[ParamPairing]] = defaultdict(list)
    saved_pairs: list[ParamPairing] = []
    seen: set[str] = set()
    head_saved = any(p.rule == "head" for n in lora.saved for p in roles_s.get(n, []))
    for pp in matching.params:
        name_s = module_of(pp.source.name)
        if pp.source.name.endswith(".weight") and name_s in lora.modules:
            seen.add(name_s)
            reason = _left_out(pp.target, options)
            if reason:
                skipped.append((_display_name(pp.target), reason))
            else:
                by_target[module_of(pp.target.name)].append(pp)
        elif pp.source.name in lora.saved or (head_saved and pp.target.rule in HEAD_RULES):
            seen.add(pp.source.name)
            if options.method != "head_only" or pp.target.rule in HEAD_RULES:
                saved_pairs.append(pp)
    for name in [*lora.modules, *lora.saved]:
        if name in seen or name in missing:
            continue
        blocks = {p.block for p in roles_s.get(f"{name}.weight", roles_s.get(name, []))}
        if blocks and blocks.isdisjoint(used_blocks) and None not in blocks:
            skipped.append((name, "no target block is paired with its source block (depth "
                                  "mapping): it is left out"))
        else:
            problems.append((name, f"the target ({layout_t.family}) has no matching role"))
    for name_t, pairs in by_target.items():
        sources = {module_of(pp.source.name) for pp in pairs}
        if len(sources) > 1:
            raise ValueError(f"target module {name_t!r} would combine the LoRA of several source "
                             f"modules {sorted(sources)}; warmstart moves one LoRA per module.")
    return by_target, saved_pairs


def _left_out(role: ParamRole, options: TransportOptions) -> str | None:
    if options.method == "head_only":
        return "no LoRA: method='head_only' moves only the task head"
    if role.rule == "embedding" and options.embeddings == "zero":
        return "no LoRA: embeddings='zero' (the method's default; embeddings='map' moves it)"
    return None


def _saved_values(lora: LoraSource, pairs: list[ParamPairing], source: nn.Module
                  ) -> dict[str, Tensor]:
    """The fine-tuned values the ``modules_to_save`` pairs read: the adapter's, and for the
    rest of a head that moves as a whole (a pooler the adapter left alone) the source's own."""
    pretrained = source.state_dict()
    out = {}
    for pp in pairs:
        name = pp.source.name
        out[name] = lora.saved[name] if name in lora.saved else pretrained[name].detach().cpu()
    return out


def _move_factors(name_t: str, f: LoraFactors, pairs: list[ParamPairing],
                  maps: Mapping[Any, ProcrustesMap], method: str, state_t: Mapping[str, Tensor],
                  alpha: float) -> LoraFactors:
    """``A' = A T_in`` (per tap for a convolution) and ``B' = alpha T_out^T B`` row block by row
    block (fused projections), in float64 on the maps' device, returned in the adapter's dtype."""
    role = pairs[0].target
    shape = tuple(state_t[role.name].shape)
    in_spaces = {pp.target.space_in for pp in pairs}
    if len(in_spaces) > 1:
        raise ValueError(f"{name_t}: its row blocks read different input spaces {in_spaces}.")
    ref = next(iter(maps.values())).map if maps else None
    device = ref.device if ref is not None else torch.device("cpu")
    a, b = f.a.to(device, torch.float64), f.b.to(device, torch.float64)
    if f.kind == "embedding":
        if shape[0] != a.shape[1]:
            raise ValueError(f"{name_t}: the source embedding LoRA covers {a.shape[1]} tokens, "
                             f"the target table has {shape[0]}; the vocabularies differ.")
        new_a = a
    elif method == "slice":
        new_a = rules.crop_pad(a, (f.rank, *shape[1:]))
    else:
        t_in = maps[role.space_in].map
        new_a = (a @ t_in if f.kind == "linear"
                 else torch.einsum("rikl,it->rtkl", a, t_in))
    out_dim = shape[1] if f.kind == "embedding" else shape[0]
    new_b = torch.zeros((out_dim, *b.shape[1:]), dtype=torch.float64, device=device)
    for pp in pairs:
        rows_t = pp.target.rows or (0, out_dim)
        rows_s = pp.source.rows or (0, b.shape[0])
        block = b[rows_s[0]:rows_s[1]]
        if method == "slice":
            moved = rules.crop_pad(block, (rows_t[1] - rows_t[0], *block.shape[1:]))
        else:
            t_out = maps[pp.target.space_out].map
            moved = torch.einsum("st,sr...->tr...", t_out, block)
        new_b[rows_t[0]:rows_t[1]] = moved
    dtype = f.a.dtype
    return LoraFactors(new_a.cpu().to(dtype), (alpha * new_b).cpu().to(dtype), f.scaling,
                       f.alpha, f.kind)


def _saved_state(deltas, values, scales, state_t: Mapping[str, Tensor], alpha: float
                 ) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """The full new state of every target module that ``modules_to_save`` covers (a parent
    module when all its parameters change, e.g. a two-layer head), alpha applied, in the
    target's dtypes."""
    new: dict[str, Tensor] = {}
    for name, delta in deltas.items():
        current = state_t[name]
        new[name] = (current.detach().double().cpu() + alpha * delta.cpu()).to(current.dtype)
    for name, value in values.items():
        new[name] = value.cpu().to(state_t[name].dtype)
    for name, scale in scales.items():
        current = state_t[name]
        new[name] = (current.detach().double().cpu() * torch.exp(alpha * scale.cpu())
                     ).to(current.dtype)
    modules = {module_of(n) for n in new}
    changed = set(new)
    while True:  # climb to a parent whose parameters all change
        grown = set()
        for m in modules:
            parent = module_of(m)
            if not parent:
                grown.add(m)
                continue
            owned = [n for n in state_t if n.startswith(parent + ".")]
            grown.add(parent if owned and all(n in changed for n in owned) else m)
        grown = {m for m in grown if not any(m.startswith(o + ".") for o in grown if o != m)}
        if grown == modules:
            break
        modules = grown
    state = {}
    for m in sorted(modules):
        for n, v in state_t.items():
            if n.startswith(m + "."):
                state[n] = new.get(n, v.detach().cpu().clone())
    for name, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"the moved value of {name} is not finite; check alpha and the "
                             "calibration data.")
    return state, tuple(sorted(modules))
