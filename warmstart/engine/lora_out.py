"""Where a moved LoRA adapter goes: a PEFT adapter folder for the target
(:func:`transport_adapter`), the target's own weights (:func:`transport_lora`, what
:func:`~warmstart.transport` does with an adapter as the source), or the adapter of a target that
PEFT already wraps (:func:`transport_into_peft`, the warm start of a LoRA fine-tuning).

All three compute everything before they write anything: a failure leaves ``out_dir`` and the
target as they were.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .activations import model_device
from .alpha import select_alpha
from .apply import _recalibration, _restored_on_error, apply_update
from .checks import check_calibration, check_models
from .families import describe_model
from .head_fit import HeadRefit, head_fit_step, output_layer
from .lora import LoraSource, active_adapter, is_adapter, read_adapter
from .lora_move import LoraModuleReport, MovedAdapter, move_adapter
from .matching import match
from .options import TransportOptions, check_alpha_grid
from .procrustes import resolve_solver
from .transport_report import ParamReport, TransportReport
from .update import Update, _warn_rank

REPORT_NAME = "warmstart_report.json"


@dataclass(frozen=True)
class AdapterReport(TransportReport):
    """A transport report whose task vector was a LoRA adapter: ``modules`` lists every moved
    LoRA module with its rank and norms; ``out_dir`` is the written adapter (if any) and
    ``adapter`` the main fields of its config."""

    modules: tuple[LoraModuleReport, ...] = field(default_factory=tuple)
    out_dir: str | None = None
    adapter: Mapping[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        out = super().summary()
        out["lora_modules"] = float(len(self.modules))
        return out


@dataclass(frozen=True)
class _Plan:
    """The shared first half: the adapter read, both models described and paired."""

    lora: LoraSource
    options: TransportOptions
    layout_s: Any
    layout_t: Any
    matching: Any


def _plan(source: nn.Module, adapter: Any, target_view: nn.Module, options: TransportOptions,
          adapter_name: str | None, device: torch.device) -> _Plan:
    lora = read_adapter(adapter, source, adapter_name)
    layout_s = describe_model(source, options.source_family)
    layout_t = describe_model(target_view, options.target_family)
    matching = match(layout_s, layout_t, options.depth_mapping)
    options = options.replace(solver=resolve_solver(options.solver, device))
    return _Plan(lora, options, layout_s, layout_t, matching)


def _report(plan: _Plan, moved: MovedAdapter, alpha: float, timings: Mapping[str, float],
            extra_params: Iterable[ParamReport] = (), scores=(), out_dir: str | None = None,
            adapter: Mapping[str, Any] | None = None) -> AdapterReport:
    maps = moved.maps
    _warn_rank(maps, plan.options.completion)
    return AdapterReport(
        method=plan.options.method, alpha=float(alpha), source_family=plan.layout_s.family,
        target_family=plan.layout_t.family,
        block_map=tuple((str(t), str(s)) for t, s in plan.matching.block_map.items()),
        params=(*moved.param_reports, *extra_params), maps=maps, skipped=moved.skipped,
        timings=dict(timings), options={**plan.options.to_dict(), "adapter": plan.lora.origin},
        alpha_scores=tuple(scores), token_pairing=moved.token_pairing,
        modules=moved.module_reports, out_dir=out_dir, adapter=dict(adapter or {}))


def _head_refit(plan: _Plan, source: nn.Module, target: nn.Module, calibration, target_calibration,
                target_head: nn.Linear | None = None) -> HeadRefit:
    """``head_fit`` against the source with its adapter merged (``functional_call``; the source
    module is not changed); a no-op refit when ``head_fit=0``."""
    if not plan.options.head_fit:
        return HeadRefit()
    return head_fit_step(source, plan.lora.finetuned_tensors(source), target, plan.layout_s,
                         plan.layout_t, calibration, target_calibration, plan.options.head_fit,
                         plan.options.head_fit_ridge, target_head, plan.options.head_fit_mode)


def _fixed_alpha(options: TransportOptions, what: str) -> float:
    if options.alpha == "auto":
        raise ValueError(f"alpha='auto' needs a validation score, which {what} does not have; "
                         "pass a number (e.g. alpha=1.0), or warm-start a PEFT-wrapped target "
                         "with TaskVectorTransport, which scores alpha with the module's "
                         "validation.")
    return float(options.alpha)


# ---------------------------------------------------------------------------------------------
# 1. A PEFT adapter folder for the target


def transport_adapter(
    source_pretrained: nn.Module,
    adapter: Any,
    target: nn.Module,
    calibration: Iterable[Any] | None = None,
    out_dir: str | Path | None = None,
    *,
    target_calibration: Iterable[Any] | None = None,
    options: TransportOptions | None = None,
    overwrite: bool = False,
    adapter_name: str | None = None,
    base_model_name_or_path: str | None = None,
    progress: bool = True,
    **option_values: Any,
) -> AdapterReport:
    """Move a LoRA adapter of ``source_pretrained`` into a LoRA adapter of ``target``, written to
    ``out_dir`` as a PEFT adapter folder (``PeftModel.from_pretrained(target, out_dir)`` loads it).

    Every LoRA module becomes the target module(s) its role pairs with, of the same rank:
    ``B' = alpha T_out^T B`` and ``A' = A T_in`` (the scale ``lora_alpha / r`` is kept, so alpha
    goes into ``B'``). ``modules_to_save`` move by the ordinary rules (a task head: the whole
    trained head, on its input side). Neither the target nor ``out_dir`` is touched on failure.

    Example::

        report = transport_adapter(minilm, "runs/minilm_lora", mpnet, calibration,
                                   "runs/mpnet_lora")
        model = PeftModel.from_pretrained(mpnet, "runs/mpnet_lora")

    Args:
        source_pretrained: the base model the adapter was trained on.
        adapter: a PEFT adapter folder, or a ``PeftModel`` (its active adapter, or
            ``adapter_name``).
        target: the target base model (read only).
        calibration: model inputs for the statistics (as for :func:`~warmstart.transport`).
        out_dir: the folder to write (created; must be empty or absent unless ``overwrite``).
        target_calibration: the target's own inputs, when its preprocessing differs.
        options: :class:`~warmstart.TransportOptions` (``method`` theseus or slice; ``alpha`` a
            number); ``option_values`` replace single fields.
        base_model_name_or_path: written into the adapter config (default: the target's
            ``name_or_path`` when it has one).
    """
    options = (options or TransportOptions()).replace(**option_values)
    alpha = _fixed_alpha(options, "transport_adapter")
    if options.head_fit:
        raise ValueError("head_fit refits the target's head on its features after the write, but "
                         "transport_adapter only reads the target; set head_fit=0, or warm-start "
                         "a PEFT-wrapped target (TaskVectorTransport, transport_into_peft) or "
                         "the target's own weights (transport), which can refit it.")
    if out_dir is None:
        raise ValueError("transport_adapter needs out_dir, the folder to write the adapter to.")
    out = _check_out_dir(out_dir, overwrite)
    check_calibration("calibration", calibration)
    check_calibration("target_calibration", target_calibration)
    check_models(source_pretrained, target)
    if is_adapter(target):
        raise TypeError("target must be the target's base model, not a PEFT model; pass "
                        "peft_model.get_base_model() after unloading, or the base model itself.")
    started = time.perf_counter()
    plan = _plan(source_pretrained, adapter, target, options, adapter_name, model_device(target))
    timings: dict[str, float] = {}
    moved = move_adapter(source_pretrained, plan.lora, target, plan.layout_s, plan.layout_t,
                         plan.matching, calibration, target_calibration, plan.options, alpha,
                         progress, timings=timings)
    if not moved.modules:
        raise ValueError(f"no LoRA module of {plan.lora.origin} moves into the target (see the "
                         "skipped parts: method, embeddings, depth mapping); nothing was written.")
    base = base_model_name_or_path or getattr(target, "name_or_path", None) or None
    config = _target_config(plan.lora.config, moved, base)
    timings["total"] = time.perf_counter() - started
    summary = {"r": config.r, "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora,
               "target_modules": sorted(config.target_modules),
               "modules_to_save": list(config.modules_to_save or []),
               "rank_pattern": dict(config.rank_pattern), "base_model_name_or_path": base}
    report = _report(plan, moved, alpha, timings, out_dir=str(out), adapter=summary)
    _write_adapter(out, config, _adapter_state(moved), report, overwrite)
    return report


def adapter_writer(out_dir: str | Path, overwrite: bool = False) -> Callable[..., AdapterReport]:
    """:func:`transport_adapter` into ``out_dir``, called like :func:`~warmstart.transport` (what
    ``warmstart transport --adapter_out`` runs in place of the transport)."""
    def write(source_pretrained, source_finetuned, target, calibration=None, *,
              target_calibration=None, evaluate=None, options=None, progress=True):
        return transport_adapter(source_pretrained, source_finetuned, target, calibration,
                                 out_dir, target_calibration=target_calibration,
                                 options=options, overwrite=overwrite, progress=progress)
    return write


def _check_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir {out} is a file; give a folder for the adapter.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"out_dir {out} is not empty; pass overwrite=True or choose another "
                              "folder.")
    return out


def _target_config(config: Any, moved: MovedAdapter, base: str | None) -> Any:
    """The source's ``LoraConfig`` with the target's module names; per-module ranks and alphas
    that differ from ``r`` / ``lora_alpha`` go into ``rank_pattern`` / ``alpha_pattern`` under
    their full, escaped names (PEFT matches those keys as regular expressions)."""
    ranks = {re.escape(n): f.rank for n, f in moved.modules.items() if f.rank != config.r}
    alphas = {re.escape(n): f.alpha for n, f in moved.modules.items()
              if f.alpha != config.lora_alpha}
    return dataclasses.replace(
        config, target_modules=sorted(moved.modules), rank_pattern=ranks, alpha_pattern=alphas,
        modules_to_save=list(moved.saved_modules) or None, base_model_name_or_path=base,
        layers_to_transform=None, layers_pattern=None, exclude_modules=None, revision=None)


def _adapter_state(moved: MovedAdapter) -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's saved names (``get_peft_model_state_dict``'s)."""
    prefix = "base_model.model."
    state = {}
    for name, f in moved.modules.items():
        a_key, b_key = (("lora_embedding_A", "lora_embedding_B") if f.kind == "embedding"
                        else ("lora_A.weight", "lora_B.weight"))
        state[f"{prefix}{name}.{a_key}"] = f.a.contiguous()
        state[f"{prefix}{name}.{b_key}"] = f.b.contiguous()
    for name, value in moved.saved.items():
        state[f"{prefix}{name}"] = value.contiguous()
    return state


