"""The work behind :class:`~warmstart.TaskVectorTransport`: find the target network in the user's
LightningModule, build the source, take calibration inputs from this rank's shard of the training
data, score ``alpha="auto"`` with the module's own validation, and run the engine's transport.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn

from ..engine.families import describe_model
from ..engine.lora import is_adapter
from ..engine.options import TransportOptions
from ..engine.transport import transport
from ..engine.transport_report import TransportReport
from .batches import (
    InputsFn,
    TokenizeText,
    WithOffsets,
    default_inputs,
    keep_offsets_where_needed,
    take_inputs,
)
from .validation import monitored, quiet_validation

if TYPE_CHECKING:
    from .sharding import ShardedTarget

DEFAULT_CALIBRATION_BATCHES = 8
_HF_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForImageClassification",
             "ForCausalLM", "ForMaskedLM", "ForQuestionAnswering")


@dataclass(frozen=True)
class WarmStart:
    """What the callback needs besides the transport options (all YAML-serialisable but the
    callables and a source module given from Python)."""

    source_pretrained: str | nn.Module
    source_finetuned: str | nn.Module | Mapping
    options: TransportOptions
    target_attribute: str | None = None
    inputs: InputsFn | None = None
    source_inputs: InputsFn | None = None
    source_tokenizer: str | None = None
    text_key: str = "text"
    monitor: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    alpha_val_batches: int = 4
    source_model_kwargs: dict[str, Any] = field(default_factory=dict)
    adapter_out: str | None = None  # `warmstart transport --adapter_out`: write a PEFT adapter
    adapter_overwrite: bool = False

    def fingerprint(self) -> str:
        described = {"source_pretrained": _describe(self.source_pretrained),
                     "source_finetuned": _describe(self.source_finetuned),
                     "options": self.options.to_dict(), "target": self.target_attribute}
        blob = json.dumps(described, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def calibration_batches(self) -> int:
        return self.options.calibration_batches or DEFAULT_CALIBRATION_BATCHES


def _describe(value: Any) -> str:
    return f"<{type(value).__name__}>" if isinstance(value, (nn.Module, Mapping)) else str(value)


def find_target(pl_module: nn.Module, path: str | None) -> nn.Module:
    """The network at dotted ``path`` (``""``: the module itself; ``None``: the one child module
    that holds all the parameters)."""
    if path is None:
        return _only_child(pl_module)
    module, parts = pl_module, path.split(".") if path else []
    for i, part in enumerate(parts):
        parent, module = module, getattr(module, part, None)
        if not isinstance(module, nn.Module):
            found = "" if module is None else f" (it is a {type(module).__name__})"
            where = ".".join(parts[:i + 1])
            children = ", ".join(n for n, _ in parent.named_children()) or "none"
            owner = ".".join(parts[:i]) or type(pl_module).__name__
            raise AttributeError(
                f"{type(pl_module).__name__} has no module at target_attribute={path!r}: "
                f"{where!r} is missing{found}; the child modules of {owner} are: {children}. "
                "Set target_attribute to the dotted path of the network ('' for the module "
                "itself).")
    return module


def _only_child(pl_module: nn.Module) -> nn.Module:
    total = sum(p.numel() for p in pl_module.parameters())
    holders = [(n, m) for n, m in pl_module.named_children() if any(True for _ in m.parameters())]
    if len(holders) == 1 and sum(p.numel() for p in holders[0][1].parameters()) == total:
        return holders[0][1]
    names = ", ".join(n for n, _ in holders) or "none"
    own = [n for n, _ in pl_module.named_parameters(recurse=False)]
    stray = f" and {len(own)} of its own ({', '.join(own)})" if own else ""
    raise AttributeError(
        f"cannot tell which part of {type(pl_module).__name__} is the target network: its "
        f"parameters sit in {len(holders)} child module(s) ({names}){stray}; set "
        "target_attribute to the dotted path of the network, or '' to transport into the "
        "module itself.")


def build_source(spec: str | nn.Module, target: nn.Module, model_kwargs: dict) -> nn.Module:
    """The source base model: the module itself, the target's Hugging Face auto class over a
    folder (or packaged text name), or :func:`~warmstart.lightning.models.build_model`."""
    if isinstance(spec, nn.Module):
        return spec
    from .models import _text_dir, build_model

    suffix = next((s for s in _HF_HEADS if type(target).__name__.endswith(s)), None)
    folder = _text_dir(spec) if suffix else None
    if folder is not None:
        import transformers

        auto = getattr(transformers, f"AutoModel{suffix}")
        kwargs = {"num_labels": target.config.num_labels} if "Classification" in suffix else {}
        return auto.from_pretrained(folder, **kwargs, **model_kwargs).eval()
    return build_model(spec, head_classes(target) or 2, pretrained=True,
                       model_kwargs=dict(model_kwargs))


def head_classes(target: nn.Module) -> int | None:
    """Rows of the target's task head, as its family layout finds it (``None``: no head)."""
    state = target.state_dict()
    heads = [p.name for p in describe_model(target).params if p.rule == "head"]
    return int(state[heads[0]].shape[0]) if heads else None


