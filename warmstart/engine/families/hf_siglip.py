"""Hugging Face ``SiglipVisionModel``: CLIP's layer names, no class token, ``post_layernorm`` over
all tokens, and an attention-pooling ``head``.

The pooling head keeps a zero delta (listed in the report): its ``nn.MultiheadAttention``
computes the query, key, value and output projections inside one functional call, so no forward
hook observes the coordinates those weights act on, and its query is one learned probe (a single
row), so no statistic could determine a map for it. Its LayerNorm and MLP alone could be
observed, but the head is left whole rather than half moved around an attention that keeps the
target's weights.
``SiglipForImageClassification`` does not use this head (it mean-pools the tokens).
"""

from __future__ import annotations

from .hf_vision import VisionNames, vision_family

NAMES = VisionNames(
    embeddings=(
        ("embeddings.position_embedding.weight", "embed.pos_embed"),
        ("embeddings.patch_embedding.weight", "embed.patch.weight"),
        ("embeddings.patch_embedding.bias", "embed.patch.bias"),
    ),
    final_norm="post_layernorm",
    excluded=(("head", "SigLIP's attention-pooling head: its fused nn.MultiheadAttention is "
                       "not observable by forward hooks and its query is one learned probe"),),
    class_tokens=0,
)

# transformers < 5 wraps the tower in SiglipVisionTransformer; 5 made SiglipVisionModel the tower
FAMILY = vision_family(
    "hf_siglip_vision",
    ("transformers.models.siglip.modeling_siglip",
     ("SiglipVisionTransformer", "SiglipVisionModel")),
    (NAMES,))