def _write_adapter(out: Path, config: Any, state: dict[str, Tensor], report: AdapterReport,
                   overwrite: bool) -> None:
    """Write into a fresh temporary folder, then move the files into ``out``."""
    from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    staging = Path(tempfile.mkdtemp(prefix="warmstart-adapter-"))
    try:
        config.save_pretrained(str(staging))
        save_file(state, str(staging / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        (staging / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2, default=str))
        out.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, REPORT_NAME):
            if (out / name).exists() and overwrite:
                (out / name).unlink()
            shutil.move(str(staging / name), str(out / name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# 2. Into the target's weights (transport() with an adapter as the source)


def transport_lora(source_pretrained: nn.Module, adapter: Any, target: nn.Module,
                   calibration: Iterable[Any] | None = None, *,
                   target_calibration: Iterable[Any] | None = None,
                   evaluate: Callable[[nn.Module], float] | None = None,
                   options: TransportOptions, progress: bool = True,
                   adapter_name: str | None = None) -> AdapterReport:
    """Add the moved adapter to the target's weights: ``theta + alpha s B' A'`` per module (one
    module's dense update at a time, never the whole model's), ``modules_to_save`` by their
    rules. Called by :func:`~warmstart.transport` when ``source_finetuned`` is an adapter."""
    if is_adapter(target):
        raise TypeError("the target is a PEFT model: to warm-start its adapter use "
                        "TaskVectorTransport (or transport_into_peft); to get an adapter folder "
                        "use transport_adapter with the base model.")
    started = time.perf_counter()
    plan = _plan(source_pretrained, adapter, target, options, adapter_name, model_device(target))
    timings: dict[str, float] = {}
    moved = move_adapter(source_pretrained, plan.lora, target, plan.layout_s, plan.layout_t,
                         plan.matching, calibration, target_calibration, plan.options, 1.0,
                         progress, timings=timings)
    deltas = dict(moved.deltas)
    lora_params = []
    for name, f in moved.modules.items():
        key = f"{name}.weight"
        if key in deltas:
            raise ValueError(f"{key} is both a LoRA module and a modules_to_save parameter.")
        deltas[key] = f.dense()
        lora_params.append(ParamReport(key, "lora", "lora", None, 0.0, f.norm(),
                                       note=f"rank {f.rank}, scaling {f.scaling:g}"))
    update = Update(deltas, moved.values, (), (), moved.skipped, moved.log_scales)
    recalibrate = _recalibration(target, plan.layout_t, calibration, target_calibration,
                                 plan.options.bn_recalibration)
    fit_head = _head_refit(plan, source_pretrained, target, calibration, target_calibration)

    def finish() -> None:  # after each write: BatchNorm statistics first, then the head
        recalibrate()
        fit_head()

    alpha, scores = plan.options.alpha, ()
    if alpha == "auto":
        alpha, scores = select_alpha(target, update, evaluate, plan.options.alpha_grid, finish,
                                     fit_head.names)
    t0 = time.perf_counter()
    with _restored_on_error(target, update, fit_head.names):
        apply_update(target, update, float(alpha))
        finish()
    timings["apply"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    reports = tuple(dataclasses.replace(m, norm_target=float(alpha) * m.norm_target)
                    for m in moved.module_reports)
    return dataclasses.replace(_report(plan, moved, float(alpha), timings, lora_params, scores),
                               modules=reports, head_fit=dict(fit_head.record))


# ---------------------------------------------------------------------------------------------
# 3. Into a target already wrapped by PEFT (warm start of a LoRA fine-tuning)


def transport_into_peft(source_pretrained: nn.Module, adapter: Any, target: nn.Module,
                        calibration: Iterable[Any] | None = None, *,
                        target_calibration: Iterable[Any] | None = None,
                        evaluate: Callable[[nn.Module], float] | None = None,
                        options: TransportOptions | None = None, progress: bool = True,
                        adapter_name: str | None = None, target_adapter: str | None = None,
                        **option_values: Any) -> AdapterReport:
    """Write the moved adapter into the LoRA parameters of ``target`` (a ``PeftModel``) in place.

    The statistics come from the target's base model (adapters disabled). Each moved module's
    factors are copied into the target adapter's ``lora_A`` / ``lora_B`` (``B`` rescaled to the
    target's ``lora_alpha / r``); a target rank above the source's keeps its extra rows of ``A``
    and zeroes those columns of ``B``, a lower one keeps the best rank-``r`` part (a small SVD).
    ``modules_to_save`` copies get their moved values. The tensors keep their identity, so an
    optimizer holding them is unaffected. ``alpha="auto"`` tries ``alpha_grid`` with
    ``evaluate(target)`` (lower is better).
    """
    options = (options or TransportOptions()).replace(**option_values)
    if options.alpha == "auto" and evaluate is None:
        raise ValueError("alpha='auto' needs evaluate=<callable(model) -> validation loss>.")
    if not is_adapter(target):
        raise TypeError(f"target must be a PEFT model (peft.get_peft_model(...)), got "
                        f"{type(target).__name__}; for a plain target use transport() or "
                        "transport_adapter().")
    if not is_adapter(adapter):
        raise TypeError("the target is a PEFT model, so source_finetuned must be a LoRA adapter of "
                        "the source (a PEFT adapter folder or PeftModel), got "
                        f"{type(adapter).__name__} {str(adapter)[:80]!r}; to move a full "
                        "fine-tune, transport into the target before wrapping it with PEFT.")
    started = time.perf_counter()
    name = target_adapter or active_adapter(target)
    live = target.get_base_model() if hasattr(target, "get_base_model") else target
    view, state_t, lora_t = _unwrapped(live, name)
    plan = _plan(source_pretrained, adapter, view, options, adapter_name, model_device(live))
    head = _live_head(view, state_t, live, plan) if plan.options.head_fit else None  # refuse early
    timings: dict[str, float] = {}
    disabled = target.disable_adapter() if hasattr(target, "disable_adapter") else _nothing()

    def check(modules: list[str]) -> None:  # before any statistics: refuse early
        absent = _absent(modules, lora_t, name)
        if absent and plan.options.strict:
            raise ValueError(
                f"the target's adapter {name!r} has no LoRA on {len(absent)} module(s) that the "
                f"source adapter moves into ({', '.join(absent[:8])}); add them to the target's "
                "LoraConfig target_modules, or pass strict=False to leave them out.")

    with disabled:
        moved = move_adapter(source_pretrained, plan.lora, live, plan.layout_s, plan.layout_t,
                             plan.matching, calibration, target_calibration, plan.options, 1.0,
                             progress, target_state=state_t, timings=timings, check=check)
    writes, notes = _peft_writes(moved, lora_t, state_t, name, set(_base_names(live, state_t)))
    skipped = moved.skipped + tuple(notes)
    fit_head = _head_refit(plan, source_pretrained, live, calibration, target_calibration, head)
    alpha, scores = plan.options.alpha, ()
    backup = {k: t.detach().clone() for k, (t, _, _) in writes.items()}
    backup.update({n: live.get_parameter(n).detach().clone() for n in fit_head.names})
    try:
        if alpha == "auto":
            trials = []
            for a in check_alpha_grid(plan.options.alpha_grid):
                _write_live(writes, a)
                fit_head()
                trials.append((a, float(evaluate(target))))
            finite = [s for s in trials if math.isfinite(s[1])]
            if not finite:
                raise ValueError(f"every alpha in {plan.options.alpha_grid} gave a non-finite "
                                 "validation score.")
            alpha, scores = min(finite, key=lambda s: s[1])[0], tuple(trials)
        _write_live(writes, float(alpha))
        fit_head()
    except BaseException:
        with torch.no_grad():
            for key, (tensor, _, _) in writes.items():
                tensor.copy_(backup[key])
            for key in fit_head.names:
                live.get_parameter(key).copy_(backup[key])
        raise
    timings["total"] = time.perf_counter() - started
    reports = tuple(dataclasses.replace(m, norm_target=float(alpha) * m.norm_target)
                    for m in moved.module_reports)
    report = _report(plan, dataclasses.replace(moved, skipped=skipped), float(alpha), timings,
                     scores=scores)
    return dataclasses.replace(report, modules=reports, head_fit=dict(fit_head.record))


def plain_view(model: nn.Module) -> nn.Module:
    """What the family adapters and input rules should see of a PEFT-wrapped ``model``: a
    tensor-free copy of its base model without PEFT's wrappers (``model`` itself otherwise)."""
    if not is_adapter(model):
        return model
    live = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _unwrapped(live, active_adapter(model))[0]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _unwrapped(live: nn.Module, adapter: str
               ) -> tuple[nn.Module, dict[str, Tensor], dict[str, nn.Module]]:
    """A tensor-free copy of ``live`` with PEFT's wrappers replaced by the modules they wrap (the
    family adapters describe that), the live tensors by the unwrapped names, and the live LoRA
    layers by module name."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    memo: dict[int, Any] = {}
    for p in live.parameters():  # buffers stay real: the families read some (rotary inv_freq)
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    view = copy.deepcopy(live, memo)
    state: dict[str, Tensor] = {}
    layers: dict[str, nn.Module] = {}
    renamed: list[tuple[str, str]] = []  # (unwrapped prefix, live prefix)
    for name, module in live.named_modules():
        if isinstance(module, LoraLayer):
            layers[name] = module
            renamed.append((name, f"{name}.base_layer"))
        elif isinstance(module, ModulesToSaveWrapper):
            renamed.append((name, f"{name}.modules_to_save.{adapter}"))
    for name, module in list(view.named_modules()):
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
            inner = (module.get_base_layer() if isinstance(module, LoraLayer)
                     else module.original_module)
            parent, _, attr = name.rpartition(".")
            setattr(view.get_submodule(parent) if parent else view, attr, inner)
    live_state = live.state_dict(keep_vars=True)
    for key in view.state_dict():
        live_key = key
        for plain, wrapped in sorted(renamed, key=lambda r: -len(r[0])):
            if key.startswith(plain + "."):
                live_key = wrapped + key[len(plain):]
                break
        state[key] = live_state[live_key]
    return view, state, layers


def _live_head(view: nn.Module, state: Mapping[str, Tensor], live: nn.Module,
               plan: _Plan) -> nn.Linear:
    """The layer of ``live`` that computes the target's output layer: PEFT's trainable copy of a
    ``modules_to_save`` head, or the plain layer. A head under LoRA is refused: the refit would
    go into its frozen base weight, under the adapter's own change."""
    from peft.tuners.lora import LoraLayer

    layer = output_layer(view, plan.layout_t, "target")
    name = next(n for n, p in view.named_parameters() if p is layer.weight)
    weight = state[name]
    for path, module in live.named_modules():
        if isinstance(module, LoraLayer) and module.get_base_layer().weight is weight:
            raise ValueError(f"head_fit refits the target's output layer, but the target's adapter "
                             f"puts LoRA on it ({path}); list it in modules_to_save instead of "
                             "target_modules, or set head_fit=0.")
    return next(m for m in live.modules() if isinstance(m, nn.Linear) and m.weight is weight)


def _absent(modules: Iterable[str], layers: Mapping[str, nn.Module], adapter: str) -> list[str]:
    """Moved modules on which the target's adapter has no LoRA."""
    return sorted(n for n in modules
                  if n not in layers or adapter not in _factor_dict(layers[n], "A"))


def _base_names(live: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    """Unwrapped names whose live tensor is a frozen base weight (not an adapter's copy)."""
    trainable = {id(p) for p in live.parameters() if p.requires_grad}
    return [k for k, t in state.items() if id(t) not in trainable]


def _peft_writes(moved: MovedAdapter, layers: Mapping[str, nn.Module], state: Mapping,
                 adapter: str, frozen: set[str]):
    """``{key: (live tensor, value at alpha 0, change per unit alpha)}`` for every write, and
    notes: moved modules the target's adapter lacks, target LoRA modules that receive nothing,
    and moved ``modules_to_save`` values that land in frozen base weights (a head layer that
    the target's adapter does not save, e.g. BERT's pooler under task_type='SEQ_CLS')."""
    writes: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    absent = _absent(moved.modules, layers, adapter)
    notes = [(n, "no LoRA on this module in the target's adapter: left out") for n in absent]
    for name, f in moved.modules.items():
        if name in absent:
            continue
        layer = layers[name]
        live_a, live_b = _factor_dict(layer, "A")[adapter], _factor_dict(layer, "B")[adapter]
        live_a = getattr(live_a, "weight", live_a)
        live_b = getattr(live_b, "weight", live_b)
        b = f.b.double() * (f.scaling / float(layer.scaling[adapter]))
        a, b, kept = _fit_rank(f.a.double(), b, live_a.shape[0])
        if kept < 1.0:
            notes.append((name, f"target rank {live_a.shape[0]} < source rank {f.rank}: kept "
                                f"{kept:.1%} of the update's energy"))
        r = a.shape[0]
        new_a = live_a.detach().double().cpu().clone()
        new_a[:r] = a
        new_b = torch.zeros(live_b.shape, dtype=torch.float64)
        new_b[:, :r] = b
        writes[f"{name}.A"] = (live_a, new_a, torch.zeros_like(new_a))  # A does not scale
        writes[f"{name}.B"] = (live_b, torch.zeros_like(new_b), new_b)
    for key, value in moved.saved.items():
        current = state[key]
        if key in frozen and (key in moved.values or key in moved.deltas):
            notes.append((key, "written into the frozen base weight: the target's adapter does "
                               "not save this module (add it to modules_to_save to train it)"))
        if key in moved.values:  # replaced whatever alpha is (a task head)
            writes[key] = (current, value.double(), torch.zeros_like(value, dtype=torch.float64))
        elif key in moved.deltas:
            base = current.detach().double().cpu()
            writes[key] = (current, base, moved.deltas[key].double().cpu())
    covered = {n for n in layers if adapter in _factor_dict(layers[n], "A")}
    notes += [(n, "the source adapter moves nothing into this module: it keeps PEFT's "
                  "initialisation") for n in sorted(covered - set(moved.modules))]
    return writes, notes


def _factor_dict(layer: nn.Module, which: str):
    plain = getattr(layer, f"lora_{which}", {})
    return plain if len(plain) else getattr(layer, f"lora_embedding_{which}", {})


def _write_live(writes: Mapping[str, tuple[Tensor, Tensor, Tensor]], alpha: float) -> None:
    values = {}
    for key, (tensor, base, change) in writes.items():
        value = (base + alpha * change).to(tensor.device, tensor.dtype)
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"the moved value of {key} is not finite in {tensor.dtype}; check "
                             "alpha and the calibration data.")
        values[key] = value
    with torch.no_grad():
        for key, (tensor, _, _) in writes.items():
            tensor.copy_(values[key])


def _fit_rank(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Factors of rank at most ``rank`` for ``B A`` (unchanged when they fit; otherwise the best
    approximation, from QR factors and an SVD of the small core); also the fraction of
    ``||B A||^2`` kept."""
    r = a.shape[0]
    if rank >= r:
        return a, b, 1.0
    shape_a, shape_b = a.shape, b.shape
    a2, b2 = a.reshape(r, -1), b.reshape(shape_b[0], r)
    qb, rb = torch.linalg.qr(b2)
    qa, ra = torch.linalg.qr(a2.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    root = s[:rank].sqrt()
    new_b = (qb @ u[:, :rank]) * root
    new_a = root[:, None] * (vh[:rank] @ qa.T)
    total = float(s.square().sum())
    kept = float(s[:rank].square().sum()) / total if total > 0 else 1.0
    return (new_a.reshape(rank, *shape_a[1:]), new_b.reshape(shape_b[0], rank, *shape_b[2:]),
            kept)

