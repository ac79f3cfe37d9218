"""Task heads of the Hugging Face auto classes (``families/hf_heads``, ``engine/head_hidden``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    MPNetConfig,
    MPNetForSequenceClassification,
    MPNetModel,
)

from warmstart.engine.families import describe_model
from warmstart.engine.head_hidden import PASS_THROUGH_SCALE
from warmstart.engine.transport import transport
from warmstart.lightning import assets


def _bert(cls=BertForSequenceClassification, hidden=32, layers=2, labels=2, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=2 * hidden, num_labels=labels,
                        max_position_embeddings=64)
    return cls(config).eval()


def _mpnet(cls=MPNetForSequenceClassification, hidden=48, layers=3, labels=2, seed=1):
    torch.manual_seed(seed)
    config = MPNetConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=4, intermediate_size=2 * hidden, num_labels=labels,
                         max_position_embeddings=64)
    return cls(config).eval()


def _finetuned(model, seed=3):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return out


def _calibration(n=3, batch=8, length=12, seed=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 100, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        mask[: batch // 2, length // 2:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _every_tensor_listed(report, target) -> None:
    listed = {p.name.split("[")[0] for p in report.params} | {n for n, _ in report.skipped}
    floats = {n for n, v in target.state_dict().items() if v.is_floating_point()}
    assert floats <= listed, floats - listed


def test_bert_pooler_and_mpnet_dense_play_the_same_head_role():
    heads_b = {p.role: p for p in describe_model(_bert()).params if p.role.startswith("head")}
    heads_m = {p.role: p for p in describe_model(_mpnet()).params if p.role.startswith("head")}
    assert set(heads_b) == set(heads_m) == {"head.dense.weight", "head.dense.bias",
                                            "head.weight", "head.bias"}
    assert heads_b["head.dense.weight"].name == "bert.pooler.dense.weight"
    assert heads_m["head.dense.weight"].name == "classifier.dense.weight"
    assert heads_m["head.weight"].name == "classifier.out_proj.weight"
    # a bare backbone's pooler stays a backbone layer: no head
    assert not [p for p in describe_model(_bert(BertModel)).params if p.role.startswith("head")]


@pytest.mark.parametrize("direction", ["bert_to_mpnet", "mpnet_to_bert"])
def test_sequence_classifiers_move_strictly_in_both_directions(direction):
    source, target = (_bert(), _mpnet()) if direction == "bert_to_mpnet" else (_mpnet(), _bert())
    finetuned = _finetuned(source)
    before = copy.deepcopy(target.state_dict())
    report = transport(source, finetuned, target, _calibration(), progress=False, strict=True)
    _every_tensor_listed(report, target)
    rules = {p.name: p.rule for p in report.params}
    dense = "classifier.dense" if direction == "bert_to_mpnet" else "bert.pooler.dense"
    out = "classifier.out_proj" if direction == "bert_to_mpnet" else "classifier"
    assert rules[f"{dense}.weight"] == "head_linear" and rules[f"{out}.weight"] == "head"
    hidden = [m for m in report.maps if m.target_space == "head_hidden"]
    assert hidden and hidden[0].rank == min(hidden[0].d_source, hidden[0].d_target)
    state = target.state_dict()
    d_s = finetuned.state_dict()[
        "bert.pooler.dense.weight" if direction == "bert_to_mpnet"
        else "classifier.dense.weight"].shape[0]
    if direction == "bert_to_mpnet":  # wider head: the extra units keep their rows, zero output
        torch.testing.assert_close(state[f"{dense}.weight"][d_s:], before[f"{dense}.weight"][d_s:])
        assert state[f"{out}.weight"][:, d_s:].abs().max() == 0
        torch.testing.assert_close(state[f"{out}.weight"][:, :d_s],
                                   finetuned.state_dict()["classifier.weight"])


def test_a_head_with_other_classes_fails_and_leaves_the_target_untouched():
    source, target = _bert(labels=2), _mpnet(labels=3)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match="same classes"):
        transport(source, _finetuned(source), target, _calibration(), progress=False)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())


class OneLayerHead(nn.Module):
    """A user's module: an encoder and one linear layer on the first token."""

    def __init__(self, encoder: nn.Module, labels: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, labels)

    def forward(self, input_ids, attention_mask=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        return self.head(hidden[:, 0])


def test_a_two_layer_source_head_into_a_one_layer_target_head_is_refused_under_strict():
    source, target = _bert(), OneLayerHead(_mpnet(MPNetModel))
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match="has one layer; no rule drops it"):
        transport(source, _finetuned(source), target, _calibration(), progress=False)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())


def test_a_one_layer_source_head_passes_through_the_target_two_layer_head():
    encoder = _bert(BertModel, hidden=32)
    encoder.pooler = None  # unused by the module's forward
    source, target = OneLayerHead(encoder), _mpnet(hidden=48)
    finetuned = _finetuned(source)
    report = transport(source, finetuned, target, _calibration(), progress=False, strict=True)
    decided = {p.name: p.rule for p in report.params if p.rule == "head_pass_through"}
    assert set(decided) == {"classifier.dense.weight", "classifier.dense.bias"}
    state = target.state_dict()
    torch.testing.assert_close(state["classifier.dense.weight"],
                               PASS_THROUGH_SCALE * torch.eye(48))
    assert state["classifier.dense.bias"].abs().max() == 0
    # the output layer reads the passed-through features through the stream's map divided by c
    ratio = state["classifier.out_proj.weight"].norm() / finetuned.head.weight.detach().norm()
    assert ratio == pytest.approx(1 / PASS_THROUGH_SCALE, rel=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(not (assets.available("minilm") and assets.available("mpnet")),
                    reason="needs the offline MiniLM and MPNet weight packages")
@pytest.mark.parametrize("direction", ["minilm_to_mpnet", "mpnet_to_minilm"])
def test_packaged_minilm_and_mpnet_sequence_classifiers_move_strictly(direction):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    mini = AutoModelForSequenceClassification.from_pretrained(assets.minilm_dir(), num_labels=2)
    mp = AutoModelForSequenceClassification.from_pretrained(assets.mpnet_dir(), num_labels=2)
    source, target = (mini, mp) if direction == "minilm_to_mpnet" else (mp, mini)
    texts = ["a gripping, funny film", "dull and far too long", "the cast is wonderful",
             "I hated every minute of it"]

    def batches(model_dir):
        tok = AutoTokenizer.from_pretrained(model_dir)
        return [dict(tok(texts, padding=True, return_tensors="pt"))]

    dirs = (assets.minilm_dir(), assets.mpnet_dir())
    cal_s, cal_t = (batches(d) for d in (dirs if direction == "minilm_to_mpnet" else dirs[::-1]))
    report = transport(source, _finetuned(source), target, cal_s, target_calibration=cal_t,
                       progress=False, strict=True, solver="eigh")  # eigh: the faster maps
    _every_tensor_listed(report, target)
    assert {p.rule for p in report.params if p.role.startswith("head")} == {
        "head_linear", "head_vector", "head", "head_bias"}
    assert all(reason.startswith("zero delta") for _, reason in report.skipped)
