"""Hugging Face ``ViTModel`` (alone, or inside ``ViTForImageClassification``): pre-norm layers, a
class token, a final ``layernorm`` and, on the bare model, a ``pooler``.

transformers 5 renamed the layer modules (``attention.q_proj`` ... ``mlp.fc2`` directly in
``layers``); earlier releases nest them as ``encoder.layer.N.attention.attention.query`` ...
``output.dense``. Both layouts are described.
"""

from __future__ import annotations

import dataclasses

from .hf_vision import VisionNames, vision_family

NAMES = VisionNames(
    layers="layers",
    query="attention.q_proj",
    key="attention.k_proj",
    value="attention.v_proj",
    attn_out="attention.o_proj",
    norm1="layernorm_before",
    norm2="layernorm_after",
    mlp_in="mlp.fc1",
    mlp_out="mlp.fc2",
    embeddings=(
        ("embeddings.cls_token", "embed.cls_token"),
        ("embeddings.mask_token", "embed.mask_token"),
        ("embeddings.position_embeddings", "embed.pos_embed"),
        ("embeddings.patch_embeddings.projection.weight", "embed.patch.weight"),
        ("embeddings.patch_embeddings.projection.bias", "embed.patch.bias"),
    ),
    final_norm="layernorm",
    pooler="pooler.dense",
)

LEGACY_NAMES = dataclasses.replace(  # transformers < 5
    NAMES,
    layers="encoder.layer",
    query="attention.attention.query",
    key="attention.attention.key",
    value="attention.attention.value",
    attn_out="attention.output.dense",
    mlp_in="intermediate.dense",
    mlp_out="output.dense",
)

FAMILY = vision_family("hf_vit", ("transformers.models.vit.modeling_vit", ("ViTModel",)),
                       (NAMES, LEGACY_NAMES))
