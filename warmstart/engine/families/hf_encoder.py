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
    find_head,
    find_submodule,
    join,
    linear_params,
    norm_params,
    transformer_block_spaces,
)


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


def prepare_text(model: nn.Module, inputs: Any) -> tuple[Any, SequenceInfo]:
    """Keep the tokenizer outputs that ``model.forward`` accepts; real tokens come from the mask."""
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        raise ValueError(
            "text models need calibration batches that are mappings with 'input_ids' (and "
            f"'attention_mask'), got {type(inputs).__name__}; tokenize the calibration text first."
        )
    params = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in inputs.items()
              if isinstance(v, Tensor) and (takes_any or k in params)}
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(inputs["input_ids"])
    return kwargs, SequenceInfo(mask=mask.bool())


def describe_encoder(model: nn.Module, family: str, cls: type, names: EncoderNames) -> ModelLayout:
    prefix, encoder = find_submodule(model, cls)
    layers = encoder.get_submodule(names.layers)
    d = encoder.config.hidden_size
    blocks = tuple(BlockId(0, i) for i in range(len(layers)))
    spaces: list[Space] = []
    params: list[ParamRole] = []
    head = find_head(model, prefix.split(".")[0])
    for bid, layer in zip(blocks, layers):
        p = join(prefix, f"{names.layers}.{bid.index}")
        resid, hidden = SpaceKey(bid, "resid"), SpaceKey(bid, "mlp_hidden")
        q, k, v = (SpaceKey(bid, f"attn_{n}") for n in "qkv")
        extra = []
        if bid == blocks[-1]:
            if head is not None:
                extra.append(Point(head[0], "in", "head_in"))
            if _has(encoder, names.pooler):
                extra.append(Point(join(prefix, names.pooler), "in", "pooler_in"))
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
        params += norm_params(f"{p}.{names.attn_norm}", "attn.norm", bid, resid,
                              layer.get_submodule(names.attn_norm))
        params += norm_params(f"{p}.{names.mlp_norm}", "mlp.norm", bid, resid,
                              layer.get_submodule(names.mlp_norm))
    first, last = SpaceKey(blocks[0], "resid"), SpaceKey(blocks[-1], "resid")
    for name, role in names.embeddings:
        if _has_param(encoder, name):
            params.append(ParamRole(join(prefix, name), role, None, "embedding", first))
    params += norm_params(join(prefix, names.embed_norm), "embed.norm", None, first,
                          encoder.get_submodule(names.embed_norm))
    if _has(encoder, names.pooler):
        pooled = SpaceKey(None, "pooler")
        spaces.append(Space(pooled, d, (Point(join(prefix, names.pooler), "out", "out"),)))
        params += linear_params(join(prefix, names.pooler), encoder.get_submodule(names.pooler),
                                "pooler", None, pooled, last)
    if head is not None:
        params.append(ParamRole(f"{head[0]}.weight", "head.weight", None, "head", None, last))
        if head[1].bias is not None:
            params.append(ParamRole(f"{head[0]}.bias", "head.bias", None, "head_bias"))
    return ModelLayout(family, (blocks,), tuple(spaces), tuple(params), prepare=prepare_text)


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
