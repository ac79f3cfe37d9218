"""Training batches -> the inputs of a network, for any batch format.

The default rule, :func:`default_inputs`:

- a tensor is the input;
- from a tuple or list (``(x, y)``), the first element;
- from a dict or ``BatchEncoding``, the keys that the network's ``forward`` accepts, minus label
  keys (``label``, ``labels``, ``label_ids``, ``target``, ``targets``); a ``forward`` that takes
  ``**kwargs`` (Hugging Face models) gets every other tensor. When ``forward`` names none of the
  keys (a timm model's ``forward(x)``) and the batch has one non-label tensor
  (``{"image": ..., "label": ...}``), that tensor is the input.

Anything else takes a callable ``inputs(batch) -> model inputs``, e.g. ``lambda b: b["pixels"]``,
or from YAML an import path (``inputs: my_project.data.pixels``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

InputsFn = Callable[[Any], Any]
LABEL_KEYS = ("label", "labels", "label_ids", "target", "targets")


def default_inputs(batch: Any, network: nn.Module) -> Any:
    """What ``network`` takes from ``batch`` (see the module docstring for the rule)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("an empty tuple/list batch holds no model inputs.")
        return batch[0]
    if isinstance(batch, Mapping):
        return _mapping_inputs(batch, network)
    raise TypeError(
        f"cannot take model inputs from a batch of type {type(batch).__name__}; pass "
        "inputs=<callable(batch) -> model inputs> (from YAML: an import path)."
    )


def _mapping_inputs(batch: Mapping, network: nn.Module) -> Any:
    names, takes_kwargs = forward_parameters(network)
    candidates = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    chosen = {k: v for k, v in candidates.items() if k in names or
              (takes_kwargs and isinstance(v, Tensor))}
    if chosen:
        return chosen
    tensors = [v for v in candidates.values() if isinstance(v, Tensor)]
    if len(tensors) == 1 and len(names) >= 1:
        return tensors[0]
    raise ValueError(
        f"none of the batch keys {sorted(map(str, batch))} is an argument of "
        f"{type(network).__name__}.forward{_signature(network)}; pass inputs=<callable(batch) -> "
        "model inputs> (from YAML: an import path such as my_project.data.model_inputs)."
    )


def forward_parameters(network: nn.Module) -> tuple[set[str], bool]:
    """Names ``network.forward`` accepts, and whether it takes ``**kwargs``."""
    signature = _forward_signature(network)
    if signature is None:  # builtins without a signature: assume anything goes
        return set(), True
    parameters = signature.parameters.values()
    names = {p.name for p in parameters
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in parameters)


def _forward_signature(network: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(network.forward)
    except (TypeError, ValueError):
        return None


def _signature(network: nn.Module) -> str:
    signature = _forward_signature(network)
    return "(...)" if signature is None else str(signature)


def take_inputs(batches: Iterable[Any], count: int, network: nn.Module,
                inputs: InputsFn | None = None, source_inputs: InputsFn | None = None
                ) -> tuple[list[Any], list[Any] | None]:
    """The target's inputs of the first ``count`` batches, and the source's when they differ.

    ``source_inputs`` (a callable) gives the source's own inputs for the same examples, e.g. the
    text re-tokenized by the source's tokenizer; without it the source reads the target's.
    """
    target_in, source_in = [], []
    for batch in islice(batches, count):
        target_in.append(inputs(batch) if inputs is not None else default_inputs(batch, network))
        if source_inputs is not None:
            source_in.append(source_inputs(batch))
    if not target_in:
        raise ValueError("the training data yielded no batches to calibrate on.")
    return target_in, (source_in if source_inputs is not None else None)


class TokenizeText:
    """``source_inputs`` that re-tokenize a raw-text key with the source's own tokenizer.

    For source and target models with different tokenizers: the batch must keep the raw text
    (``batch[text_key]``, a list of strings). Texts are cut to the target batch's token length
    when the batch has ``input_ids``, so the two models see the same examples. A fast tokenizer
    also returns each token's character span (``offset_mapping``, never a model input), so that
    tokens can be paired with another tokenizer's by the characters they cover.

    Args:
        tokenizer: a ``transformers`` tokenizer, a Hugging Face folder, or a packaged name
            (``minilm`` / ``mpnet``).
        text_key: the batch key holding the raw text.
    """

    def __init__(self, tokenizer: Any, text_key: str = "text") -> None:
        if isinstance(tokenizer, str):
            from .models import tokenizer_for

            name, tokenizer = tokenizer, tokenizer_for(tokenizer)
            if tokenizer is None:
                raise ValueError(f"source tokenizer {name!r} is a vision model; give a Hugging "
                                 "Face folder or packaged text model name.")
        self.tokenizer, self.text_key = tokenizer, text_key

    def __call__(self, batch: Mapping) -> dict[str, Tensor]:
        encoded = self._encode(batch)
        out = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if "offset_mapping" in encoded:  # slow (Python) tokenizers give none
            out["offset_mapping"] = encoded["offset_mapping"]
        return out

    def _encode(self, batch: Mapping) -> Any:
        if not isinstance(batch, Mapping) or self.text_key not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"the source tokenizer needs the raw text in batch[{self.text_key!r}]"
                             f", but the batch has {keys}; keep the text in the batches or set "
                             "text_key.")
        ids = batch.get("input_ids")
        length = int(ids.shape[1]) if isinstance(ids, torch.Tensor) and ids.ndim == 2 else None
        return self.tokenizer(list(batch[self.text_key]), padding=True,
                              truncation=length is not None, max_length=length,
                              return_tensors="pt",
                              return_offsets_mapping=bool(getattr(self.tokenizer, "is_fast",
                                                                  False)))


