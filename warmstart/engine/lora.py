"""LoRA adapters (PEFT) as task vectors: read one, and move it into another base model.

A LoRA update of a linear layer is ``dW = s B A`` (``A`` [r, in], ``B`` [out, r], ``s`` =
``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA). The linear rule moves it to
``T_out^T dW T_in = s (T_out^T B) (A T_in)``: again a LoRA of rank ``r``, with no truncation. So
the factors are moved one module at a time and no full-size update is ever built: ``B' = T_out^T B``
and ``A' = A T_in``. A convolution's LoRA is the same per spatial tap of ``A``; an embedding's
(``dE = s A^T B^T``) maps ``B`` only. ``modules_to_save`` (e.g. a trained classifier) are full
tensors and move by the ordinary rules of :mod:`.update`.

Adapters are read through PEFT's public API (``PeftConfig.from_pretrained``, ``load_peft_weights``,
``get_peft_model_state_dict``); the maps come from the same statistics and matching as a full
transport (:func:`.update.compute_maps`). This module reads adapters; :mod:`.lora_move` moves
them; :mod:`.lora_out` writes the result as a PEFT adapter for the target, into the target's
weights, or into a live PEFT model.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ADAPTER_CONFIG = "adapter_config.json"  # peft.utils.CONFIG_NAME (importing peft takes seconds)
_PEFT_PREFIX = "base_model.model."
_FACTOR_KEYS = ((".lora_A.weight", "a"), (".lora_B.weight", "b"),
                (".lora_embedding_A", "a"), (".lora_embedding_B", "b"))
_SHOWN = 8


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA, ``dW = scaling * B A`` in the module's weight layout.

    ``kind`` is ``linear`` (``A`` [r, in], ``B`` [out, r]), ``conv`` (``A`` [r, in, kh, kw],
    ``B`` [out, r, 1, 1]) or ``embedding`` (``A`` [r, n_tokens], ``B`` [dim, r];
    ``dE = s A^T B^T``).
    ``alpha`` is the module's ``lora_alpha``.
    """

    a: Tensor
    b: Tensor
    scaling: float
    alpha: float
    kind: str

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def norm(self) -> float:
        """``||scaling * B A||_F`` from the two ``r x r`` Grams, without forming ``B A``."""
        a = self.a.double().reshape(self.rank, -1)
        b = self.b.double().reshape(self.b.shape[0], self.rank)
        return abs(self.scaling) * float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt())

    def dense(self) -> Tensor:
        """The full update ``dW`` of this one module (for merging into weights), in float64."""
        a, b = self.a.double(), self.b.double()
        if self.kind == "embedding":
            return self.scaling * (a.T @ b.T)
        if self.kind == "conv":
            return self.scaling * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
        return self.scaling * (b @ a)


@dataclass(frozen=True)
class LoraSource:
    """A LoRA adapter read against its base model.

    ``modules``: source module name -> factors; ``saved``: the ``modules_to_save`` parameters
    (full tensors) by source parameter name; ``config``: the adapter's ``LoraConfig``.
    """

    config: Any
    modules: Mapping[str, LoraFactors]
    saved: Mapping[str, Tensor]
    origin: str

    def finetuned_tensors(self, source: nn.Module) -> dict[str, Tensor]:
        """The tensors of ``source`` that the adapter changes, as the finetuned model has them:
        ``W + scaling B A`` for every LoRA module and the ``modules_to_save`` values, on the
        source's device and in its dtypes. What ``torch.func.functional_call(source, ...)``
        needs to run the finetuned source without merging into it."""
        tensors = source.state_dict()
        merged = {}
        for name, f in self.modules.items():
            weight = tensors[f"{name}.weight"]
            merged[f"{name}.weight"] = (weight.double() + f.dense().to(weight.device)
                                        ).to(weight.dtype)
        for name, value in self.saved.items():
            merged[name] = value.to(tensors[name].device, tensors[name].dtype)
        return merged


def is_adapter(obj: Any) -> bool:
    """A PEFT adapter folder (or its ``adapter_config.json``), or a model carrying ``peft_config``
    (a ``PeftModel``); cheap, imports nothing."""
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        return path.name == ADAPTER_CONFIG or (path / ADAPTER_CONFIG).is_file()
    return isinstance(obj, nn.Module) and isinstance(getattr(obj, "peft_config", None), Mapping)


