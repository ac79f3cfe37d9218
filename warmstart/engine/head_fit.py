"""``head_fit``: refit the target's output layer to the finetuned source's outputs, without labels.

After the body has moved (and BatchNorm has been recalibrated), the target's task head reads
features that the transported head was never fitted to. This step runs the finetuned source and
the updated target on a few calibration batches and solves, in closed form, the ridge regression

    min_{W, b}  || F_t W^T + b - Z_s ||^2  +  lam * ||W||^2,     lam = ridge * mean(diag(F_t^T F_t))

where ``F_t`` are the inputs of the target's output layer and ``Z_s`` the source's outputs
(logits) on the same examples: a distillation of the source's head onto the target's features.
It uses no labels and no gradient steps. Only the last ``nn.Linear`` of the head is refitted (the
layer whose parameters have the ``head`` rule); a two-layer head keeps its moved hidden layer.

``head_fit_mode="scale"`` fits one number instead: the moved layer's weight and bias are
multiplied by the positive least-squares scale of its logits onto the source's, so the target
keeps its own decisions and takes the source's confidence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .activations import call_model, move_to, prepare_inputs, run_batch
from .families.base import ModelLayout


@dataclass(frozen=True)
class HeadRefit:
    """What to run after each write (calling it refits the head; a no-op when ``head_fit=0``),
    the names of the ``target`` parameters it writes, for the caller's backups, and what the
    last refit did (``record``: the rows it used, the mean squared gap between the target's and
    the source's logits before and after it, and the scale in ``scale`` mode), for the report."""

    fit: Callable[[], None] = lambda: None
    names: tuple[str, ...] = ()
    record: dict[str, float | str] = field(default_factory=dict)

    def __call__(self) -> None:
        self.fit()


def head_fit_step(source: nn.Module, finetuned: Mapping[str, Tensor], target: nn.Module,
                  layout_s: ModelLayout, layout_t: ModelLayout, calibration: Iterable[Any] | None,
                  target_calibration: Iterable[Any] | None, n_batches: int, ridge: float,
                  target_head: nn.Linear | None = None, mode: str = "ridge") -> HeadRefit:
    """The head refit on ``n_batches``, to run after each write.

    ``finetuned`` holds the source's finetuned tensors (all of them, or only those that differ
    from ``source``'s, e.g. a LoRA adapter merged module by module). The source's outputs are
    computed here, once (they do not depend on alpha); the target's features are read when the
    refit runs, after the write. ``target_head``: the layer to refit when it is not the one the
    layout names in ``target`` (the live copy of a PEFT ``modules_to_save`` head). ``mode``:
    ``ridge`` (:func:`ridge_fit`) or ``scale`` (:func:`scale_fit`).
    """
    if n_batches == 0:
        return HeadRefit()
    if calibration is None:
        raise ValueError("head_fit needs calibration inputs (the finetuned source's outputs are "
                         "its targets); pass calibration=..., or set head_fit=0.")
    source_head = output_layer(source, layout_s, "source")
    if target_head is None:
        target_head = output_layer(target, layout_t, "target")
    if source_head.out_features != target_head.out_features:
        raise ValueError(f"head_fit needs output layers of the same size: the source's has "
                         f"{source_head.out_features} outputs, the target's "
                         f"{target_head.out_features}; set head_fit=0.")
    batches_s = list(islice(calibration, n_batches))
    batches_t = (batches_s if target_calibration is None
                 else list(islice(target_calibration, n_batches)))
    outputs = _source_outputs(source, finetuned, layout_s, source_head, batches_s)
    record: dict[str, float | str] = {}  # what the last refit did

    def fit() -> None:
        features = _layer_inputs(target, layout_t, target_head, batches_t)
        if features.shape[0] != outputs.shape[0]:
            raise ValueError(
                f"head_fit paired {outputs.shape[0]} source output rows with {features.shape[0]} "
                "target rows: the two models' heads see different numbers of rows (token heads "
                "under different tokenizers); head_fit supports heads with one row per example "
                "or identical tokenizations. Set head_fit=0.")
        if mode == "scale":
            weight, bias = scale_fit(features, outputs, target_head.weight, target_head.bias)
        else:
            weight, bias = ridge_fit(features, outputs, ridge, target_head.bias is not None)
        now = {"mode": mode, "rows": float(len(features)),
               "logit_mse_before": _gap(features, outputs, target_head.weight, target_head.bias),
               "logit_mse_after": _gap(features, outputs, weight, bias)}
        if mode == "scale":
            old = target_head.weight.detach().double().to(weight.device)
            now["scale"] = float((weight * old).sum() / (old * old).sum())
        _write(target_head, weight, bias)
        record.clear()
        record.update(now)

    written = {id(p) for p in target_head.parameters()}
    return HeadRefit(fit, tuple(n for n, p in target.named_parameters() if id(p) in written),
                     record)


def _gap(features: Tensor, outputs: Tensor, weight: Tensor, bias: Tensor | None) -> float:
    """Mean squared difference between the layer's logits and the source's."""
    logits = features.double() @ weight.detach().double().to(features.device).T
    if bias is not None:
        logits = logits + bias.detach().double().to(features.device)
    return float((logits - outputs.double()).square().mean())


def ridge_fit(features: Tensor, outputs: Tensor, ridge: float,
              bias: bool = True) -> tuple[Tensor, Tensor | None]:
    """``(W, b)`` minimising ``||F W^T + b - Z||^2 + lam ||W||^2`` in float64 (``b`` is not
    penalised), ``lam = ridge * mean(diag(F^T F))``."""
    f, z = features.double(), outputs.double()
    x = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype, device=f.device)], 1) if bias else f
    gram = x.T @ x
    penalty = torch.full((len(gram),), ridge * float(gram.diagonal()[:f.shape[1]].mean()),
                         dtype=gram.dtype, device=gram.device)
    if bias:
        penalty[-1] = 0.0
    solution = torch.linalg.solve(gram + torch.diag(penalty), x.T @ z).T
    return (solution[:, :-1], solution[:, -1]) if bias else (solution, None)


