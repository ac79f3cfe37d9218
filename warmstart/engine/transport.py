"""Move a task vector from a source model into a target model: the one public entry point.

The work is split by job: :mod:`.checks` (inputs), :mod:`.update` (maps and per-parameter rules,
nothing written), :mod:`.alpha` (``alpha="auto"``) and :mod:`.apply` (the transactional write).
Everything is computed before anything is written; the write itself restores the old values if it
fails, so after any error the target is bit-for-bit what it was.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from .activations import model_device
from .alpha import select_alpha
from .apply import _recalibration, _restored_on_error, apply_update
from .checks import _checked_finetuned, check_calibration, check_models
from .families import describe_model
from .head_fit import head_fit_step
from .lora import is_adapter
from .matching import match
from .options import TransportOptions
from .procrustes import resolve_solver
from .task_vector import as_state_dict, fit_prefix
from .transport_report import TransportReport
from .update import compute_update


def transport(
    source_pretrained: nn.Module,
    source_finetuned: nn.Module | Mapping[str, Tensor] | str,
    target: nn.Module,
    calibration: Iterable[Any] | None = None,
    *,
    target_calibration: Iterable[Any] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    options: TransportOptions | None = None,
    progress: bool = True,
    **option_values: Any,
) -> TransportReport:
    """Add ``alpha * tau_B`` to ``target`` in place and return the transport report.

    Example::

        report = transport(source, "source_finetuned.safetensors", target, train_inputs,
                           alpha=2.0, solver="svd")

    Args:
        source_pretrained: the source base model (its activations are observed).
        source_finetuned: the finetuned source: a module, a state dict or a checkpoint path (a
            Lightning ``.ckpt`` of any module: the wrapper prefix, e.g. ``net.``, is stripped),
            or a LoRA adapter (a PEFT adapter folder or ``PeftModel``: moved as its factors, see
            :mod:`.lora`).
        target: the target base model, updated in place (its task head is replaced).
        calibration: model inputs (tensors, or mappings of keyword tensors), e.g. unlabelled
            training batches; not needed for ``method="slice"``.
        target_calibration: the target's own inputs for the same examples, when its
            preprocessing differs (another tokenizer).
        evaluate: ``evaluate(target) -> score`` (lower is better, e.g. a validation loss), needed
            by ``alpha="auto"``; called once per strength of ``alpha_grid``.
        options: a :class:`~warmstart.TransportOptions`; ``option_values`` (any of its fields,
            e.g. ``alpha=2.0``) replace single fields of it.
        progress: show progress bars.
    """
    options = (options or TransportOptions()).replace(**option_values)
    if options.alpha == "auto" and evaluate is None:
        raise ValueError("alpha='auto' needs evaluate=<callable(model) -> validation loss>.")
    check_calibration("calibration", calibration)
    check_calibration("target_calibration", target_calibration)
    check_models(source_pretrained, target)
    if is_adapter(source_finetuned):  # a LoRA task vector: moved as factors (engine/lora.py)
        from .lora_out import transport_lora

        return transport_lora(source_pretrained, source_finetuned, target, calibration,
                              target_calibration=target_calibration, evaluate=evaluate,
                              options=options, progress=progress)
    started = time.perf_counter()
    # the engine only reads it; a module's weights are copied only when they are the target's
    finetuned = as_state_dict(source_finetuned, clone=source_finetuned is target)
    if not isinstance(source_finetuned, nn.Module):  # a checkpoint may carry a wrapper prefix
        finetuned = fit_prefix(finetuned, source_pretrained.state_dict(), "source_finetuned")
    finetuned = _checked_finetuned(finetuned)
    layout_s = describe_model(source_pretrained, options.source_family)
    layout_t = describe_model(target, options.target_family)
    matching = match(layout_s, layout_t, options.depth_mapping)
    # the statistics, hence the maps, live on the target's device
    options = options.replace(solver=resolve_solver(options.solver, model_device(target)))
    update, timings = compute_update(source_pretrained, finetuned, target, layout_s, layout_t,
                                     matching, calibration, target_calibration, options, progress)
    recalibrate = _recalibration(target, layout_t, calibration, target_calibration,
                                 options.bn_recalibration)
    fit_head = head_fit_step(source_pretrained, finetuned, target, layout_s, layout_t,
                             calibration, target_calibration, options.head_fit,
                             options.head_fit_ridge, mode=options.head_fit_mode)

    def finish() -> None:  # after each write: BatchNorm statistics first, then the head
        recalibrate()
        fit_head()

    alpha, scores = options.alpha, ()
    if alpha == "auto":
        alpha, scores = select_alpha(target, update, evaluate, options.alpha_grid, finish,
                                     fit_head.names)
    t0 = time.perf_counter()
    with _restored_on_error(target, update, fit_head.names):
        apply_update(target, update, float(alpha))
        finish()
    timings["apply"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    return TransportReport(
        options.method, float(alpha), layout_s.family, layout_t.family,
        tuple((str(t), str(s)) for t, s in matching.block_map.items()),
        update.params, update.maps, update.skipped, timings, options.to_dict(), scores,
        token_pairing=update.token_pairing, head_fit=dict(fit_head.record),
    )
