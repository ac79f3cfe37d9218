"""Hugging Face ``BertModel`` (e.g. all-MiniLM-L6-v2), alone or as the backbone of a classifier."""

from __future__ import annotations

from torch import nn

from .base import Family, find_submodule
from .hf_encoder import EncoderNames, describe_encoder

NAMES = EncoderNames(
    embeddings=(
        ("embeddings.word_embeddings.weight", "embed.tokens"),
        ("embeddings.position_embeddings.weight", "embed.positions"),
        ("embeddings.token_type_embeddings.weight", "embed.token_type"),
    ),
)


def _bert_cls():
    from transformers import BertModel

    return BertModel


def _matches(model: nn.Module) -> bool:
    return find_submodule(model, _bert_cls()) is not None


FAMILY = Family("hf_bert", _matches, lambda m: describe_encoder(m, "hf_bert", _bert_cls(), NAMES))
