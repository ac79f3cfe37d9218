"""Family adapters: one small module per model family, chosen by ``describe_model``."""

from __future__ import annotations

from torch import nn

from . import (
    generic,
    hf_bert,
    hf_clip,
    hf_deberta,
    hf_decoder,
    hf_gpt2,
    hf_mpnet,
    hf_roberta,
    hf_siglip,
    hf_t5,
    hf_vit,
    timm_convnext,
    timm_efficientnet,
    timm_resnet,
    timm_vit,
)
from .base import BlockId, Family, ModelLayout, ParamRole, Point, SequenceInfo, Space, SpaceKey

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (timm_vit.FAMILY, timm_efficientnet.FAMILY, hf_bert.FAMILY, hf_mpnet.FAMILY,
              hf_t5.FAMILY, generic.FAMILY, hf_decoder.FAMILY, hf_gpt2.FAMILY,
              hf_roberta.FAMILY, hf_roberta.XLM_R_FAMILY, hf_deberta.FAMILY, hf_vit.FAMILY,
              hf_clip.FAMILY, hf_siglip.FAMILY,
              timm_convnext.FAMILY, timm_resnet.FAMILY)
}


def register_family(family: Family) -> None:
    """Add an adapter (or replace one of the same name)."""
    FAMILIES[family.name] = family


def describe_model(model: nn.Module, family: str | None = None) -> ModelLayout:
    """Describe ``model`` with the named family, or the highest-priority family that matches."""
    if family is not None:
        if family not in FAMILIES:
            raise ValueError(
                f"unknown model family {family!r}; known families: {sorted(FAMILIES)}. "
                "Register a new one with warmstart.engine.families.register_family."
            )
        return FAMILIES[family].describe(model)
    for candidate in sorted(FAMILIES.values(), key=lambda f: -f.priority):
        if candidate.matches(model):
            return candidate.describe(model)
    raise ValueError(f"no family adapter matches {type(model).__name__}")  # pragma: no cover


__all__ = [
    "FAMILIES", "BlockId", "Family", "ModelLayout", "ParamRole", "Point", "SequenceInfo", "Space",
    "SpaceKey", "describe_model", "register_family",
]
