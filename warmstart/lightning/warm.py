"""The work behind the Lightning callbacks: load the source, build calibration batches from the
trainer's data, evaluate a few validation batches, run the transport.

Batches follow warmstart's convention: dicts with ``label`` and either ``image`` [B, 3, H, W] or
``input_ids`` / ``attention_mask`` plus the raw ``text`` (so the source's own tokenizer can
re-tokenize the same examples). The LightningModule maps a batch to logits with ``forward(batch)``
and to its model's inputs with ``model_inputs(batch)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.matching import check_depth_mapping
from ..engine.task_vector import load_state_dict
from ..engine.transport import DEFAULT_ALPHA_GRID, check_alpha_grid, check_options, transport
from ..engine.transport_report import TransportReport
from .models import build_model, tokenizer_for


@dataclass(frozen=True)
class TransportConfig:
    """Everything that decides a transport; its fingerprint guards against applying twice."""

    source_pretrained: str
    source_finetuned: str
    method: Literal["theseus", "slice", "head_only"] = "theseus"
    calibration_batches: int = 8
    alpha: float | str = 1.0
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID
    alpha_val_batches: int = 4
    center: bool = False
    whiten: float = 0.0
    completion: Literal["none", "crop"] = "crop"
    solver: Literal["auto", "svd", "eigh"] = "auto"
    depthwise: Literal["diagonal", "zero"] = "diagonal"
    embeddings: Literal["zero", "map"] = "zero"
    depth_mapping: tuple[int, ...] | None = None
    bn_recalibration: int = 0
    strict: bool = True
    source_model_kwargs: dict[str, Any] = field(default_factory=dict)
    target_attribute: str = "model"

    def check(self) -> None:
        check_options(self.method, self.alpha, self.whiten, self.depthwise, self.embeddings,
                      self.solver)
        if self.alpha == "auto":
            check_alpha_grid(self.alpha_grid)
        check_depth_mapping(self.depth_mapping)
        if self.bn_recalibration < 0:
            raise ValueError(f"bn_recalibration must be >= 0 batches, got {self.bn_recalibration}.")
        if self.calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1, got {self.calibration_batches}.")
        if self.alpha == "auto" and self.alpha_val_batches < 1:
            raise ValueError(f"alpha_val_batches must be >= 1 with alpha='auto', got "
                             f"{self.alpha_val_batches}.")
        if not Path(self.source_finetuned).exists():
            raise FileNotFoundError(
                f"source_finetuned checkpoint {self.source_finetuned!r} does not exist; give the "
                "path of the fine-tuned source (a Lightning .ckpt, safetensors, .pt/.bin or a "
                "Hugging Face folder)."
            )

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def target_module(pl_module: nn.Module, attribute: str) -> nn.Module:
    module = getattr(pl_module, attribute, None)
    if not isinstance(module, nn.Module):
        found = "" if module is None else f" (it is a {type(module).__name__})"
        raise AttributeError(
            f"{type(pl_module).__name__} has no module attribute {attribute!r}{found} to "
            "transport into; set target_attribute to the attribute that holds the network "
            "(warmstart's Classifier uses 'model')."
        )
    return module


def load_source(config: TransportConfig, num_classes: int,
                module: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """The source base model (for activations) and the finetuned weights, in its naming."""
    pretrained = module if module is not None else build_model(
        config.source_pretrained, num_classes, pretrained=True,
        model_kwargs=dict(config.source_model_kwargs))
    finetuned = load_state_dict(config.source_finetuned)
    names = set(pretrained.state_dict())
    if not names & set(finetuned):
        stripped = {k.split(".", 1)[1]: v for k, v in finetuned.items() if "." in k}
        if names & set(stripped):  # a LightningModule checkpoint: strip "model." and the like
            finetuned = stripped
    return pretrained, finetuned


def head_classes(model: nn.Module) -> int:
    for attr in ("head", "classifier", "fc"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            return head.out_features
    raise AttributeError(f"{type(model).__name__} has no linear task head "
                         "(head/classifier/fc); warmstart transports into classifiers.")


def calibration_pairs(batches: Iterable[dict], pl_module, source_name: str | None, count: int
                      ) -> tuple[list[Any], list[Any]]:
    """Source and target inputs for the first ``count`` batches (text re-tokenized per model)."""
    tokenizer = tokenizer_for(source_name) if source_name is not None else None
    source_inputs, target_inputs = [], []
    for batch in islice(batches, count):
        target_in = pl_module.model_inputs(batch)
        target_inputs.append(target_in)
        if tokenizer is None:
            source_inputs.append(target_in)
            continue
        if "text" not in batch:
            raise ValueError("text batches need the raw 'text' so the source tokenizer can "
                             "re-tokenize them; use warmstart's TextClassificationData.")
        encoded = tokenizer(list(batch["text"]), padding=True, truncation=True,
                            max_length=int(batch["input_ids"].shape[1]), return_tensors="pt")
        source_inputs.append({"input_ids": encoded["input_ids"],
                              "attention_mask": encoded["attention_mask"]})
    return source_inputs, target_inputs


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


@torch.no_grad()
def evaluate(pl_module, batches: Iterable[dict], max_batches: int | None = None) -> dict:
    """Mean cross-entropy and accuracy of ``pl_module(batch)`` over (at most) ``max_batches``."""
    was_training = pl_module.training
    pl_module.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for batch in islice(batches, max_batches):
            batch = to_device(batch, pl_module.device)
            logits = pl_module(batch)
            labels = batch["label"]
            loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            count += int(labels.numel())
    finally:
        pl_module.train(was_training)
    if count == 0:
        raise ValueError("the validation data yielded no examples.")
    return {"val_loss": loss_sum / count, "val_acc": correct / count}


def run_transport(config: TransportConfig, pl_module, train_batches: Iterable[dict],
                  val_batches: Iterable[dict] | None, progress: bool = True,
                  source_module: nn.Module | None = None) -> TransportReport:
    """Transport into ``pl_module.<target_attribute>`` in place; returns the report.

    ``source_module`` (Python use) replaces building the source from ``config.source_pretrained``.
    """
    target = target_module(pl_module, config.target_attribute)
    source, finetuned = load_source(config, head_classes(target), source_module)
    source.to(pl_module.device)
    calibration, target_calibration = (None, None)
    if config.method != "slice" or config.bn_recalibration > 0:
        calibration, target_calibration = calibration_pairs(
            train_batches, pl_module,
            None if source_module is not None else config.source_pretrained,
            config.calibration_batches)
    evaluate_fn = None
    if config.alpha == "auto":
        if val_batches is None:
            raise ValueError("alpha='auto' needs validation data; give the Trainer a val loader.")
        cached = list(islice(val_batches, config.alpha_val_batches))
        evaluate_fn = lambda _model: evaluate(pl_module, cached)["val_loss"]  # noqa: E731
    return transport(
        source, finetuned, target, calibration, target_calibration=target_calibration,
        method=config.method, alpha=config.alpha, alpha_grid=config.alpha_grid,
        evaluate=evaluate_fn, center=config.center, whiten=config.whiten,
        completion=config.completion, solver=config.solver, depthwise=config.depthwise,
        embeddings=config.embeddings,
        depth_mapping=list(config.depth_mapping) if config.depth_mapping else None,
        bn_recalibration=config.bn_recalibration, strict=config.strict, progress=progress,
    )

