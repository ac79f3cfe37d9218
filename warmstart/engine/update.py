"""Compute the update of a transport (maps, then every parameter's rule) without writing it."""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from . import gains, rules
from .activations import SpacePairing, collect_statistics, model_device
from .checks import _warn_zero
from .families.base import ModelLayout, ParamRole, SpaceKey
from .gains import GainStatistics
from .head_hidden import HEAD_RULES, head_hidden_map, pass_through
from .heads import head_maps
from .matching import Matching
from .options import TransportOptions
from .procrustes import ProcrustesMap, procrustes_map
from .task_vector import as_state_dict, task_vector
from .token_alignment import describe_pairings
from .transport_report import MapReport, ParamReport


@dataclass(frozen=True)
class Update:
    """Computed, not yet applied: ``deltas`` are added (times alpha), ``values`` replace,
    ``log_scales`` multiply (``theta * exp(alpha * s)``, for variances)."""

    deltas: Mapping[str, Tensor]
    values: Mapping[str, Tensor]
    params: tuple[ParamReport, ...]
    maps: tuple[MapReport, ...]
    skipped: tuple[tuple[str, str], ...]
    log_scales: Mapping[str, Tensor] | None = None  # variances: theta * exp(alpha * log_scale)
    token_pairing: str = "none"  # how text token rows paired (token_alignment.describe_pairings)


def compute_update(source, finetuned, target, layout_s: ModelLayout, layout_t: ModelLayout,
                   matching: Matching, calibration, target_calibration,
                   options: TransportOptions, progress: bool = True
                   ) -> tuple[Update, dict[str, float]]:
    """Everything up to, not including, the write into the target.

    ``options.solver`` must already be resolved (``svd`` or ``eigh``, not ``auto``).
    """
    timings: dict[str, float] = {}
    opts, method = options, options.method
    # read only here, before anything is written: no copy (at LLM scale, a model's size)
    pretrained = as_state_dict(source, clone=source is target)
    head_names = {p.name for p in layout_s.params if p.rule in HEAD_RULES}
    tau = task_vector(pretrained, finetuned, ignore=head_names, lazy=True)
    _warn_zero(tau)
    skipped = _check_coverage(layout_s, layout_t, matching, tau, target, opts.embeddings,
                              opts.strict)
    pairs = []
    for pp in matching.params:
        reason = _left_out(pp.target, method, opts.depthwise, opts.embeddings)
        if reason is None:
            pairs.append(pp)
        else:
            skipped.append((_display_name(pp.target), reason))
    needed = {k for pp in pairs for k in (pp.target.space_in, pp.target.space_out) if k}
    fixed = {k for k in needed if (space := layout_t.space(k)) is not None and space.fixed}
    needed -= fixed
    gain_pairings, accumulators = ([], {})
    if method != "slice" and needed and opts.gains == "regression":
        gain_pairings, accumulators = _gain_pairings(pairs, tau, source, target, layout_s,
                                                     layout_t)
    gain_space_of = {gains.gain_space(pp.target): pp.target.space_out for pp in pairs
                     if pp.target.rule == "gain"}
    groups = block_groups(needed, layout_t, opts.block_group) if method != "slice" else [set()]
    if len(groups) > 1 and iter(calibration) is calibration:
        raise ValueError(f"block_group={opts.block_group} reads the calibration inputs once per "
                         f"group ({len(groups)} passes), but they are a one-shot iterator; pass "
                         "a list or a DataLoader.")
    maps: dict[SpaceKey, ProcrustesMap] = {}
    gain_stats: dict[SpaceKey, GainStatistics] = {}
    pairings_used: dict[str, int] = {}
    deltas, values, scales, reports, map_reports = {}, {}, {}, [], []
    pending, done = list(pairs), set()
    pass_through_notes: list[tuple[str, str]] = []
    for i, group in enumerate(groups):
        last = i == len(groups) - 1
        if group:
            extra = [gp for gp in gain_pairings if gain_space_of[gp.target_space] in group]
            group_maps, group_gains = compute_maps(
                source, target, layout_s, layout_t, matching, group, calibration,
                target_calibration, opts, progress, timings, extra=extra,
                accumulators={gp.target_space: accumulators.pop(gp.target_space)
                              for gp in extra},
                pairings_used=pairings_used, stop_early=not last)
            maps.update(group_maps)
            gain_stats.update(group_gains)
            done |= group
        if last and method != "slice":
            for key in sorted(fixed, key=str):
                if any(pp.target.space_out == key for pp in pairs):
                    maps[key] = head_hidden_map(key, layout_t.space(key).width, pairs,
                                                finetuned, maps, opts.head_hidden)
                else:  # the source's head has one layer: the target's first passes through
                    maps[key], passed, decisions = pass_through(key, layout_t, maps,
                                                                target.state_dict())
                    values.update(passed)
                    reports += [ParamReport(n, "head.dense", "head_pass_through", None, 0.0,
                                            float(passed[n].norm()), str(key)) for n in passed]
                    pass_through_notes.extend(decisions)
            done |= fixed
        ready = [pp for pp in pending if last or {pp.target.space_in, pp.target.space_out}
                 - {None} <= done]
        pending = [pp for pp in pending if pp not in ready]
        t0 = time.perf_counter()
        group_update = _transport_params(ready, tau, finetuned, target, maps, method, gain_stats)
        timings["rules"] = timings.get("rules", 0.0) + time.perf_counter() - t0
        if opts.block_group is not None:  # bounded memory: keep each delta in the target's dtype
            target_dtypes = {n: t.dtype for n, t in target.state_dict().items()}
            group_update[0].update({n: d.to(target_dtypes[n]) for n, d in
                                    group_update[0].items()})
        for store, part in zip((deltas, values, scales), group_update[:3]):
            store.update(part)
        reports += group_update[3]
        still_needed = {k for pp in pending for k in (pp.target.space_in, pp.target.space_out)}
        for key in [k for k in maps if k not in still_needed]:  # free maps no longer needed
            map_reports.append(_map_report(
                key, matching.spaces[key].source_space if key in matching.spaces else key,
                maps.pop(key)))
        gain_stats.clear()
    map_reports = tuple(sorted(map_reports, key=lambda m: m.target_space))
    reports = tuple(reports)
    _warn_rank(map_reports, opts.completion)
    return Update(deltas, values, reports, map_reports, tuple(skipped), scales,
                  describe_pairings(pairings_used)), timings


