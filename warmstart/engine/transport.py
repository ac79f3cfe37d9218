"""Move a task vector from a source model into a target model: the one public entry point.

Everything is computed before anything is written; the write itself restores the old values if it
fails, so after any error the target is bit-for-bit what it was.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import rules
from .activations import collect_statistics, model_device
from .families import describe_model
from .families.base import ModelLayout, ParamRole, SpaceKey
from .matching import DepthMapping, Matching, check_depth_mapping, match
from .norms import batchnorm_layers, recalibrate_batchnorm
from .procrustes import (
    Completion,
    ProcrustesMap,
    Solver,
    check_solver,
    procrustes_map,
    resolve_solver,
)
from .task_vector import as_state_dict, task_vector
from .transport_report import MapReport, ParamReport, TransportReport

Method = Literal["theseus", "slice", "head_only"]
METHODS = ("theseus", "slice", "head_only")
DEFAULT_ALPHA_GRID = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


@dataclass(frozen=True)
class MapOptions:
    center: bool = False
    whiten: float = 0.0
    completion: Completion = "crop"
    rank_rtol: float = 1e-6
    solver: Solver = "auto"


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


_NEGATIVE_ALPHA = ("{}: the task head is replaced by the finetuned head whatever alpha is, so a "
                   "negative alpha would move the body away from the task its head predicts; use "
                   "alpha=0 to transport the head alone.")


def check_alpha_grid(grid: Iterable[float]) -> list[float]:
    """The grid for ``alpha="auto"`` as floats: non-empty, finite, >= 0."""
    try:
        values = [float(a) for a in grid]
    except (TypeError, ValueError) as err:
        raise ValueError(f"alpha_grid must be a non-empty list of finite numbers, got {grid!r}."
                         ) from err
    if not values or not all(math.isfinite(a) for a in values):
        raise ValueError(f"alpha_grid must be a non-empty list of finite numbers, got {values!r}.")
    if min(values) < 0:
        raise ValueError(_NEGATIVE_ALPHA.format(f"alpha_grid values must be >= 0, got {values!r}"))
    return values


def check_models(source_pretrained: Any, target: Any) -> None:
    """Both models must be modules that hold data (not on the meta device)."""
    for arg, model, fix in (
        ("source_pretrained", source_pretrained, "build the source model and load its pretrained "
         "weights; a checkpoint path is accepted for source_finetuned only"),
        ("target", target, "pass the model itself (it is updated in place), not its state dict "
         "or a path"),
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{arg} must be an nn.Module, got "
                            f"{type(model).__name__} {_short(model)}; {fix}.")
        on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
        if on_meta:
            raise ValueError(
                f"{arg} has {len(on_meta)} tensor(s) on the meta device, which hold no data "
                f"(e.g. {on_meta[0]!r}); materialize the model before transporting (e.g. "
                "model.to_empty(device='cpu') and load its weights, or build it without "
                "device='meta').")


def check_calibration(arg: str, calibration: Any) -> None:
    """An iterable of batches; a lone batch (a tensor or a mapping) is the usual slip."""
    if calibration is None:
        return
    if isinstance(calibration, (Tensor, Mapping)):
        what = (f"one Tensor of shape {tuple(calibration.shape)}"
                if isinstance(calibration, Tensor) else "one mapping (a single batch)")
        raise TypeError(f"{arg} must be an iterable of batches, got {what}; wrap a single batch "
                        f"in a list ([batch]) or pass a DataLoader.")
    if not isinstance(calibration, Iterable):
        raise TypeError(f"{arg} must be an iterable of batches (a list of model inputs or a "
                        f"DataLoader), got {type(calibration).__name__} {_short(calibration)}.")


def _short(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"with {len(value)} entries"
    text = repr(value)
    if isinstance(value, (str, os.PathLike)):
        return text  # a path is worth reading in full
    return text if len(text) <= 60 else text[:57] + "..."


def check_options(method: str, alpha: Any, whiten: float, depthwise: str, embeddings: str,
                  solver: str = "auto") -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if alpha != "auto" and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                            or not math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number or 'auto', got {alpha!r}.")
    if alpha != "auto" and alpha < 0:
        raise ValueError(_NEGATIVE_ALPHA.format(f"alpha must be >= 0, got {alpha!r}"))
    if not isinstance(whiten, (int, float)) or not 0.0 <= whiten <= 0.5:
        raise ValueError(f"whiten must be a power in [0, 0.5], got {whiten!r}.")
    if depthwise not in ("diagonal", "zero"):
        raise ValueError(f"depthwise must be 'diagonal' or 'zero', got {depthwise!r}.")
    if embeddings not in ("zero", "map"):
        raise ValueError(f"embeddings must be 'zero' or 'map', got {embeddings!r}.")
    check_solver(solver)


def transport(
    source_pretrained: nn.Module,
    source_finetuned: nn.Module | Mapping[str, Tensor] | str,
    target: nn.Module,
    calibration: Iterable[Any] | None = None,
    *,
    target_calibration: Iterable[Any] | None = None,
    method: Method = "theseus",
    alpha: float | Literal["auto"] = 1.0,
    alpha_grid: Iterable[float] = DEFAULT_ALPHA_GRID,
    evaluate: Callable[[nn.Module], float] | None = None,
    center: bool = False,
    whiten: float = 0.0,
    completion: Completion = "crop",
    solver: Solver = "auto",
    depthwise: Literal["diagonal", "zero"] = "diagonal",
    embeddings: Literal["zero", "map"] = "zero",
    depth_mapping: DepthMapping = None,
    bn_recalibration: int = 0,
    strict: bool = True,
    max_batches: int | None = None,
    source_family: str | None = None,
    target_family: str | None = None,
    progress: bool = True,
) -> TransportReport:
    """Add ``alpha * tau_B`` to ``target`` in place and return the transport report.

    Args:
        source_pretrained: the source base model (its activations are observed).
        source_finetuned: the finetuned source: a module, a state dict or a checkpoint path.
        target: the target base model, updated in place (its task head is replaced).
        calibration: model inputs (tensors, or mappings of keyword tensors), e.g. unlabelled
            training batches; not needed for ``method="slice"``.
        target_calibration: the target's own inputs for the same examples, when its
            preprocessing differs (another tokenizer).
        method: ``theseus`` (Procrustes maps), ``slice`` (crop/pad baseline) or ``head_only``.
        alpha: strength, or ``"auto"`` to take the best of ``alpha_grid`` by ``evaluate(target)``
            (a validation loss, lower is better; forward passes only).
        center, whiten, completion: map options, see :func:`warmstart.engine.procrustes.procrustes_map`.
            ``completion="crop"`` (the default here) fills directions no calibration row
            determines with the crop map restricted to them, so identical models still get
            exactly tau on real, rank-deficient activations (EfficientNet-Lite0 onto itself:
            0.953 val accuracy with "crop" against 0.195 with "none"); "none" leaves them out.
        solver: how the maps' polar factors are computed: ``svd`` (exact), ``eigh`` (a Gram
            eigendecomposition polished by Newton-Schulz steps, within 2e-6 of the SVD and about
            15 times faster on a GPU for large maps) or ``auto`` (``eigh`` where the statistics
            sit on a CUDA device, ``svd`` otherwise).
        depthwise: ``diagonal`` transports depthwise convs by the diagonal rule, ``zero`` leaves
            them at the target's weights.
        embeddings: ``zero`` (the method's default) or ``map`` (feature dimension mapped).
        depth_mapping: explicit source block per target block (see ``matching.map_blocks``).
        bn_recalibration: after the update, re-estimate the target's BatchNorm running statistics
            from this many calibration batches (forward passes only; 0 = off). Also used inside
            each ``alpha="auto"`` trial.
        strict: error on parameters that cannot be matched; when False they are skipped and listed.
    """
    check_options(method, alpha, whiten, depthwise, embeddings, solver)
    if isinstance(bn_recalibration, bool) or not isinstance(bn_recalibration, int) \
            or bn_recalibration < 0:
        raise ValueError(f"bn_recalibration must be a number of batches >= 0, got "
                         f"{bn_recalibration!r}.")
    if alpha == "auto" and evaluate is None:
        raise ValueError("alpha='auto' needs evaluate=<callable(model) -> validation loss>.")
    if alpha == "auto":
        alpha_grid = check_alpha_grid(alpha_grid)
    if max_batches is not None and (isinstance(max_batches, bool)
                                    or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be None (all batches) or a number of batches >= 1, "
                         f"got {max_batches!r}.")
    check_depth_mapping(depth_mapping)
    check_calibration("calibration", calibration)
    check_calibration("target_calibration", target_calibration)
    check_models(source_pretrained, target)
    started = time.perf_counter()
    finetuned = _checked_finetuned(as_state_dict(source_finetuned))
    layout_s = describe_model(source_pretrained, source_family)
    layout_t = describe_model(target, target_family)
    matching = match(layout_s, layout_t, depth_mapping)
    # the statistics, hence the maps, live on the target's device
    solver = resolve_solver(solver, model_device(target))
    opts = MapOptions(center, float(whiten), completion, solver=solver)
    update, timings = compute_update(
        source_pretrained, finetuned, target, layout_s, layout_t, matching, calibration,
        target_calibration, method, opts, depthwise, embeddings, strict, max_batches, progress,
    )
    finish = _recalibration(target, layout_t, calibration, target_calibration, bn_recalibration)
    scores: tuple[tuple[float, float], ...] = ()
    if alpha == "auto":
        alpha, scores = select_alpha(target, update, evaluate, alpha_grid, finish)
    t0 = time.perf_counter()
    with _restored_on_error(target, update):
        apply_update(target, update, float(alpha))
        finish()
    timings["apply"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    options = dict(method=method, center=center, whiten=whiten, completion=completion,
                   solver=solver, depthwise=depthwise, embeddings=embeddings, strict=strict,
                   bn_recalibration=bn_recalibration,
                   max_batches=max_batches)
    return TransportReport(
        method, float(alpha), layout_s.family, layout_t.family,
        tuple((str(t), str(s)) for t, s in matching.block_map.items()),
        update.params, update.maps, update.skipped, timings, options, scores,
    )


def _checked_finetuned(finetuned: dict[str, Tensor]) -> dict[str, Tensor]:
    """The finetuned weights must hold data and be finite (a diverged run gives NaN weights)."""
    on_meta = sorted(k for k, v in finetuned.items() if v.is_meta)
    if on_meta:
        raise ValueError(f"source_finetuned has {len(on_meta)} tensor(s) on the meta device, which "
                         f"hold no data (e.g. {on_meta[0]!r}); pass real weights.")
    bad = sorted(k for k, v in finetuned.items()
                 if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(
            f"source_finetuned holds NaN or Inf in {len(bad)} tensor(s) ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}); the fine-tuning diverged or the checkpoint is "
            "damaged: use an earlier checkpoint of the run.")
    return finetuned


def _warn_zero(tau: Mapping[str, Tensor]) -> None:
    if tau and all(not bool(v.any()) for v in tau.values()):
        warnings.warn(
            f"the task vector is zero: source_finetuned equals source_pretrained on all "
            f"{len(tau)} shared tensors, so only the task head is transported; check that "
            "source_finetuned is the fine-tuned checkpoint, not the base model.", stacklevel=4)


def compute_update(source, finetuned, target, layout_s: ModelLayout, layout_t: ModelLayout,
                   matching: Matching, calibration, target_calibration, method: str,
                   opts: MapOptions, depthwise: str, embeddings: str, strict: bool,
                   max_batches, progress) -> tuple[Update, dict[str, float]]:
    """Everything up to, not including, the write into the target."""
    timings: dict[str, float] = {}
    pretrained = as_state_dict(source)
    head_names = {p.name for p in layout_s.params if p.rule in ("head", "head_bias")}
    tau = task_vector(pretrained, finetuned, ignore=head_names)
    _warn_zero(tau)
    skipped = _check_coverage(layout_s, layout_t, matching, tau, target, embeddings, strict)
    pairs = []
    for pp in matching.params:
        reason = _left_out(pp.target, method, depthwise, embeddings)
        if reason is None:
            pairs.append(pp)
        else:
            skipped.append((_display_name(pp.target), reason))
    needed = {k for pp in pairs for k in (pp.target.space_in, pp.target.space_out) if k}
    maps: dict[SpaceKey, ProcrustesMap] = {}
    if method != "slice" and needed:
        missing = sorted(str(k) for k in needed if k not in matching.spaces)
        if missing:
            raise ValueError(f"no paired activations observe the target spaces {missing}; the "
                             "source and target adapters name no common points there.")
        if calibration is None:
            raise ValueError(f"method={method!r} needs calibration inputs; pass calibration=... "
                             "(e.g. a DataLoader of unlabelled training inputs).")
        t0 = time.perf_counter()
        stats = collect_statistics(
            source, target, layout_s, layout_t,
            [matching.spaces[k] for k in sorted(needed, key=str)],
            calibration, target_calibration, with_grams=opts.whiten > 0,
            max_batches=max_batches, progress=progress)
        timings["statistics"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        maps = {}
        for key in list(stats):  # each space's statistics are freed once its map exists
            maps[key] = procrustes_map(stats.pop(key), center=opts.center, whiten=opts.whiten,
                                       completion=opts.completion, rank_rtol=opts.rank_rtol,
                                       solver=opts.solver)
        timings["maps"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    deltas, values, scales, reports = _transport_params(pairs, tau, finetuned, target, maps,
                                                        method)
    timings["rules"] = time.perf_counter() - t0
    map_reports = tuple(_map_report(k, matching.spaces[k].source_space, m)
                        for k, m in sorted(maps.items(), key=lambda kv: str(kv[0])))
    _warn_rank(map_reports)
    return Update(deltas, values, reports, map_reports, tuple(skipped), scales), timings


def _left_out(role: ParamRole, method: str, depthwise: str, embeddings: str) -> str | None:
    """Why a matched parameter keeps the target's value (a zero delta), or None to transport it."""
    if method == "head_only" and role.rule not in ("head", "head_bias"):
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
    rules_t = {p.name: p.rule for p in layout_t.params}
    rules_s = {p.name: p.rule for p in layout_s.params}
    problems += [(n, r) for n, r in matching.unmatched_target if rules_t.get(n) not in zero_ok]
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


def _transport_params(pairs, tau, finetuned, target, maps, method):
    target_state = target.state_dict()
    deltas: dict[str, Tensor] = {}
    values: dict[str, Tensor] = {}
    scales: dict[str, Tensor] = {}
    reports = []
    for pp in pairs:
        role_t, role_s = pp.target, pp.source
        current = _role_tensor(target_state, role_t)
        if role_t.rule in ("head", "head_bias"):
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
                          t_out.map if t_out else None, t_in.map if t_in else None)
        store = (values if role_t.rule in ("head", "head_bias")
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


def _apply_rule(role: ParamRole, value: Tensor, shape, method, t_out, t_in) -> Tensor:
    if method == "slice" and role.rule not in ("head", "head_bias"):
        return rules.crop_pad(value, tuple(shape))
    if role.rule == "head_bias":
        new = value
    elif role.rule == "head":
        new = rules.crop_pad(value, tuple(shape)) if method == "slice" else rules.head(value, t_in)
    elif role.rule == "linear":
        new = rules.linear(value, t_out, t_in)
    elif role.rule == "vector":
        new = rules.vector(value, t_out)
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


def _map_report(key: SpaceKey, source_key: SpaceKey, m: ProcrustesMap) -> MapReport:
    d_s, d_t = m.map.shape
    return MapReport(str(key), str(source_key), d_s, d_t, m.n_rows, m.rank, m.residual,
                     m.alignment, m.completed)


def _warn_rank(maps: tuple[MapReport, ...]) -> None:
    deficient = [m for m in maps if not m.determined]
    if deficient:
        worst = ", ".join(f"{m.target_space} rank {m.rank}/{min(m.d_source, m.d_target)} "
                          f"from {m.n_rows} rows" for m in deficient[:3])
        warnings.warn(
            f"{len(deficient)} of {len(maps)} maps are rank-deficient ({worst}); their "
            "undetermined directions get no delta. Use more calibration data, or "
            "completion='crop' for a deterministic completion.", stacklevel=3)


def target_tensors(target: nn.Module) -> dict[str, Tensor]:
    """Parameters and floating buffers of ``target`` by state-dict name (the live tensors)."""
    out = dict(target.named_parameters())
    out.update({n: b for n, b in target.named_buffers() if b.is_floating_point()})
    return out


def apply_update(target: nn.Module, update: Update, alpha: float) -> None:
    """Write ``theta + alpha * delta`` (computed in float64, cast once), the replaced values and
    the scaled variances ``theta * exp(alpha * log_scale)``.

    All new values are computed and checked first; the copy restores the old values if it fails.
    """
    live = target_tensors(target)
    new_values: dict[str, Tensor] = {}
    items = [*((n, d, "delta") for n, d in update.deltas.items()),
             *((n, v, "value") for n, v in update.values.items()),
             *((n, s, "scale") for n, s in (update.log_scales or {}).items())]
    for name, tensor, kind in items:
        current = live[name]
        value = tensor.to(current.device)
        if kind == "delta":
            value = current.detach().double() + alpha * value
        elif kind == "scale":
            value = current.detach().double() * torch.exp(alpha * value)
        value = value.to(dtype=current.dtype)  # checked after the cast: fp16 overflows at 65504
        if not torch.isfinite(value).all():
            raise ValueError(f"the transported value of {name} is not finite in "
                             f"{current.dtype}; nothing was written. Check alpha and the "
                             "calibration data.")
        new_values[name] = value
    backup = {name: live[name].detach().clone() for name in new_values}
    try:
        with torch.no_grad():
            for name, value in new_values.items():
                live[name].copy_(value)
    except BaseException:
        _restore(target, backup)
        raise


def _recalibration(target, layout, calibration, target_calibration, n_batches: int):
    """What to run after each write: BatchNorm recalibration on ``n_batches``, or nothing."""
    if n_batches == 0 or not batchnorm_layers(target):
        return lambda: None
    source = target_calibration if target_calibration is not None else calibration
    if source is None:
        raise ValueError("bn_recalibration needs calibration inputs; pass calibration=...")
    batches = list(islice(source, n_batches))  # re-iterable for every alpha trial
    return lambda: recalibrate_batchnorm(target, layout, batches)


def _touched(target: nn.Module, update: Update) -> dict[str, Tensor]:
    """Backups of everything a write (and a BatchNorm recalibration) may change."""
    live = target_tensors(target)
    names = {*update.deltas, *update.values, *(update.log_scales or {})}
    names |= {n for n, b in target.named_buffers() if n.endswith(("running_mean", "running_var"))}
    return {n: live[n].detach().clone() for n in names if n in live}


@contextmanager
def _restored_on_error(target: nn.Module, update: Update):
    backup = _touched(target, update)
    try:
        yield
    except BaseException:
        _restore(target, backup)
        raise


def _restore(target: nn.Module, backup: Mapping[str, Tensor]) -> None:
    live = target_tensors(target)
    with torch.no_grad():
        for name, value in backup.items():
            live[name].copy_(value)


def select_alpha(target: nn.Module, update: Update, evaluate, grid,
                 finish=lambda: None) -> tuple[float, tuple]:
    """Best alpha of ``grid`` by ``evaluate(target)`` (lower is better); target restored after.

    ``finish`` runs after each trial write (e.g. BatchNorm recalibration).
    """
    grid = check_alpha_grid(grid)
    backup = _touched(target, update)
    scores = []
    try:
        for a in grid:
            apply_update(target, update, a)
            finish()
            scores.append((a, float(evaluate(target))))
            _restore(target, backup)
    finally:
        _restore(target, backup)
    finite = [s for s in scores if math.isfinite(s[1])]
    if not finite:
        raise ValueError(f"every alpha in {grid} gave a non-finite validation loss.")
    return min(finite, key=lambda s: s[1])[0], tuple(scores)