class WithOffsets:
    """Target ``inputs`` plus the character spans of the target's tokens.

    ``inputs(batch)`` gives the target's inputs as usual; ``tokenize`` (a :class:`TokenizeText`
    over the target's tokenizer) re-tokenizes the batch's raw text, and its ``offset_mapping`` is
    added when it splits the text into exactly the batch's ``input_ids`` (otherwise the spans
    would describe other tokens, and the inputs are returned as they are).
    """

    def __init__(self, inputs: InputsFn, tokenize: TokenizeText) -> None:
        self.inputs, self.tokenize = inputs, tokenize

    def __call__(self, batch: Any) -> Any:
        inputs = self.inputs(batch)
        if not isinstance(inputs, Mapping) or not isinstance(inputs.get("input_ids"), Tensor):
            return inputs
        encoded = self.tokenize(batch)
        ids = inputs["input_ids"]
        if ("offset_mapping" not in encoded or encoded["input_ids"].shape != ids.shape
                or not torch.equal(encoded["input_ids"].to(ids.device, ids.dtype), ids)):
            return inputs
        return {**inputs, "offset_mapping": encoded["offset_mapping"].to(ids.device)}


def split_differs(source_in: Mapping, target_in: Mapping) -> bool:
    """Whether two tokenizations of one batch split some example differently: other token
    counts, or (where both carry ``offset_mapping``) other character spans."""
    mask_s, mask_t = (_mask(b).bool().cpu() for b in (source_in, target_in))
    if mask_s.shape[0] != mask_t.shape[0] or not torch.equal(mask_s.sum(1), mask_t.sum(1)):
        return True
    if "offset_mapping" not in source_in or "offset_mapping" not in target_in:
        return False
    return not torch.equal(source_in["offset_mapping"].cpu()[mask_s],
                           target_in["offset_mapping"].cpu()[mask_t])


def keep_offsets_where_needed(source_in: list[Any], target_in: list[Any]) -> int:
    """Drop ``offset_mapping`` from both sides of every batch whose two tokenizations split the
    text identically (tokens then pair one to one, as without offsets); returns how many batches
    split differently."""
    differ = 0
    for i, (b_s, b_t) in enumerate(zip(source_in, target_in)):
        if not (isinstance(b_s, Mapping) and isinstance(b_t, Mapping)
                and "input_ids" in b_s and "input_ids" in b_t):
            continue
        if split_differs(b_s, b_t):
            differ += 1
            continue
        source_in[i] = {k: v for k, v in b_s.items() if k != "offset_mapping"}
        target_in[i] = {k: v for k, v in b_t.items() if k != "offset_mapping"}
    return differ


def _mask(inputs: Mapping) -> Tensor:
    mask = inputs.get("attention_mask")
    return mask if isinstance(mask, Tensor) else torch.ones_like(inputs["input_ids"])