def scale_fit(features: Tensor, outputs: Tensor, weight: Tensor,
              bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``(c W, c b)`` with ``c > 0`` the least-squares scale of the layer's outputs ``F W^T + b``
    onto ``Z``, in float64. With several outputs each row's mean is removed from both first
    (a softmax ignores it), so only the spread of the logits is matched: the argmax of every
    row stays as it was."""
    w = weight.detach().double().to(features.device)
    b = None if bias is None else bias.detach().double().to(features.device)
    own = features.double() @ w.T + (0.0 if b is None else b)
    wanted = outputs.double()
    if own.shape[1] > 1:
        own, wanted = own - own.mean(1, keepdim=True), wanted - wanted.mean(1, keepdim=True)
    c = float((own * wanted).sum() / (own * own).sum())
    if not math.isfinite(c) or c <= 0:
        raise ValueError(f"head_fit_mode='scale' found the target's logits unrelated or opposed to "
                         f"the source's (least-squares scale {c:.3g}); nothing was written. Use "
                         "head_fit_mode='ridge', or head_fit=0.")
    return c * w, None if b is None else c * b


def output_layer(model: nn.Module, layout: ModelLayout, side: str) -> nn.Linear:
    names = [p.name for p in layout.params if p.rule == "head" and p.name.endswith(".weight")]
    modules = dict(model.named_modules())
    layer = modules.get(names[0].rsplit(".", 1)[0]) if len(names) == 1 else None
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"head_fit needs a task head that ends in one nn.Linear; the {side} "
                         f"({type(model).__name__}, family {layout.family}) has head weights "
                         f"{names or 'none'}. Set head_fit=0.")
    return layer


def _rows(t: Tensor) -> Tensor:
    return t.detach().reshape(-1, t.shape[-1]).double()


@torch.no_grad()
def _run(model: nn.Module, layout: ModelLayout, layer: nn.Linear, batches: list, side: str,
         state: Mapping[str, Tensor] | None = None) -> Tensor:
    """Rows seen by ``layer`` (its inputs) for the target, or produced by it for the source,
    with the module in eval mode; ``state`` replaces the module's tensors for the run."""
    rows: list[Tensor] = []
    grab = ((lambda m, i, o: rows.append(_rows(o))) if side == "source"
            else (lambda m, i, o: rows.append(_rows(i[0]))))
    call = call_model if state is None else partial(_call_with, state=state)
    flags = [(m, m.training) for m in model.modules()]
    handle = layer.register_forward_hook(grab)
    try:
        model.eval()
        for index, batch in enumerate(batches):
            inputs, _ = prepare_inputs(model, layout, move_to(batch, model))
            run_batch(model, inputs, side, index, call)
    finally:
        handle.remove()
        for m, training in flags:
            m.training = training
    if not rows:
        raise ValueError("head_fit got no batches: the calibration inputs were used up; pass a "
                         "re-iterable (a list or a DataLoader), not a generator.")
    return torch.cat(rows)


def _call_with(model: nn.Module, inputs: Any, state: Mapping[str, Tensor]) -> Any:
    if isinstance(inputs, Mapping):
        return functional_call(model, state, (), dict(inputs))
    return functional_call(model, state, tuple(inputs) if isinstance(inputs, (tuple, list))
                           else (inputs,))


def _source_outputs(source: nn.Module, finetuned: Mapping[str, Tensor], layout: ModelLayout,
                    layer: nn.Linear, batches: list) -> Tensor:
    """The finetuned source's output rows: ``source`` run with the finetuned tensors in place of
    its own (``functional_call``, which keeps the module's own tensors for names ``finetuned``
    lacks; the module itself is not changed)."""
    device = next((p.device for p in source.parameters()), torch.device("cpu"))
    state = {n: t.to(device) for n, t in finetuned.items()}
    return _run(source, layout, layer, batches, "source", state)


def _layer_inputs(target: nn.Module, layout: ModelLayout, layer: nn.Linear,
                  batches: list) -> Tensor:
    return _run(target, layout, layer, batches, "target")


def _write(layer: nn.Linear, weight: Tensor, bias: Tensor | None) -> None:
    new = [(layer.weight, weight)] + ([(layer.bias, bias)] if bias is not None else [])
    for _, value in new:
        if not torch.isfinite(value).all():
            raise ValueError("head_fit gave a non-finite output layer; nothing was written. "
                             "Raise head_fit_ridge or check the calibration data.")
    with torch.no_grad():
        for param, value in new:
            param.copy_(value.to(param.device, param.dtype))
