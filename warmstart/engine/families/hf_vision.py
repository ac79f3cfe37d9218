"""Hugging Face pre-norm vision towers (ViT, CLIP, SigLIP), described by a table of module names.

A tower is patch embeddings (plus class token and positions), an optional norm before the layers,
layers of ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, and a final norm. Every norm reads and
writes the residual stream, so its gain and shift live in the residual space of its block. The
roles are timm ViT's (``norm1``, ``norm2``, ``final_norm``, ``embed.cls_token``, ...), so an HF
ViT pairs with a timm ViT, and the towers pair with each other where their parts correspond.

Token rows pair as in ``timm_vit``: the class token apart, the patch grid of the source resized to
the target's, so towers of different image or patch sizes pair.

A family file gives the tower classes (by name: a class missing from the installed transformers
is skipped) and one table per module layout it supports (transformers 5 renamed ViT's modules);
the first table whose layers exist in the found tower describes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import import_module
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    BlockId,
    Family,
    ModelLayout,
    ParamRole,
    Point,
    SequenceInfo,
    Space,
    SpaceKey,
    join,
    linear_params,
    norm_params,
    transformer_block_spaces,
)
from .hf_encoder import _has, _has_param
from .hf_heads import describe_head


@dataclass(frozen=True)
class VisionNames:
    """Module names inside one layer and in the tower; ``""`` marks a part the tower lacks."""

    layers: str = "encoder.layers"
    query: str = "self_attn.q_proj"
    key: str = "self_attn.k_proj"
    value: str = "self_attn.v_proj"
    attn_out: str = "self_attn.out_proj"
    norm1: str = "layer_norm1"
    norm2: str = "layer_norm2"
    mlp_in: str = "mlp.fc1"
    mlp_out: str = "mlp.fc2"
    embeddings: tuple[tuple[str, str], ...] = ()  # (parameter name, role): zero delta by default
    norm_pre: str = ""  # CLIP's norm between the embeddings and the first layer
    final_norm: str = ""  # over all tokens (ViT, SigLIP) or the pooled class token (CLIP)
    pooler: str = ""  # ViTModel's pooler: a backbone layer with a space of its own
    projection: str = ""  # CLIP's visual_projection, beside the tower (in its parent module)
    excluded: tuple[tuple[str, str], ...] = ()  # (tower module, reason): zero delta
    class_tokens: int = 1


Tower = tuple[str, tuple[str, ...]]  # (python module, class names)


def _classes(tower: Tower) -> tuple[type, ...]:
    module_path, names = tower
    try:
        module = import_module(module_path)
    except ImportError:
        return ()
    return tuple(getattr(module, n) for n in names if hasattr(module, n))


def find_tower(model: nn.Module, tower: Tower, tables: tuple[VisionNames, ...]
               ) -> tuple[str, nn.Module, VisionNames] | None:
    """The first submodule of a tower class with the layers of one of ``tables``."""
    classes = _classes(tower)
    if not classes:
        return None
    for name, module in model.named_modules():
        if isinstance(module, classes):
            for names in tables:
                if _has(module, names.layers):
                    return name, module, names
    return None


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, (int, float)) else \
        (int(value[0]), int(value[1]))


def _resized(images: Tensor, size: tuple[int, int]) -> Tensor:
    if images.ndim != 4:
        raise ValueError(f"vision towers take calibration images [B, C, H, W], got a tensor of "
                         f"shape {tuple(images.shape)}; pass the image tensors (no labels).")
    if tuple(images.shape[-2:]) != size:
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    return images


def prepare_images(size: tuple[int, int], info: SequenceInfo):
    """Resize calibration images (a tensor, or ``pixel_values`` of a mapping) to the tower's own
    size, so its position embeddings fit; the token layout is the same for every batch."""
    def prepare(model: nn.Module, inputs: Any) -> tuple[Any, SequenceInfo]:
        if isinstance(inputs, Mapping) and isinstance(inputs.get("pixel_values"), Tensor):
            return {**inputs, "pixel_values": _resized(inputs["pixel_values"], size)}, info
        if isinstance(inputs, Tensor):
            return _resized(inputs, size), info
        return inputs, info
    return prepare


def describe_vision(model: nn.Module, family: str, tower: Tower,
                    tables: tuple[VisionNames, ...]) -> ModelLayout:
    found = find_tower(model, tower, tables)
    if found is None:
        raise ValueError(
            f"{type(model).__name__} holds no {'/'.join(tower[1])} whose layers are at "
            f"{' or '.join(repr(t.layers) for t in tables)}; this transformers version lays the "
            f"tower out differently. Describe it with a new table in the {family} family file."
        )
    prefix, module, names = found
    layers = module.get_submodule(names.layers)
    blocks = tuple(BlockId(0, i) for i in range(len(layers)))
    first, last = SpaceKey(blocks[0], "resid"), SpaceKey(blocks[-1], "resid")
    d = layers[0].get_submodule(names.query).in_features
    pooler = join(prefix, names.pooler) if names.pooler and _has(module, names.pooler) else None
    head_spaces, head_params, head_points, head_dense = describe_head(model, prefix, last, pooler)
    if head_dense == pooler:
        pooler = None
    projection = join(prefix.rpartition(".")[0], names.projection) if names.projection else None
    if projection is not None and not _has(model, projection):
        projection = None
    spaces: list[Space] = []
    params: list[ParamRole] = []
    for bid, layer in zip(blocks, layers):
        p = join(prefix, f"{names.layers}.{bid.index}")
        resid, hidden = SpaceKey(bid, "resid"), SpaceKey(bid, "mlp_hidden")
        q, k, v = (SpaceKey(bid, f"attn_{n}") for n in "qkv")
        extra = list(head_points) if bid == blocks[-1] else []
        if bid == blocks[-1] and pooler is not None:
            extra.append(Point(pooler, "in", "pooler_in"))
        if bid == blocks[-1] and projection is not None:  # reads the normed class token
            extra.append(Point(projection, "in", "projection_in"))
        projections = tuple(Point(f"{p}.{m}", "out", "proj")
                            for m in (names.query, names.key, names.value))
        spaces += transformer_block_spaces(
            bid, d, layer.get_submodule(names.mlp_in).out_features, projections,
            f"{p}.{names.attn_out}", f"{p}.{names.mlp_in}", f"{p}.{names.mlp_out}", tuple(extra))
        for name, role, out_space, in_space in (
            (names.query, "attn.q", q, resid),
            (names.key, "attn.k", k, resid),
            (names.value, "attn.v", v, resid),
            (names.attn_out, "attn.o", resid, v),
            (names.mlp_in, "mlp.fc1", hidden, resid),
            (names.mlp_out, "mlp.fc2", resid, hidden),
        ):
            params += linear_params(f"{p}.{name}", layer.get_submodule(name), role, bid,
                                    out_space, in_space)
        params += norm_params(f"{p}.{names.norm1}", "norm1", bid, resid,
                              layer.get_submodule(names.norm1))
        params += norm_params(f"{p}.{names.norm2}", "norm2", bid, resid,
                              layer.get_submodule(names.norm2))
    for name, role in names.embeddings:
        if _has_param(module, name):
            params.append(ParamRole(join(prefix, name), role, None, "embedding", first))
    for name, role, space in ((names.norm_pre, "norm_pre", first),
                              (names.final_norm, "final_norm", last)):
        if name and _has(module, name):
            params += norm_params(join(prefix, name), role, None, space, module.get_submodule(name))
    for name, role in ((pooler, "pooler"), (projection, "projection")):
        if name is not None:
            layer = model.get_submodule(name)
            key = SpaceKey(None, role)
            spaces.append(Space(key, layer.out_features, (Point(name, "out", "out"),)))
            params += linear_params(name, layer, role, None, key, last)
    spaces += head_spaces
    params += head_params
    excluded = {n: reason for part, reason in names.excluded if _has(module, part)
                for n, _ in module.get_submodule(part).named_parameters(join(prefix, part))}
    config = getattr(module, "config", None) or model.config
    size = _pair(config.image_size)
    patch = _pair(config.patch_size)
    info = SequenceInfo(prefix=names.class_tokens, grid=(size[0] // patch[0], size[1] // patch[1]))
    return ModelLayout(family, (blocks,), tuple(spaces), tuple(params), excluded=excluded,
                       prepare=prepare_images(size, info))


def vision_family(name: str, tower: Tower, tables: tuple[VisionNames, ...]) -> Family:
    """A registered family for the towers of ``tower`` described by ``tables``."""
    return Family(name, lambda m: find_tower(m, tower, tables) is not None,
                  lambda m: describe_vision(m, name, tower, tables))