def calibration_loader(trainer: L.Trainer) -> Any:
    """This rank's shard of the training data (under a distributed sampler, unshuffled; on one
    device, the training loader as it is).

    At ``on_fit_start`` the fit loop has not built its loader yet, and Lightning has no public
    call for "the training loader as this rank will see it"; these two internals are the ones
    the fit loop itself uses (``setup_data``), so the sharding is exactly Lightning's.
    """
    loader = trainer.fit_loop._data_source.dataloader()
    return trainer._data_connector._prepare_dataloader(loader, shuffle=False,
                                                       mode=RunningStage.TRAINING)


def _generators(loader: Any) -> list[torch.Generator]:
    """The torch generators a loader draws its order and worker seeds from."""
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    found = [getattr(obj, "generator", None) for obj in (loader, sampler, batch_sampler)]
    return list({id(g): g for g in found if isinstance(g, torch.Generator)}.values())


@contextmanager
def training_batches(trainer: L.Trainer) -> Iterator[Iterator[Any]]:
    """This rank's training batches (:func:`calibration_loader`) as the fit loop hands them to
    ``training_step``: the precision plugin's input conversion, the ``on_before_batch_transfer``
    hook (the datamodule's where it has one) and the strategy's ``batch_to_device``. Inside it,
    taking batches changes neither the global random state nor the loader's own generators, so
    the fit's data order stays what it would have been."""
    pl_module = trainer.lightning_module
    datamodule = trainer.datamodule
    hooks = (datamodule if datamodule is not None
             and is_overridden("on_before_batch_transfer", datamodule) else pl_module)
    loader = calibration_loader(trainer)
    generators = _generators(loader)
    states = [g.get_state() for g in generators]

    def batches() -> Iterator[Any]:
        for batch in loader:
            batch = trainer.precision_plugin.convert_input(batch)
            batch = hooks.on_before_batch_transfer(batch, 0)
            yield trainer.strategy.batch_to_device(batch, dataloader_idx=0)

    try:
        with isolate_rng():
            yield batches()
    finally:
        for generator, state in zip(generators, states):
            generator.set_state(state)


def _source_inputs(plan: WarmStart) -> InputsFn | None:
    if plan.source_inputs is not None:
        return plan.source_inputs
    if plan.source_tokenizer is not None:
        return TokenizeText(plan.source_tokenizer, plan.text_key)
    return None


def _target_inputs(trainer: L.Trainer, target: nn.Module, plan: WarmStart) -> InputsFn | None:
    """With ``source_tokenizer``: the target's inputs plus its tokens' character spans, so that
    tokens pair by the characters they cover when the two tokenizers split a text differently."""
    if plan.source_tokenizer is None or plan.source_inputs is not None:
        return plan.inputs
    tokenizer = target_tokenizer(trainer, target)
    if tokenizer is None:
        return plan.inputs
    inputs = plan.inputs or (lambda batch: default_inputs(batch, target))
    return WithOffsets(inputs, TokenizeText(tokenizer, plan.text_key))


def target_tokenizer(trainer: L.Trainer, target: nn.Module) -> Any | None:
    """The target's tokenizer: the datamodule's ``tokenizer``, else the one saved in the target's
    Hugging Face folder (``config._name_or_path``); ``None`` when neither exists."""
    found = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
    if callable(found):
        return found
    for module in target.modules():
        folder = getattr(getattr(module, "config", None), "_name_or_path", None)
        if isinstance(folder, str) and folder and Path(folder).is_dir():
            from transformers import AutoTokenizer

            try:
                return AutoTokenizer.from_pretrained(folder)
            except (OSError, ValueError):
                return None
    return None


