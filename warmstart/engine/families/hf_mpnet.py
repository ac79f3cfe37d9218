"""Hugging Face ``MPNetModel`` (e.g. all-mpnet-base-v2), alone or as the backbone of a
classifier."""

from __future__ import annotations

from torch import nn

from .base import Family, find_submodule
from .hf_encoder import EncoderNames, describe_encoder

NAMES = EncoderNames(
    query="attention.attn.q",
    key="attention.attn.k",
    value="attention.attn.v",
    attn_out="attention.attn.o",
    attn_norm="attention.LayerNorm",
    embeddings=(
        ("embeddings.word_embeddings.weight", "embed.tokens"),
        ("embeddings.position_embeddings.weight", "embed.positions"),
        ("encoder.relative_attention_bias.weight", "embed.relative_attention_bias"),
    ),
)


def _mpnet_cls():
    from transformers import MPNetModel

    return MPNetModel


def _matches(model: nn.Module) -> bool:
    return find_submodule(model, _mpnet_cls()) is not None


FAMILY = Family("hf_mpnet", _matches,
                lambda m: describe_encoder(m, "hf_mpnet", _mpnet_cls(), NAMES))
