"""timm ``VisionTransformer``: pre-norm blocks with a fused ``attn.qkv`` projection."""

from __future__ import annotations

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
    instance_of,
    linear_params,
    norm_params,
    transformer_block_spaces,
)


def _prepare(model: nn.Module, images: Any) -> tuple[Any, SequenceInfo]:
    """Resize calibration images to the model's own input size; describe its token layout."""
    size = tuple(model.patch_embed.img_size)
    if isinstance(images, Tensor) and images.ndim != 4:
        raise ValueError(f"ViT calibration batches must be images [B, C, H, W], got a tensor of "
                         f"shape {tuple(images.shape)}; pass the image tensors (no labels).")
    if isinstance(images, Tensor) and tuple(images.shape[-2:]) != size:
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    info = SequenceInfo(prefix=model.num_prefix_tokens, grid=tuple(model.patch_embed.grid_size))
    return images, info


def describe(model: nn.Module) -> ModelLayout:
    blocks = tuple(BlockId(0, i) for i in range(len(model.blocks)))
    spaces: list[Space] = []
    params: list[ParamRole] = []
    d = model.embed_dim
    for bid, block in zip(blocks, model.blocks):
        p = f"blocks.{bid.index}"
        resid, hidden = SpaceKey(bid, "resid"), SpaceKey(bid, "mlp_hidden")
        q, k, v = (SpaceKey(bid, f"attn_{n}") for n in "qkv")
        fused = tuple(Point(f"{p}.attn.qkv", "out", "proj", features=(j * d, (j + 1) * d))
                      for j in range(3))
        # Pooled features are in the coordinates of the tokens they pool.
        extra = (Point("head", "in", "head_in"),) if bid == blocks[-1] else ()
        spaces += transformer_block_spaces(bid, d, block.mlp.fc1.out_features, fused,
                                           f"{p}.attn.proj", f"{p}.mlp.fc1", f"{p}.mlp.fc2", extra)
        qkv = block.attn.qkv
        for j, (name, space) in enumerate(zip("qkv", (q, k, v))):
            rows = (j * d, (j + 1) * d)
            params.append(ParamRole(f"{p}.attn.qkv.weight", f"attn.{name}.weight", bid, "linear",
                                    space, resid, rows))
            if qkv.bias is not None:
                params.append(ParamRole(f"{p}.attn.qkv.bias", f"attn.{name}.bias", bid, "vector",
                                        space, None, rows))
        params += linear_params(f"{p}.attn.proj", block.attn.proj, "attn.o", bid, resid, v)
        params += linear_params(f"{p}.mlp.fc1", block.mlp.fc1, "mlp.fc1", bid, hidden, resid)
        params += linear_params(f"{p}.mlp.fc2", block.mlp.fc2, "mlp.fc2", bid, resid, hidden)
        params += norm_params(f"{p}.norm1", "norm1", bid, resid, block.norm1)
        params += norm_params(f"{p}.norm2", "norm2", bid, resid, block.norm2)
        for ls in ("ls1", "ls2"):
            if hasattr(getattr(block, ls), "gamma"):
                params.append(ParamRole(f"{p}.{ls}.gamma", f"{ls}.gamma", bid, "gain", resid))
    first, last = SpaceKey(blocks[0], "resid"), SpaceKey(blocks[-1], "resid")
    for name in ("cls_token", "reg_token", "pos_embed"):
        if getattr(model, name, None) is not None:
            params.append(ParamRole(name, f"embed.{name}", None, "embedding", first))
    params += [ParamRole(f"patch_embed.proj.{n}", f"embed.patch.{n}", None, "embedding", first)
               for n, _ in model.patch_embed.proj.named_parameters()]
    params += norm_params("norm", "final_norm", None, last, model.norm)
    params += norm_params("fc_norm", "fc_norm", None, last, model.fc_norm)
    if isinstance(model.head, nn.Linear):
        params.append(ParamRole("head.weight", "head.weight", None, "head", None, last))
        if model.head.bias is not None:
            params.append(ParamRole("head.bias", "head.bias", None, "head_bias"))
    return ModelLayout("timm_vit", (blocks,), tuple(spaces), tuple(params), prepare=_prepare)


FAMILY = Family("timm_vit", instance_of("timm.models.vision_transformer", "VisionTransformer"),
                describe, priority=10)
