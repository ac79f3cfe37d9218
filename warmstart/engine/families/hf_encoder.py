"""Hugging Face post-norm text encoders (BERT-like), described by a table of module names."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import (
    BlockId,
    ModelLayout,
    ParamRole,
    Point,
    SequenceInfo,
    Space,
    SpaceKey,
    find_submodule,
    join,
    linear_params,
    norm_params,
    transformer_block_spaces,
)
from .hf_heads import describe_head


@dataclass(frozen=True)
class EncoderNames:
    """Module names inside one encoder layer, and the model-level embeddings."""

    layers: str = "encoder.layer"
    query: str = "attention.self.query"
    key: str = "attention.self.key"
    value: str = "attention.self.value"
    attn_out: str = "attention.output.dense"
    attn_norm: str = "attention.output.LayerNorm"
    mlp_in: str = "intermediate.dense"
    mlp_out: str = "output.dense"
    mlp_norm: str = "output.LayerNorm"
    embeddings: tuple[tuple[str, str], ...] = ()  # (parameter name, role)
    embed_norm: str = "embeddings.LayerNorm"
    pooler: str = "pooler.dense"
    # optional parts, skipped where a model lacks them (DeBERTa's relative attention):
    extra_linear: tuple[tuple[str, str, str, str], ...] = ()  # (layer module, role, out, in space)
    model_norms: tuple[tuple[str, str], ...] = ()  # (encoder norm, role), in the first resid space
    excluded: tuple[tuple[str, str], ...] = ()  # (encoder module, reason): zero delta


def prepare_text(model: nn.Module, inputs: Any) -> tuple[Any, SequenceInfo]:
    """Keep the tokenizer outputs that ``model.forward`` accepts; real tokens come from the mask,
    character spans (for pairing with another tokenizer) from ``offset_mapping``, which, like
    ``special_tokens_mask``, is never a model input."""
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        raise ValueError(
            "text models need calibration batches that are mappings with 'input_ids' (and "
            f"'attention_mask'), got {type(inputs).__name__}; tokenize the calibration text first."
        )
    params = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in inputs.items() if isinstance(v, Tensor)
              and (takes_any or k in params) and k not in _TOKENIZER_ONLY}
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(inputs["input_ids"])
    offsets = inputs.get("offset_mapping")
    return kwargs, SequenceInfo(mask=mask.bool(),
                                offsets=offsets if isinstance(offsets, Tensor) else None)


_TOKENIZER_ONLY = ("offset_mapping", "special_tokens_mask")


def describe_encoder(model: nn.Module, family: str, cls: type, names: EncoderNames) -> ModelLayout:
    prefix, encoder = find_submodule(model, cls)
    layers = encoder.get_submodule(names.layers)
    d = encoder.config.hidden_size
    blocks = tuple(BlockId(0, i) for i in range(len(layers)))
    spaces: list[Space] = []
    params: list[ParamRole] = []
    first, last = SpaceKey(blocks[0], "resid"), SpaceKey(blocks[-1], "resid")
    pooler = join(prefix, names.pooler) if _has(encoder, names.pooler) else None
    head_spaces, head_params, head_points, head_dense = describe_head(model, prefix, last, pooler)
    if head_dense == pooler:
        pooler = None  # the pooler is the head's first layer (BERT's sequence classifier)
    for bid, layer in zip(blocks, layers):
        p = join(prefix, f"{names.layers}.{bid.index}")
        resid, hidden = SpaceKey(bid, "resid"), SpaceKey(bid, "mlp_hidden")
        q, k, v = (SpaceKey(bid, f"attn_{n}") for n in "qkv")
        extra = []
        if bid == blocks[-1]:
            extra += head_points
            if pooler is not None:
                extra.append(Point(pooler, "in", "pooler_in"))
        projections = tuple(Point(f"{p}.{m}", "out", "proj")
                            for m in (names.query, names.key, names.value))
        spaces += transformer_block_spaces(
            bid, d, layer.get_submodule(names.mlp_in).out_features, projections,
            f"{p}.{names.attn_out}", f"{p}.{names.mlp_in}", f"{p}.{names.mlp_out}", tuple(extra))
        for module, role, out_space, in_space in (
            (names.query, "attn.q", q, resid),
            (names.key, "attn.k", k, resid),
            (names.value, "attn.v", v, resid),
            (names.attn_out, "attn.o", resid, v),
            (names.mlp_in, "mlp.fc1", hidden, resid),
            (names.mlp_out, "mlp.fc2", resid, hidden),
        ):
            params += linear_params(f"{p}.{module}", layer.get_submodule(module), role, bid,
                                    out_space, in_space)
        for module, role, out_name, in_name in names.extra_linear:
            if _has(layer, module):
                params += linear_params(f"{p}.{module}", layer.get_submodule(module), role, bid,
                                        SpaceKey(bid, out_name), SpaceKey(bid, in_name))
        params += norm_params(f"{p}.{names.attn_norm}", "attn.norm", bid, resid,
                              layer.get_submodule(names.attn_norm))
        params += norm_params(f"{p}.{names.mlp_norm}", "mlp.norm", bid, resid,
                              layer.get_submodule(names.mlp_norm))
    for name, role in names.embeddings:
        if _has_param(encoder, name):
            params.append(ParamRole(join(prefix, name), role, None, "embedding", first))
    params += norm_params(join(prefix, names.embed_norm), "embed.norm", None, first,
                          encoder.get_submodule(names.embed_norm))
    for module, role in names.model_norms:
        if _has(encoder, module):
            params += norm_params(join(prefix, module), role, None, first,
                                  encoder.get_submodule(module))
    if pooler is not None:
        pooled = SpaceKey(None, "pooler")
        spaces.append(Space(pooled, d, (Point(pooler, "out", "out"),)))
        params += linear_params(pooler, model.get_submodule(pooler), "pooler", None, pooled, last)
    spaces += head_spaces
    params += head_params
    return ModelLayout(family, (blocks,), tuple(spaces), tuple(params),
                       excluded=_excluded(encoder, prefix, names), prepare=prepare_text)


def _excluded(encoder: nn.Module, prefix: str, names: EncoderNames) -> dict[str, str]:
    """Every parameter of the modules ``names.excluded`` lists, with its reason."""
    return {name: reason for module, reason in names.excluded if _has(encoder, module)
            for name, _ in encoder.get_submodule(module).named_parameters(join(prefix, module))}


def _has(module: nn.Module, name: str) -> bool:
    try:
        return module.get_submodule(name) is not None
    except AttributeError:
        return False


def _has_param(module: nn.Module, name: str) -> bool:
    try:
        module.get_parameter(name)
        return True
    except AttributeError:
        return False
