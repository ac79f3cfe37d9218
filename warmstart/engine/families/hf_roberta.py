"""Hugging Face ``RobertaModel`` and ``XLMRobertaModel``: BERT's post-norm layout and module names.

Only the embeddings differ from BERT: position ids start after ``padding_idx`` (RoBERTa counts
real tokens from ``pad_token_id + 1``), which changes nothing here, since token rows pair by the
attention mask and the embeddings keep a zero delta by default.
"""

from __future__ import annotations

from .base import Family, find_submodule
from .hf_bert import NAMES as BERT_NAMES
from .hf_encoder import describe_encoder

NAMES = BERT_NAMES


def _roberta_cls():
    from transformers import RobertaModel

    return RobertaModel


def _xlm_roberta_cls():
    from transformers import XLMRobertaModel

    return XLMRobertaModel


def _family(name: str, cls) -> Family:
    return Family(name, lambda m: find_submodule(m, cls()) is not None,
                  lambda m: describe_encoder(m, name, cls(), NAMES))


FAMILY = _family("hf_roberta", _roberta_cls)
XLM_R_FAMILY = _family("hf_xlm_roberta", _xlm_roberta_cls)