def read_adapter(adapter: Any, source: nn.Module, adapter_name: str | None = None) -> LoraSource:
    """The LoRA factors and ``modules_to_save`` of ``adapter`` (a folder or a PEFT model), named
    as ``source``'s modules and checked against their shapes."""
    wrapped = next((n for n, m in source.named_modules() if hasattr(m, "lora_A")), None)
    if wrapped is not None or is_adapter(source):
        raise ValueError(
            f"source_pretrained carries PEFT layers (e.g. {wrapped!r}): get_peft_model wraps the "
            "model it is given in place, so this is no longer the base model. Pass a base model "
            "without adapters (copy.deepcopy it before get_peft_model, or load it again).")
    if isinstance(adapter, (str, os.PathLike)):
        config, state, origin = _read_folder(Path(adapter))
    elif is_adapter(adapter):
        from peft import get_peft_model_state_dict

        name = adapter_name or active_adapter(adapter)
        if name not in adapter.peft_config:
            raise ValueError(f"the PEFT model has no adapter {name!r}; its adapters are "
                             f"{sorted(adapter.peft_config)}.")
        config, origin = adapter.peft_config[name], f"PEFT model adapter {name!r}"
        check_config(config, origin)
        state = get_peft_model_state_dict(adapter, adapter_name=name)
    else:
        raise TypeError(f"a LoRA adapter is a PEFT adapter folder (adapter_config.json + "
                        f"adapter_model.safetensors) or a peft.PeftModel, got "
                        f"{type(adapter).__name__}.")
    return _parse(config, {k: v.detach().cpu() for k, v in state.items()}, source, origin)


