"""Hugging Face ``DebertaV2Model`` (DeBERTa-v2 and -v3): post-norm layers with disentangled
relative attention.

Each layer projects the shared relative position embeddings (``encoder.rel_embeddings``, after
the optional ``encoder.LayerNorm``) with its own key and query projections: ``key_proj`` /
``query_proj`` themselves when ``share_att_key`` (v3), else ``pos_key_proj`` / ``pos_query_proj``.
A position key is scored against content queries, so ``pos_key_proj`` writes into the key space;
a position query is scored against content keys, so ``pos_query_proj`` writes into the query space.
Both read the relative embeddings, which are in the hidden-state coordinates (with
``share_att_key`` one projection reads both), so their input is the layer's residual space.

The relative embeddings are position embeddings: zero delta by default like the others (their
rows are position buckets, not tokens, and no calibration row observes them); with
``embeddings="map"`` their feature dimension moves by the first block's map. Their LayerNorm is a
norm of that space and is transported as one. Two optional parts keep a zero delta, listed in the
report: the convolution beside the first layer (``conv_kernel_size > 0``: a grouped ``Conv1d``
over neighbouring tokens, which no rule moves) and the embedding projection that exists when
``embedding_size != hidden_size`` (part of the token embeddings).
"""

from __future__ import annotations

from torch import nn

from .base import Family, find_submodule
from .hf_encoder import EncoderNames, describe_encoder

NAMES = EncoderNames(
    query="attention.self.query_proj",
    key="attention.self.key_proj",
    value="attention.self.value_proj",
    embeddings=(
        ("embeddings.word_embeddings.weight", "embed.tokens"),
        ("embeddings.position_embeddings.weight", "embed.positions"),
        ("embeddings.token_type_embeddings.weight", "embed.token_type"),
        ("encoder.rel_embeddings.weight", "embed.relative"),
    ),
    extra_linear=(
        ("attention.self.pos_key_proj", "attn.pos_k", "attn_k", "resid"),
        ("attention.self.pos_query_proj", "attn.pos_q", "attn_q", "resid"),
    ),
    model_norms=(("encoder.LayerNorm", "rel.norm"),),
    excluded=(
        ("encoder.conv", "DeBERTa's convolution beside the first layer (a grouped Conv1d over "
                         "neighbouring tokens) has no transport rule"),
        ("embeddings.embed_proj", "DeBERTa's embedding projection is part of the token "
                                  "embeddings, which keep a zero delta"),
    ),
)


def _deberta_cls():
    from transformers import DebertaV2Model

    return DebertaV2Model


def _matches(model: nn.Module) -> bool:
    return find_submodule(model, _deberta_cls()) is not None


FAMILY = Family("hf_deberta", _matches,
                lambda m: describe_encoder(m, "hf_deberta", _deberta_cls(), NAMES))
