"""Hugging Face CLIP vision tower: ``CLIPVisionModel`` and ``CLIPVisionModelWithProjection``.

``pre_layrnorm`` normalises the embeddings before the first layer (role ``norm_pre``, a norm of the
first residual space); ``post_layernorm`` normalises only the pooled class token, which is the
final norm of the other towers applied to one token (role ``final_norm``). ``visual_projection``
(no bias) maps that token into the shared image-text space, observed at its output; its rank is
at most the number of calibration images.
"""

from __future__ import annotations

from .hf_vision import VisionNames, vision_family

NAMES = VisionNames(
    embeddings=(
        ("embeddings.class_embedding", "embed.cls_token"),
        ("embeddings.position_embedding.weight", "embed.pos_embed"),
        ("embeddings.patch_embedding.weight", "embed.patch.weight"),
    ),
    norm_pre="pre_layrnorm",
    final_norm="post_layernorm",
    projection="visual_projection",
)

# transformers < 5 wraps the tower in CLIPVisionTransformer; 5 made CLIPVisionModel the tower
FAMILY = vision_family(
    "hf_clip_vision",
    ("transformers.models.clip.modeling_clip", ("CLIPVisionTransformer", "CLIPVisionModel")),
    (NAMES,))