def active_adapter(model: nn.Module) -> str:
    """The one active adapter of a PEFT model (several need ``adapter_name``)."""
    active = getattr(model, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        active = active[0] if len(active) == 1 else None
    if not isinstance(active, str):
        names = sorted(getattr(model, "peft_config", {}))
        if len(names) != 1:
            raise ValueError(f"the PEFT model has several adapters {names} and no single active "
                             "one; pass adapter_name=...")
        active = names[0]
    return active


def _read_folder(path: Path) -> tuple[Any, dict[str, Tensor], str]:
    if path.name == ADAPTER_CONFIG:
        path = path.parent
    if not path.is_dir() or not (path / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(
            f"{path} is not a PEFT adapter folder: it has no {ADAPTER_CONFIG}; pass the folder "
            "that PeftModel.save_pretrained wrote.")
    from peft import PeftConfig
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, load_peft_weights

    origin = f"adapter {path}"
    try:
        config = PeftConfig.from_pretrained(str(path))
    except Exception as err:  # json, unknown peft_type, bad fields: peft raises many types
        raise ValueError(f"could not read {path / ADAPTER_CONFIG}: {type(err).__name__}: {err}; "
                         "the adapter config is damaged: write it again with "
                         "PeftModel.save_pretrained.") from err
    check_config(config, origin)
    if not any((path / n).is_file() for n in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)):
        raise FileNotFoundError(f"{origin} has no {SAFETENSORS_WEIGHTS_NAME} (nor {WEIGHTS_NAME});"
                                " copy the whole adapter folder.")
    try:
        state = load_peft_weights(str(path), device="cpu")
    except Exception as err:  # safetensors and torch raise their own types
        raise ValueError(f"could not read the weights of {origin}: {type(err).__name__}: {err}; "
                         "the file is damaged or incomplete: save the adapter again with "
                         "PeftModel.save_pretrained.") from err
    return config, state, origin


# Config fields whose adapters the factor rules cannot move, with why and what to do instead.
_MERGE = ("merge the adapter into its base model (PeftModel.merge_and_unload()) and pass the "
          "merged model as a full fine-tuned source")
_UNSUPPORTED = (
    ("use_dora", "DoRA (use_dora=True) rescales every output channel by the norm of the merged "
     "weight, which no map moves exactly"),
    ("fan_in_fan_out", "fan_in_fan_out=True (GPT-2 style Conv1D layers): no warmstart family "
     "describes those layers"),
    ("lora_bias", "lora_bias=True adds a bias to every B factor, which the adapter output rules "
     "do not move"),
    ("use_qalora", "QALoRA (use_qalora=True) pools the inputs of A"),
    ("alora_invocation_tokens", "aLoRA (alora_invocation_tokens) activates only after its "
     "invocation tokens"),
    ("layer_replication", "layer_replication builds a model whose layers the family cannot see"),
    ("target_parameters", "target_parameters puts LoRA on bare parameters (e.g. MoE experts)"),
    ("trainable_token_indices", "trainable_token_indices trains single embedding rows"),
    ("use_bdlora", "BD-LoRA (use_bdlora) constrains the factors to blocks"),
)


def check_config(config: Any, origin: str) -> None:
    """Only plain LoRA (optionally rsLoRA, rank/alpha patterns, modules_to_save) is moved."""
    kind = getattr(config.peft_type, "value", config.peft_type)
    if kind != "LORA":
        raise ValueError(
            f"{origin} is a {kind} adapter; warmstart moves LoRA adapters (peft_type LORA) only: "
            f"the parameters of {kind} have no counterpart in the model's coordinate spaces. "
            f"Use a LoRA adapter, or {_MERGE} if the method can be merged.")
    bias = getattr(config, "bias", "none")
    found = [why for field, why in _UNSUPPORTED if getattr(config, field, None)]
    if bias != "none":
        found.append(f"bias={bias!r} trains the base model's biases")
    if found:
        raise ValueError(f"{origin} cannot be moved as LoRA factors: {'; '.join(found)}. "
                         f"Instead, {_MERGE}.")


def _parse(config: Any, state: dict[str, Tensor], source: nn.Module, origin: str) -> LoraSource:
    if all(k.startswith(_PEFT_PREFIX) for k in state):
        state = {k[len(_PEFT_PREFIX):]: v for k, v in state.items()}
    parts: dict[str, dict[str, Tensor]] = defaultdict(dict)
    embedding: set[str] = set()
    rest: dict[str, Tensor] = {}
    for key, value in state.items():
        for suffix, field in _FACTOR_KEYS:
            if key.endswith(suffix):
                parts[key[:-len(suffix)]][field] = value
                if "embedding" in suffix:
                    embedding.add(key[:-len(suffix)])
                break
        else:
            rest[key] = value
    if not parts and not rest:
        raise ValueError(f"{origin} holds no LoRA factors; is it an empty or damaged adapter?")
    half = sorted(m for m, p in parts.items() if set(p) != {"a", "b"})
    if half:
        raise ValueError(f"{origin} is damaged: module(s) {half[:_SHOWN]} have only one of the "
                         "two LoRA factors (A and B); save the adapter again.")
    saved_modules = list(getattr(config, "modules_to_save", None) or [])
    stray = sorted(k for k in rest if not any(_under(k, m) for m in saved_modules))
    if stray:
        raise ValueError(f"{origin} holds entries {stray[:_SHOWN]} that are neither LoRA factors "
                         f"nor parameters of its modules_to_save {saved_modules}; it is damaged "
                         "or not a LoRA adapter.")
    names = _aligned([*parts, *rest], source, origin)
    modules = {names[m]: _factors(config, m, p, names[m], m in embedding, source, origin)
               for m, p in parts.items()}
    params = dict(source.state_dict())
    saved = {}
    for key, value in rest.items():
        want = params[names[key]]
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(f"{origin} was trained on another base model: its modules_to_save "
                             f"entry {key!r} has shape {tuple(value.shape)}, the source's "
                             f"{names[key]!r} has {tuple(want.shape)}. Pass the base model the "
                             "adapter was trained on as source_pretrained.")
        saved[names[key]] = value
    return LoraSource(config, modules, saved, origin)


def _under(key: str, module: str) -> bool:
    return key.startswith(module + ".") or f".{module}." in key


def _aligned(keys: list[str], source: nn.Module, origin: str) -> dict[str, str]:
    """Adapter names -> source names: as they are, or with a wrapper prefix removed or added (an
    adapter trained on ``BertForSequenceClassification`` read against its ``BertModel``)."""
    known = {n for n, _ in source.named_modules()} | set(source.state_dict())
    tops = sorted({n.split(".", 1)[0] for n in known if "." in n})
    candidates = [lambda k: k]
    for cut in (1, 2):
        candidates.append(lambda k, c=cut: k.split(".", c)[-1] if k.count(".") >= c else k)
    candidates += [lambda k, t=t: f"{t}.{k}" for t in tops]
    best = max(candidates, key=lambda f: sum(f(k) in known for k in keys))
    missing = sorted(k for k in keys if best(k) not in known)
    if missing:
        raise ValueError(
            f"{origin} was trained on another base model: {len(missing)} of its modules are not "
            f"in the source model {type(source).__name__} ({', '.join(missing[:_SHOWN])}"
            f"{', ...' if len(missing) > _SHOWN else ''}). Pass the base model the adapter was "
            "trained on (the same class, e.g. its *ForSequenceClassification) as "
            "source_pretrained.")
    return {k: best(k) for k in keys}


def _factors(config, key: str, part: Mapping[str, Tensor], name: str, embedding: bool,
             source: nn.Module, origin: str) -> LoraFactors:
    from peft.utils.other import get_pattern_key

    a, b = part["a"], part["b"]
    module = source.get_submodule(name)
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Embedding) or embedding:
        kind, want_a, want_b = "embedding", (a.shape[0], *weight.shape[:1]), (weight.shape[1],)
    elif isinstance(module, nn.modules.conv._ConvNd):
        kind, want_a, want_b = "conv", (a.shape[0], *weight.shape[1:]), (weight.shape[0],)
    elif isinstance(module, nn.Linear):
        kind, want_a, want_b = "linear", (a.shape[0], weight.shape[1]), (weight.shape[0],)
    else:
        raise ValueError(f"{origin}: module {name!r} is a {type(module).__name__}; warmstart "
                         "moves LoRA on nn.Linear, convolutions and nn.Embedding only.")
    if tuple(a.shape) != want_a or tuple(b.shape[:1]) != want_b or b.shape[1] != a.shape[0]:
        raise ValueError(
            f"{origin} was trained on another base model: module {name!r} has LoRA factors A "
            f"{tuple(a.shape)} and B {tuple(b.shape)}, which do not fit its weight "
            f"{tuple(weight.shape)}. Pass the base model the adapter was trained on as "
            "source_pretrained.")
    rank_pattern, alpha_pattern = config.rank_pattern or {}, config.alpha_pattern or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), key), config.r)
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), key), config.lora_alpha)
    if int(r) != a.shape[0]:
        raise ValueError(f"{origin} is inconsistent: its config gives module {key!r} rank {r}, "
                         f"its weights rank {a.shape[0]}; save the adapter again.")
    scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    return LoraFactors(a, b, float(scaling), float(alpha), kind)