def compute_maps(source, target, layout_s: ModelLayout, layout_t: ModelLayout,
                 matching: Matching, needed, calibration, target_calibration,
                 options: TransportOptions, progress: bool = True,
                 timings: dict[str, float] | None = None, *, extra=(), accumulators=None,
                 pairings_used: dict[str, int] | None = None, stop_early: bool = False):
    """The maps of the target spaces ``needed`` from one pass over the calibration inputs.

    ``stop_early`` ends each forward pass once every observed layer has been seen (a pass over
    one group of early blocks need not run the rest of the model).

    ``extra`` pairings fold into ``accumulators`` in the same pass (e.g. gain regressions).
    Returns ``(maps, extra statistics)``. Shared with the LoRA transport (:mod:`.lora`), which
    needs the maps without a dense task vector.
    """
    timings = {} if timings is None else timings
    opts, accumulators = options, accumulators or {}
    missing = sorted(str(k) for k in needed if k not in matching.spaces)
    if missing:
        raise ValueError(f"no paired activations observe the target spaces {missing}; the "
                         "source and target adapters name no common points there.")
    if calibration is None:
        raise ValueError(f"method={opts.method!r} needs calibration inputs; pass calibration=... "
                         "(e.g. a DataLoader of unlabelled training inputs).")
    t0 = time.perf_counter()
    stats = collect_statistics(
        source, target, layout_s, layout_t,
        [matching.spaces[k] for k in sorted(needed, key=str)] + list(extra),
        calibration, target_calibration, with_grams=opts.whiten > 0,
        max_batches=opts.calibration_batches, progress=progress,
        token_pairing=opts.token_pairing, pairings_used=pairings_used,
        accumulators=accumulators, stop_early=stop_early, rows_per_batch=opts.rows_per_batch)
    timings["statistics"] = timings.get("statistics", 0.0) + time.perf_counter() - t0
    extra_stats = {key: stats.pop(key) for key in accumulators}
    t0 = time.perf_counter()
    maps = head_maps(stats, layout_s, layout_t, matching, opts)  # attention heads
    for key in list(stats):  # each space's statistics are freed once its map exists
        space = stats.pop(key)  # summed from n_rows paired rows: its rank is at most that
        maps[key] = procrustes_map(space, center=opts.center, whiten=opts.whiten,
                                   completion=opts.completion, rank_rtol=opts.rank_rtol,
                                   solver=opts.solver, rank_bound=space.n_rows)
    timings["maps"] = timings.get("maps", 0.0) + time.perf_counter() - t0
    return maps, extra_stats