def _check_splits(source_in: list, target_in: list, plan: WarmStart) -> None:
    """Offsets stay only on batches the two tokenizers split differently; there, pairing by
    offsets needs them on both sides."""
    if not keep_offsets_where_needed(source_in, target_in):
        return
    if plan.options.token_pairing not in ("auto", "offsets"):
        return
    for side, batches, fix in (
            ("source", source_in, f"make source_tokenizer={plan.source_tokenizer!r} a fast "
                                  "tokenizer (a folder with tokenizer.json)"),
            ("target", target_in, "give the datamodule a `tokenizer` attribute (the fast "
                                  "tokenizer of the target's batches)")):
        if any(isinstance(b, Mapping) and "offset_mapping" not in b for b in batches):
            raise ValueError(
                f"the source tokenizer splits the calibration text differently from the target's "
                f"batches, so tokens pair by the characters they cover, but the {side} tokens "
                f"have no character offsets; {fix}, or set options.token_pairing='example' to "
                "pair mean-pooled examples.")


def alpha_scorer(trainer: L.Trainer, plan: WarmStart) -> Callable[[nn.Module], float]:
    """``evaluate(target)`` for ``alpha="auto"``: the module's monitored validation metric over
    ``alpha_val_batches`` batches (lower is better; negated for ``mode="max"``), averaged over
    the ranks so that every rank picks the same alpha. One validation batch runs first, so a
    ``monitor`` the module does not log fails before any calibration work."""
    sign = 1.0 if plan.mode == "min" else -1.0
    monitored(quiet_validation(trainer, 1), plan.monitor, "alpha='auto'")

    def evaluate(_target: nn.Module) -> float:
        metrics = quiet_validation(trainer, plan.alpha_val_batches)
        score = sign * monitored(metrics, plan.monitor, "alpha='auto'")
        return float(trainer.strategy.reduce(torch.tensor(score), reduce_op="mean"))

    return evaluate


def _as_logged(report: TransportReport, plan: WarmStart) -> TransportReport:
    """The report with the trials' scores as the module logged them (not negated for
    ``mode="max"``), and the metric they are."""
    sign = 1.0 if plan.mode == "min" else -1.0
    return dataclasses.replace(
        report, alpha_scores=tuple((a, sign * s) for a, s in report.alpha_scores),
        options={**report.options, "monitor": plan.monitor, "mode": plan.mode})


def run_transport(trainer: L.Trainer, pl_module: L.LightningModule, plan: WarmStart,
                  progress: bool = True, sharded: ShardedTarget | None = None) -> TransportReport:
    """Transport into the target network of ``pl_module`` in place; returns the report.

    ``sharded`` (under FSDP): the engine runs on its full copy, whose result goes to the shards.
    """
    target = find_target(pl_module, plan.target_attribute) if sharded is None else None
    evaluate = alpha_scorer(trainer, plan) if plan.options.alpha == "auto" else None
    if sharded is not None:
        target, evaluate = sharded.gather(trainer, evaluate)
    network = target
    if is_adapter(target):  # PEFT-wrapped: names, head and forward are the base model's
        from ..engine.lora_out import plain_view

        network = plain_view(target)
    source = build_source(plan.source_pretrained, network, plan.source_model_kwargs)
    home = next((p.device for p in source.parameters()), torch.device("cpu"))
    target_in = source_in = None
    if (plan.options.method != "slice" or plan.options.bn_recalibration > 0
            or plan.options.head_fit > 0):
        with training_batches(trainer) as batches:  # the fit's data order is left as it was
            target_in, source_in = take_inputs(batches, plan.calibration_batches, network,
                                               _target_inputs(trainer, network, plan),
                                               _source_inputs(plan))
        if source_in is not None and plan.source_inputs is None:
            _check_splits(source_in, target_in, plan)
    try:
        source.to(pl_module.device)
        engine = transport
        if is_adapter(target):  # a PEFT-wrapped target: its adapter is warm-started
            from ..engine.lora_out import transport_into_peft as engine
        if plan.adapter_out is not None:  # the target stays as it is; an adapter is written
            from ..engine.lora_out import adapter_writer

            engine = adapter_writer(plan.adapter_out, plan.adapter_overwrite)
        report = engine(  # the source reads its own inputs when it has them
            source, plan.source_finetuned, target,
            source_in if source_in is not None else target_in,
            target_calibration=target_in if source_in is not None else None,
            evaluate=evaluate, options=plan.options.replace(
                calibration_batches=plan.calibration_batches), progress=progress)
    except BaseException:
        if sharded is not None:  # alpha='auto' trials may have written into the shards
            sharded.restore(trainer)
        raise
    finally:
        source.to(home)  # a module the user passed goes back where it was
    if sharded is not None:
        sharded.scatter(trainer)
    return _as_logged(report, plan) if evaluate is not None else report