def block_groups(needed: set[SpaceKey], layout: ModelLayout, block_group: int | None
                 ) -> list[set[SpaceKey]]:
    """The target spaces split into passes of ``block_group`` consecutive blocks (all stages in
    order); model-level spaces join the last pass. ``None``: one pass over everything."""
    if block_group is None:
        return [set(needed)]
    order = {b: i for i, b in enumerate(b for stage in layout.blocks for b in stage)}
    n_groups = max(1, -(-len(order) // block_group))
    groups: list[set[SpaceKey]] = [set() for _ in range(n_groups)]
    for key in needed:
        index = n_groups - 1 if key.block is None else order[key.block] // block_group
        groups[index].add(key)
    return [g for g in groups[:-1] if g] + [groups[-1]]


def _left_out(role: ParamRole, method: str, depthwise: str, embeddings: str) -> str | None:
    """Why a matched parameter keeps the target's value (a zero delta), or None to transport it."""
    if method == "head_only" and role.rule not in HEAD_RULES:
        return "zero delta: method='head_only' transports only the task head"
    if role.rule == "embedding" and embeddings == "zero":
        return "zero delta: embeddings='zero' (the method's default)"
    if role.rule == "depthwise" and depthwise == "zero":
        return "zero delta: depthwise='zero'"
    return None


def _display_name(role: ParamRole) -> str:
    return role.name if role.rows is None else f"{role.name}[{role.rows[0]}:{role.rows[1]}]"


def _check_coverage(layout_s, layout_t, matching, tau, target, embeddings, strict):
    """Every parameter must be matched or carry an explicit reason; returns the skipped list."""
    described_t = {p.name for p in layout_t.params} | set(layout_t.excluded)
    described_s = {p.name for p in layout_s.params} | set(layout_s.excluded)
    problems = [(n, "no family rule describes it (target)")
                for n, v in target.state_dict().items()
                if v.is_floating_point() and n not in described_t]
    problems += [(n, "no family rule describes it (source)") for n in tau if n not in described_s]
    zero_ok = {"embedding"} if embeddings == "zero" else set()
    # a two-layer target head against a one-layer source head: the target's first layer is
    # initialised to pass features through (head_hidden.pass_through), a documented decision
    one_layer_source = not any(p.rule == "head_linear" for p in layout_s.params)
    decided = {"head_linear", "head_vector"} if one_layer_source else set()
    problems += [(p.name, f"the source's task head has this hidden layer ({p.role}), the "
                  f"target's ({layout_t.family}) has one layer; no rule drops it")
                 for p in layout_s.params if p.rule in ("head_linear", "head_vector")
                 and not any(q.rule == "head_linear" for q in layout_t.params)]
    rules_t = {p.name: p.rule for p in layout_t.params}
    rules_s = {p.name: p.rule for p in layout_s.params}
    problems += [(n, r) for n, r in matching.unmatched_target
                 if rules_t.get(n) not in zero_ok | decided]
    listed_zero = [(n, f"zero delta: embeddings='zero' ({r})") for n, r in matching.unmatched_target
                   if rules_t.get(n) in zero_ok]
    problems += [(n, r) for n, r in matching.unmatched_source
                 if rules_s.get(n) not in zero_ok and n in tau]
    if problems and strict:
        listed = "; ".join(f"{n}: {r}" for n, r in problems[:10])
        raise ValueError(
            f"{len(problems)} parameter(s) cannot be matched between source "
            f"({layout_s.family}) and target ({layout_t.family}): "
            f"{listed}{' ...' if len(problems) > 10 else ''}. Pass "
            "strict=False to skip them (they keep a zero delta and are listed in the report), or "
            "choose models of compatible families."
        )
    skipped = list(problems) + listed_zero
    skipped += [(n, f"zero delta: {layout_t.excluded[n]}") for n in layout_t.excluded]
    return skipped


def _role_tensor(tensors: Mapping[str, Tensor], role: ParamRole) -> Tensor:
    value = tensors[role.name]
    if role.rows is not None:
        value = value[role.rows[0]:role.rows[1]]
    return value


def _gain_pairings(pairs, tau, source, target, layout_s, layout_t):
    """Pairings of the norm layers whose gains change, with their regression accumulators."""
    pairings, accumulators = [], {}
    device = model_device(target)
    for pp in pairs:
        role_t, role_s = pp.target, pp.source
        if role_t.rule != "gain" or role_s.name not in tau or role_t.space_out is None:
            continue
        key = gains.gain_space(role_t)
        scale_s, scale_t = gains.scale_of(source, role_s), gains.scale_of(target, role_t)
        point_s = gains.gain_point(role_s, layout_s.space(role_s.space_out))
        point_t = gains.gain_point(role_t, layout_t.space(role_t.space_out))
        pairings.append(SpacePairing(key, gains.gain_space(role_s), len(scale_s[0]),
                                     len(scale_t[0]), ((point_s, point_t),)))
        accumulators[key] = gains.GainStatistics(scale_s, scale_t, device)
    return pairings, accumulators


def _transport_params(pairs, tau, finetuned, target, maps, method, gain_stats):
    target_state = target.state_dict()
    deltas: dict[str, Tensor] = {}
    values: dict[str, Tensor] = {}
    scales: dict[str, Tensor] = {}
    reports = []
    for pp in pairs:
        role_t, role_s = pp.target, pp.source
        current = _role_tensor(target_state, role_t)
        if role_t.rule in HEAD_RULES:
            source_value = _role_tensor(finetuned, role_s).double()
        elif role_t.rule == "variance" and role_s.name in tau:
            source_value = _log_ratio(_role_tensor(finetuned, role_s), _role_tensor(tau, role_s))
        elif role_s.name in tau:
            source_value = _role_tensor(tau, role_s).double()
        else:
            continue
        t_out = maps.get(role_t.space_out) if role_t.space_out else None
        t_in = maps.get(role_t.space_in) if role_t.space_in else None
        device = t_out.map.device if t_out else (t_in.map.device if t_in else current.device)
        new = _apply_rule(role_t, source_value.to(device), current.shape, method,
                          gain_stats.get(gains.gain_space(role_t)),
                          t_out.map if t_out else None, t_in.map if t_in else None)
        if role_t.rule in ("head_linear", "head_vector"):
            new = _keep_unmapped_rows(new, current, t_out.map)
        store = (values if role_t.rule in HEAD_RULES
                 else scales if role_t.rule == "variance" else deltas)
        _place(store, role_t, new, target_state)
        reports.append(ParamReport(
            _display_name(role_t),
            role_t.role, role_t.rule if method != "slice" else "slice", role_s.name,
            float(source_value.norm()), float(new.norm()),
            str(role_t.space_out) if role_t.space_out else None,
            str(role_t.space_in) if role_t.space_in else None,
            t_out.residual if t_out else None, t_in.residual if t_in else None))
    return deltas, values, scales, tuple(reports)


def _log_ratio(finetuned: Tensor, tau: Tensor) -> Tensor:
    """Per-channel ``log(v_finetuned / v_pretrained)`` of a variance (0 where either is 0).

    Variances are moved as multiplicative changes: a mapped ratio keeps every target variance
    positive (an additive delta turns small or dead target channels negative) and leaves dead
    channels at 0.
    """
    after = finetuned.double()
    before = after - tau.double()
    ok = (before > 0) & (after > 0)
    return torch.where(ok, torch.log(after.clamp_min(1e-300) / before.clamp_min(1e-300)), 0.0)


def _apply_rule(role: ParamRole, value: Tensor, shape, method, gain_stats, t_out, t_in
                ) -> Tensor:
    if method == "slice" and role.rule not in ("head", "head_bias"):
        return rules.crop_pad(value, tuple(shape))
    if role.rule == "head_bias":
        new = value
    elif role.rule == "head_linear":
        new = rules.linear(value, t_out, t_in)
    elif role.rule == "head_vector":
        new = rules.vector(value, t_out)
    elif role.rule == "head":
        new = rules.crop_pad(value, tuple(shape)) if method == "slice" else rules.head(value, t_in)
    elif role.rule == "linear":
        new = rules.linear(value, t_out, t_in)
    elif role.rule == "vector":
        new = rules.vector(value, t_out)
    elif role.rule == "gain":
        new = gains.gain(value, t_out, gain_stats)
    elif role.rule == "variance":
        new = rules.variance(value, t_out)
    elif role.rule == "conv":
        if value.shape[2:] != tuple(shape[2:]):
            raise ValueError(f"{role.name}: kernel {tuple(value.shape[2:])} of the source cannot "
                             f"be transported into kernel {tuple(shape[2:])}.")
        new = rules.conv(value, t_out, t_in)
    elif role.rule == "depthwise":
        new = rules.depthwise(value, t_out)
    else:  # embedding with embeddings="map"
        new = rules.embedding(value, t_out)
    if tuple(new.shape) != tuple(shape):
        raise ValueError(f"{role.name}: the {role.rule} rule produced shape {tuple(new.shape)} but "
                         f"the target parameter has shape {tuple(shape)}; for the head, source "
                         "and target must predict the same classes.")
    return new


def _place(store: dict[str, Tensor], role: ParamRole, new: Tensor, target_state) -> None:
    if role.rows is None:
        store[role.name] = new
        return
    if role.name not in store:
        store[role.name] = torch.zeros(target_state[role.name].shape, dtype=new.dtype,
                                       device=new.device)
    store[role.name][role.rows[0]:role.rows[1]] = new


def _keep_unmapped_rows(new: Tensor, current: Tensor, t_out: Tensor) -> Tensor:
    """Target units no source unit maps to keep the target's own rows (its initialisation)."""
    unmapped = t_out.abs().sum(0) == 0
    if not unmapped.any():
        return new
    return torch.where(unmapped.view(-1, *([1] * (new.ndim - 1))),
                       current.to(new.device, new.dtype), new)


def _map_report(key: SpaceKey, source_key: SpaceKey, m: ProcrustesMap) -> MapReport:
    d_s, d_t = m.map.shape
    return MapReport(str(key), str(source_key), d_s, d_t, m.n_rows, m.rank, m.residual,
                     m.alignment, m.completed)


def _warn_rank(maps: tuple[MapReport, ...], completion: str) -> None:
    deficient = [m for m in maps if not m.determined]
    if deficient:
        worst = ", ".join(f"{m.target_space} rank {m.rank}/{min(m.d_source, m.d_target)} "
                          f"from {m.n_rows} rows" for m in deficient[:3])
        fix = ("completion='crop' for a deterministic completion" if completion == "none" else
               "a smaller rank_rtol (the crop map itself reaches these directions only below "
               "rank_rtol, so the completion left them out too)")
        warnings.warn(
            f"{len(deficient)} of {len(maps)} maps are rank-deficient ({worst}); their "
            f"undetermined directions get no delta. Use more calibration data, or {fix}.",
            stacklevel=3)

