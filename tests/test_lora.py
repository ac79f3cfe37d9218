"""LoRA in, LoRA out: PEFT adapters moved as their factors (tiny random-init models, CPU).

The exactness tests build the target as a function-preserving widening of the source, so the
maps are known exactly and the moved adapter must make the target compute what the source with
its adapter computes.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft", reason="the LoRA transport needs peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, BertModel  # noqa: E402

from warmstart import transport, transport_adapter  # noqa: E402
from warmstart.engine.lora_out import transport_into_peft  # noqa: E402

BERT_MODULES = ["query", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


# ---------------------------------------------------------------------------------------------
# Models


def _bert_config(d: int, heads: int, inter: int, eps: float, layers: int = 2) -> BertConfig:
    return BertConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                      intermediate_size=inter, vocab_size=100, max_position_embeddings=32,
                      num_labels=3, layer_norm_eps=eps, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


def _bert(cls=BertForSequenceClassification, d: int = 32, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = cls(_bert_config(d, 4, 2 * d, 1e-5, layers)).eval()
    with torch.no_grad():  # non-trivial norms and biases: activations of full rank
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _duplicating(d: int, k: int, g: torch.Generator) -> torch.Tensor:
    """[d, k d], orthonormal rows: every coordinate copied k times, scaled by 1/sqrt(k), at
    permuted places. LayerNorm commutes with it (mean and variance scale, see _widen_bert)."""
    perm = torch.randperm(d * k, generator=g)
    e = torch.zeros(d, d * k)
    for i in range(d):
        e[i, perm[k * i:k * (i + 1)]] = k ** -0.5
    return e


def _partial_permutation(d: int, d_t: int, g: torch.Generator, signed: bool = False):
    e = torch.zeros(d, d_t)
    cols = torch.randperm(d_t, generator=g)[:d]
    signs = (torch.randint(0, 2, (d,), generator=g) * 2 - 1).float() if signed else 1.0
    e[torch.arange(d), cols] = signs
    return e


def _widen_bert(source: nn.Module, k: int = 2, seed: int = 5) -> tuple[nn.Module, torch.Tensor]:
    """A BERT k times wider computing ``source``'s function in the stream coordinates ``E``.

    Stream: duplication ``E`` (LayerNorm gains and shifts ``g E``, ``b E``, eps / k); attention:
    k times the heads, the source's heads first and the others silent; MLP hidden units: a
    partial permutation (GELU keeps it); pooler output: a signed partial permutation (tanh)."""
    cfg = source.config
    d, di = cfg.hidden_size, cfg.intermediate_size
    target = type(source)(_bert_config(d * k, cfg.num_attention_heads * k, di * 2,
                                       cfg.layer_norm_eps / k, cfg.num_hidden_layers)).eval()
    g = torch.Generator().manual_seed(seed)
    e, q = _duplicating(d, k, g), torch.eye(d, d * k)
    h, p = _partial_permutation(di, di * 2, g), _partial_permutation(d, d * k, g, signed=True)
    maps = {"query": (q, e), "key": (q, e), "value": (q, e), "attention.output.dense": (e, q),
            "intermediate.dense": (h, e), "output.dense": (e, h), "pooler.dense": (p, e)}
    old, new = source.state_dict(), dict(target.state_dict())
    for name, value in old.items():
        if name.endswith(("position_ids", "token_type_ids")) or name.startswith("classifier"):
            continue  # the target keeps its own buffers and (new) head
        module = next((m for m in maps if f"{m}." in name), None)
        if module is None:  # embeddings and LayerNorms: along the stream
            new[name] = value @ e
        elif name.endswith("weight"):
            new[name] = maps[module][0].T @ value @ maps[module][1]
        else:
            new[name] = value @ maps[module][0]
    target.load_state_dict(new)
    return target, e


def _texts(n_batches: int = 3, batch: int = 8, length: int = 12, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[: batch // 2, length - 3:] = 0  # padding is left out of the statistics
        out.append({"input_ids": torch.randint(5, 100, (batch, length), generator=g),
                    "attention_mask": mask})
    return out


def _lora(model: nn.Module, seed: int = 1, scale: float = 0.3, **config) -> PeftModel:
    """``model`` (copied) with a LoRA whose factors (and modules_to_save) are random: a trained
    adapter, as far as the transport can tell."""
    config.setdefault("target_modules", BERT_MODULES)
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return wrapped.eval()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, snapshot) -> bool:
    state = model.state_dict()
    return set(state) == set(snapshot) and all(torch.equal(state[k], v)
                                               for k, v in snapshot.items())


# ---------------------------------------------------------------------------------------------
# LoRA out: a PEFT adapter for the target


def test_widening_is_exact():
    source = _bert(BertModel)
    target, e = _widen_bert(source)
    x = _texts(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(target(**x).last_hidden_state,
                                   source(**x).last_hidden_state @ e, atol=1e-5, rtol=0)


def test_bert_classifier_adapter_moves_exactly_into_a_widened_bert(tmp_path):
    source = _bert()
    target, _ = _widen_bert(source)
    adapter = _lora(source, r=4, lora_alpha=8, task_type="SEQ_CLS")  # classifier: modules_to_save
    adapter.save_pretrained(tmp_path / "source_adapter")
    before = _snapshot(target)
    out = tmp_path / "target_adapter"
    report = transport_adapter(source, tmp_path / "source_adapter", target, _texts(), out,
                               progress=False)
    assert _unchanged(target, before)  # the target is only read

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert len(config["target_modules"]) == 10  # 5 modules x 2 layers, by the target's names
    assert set(config["modules_to_save"]) == {"classifier", "bert.pooler"}
    loaded = PeftModel.from_pretrained(copy.deepcopy(target), out).eval()
    ranks = {m.lora_A["default"].weight.shape[0] for m in loaded.modules()
             if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert ranks == {4}
    x = _texts(1, seed=11)[0]
    with torch.no_grad():
        expected, got = adapter(**x).logits, loaded(**x).logits
        plain = target(**x).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (plain - expected).abs().max() > 0.1  # the adapter is what makes them agree

    assert len(report.modules) == 10 and {m.rank for m in report.modules} == {4}
    for m in report.modules:  # E, Q, H have orthonormal rows: norms are kept exactly
        assert m.norm_source > 0 and m.norm_target == pytest.approx(m.norm_source, rel=1e-4)
    assert {p.rule for p in report.params} >= {"head", "head_bias"}
    written = json.loads((out / "warmstart_report.json").read_text())
    assert written["summary"]["lora_modules"] == 10.0


def _llama(d: int, inter: int, eps: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        hidden_size=d, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=100, max_position_embeddings=64,
        rms_norm_eps=eps, tie_word_embeddings=False)).eval()


def _widen_llama(source: nn.Module, seed: int = 5) -> nn.Module:
    """Twice as wide, same heads: the stream embedded by a signed partial permutation ``P``
    (RMSNorm gains ``|P|``-mapped times sqrt(d_s/d_t), eps times d_s/d_t), the SwiGLU hidden
    units by a partial permutation; attention keeps its widths."""
    cfg = source.config
    d, di = cfg.hidden_size, cfg.intermediate_size
    target = _llama(2 * d, 2 * di, cfg.rms_norm_eps / 2)
    g = torch.Generator().manual_seed(seed)
    p, h = _partial_permutation(d, 2 * d, g, signed=True), _partial_permutation(di, 2 * di, g)
    new = dict(target.state_dict())
    for name, v in source.state_dict().items():
        if "norm" in name:
            new[name] = (v @ p.abs()) * 0.5 ** 0.5
        elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            new[name] = v @ p
        elif name.endswith("o_proj.weight"):
            new[name] = p.T @ v
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            new[name] = h.T @ v @ p
        elif name.endswith("down_proj.weight"):
            new[name] = p.T @ v @ h
        else:  # token embeddings and the LM head, along the stream
            new[name] = v @ p
    target.load_state_dict(new)
    return target


def test_gqa_llama_adapter_moves_exactly_into_a_widened_llama(tmp_path):
    torch.manual_seed(0)
    source = _llama(32, 64, 1e-5)
    with torch.no_grad():
        for name, p in source.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p)).abs_()
    target = _widen_llama(source)
    adapter = _lora(source, r=4, lora_alpha=8, task_type="CAUSAL_LM",
                    target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    g = torch.Generator().manual_seed(2)
    calibration = [{"input_ids": torch.randint(0, 100, (8, 12), generator=g)} for _ in range(3)]
    report = transport_adapter(source, adapter, target, calibration, tmp_path / "a",
                               block_group=1, progress=False)  # statistics one block at a time
    assert report.target_family == "hf_decoder" and len(report.modules) == 10
    loaded = PeftModel.from_pretrained(copy.deepcopy(target), tmp_path / "a").eval()
    assert {m.r["default"] for m in loaded.modules() if hasattr(m, "r")} == {4}
    ids = torch.randint(0, 100, (4, 10), generator=g)
    with torch.no_grad():
        expected = adapter(input_ids=ids).logits
        assert (expected - source(ids).logits).abs().max() > 0.1
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-4, rtol=0)


def test_gqa_llama_adapter_moves_into_a_peft_wrapped_widened_llama_in_place():
    """The path of ``TaskVectorTransport`` for a PEFT-wrapped decoder: the family reads the
    rotary frequencies, a buffer, from the wrapper's view of the target."""
    torch.manual_seed(0)
    source = _llama(32, 64, 1e-5)
    target = _widen_llama(source)
    modules = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    adapter = _lora(source, r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=modules)
    wrapped = get_peft_model(copy.deepcopy(target), LoraConfig(
        r=4, lora_alpha=8, target_modules=modules, task_type="CAUSAL_LM")).eval()
    g = torch.Generator().manual_seed(2)
    calibration = [{"input_ids": torch.randint(0, 100, (8, 12), generator=g)} for _ in range(3)]
    report = transport_into_peft(source, adapter, wrapped, calibration, progress=False)
    assert report.target_family == "hf_decoder" and len(report.modules) == 10
    ids = torch.randint(0, 100, (4, 10), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=ids).logits, adapter(input_ids=ids).logits,
                                   atol=1e-4, rtol=0)


def test_patterns_rslora_and_alpha_go_into_the_factors(tmp_path):
    source = _bert(BertModel)
    target, e = _widen_bert(source)
    adapter = _lora(source, r=4, lora_alpha=8,
                    rank_pattern={"layer.1.attention.self.query": 2},
                    alpha_pattern={"layer.0.output.dense": 3})
    x = _texts(1, seed=11)[0]
    report = transport_adapter(source, adapter, target, _texts(), tmp_path / "a", progress=False)
    loaded = PeftModel.from_pretrained(copy.deepcopy(target), tmp_path / "a").eval()
    query = loaded.get_base_model().encoder.layer[1].attention.self.query
    assert query.r["default"] == 2 and query.scaling["default"] == 4.0
    assert loaded.get_base_model().encoder.layer[0].output.dense.scaling["default"] == 0.75
    with torch.no_grad():
        # float32 forward noise, amplified by a large random adapter (float64: 1e-7)
        torch.testing.assert_close(loaded(**x).last_hidden_state,
                                   adapter(**x).last_hidden_state @ e, atol=5e-4, rtol=0)
    assert {m.rank for m in report.modules} == {2, 4}

    rs = _lora(source, r=4, lora_alpha=8, use_rslora=True)
    report = transport_adapter(source, rs, target, _texts(), tmp_path / "rs", alpha=2.0,
                               progress=False)
    assert {m.scaling for m in report.modules} == {4.0}  # 8 / sqrt(4)
    loaded = PeftModel.from_pretrained(copy.deepcopy(target), tmp_path / "rs").eval()
    base = loaded.get_base_model().encoder.layer[0]
    src = rs.get_base_model().encoder.layer[0]
    with torch.no_grad():  # alpha = 2 doubles B' and leaves A' alone
        for name in ("attention.self.value", "intermediate.dense"):
            moved, orig = base.get_submodule(name), src.get_submodule(name)
            torch.testing.assert_close(moved.lora_B["default"].weight.norm(),
                                       2 * orig.lora_B["default"].weight.norm(), rtol=1e-4,
                                       atol=0)
            torch.testing.assert_close(moved.lora_A["default"].weight.norm(),
                                       orig.lora_A["default"].weight.norm(), rtol=1e-4, atol=0)
    for m in report.modules:
        assert m.norm_target == pytest.approx(2 * m.norm_source, rel=1e-4)


def test_transport_with_an_adapter_merges_it_module_by_module():
    """LoRA in, weights out: transport() with an adapter source adds alpha s B'A' per module."""
    source = _bert(BertModel)
    target, e = _widen_bert(source)
    adapter = _lora(source, r=4, lora_alpha=8)
    x = _texts(1, seed=11)[0]
    with torch.no_grad():
        expected = adapter(**x).last_hidden_state @ e
    report = transport(source, adapter, target, _texts(), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(target(**x).last_hidden_state, expected, atol=5e-4, rtol=0)
    assert len(report.modules) == 10
    assert sum(p.rule == "lora" for p in report.params) == 10


def test_deeper_target_pairs_blocks_by_relative_depth(tmp_path):
    source = _bert(BertModel, layers=2)
    target = _bert(BertModel, d=48, layers=3, seed=4)
    report = transport_adapter(source, _lora(source), target, _texts(), tmp_path / "a",
                               progress=False)
    by_block = sorted({m.name.split(".")[2] for m in report.modules})
    assert by_block == ["0", "1", "2"]  # target block 1 takes source block 1 (round half up)
    sources = {m.name: m.source for m in report.modules}
    assert sources["encoder.layer.1.attention.self.query"] == "encoder.layer.1.attention.self.query"
    loaded = PeftModel.from_pretrained(copy.deepcopy(target), tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.isfinite(loaded(**_texts(1)[0]).last_hidden_state).all()


# ---------------------------------------------------------------------------------------------
# Warm start of a PEFT-wrapped target


def test_into_a_peft_target_in_place_with_other_rank_and_scale():
    source = _bert()
    target, _ = _widen_bert(source)
    adapter = _lora(source, r=4, lora_alpha=8, task_type="SEQ_CLS")
    wrapped = get_peft_model(copy.deepcopy(target), LoraConfig(
        r=8, lora_alpha=4, target_modules=BERT_MODULES, task_type="SEQ_CLS")).eval()
    tensors = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    pointers = {n: p.data_ptr() for n, p in tensors.items()}
    report = transport_into_peft(source, adapter, wrapped, _texts(), progress=False)
    assert {n: p.data_ptr() for n, p in wrapped.named_parameters() if p.requires_grad} == pointers
    x = _texts(1, seed=11)[0]
    with torch.no_grad():
        torch.testing.assert_close(wrapped(**x).logits, adapter(**x).logits, atol=1e-4, rtol=0)
        with wrapped.disable_adapter():  # the encoder's base weights are untouched
            torch.testing.assert_close(wrapped.get_base_model().bert(**x).last_hidden_state,
                                       target.bert(**x).last_hidden_state, atol=0, rtol=0)
    assert len(report.modules) == 10
    notes = dict(report.skipped)  # BERT's pooler is the head's first layer, frozen in the target
    assert "written into the frozen base weight" in notes["bert.pooler.dense.weight"]

    narrow = get_peft_model(copy.deepcopy(target), LoraConfig(
        r=2, lora_alpha=4, target_modules=["query"], task_type="SEQ_CLS")).eval()
    with pytest.raises(ValueError, match="has no LoRA on 8 module"):
        transport_into_peft(source, adapter, narrow, _texts(), progress=False)
    report = transport_into_peft(source, adapter, narrow, _texts(), strict=False, progress=False)
    notes = dict(report.skipped)
    assert "left out" in notes["bert.encoder.layer.0.attention.self.value"]
    query = notes["bert.encoder.layer.0.attention.self.query"]
    assert "target rank 2 < source rank 4: kept" in query


def test_callback_warm_starts_the_lora_of_a_lightning_module(tmp_path):
    lightning = pytest.importorskip("lightning")
    from warmstart import TaskVectorTransport

    source = _bert()
    target, _ = _widen_bert(source)
    _lora(source, r=4, lora_alpha=8, task_type="SEQ_CLS").save_pretrained(tmp_path / "adapter")

    class LoraModule(lightning.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, _):
            return self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.sum()

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.0)

    wrapped = get_peft_model(copy.deepcopy(target), LoraConfig(
        r=4, lora_alpha=8, target_modules=BERT_MODULES, task_type="SEQ_CLS"))
    module = LoraModule(wrapped)
    warm = TaskVectorTransport(source, str(tmp_path / "adapter"), target_attribute="model",
                               calibration_batches=3, progress=False)
    trainer = lightning.Trainer(max_steps=1, accelerator="cpu", logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, default_root_dir=tmp_path,
                                callbacks=[warm])
    batches = [dict(b, labels=torch.zeros(8, dtype=torch.long)) for b in _texts()]
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    expected = PeftModel.from_pretrained(copy.deepcopy(source), tmp_path / "adapter").eval()
    x = _texts(1, seed=11)[0]
    with torch.no_grad():  # lr 0: the one step changed nothing
        torch.testing.assert_close(wrapped.eval()(**x).logits, expected(**x).logits, atol=1e-4,
                                   rtol=0)
    assert warm.report.summary()["lora_modules"] == 10.0
    optimizer_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in wrapped.parameters() if p.requires_grad} == optimizer_params


# ---------------------------------------------------------------------------------------------
# Bad inputs: a clear error, nothing written


def _assert_refused(tmp_path, source, adapter, target, match, error=ValueError):
    out = tmp_path / "out"
    before = _snapshot(target)
    with pytest.raises(error, match=match):
        transport_adapter(source, adapter, target, _texts(2), out, progress=False)
    assert not out.exists()
    assert _unchanged(target, before)


def test_adapter_for_another_base_is_refused(tmp_path):
    source = _bert(BertModel)
    target, _ = _widen_bert(source)
    wider = _bert(BertModel, d=48)
    _lora(wider).save_pretrained(tmp_path / "wide")
    _assert_refused(tmp_path, source, tmp_path / "wide", target,
                    r"trained on another base model: module 'encoder.layer.0.attention.output."
                    r"dense' has LoRA factors A \(8, 48\) and B \(48, 8\), which do not fit "
                    r"its weight \(32, 32\)")
    deeper = _bert(BertModel, layers=3)
    _assert_refused(tmp_path, source, _lora(deeper), target,
                    r"trained on another base model: 5 of its modules are not in the source "
                    r"model BertModel \(encoder.layer.2.attention.output.dense")


def test_damaged_adapters_are_refused(tmp_path):
    source = _bert(BertModel)
    target, _ = _widen_bert(source)
    folder = tmp_path / "adapter"
    _lora(source).save_pretrained(folder)
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _assert_refused(tmp_path, source, folder, target, r"could not read the weights of adapter .*"
                    r"damaged or incomplete")
    weights.write_bytes(data)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    _assert_refused(tmp_path, source, folder, target, r"could not read .*adapter_config.json.*"
                    "damaged")
    _assert_refused(tmp_path, source, tmp_path, target, "is not a PEFT adapter folder: it has no "
                    "adapter_config.json", FileNotFoundError)


@pytest.mark.parametrize("kind", ["ia3", "dora", "bias"])
def test_unsupported_peft_types_are_refused(tmp_path, kind):
    source = _bert(BertModel)
    target, _ = _widen_bert(source)
    if kind == "ia3":
        config = peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                feedforward_modules=["output.dense"])
        adapter, match = get_peft_model(copy.deepcopy(source), config), "is a IA3 adapter"
    else:
        extra = {"use_dora": True} if kind == "dora" else {"bias": "all"}
        adapter = get_peft_model(copy.deepcopy(source), LoraConfig(
            r=4, target_modules=BERT_MODULES, **extra))
        match = ("DoRA \\(use_dora=True\\)" if kind == "dora"
                 else "bias='all' trains the base model's biases")
    adapter.save_pretrained(tmp_path / "adapter")
    _assert_refused(tmp_path, source, tmp_path / "adapter", target,
                    f"{match}.*merge_and_unload")


def test_lora_on_the_head_moves_the_whole_head(tmp_path):
    """LoRA on BERT's head (pooler and classifier, all 'dense' layers): the target's head is new,
    so the merged head layers go into the target adapter's modules_to_save."""
    source = _bert()
    target, _ = _widen_bert(source)
    adapter = _lora(source, r=4, lora_alpha=8, scale=0.1,
                    target_modules=["dense", "query", "classifier"])
    report = transport_adapter(source, adapter, target, _texts(), tmp_path / "a", progress=False)
    assert set(report.adapter["modules_to_save"]) == {"bert.pooler", "classifier"}
    assert len(report.modules) == 8  # query and the three dense layers of each block
    loaded = PeftModel.from_pretrained(copy.deepcopy(target), tmp_path / "a").eval()
    x = _texts(1, seed=11)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, adapter(**x).logits, atol=1e-4, rtol=0)
        assert (target(**x).logits - adapter(**x).logits).abs().max() > 0.05


def test_one_layer_source_head_into_a_two_layer_target_head(tmp_path):
    """The project's text classifier (encoder, mean pooling, linear head) into BERT's sequence
    classifier (pooler -> classifier): the pooler passes the features through."""
    from warmstart.lightning.models import TextClassifierNet

    torch.manual_seed(0)
    source = TextClassifierNet(_bert(BertModel), 3).eval()
    target = _bert(d=48, seed=4)
    adapter = _lora(source, r=4, modules_to_save=["head"])
    report = transport_adapter(source, adapter, target, _texts(), tmp_path / "a", progress=False)
    assert set(report.adapter["modules_to_save"]) == {"bert.pooler", "classifier"}
    assert any(p.rule == "head_pass_through" for p in report.params)
    loaded = PeftModel.from_pretrained(copy.deepcopy(target), tmp_path / "a").eval()
    with torch.no_grad():
        assert torch.isfinite(loaded(**_texts(1)[0]).logits).all()


def test_busy_out_dir_wrapped_source_and_auto_alpha_are_refused(tmp_path):
    source = _bert()
    target, _ = _widen_bert(source)
    wrapped_in_place = copy.deepcopy(source)
    adapter = get_peft_model(wrapped_in_place, LoraConfig(r=4, target_modules=["query"]))
    _assert_refused(tmp_path, wrapped_in_place, adapter, target,
                    r"source_pretrained carries PEFT layers \(e.g. 'bert.encoder.layer.0.attention."
                    r"self.query'\): get_peft_model wraps the model it is given in place")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty; pass overwrite=True"):
        transport_adapter(source, _lora(source), target, _texts(2), busy, progress=False)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="alpha='auto' needs a validation score"):
        transport_adapter(source, _lora(source), target, _texts(2), tmp_path / "x",
                          alpha="auto", progress=False)
    with pytest.raises(ValueError, match="head_fit refits the target's head on its features "
                                         "after the write, but transport_adapter only reads"):
        transport_adapter(source, _lora(source), target, _texts(2), tmp_path / "y", head_fit=2,
                          progress=False)
    assert not (tmp_path / "y").exists()


# ---------------------------------------------------------------------------------------------
# head_fit with a LoRA source: the target's head refitted to the source-with-adapter's logits


def _refit_expected(model: nn.Module, head: nn.Linear, adapter: PeftModel, batches):
    """The ridge fit of PEFT's own forward of the source adapter (its logits) on the inputs that
    ``head`` sees when ``model`` runs the same batches."""
    from warmstart.engine.head_fit import ridge_fit
    from warmstart.engine.options import TransportOptions

    features = []
    hook = head.register_forward_hook(lambda m, i, o: features.append(i[0]))
    with torch.no_grad():
        logits = torch.cat([adapter(**b).logits for b in batches])
        for b in batches:
            model(**b)
    hook.remove()
    return ridge_fit(torch.cat(features), logits, TransportOptions().head_fit_ridge)


def test_head_fit_with_an_adapter_source_fits_the_adapted_sources_logits():
    """transport() with a LoRA adapter and head_fit=3 into a wider BERT: the classifier is the
    ridge fit of the logits PEFT computes for the source with its adapter, on the classifier's
    inputs after the write; every other tensor is as without head_fit; the source is not changed
    (the adapter is merged for a functional call, not into it)."""
    source = _bert()
    target = _bert(d=48, seed=4)
    adapter = _lora(source, r=4, lora_alpha=8, task_type="SEQ_CLS")
    batches = _texts()
    source_before = _snapshot(source)
    moved, refit = copy.deepcopy(target), copy.deepcopy(target)
    transport(source, adapter, moved, batches, progress=False)
    report = transport(source, adapter, refit, batches, head_fit=3, progress=False)
    assert _unchanged(source, source_before)
    assert report.head_fit["mode"] == "ridge" and report.head_fit["rows"] == 24.0
    for name, value in refit.state_dict().items():
        if not name.startswith("classifier."):
            assert torch.equal(value, moved.state_dict()[name]), name
    w, b = _refit_expected(refit.eval(), refit.classifier, adapter, batches)
    torch.testing.assert_close(refit.classifier.weight, w.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(refit.classifier.bias, b.float(), atol=1e-5, rtol=1e-4)
    assert (refit.classifier.weight - moved.classifier.weight).abs().max() > 1e-2


def test_head_fit_into_a_peft_target_refits_its_trainable_head_copy():
    """A PEFT-wrapped target (SEQ_CLS: the classifier in modules_to_save): the refit goes into
    the trainable copy, which the optimizer holds (same tensors), and matches the fit computed
    with the wrapped model's own forward; the frozen original and the moved factors are as
    without head_fit."""
    source = _bert()
    target = _bert(d=48, seed=4)
    adapter = _lora(source, r=4, lora_alpha=8, task_type="SEQ_CLS")
    batches = _texts()

    def wrap():
        return get_peft_model(copy.deepcopy(target), LoraConfig(
            r=4, lora_alpha=8, target_modules=BERT_MODULES, task_type="SEQ_CLS")).eval()

    moved, refit = wrap(), wrap()
    pointers = {n: p.data_ptr() for n, p in refit.named_parameters()}
    transport_into_peft(source, adapter, moved, batches, progress=False)
    report = transport_into_peft(source, adapter, refit, batches, head_fit=3, progress=False)
    assert {n: p.data_ptr() for n, p in refit.named_parameters()} == pointers
    assert report.head_fit["rows"] == 24.0  # 3 batches of 8 sentences, one row each
    assert report.head_fit["logit_mse_after"] < report.head_fit["logit_mse_before"]
    copy_ = refit.base_model.model.classifier.modules_to_save["default"]
    for name, value in refit.state_dict().items():
        if "classifier.modules_to_save" not in name:
            assert torch.equal(value, moved.state_dict()[name]), name
    w, b = _refit_expected(refit, copy_, adapter, batches)
    torch.testing.assert_close(copy_.weight, w.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(copy_.bias, b.float(), atol=1e-5, rtol=1e-4)
    assert copy_.weight.requires_grad


def test_head_fit_with_an_adapter_is_undone_when_a_later_step_fails(tmp_path):
    """alpha='auto' whose scoring fails on the second trial, after a trial write and refit: the
    target, plain or PEFT-wrapped, is exactly as before."""
    source = _bert()
    target = _bert(d=48, seed=4)
    calls = []

    def evaluate(model):
        calls.append(1)
        if len(calls) % 2 == 0:
            raise RuntimeError("validation failed")
        return 1.0

    wrapped = get_peft_model(copy.deepcopy(target), LoraConfig(
        r=4, lora_alpha=8, target_modules=BERT_MODULES, task_type="SEQ_CLS")).eval()
    # with the classifier saved, and without (then only the refit writes the target's head)
    for adapter in (_lora(source, r=4, lora_alpha=8, task_type="SEQ_CLS"), _lora(source, r=4)):
        for model, engine in ((target, transport), (wrapped, transport_into_peft)):
            before = _snapshot(model)
            with pytest.raises(RuntimeError, match="validation failed"):
                engine(source, adapter, model, _texts(), alpha="auto", alpha_grid=(1.0, 2.0),
                       evaluate=evaluate, head_fit=2, progress=False)
            assert _unchanged(model, before)


def test_head_fit_refuses_a_target_head_under_lora():
    """The target's adapter puts LoRA on the classifier: a refit of its frozen base weight would
    sit under the adapter's change, so it is refused before anything is written."""
    source = _bert()
    adapter = _lora(source, r=4, lora_alpha=8, task_type="SEQ_CLS")
    wrapped = get_peft_model(copy.deepcopy(_bert(d=48, seed=4)), LoraConfig(
        r=4, lora_alpha=8, target_modules=[*BERT_MODULES, "classifier"])).eval()
    before = _snapshot(wrapped)
    with pytest.raises(ValueError, match=r"head_fit refits the target's output layer, but the "
                                         r"target's adapter puts LoRA on it \(.*classifier\); "
                                         r"list it in modules_to_save"):
        transport_into_peft(source, adapter, wrapped, _texts(), head_fit=2, progress=False)
    assert _unchanged(wrapped, before)


# ---------------------------------------------------------------------------------------------
# The command line


def test_transport_command_writes_an_adapter_for_a_vit_with_fused_qkv(tmp_path):
    """`warmstart transport --adapter_out`: timm ViTs (fused qkv: one A, B row blocks per q/k/v),
    the classifier head as modules_to_save; the fit config's target stays as it is."""
    import yaml
    from safetensors.torch import save_file

    from warmstart.__main__ import main
    from warmstart.lightning.models import Classifier

    vit = {"img_size": 16, "patch_size": 8, "num_heads": 2}
    torch.manual_seed(0)
    source = Classifier("vit_tiny_patch16_224", 10, pretrained=False,
                        model_kwargs={**vit, "embed_dim": 32, "depth": 2}).model
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(base))
    _lora(source, r=4, lora_alpha=4, target_modules=["qkv", "attn.proj", "fc1", "fc2"],
          modules_to_save=["head"]).save_pretrained(tmp_path / "adapter")
    config = {
        "seed_everything": 1,
        "model": {"class_path": "warmstart.lightning.models.Classifier",
                  "init_args": {"backbone": "vit_tiny_patch16_224", "num_classes": 10,
                                "pretrained": False,
                                "model_kwargs": {**vit, "embed_dim": 48, "depth": 3}}},
        "data": {"class_path": "warmstart.lightning.data.ImageClassificationData",
                 "init_args": {"source": "mnist5k", "image_size": 16, "batch_size": 16,
                               "train_limit": 64, "val_limit": 32}},
        "trainer": {"accelerator": "cpu", "devices": 1},
        "transport": {"source_pretrained": "vit_tiny_patch16_224",
                      "source_finetuned": str(tmp_path / "adapter"),
                      "source_model_kwargs": {
                          **vit, "embed_dim": 32, "depth": 2,
                          "pretrained_cfg_overlay": {"file": str(base)}},
                      "options": {"calibration_batches": 2}},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "target_adapter"
    assert main(["transport", "-c", str(tmp_path / "fit.yaml"), "--adapter_out", str(out)]) == 0
    torch.manual_seed(1)
    target = Classifier("vit_tiny_patch16_224", 10, pretrained=False,
                        model_kwargs={**vit, "embed_dim": 48, "depth": 3}).model.eval()
    loaded = PeftModel.from_pretrained(copy.deepcopy(target), out).eval()
    qkv = loaded.get_base_model().blocks[1].attn.qkv
    assert qkv.lora_A["default"].weight.shape == (4, 48)
    assert qkv.lora_B["default"].weight.shape == (144, 4)
    report = json.loads((out / "warmstart_report.json").read_text())
    assert len(report["modules"]) == 12 and report["adapter"]["modules_to_save"] == ["head"]
    with torch.no_grad():
        x = torch.randn(2, 3, 16, 16)
        assert (loaded(x) - target(x)).abs().max() > 1e-3  # the moved adapter acts
    assert main(["transport", "-c", str(tmp_path / "fit.yaml"), "--adapter_out",
                 str(out)]) == 2  # a written adapter is not overwritten


def test_compare_runs_lora_cold_and_lora_theseus_arms(tmp_path):
    """The lora arms wrap the fit config's target with PEFT; lora_theseus warm-starts its
    adapter from the source's, lora_cold keeps PEFT's init; only adapter and head train."""
    from safetensors.torch import save_file

    from warmstart.experiments.compare import CompareConfig, run_arm
    from warmstart.lightning.models import Classifier

    vit = {"img_size": 16, "patch_size": 8, "num_heads": 2}
    torch.manual_seed(0)
    source = Classifier("vit_tiny_patch16_224", 10, pretrained=False,
                        model_kwargs={**vit, "embed_dim": 32, "depth": 2}).model
    save_file({k: v.contiguous() for k, v in source.state_dict().items()},
              str(tmp_path / "base.safetensors"))
    lora = {"r": 4, "lora_alpha": 4, "target_modules": ["qkv", "fc1"], "modules_to_save": ["head"]}
    _lora(source, **lora).save_pretrained(tmp_path / "adapter")
    fit = {"model": {"class_path": "warmstart.lightning.models.Classifier",
                     "init_args": {"backbone": "vit_tiny_patch16_224", "num_classes": 10,
                                   "pretrained": False,
                                   "model_kwargs": {**vit, "embed_dim": 48, "depth": 3}}},
           "data": {"class_path": "warmstart.lightning.data.ImageClassificationData",
                    "init_args": {"source": "mnist5k", "image_size": 16, "batch_size": 16,
                                  "train_limit": 64, "val_limit": 32}},
           "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False,
                       "limit_val_batches": 1, "enable_checkpointing": False}}
    config = CompareConfig(
        fit_config=(fit,), out_dir=str(tmp_path / "compare"), arms=("lora_cold", "lora_theseus"),
        transport={"source_pretrained": "vit_tiny_patch16_224", "target_attribute": "model",
                   "calibration_batches": 2, "progress": False,
                   "source_model_kwargs": {**vit, "embed_dim": 32, "depth": 2,
                                           "pretrained_cfg_overlay": {
                                               "file": str(tmp_path / "base.safetensors")}}},
        source={"adapter": str(tmp_path / "adapter")}, tracker={"every_n_steps": 1}, lora=lora)
    for arm in config.arms:
        assert run_arm(config, arm, 0, "").exists()
    runs = tmp_path / "compare" / "runs"
    assert not list((runs / "lora_cold_seed0").rglob("transport_report.json"))
    report = json.loads(next((runs / "lora_theseus_seed0").rglob("transport_report.json"))
                        .read_text())
    assert len(report["modules"]) == 6 and {m["rank"] for m in report["modules"]} == {4}


def test_text_classifier_trains_under_a_peft_wrapper():
    """The lora arms wrap a text Classifier's network with PEFT: it still reads token batches,
    and only the adapter and the saved head train, the head at its own learning rate."""
    from warmstart.experiments.compare import wrap_lora
    from warmstart.lightning.models import Classifier

    tiny = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
            "intermediate_size": 64}
    module = Classifier("minilm", 2, pretrained=False, model_kwargs=tiny, lr=1e-3,
                        head_lr_multiplier=10.0)
    wrap_lora(module, "model", {"r": 2, "target_modules": ["query", "value"],
                                "modules_to_save": ["head"]})
    assert type(module.model).__name__ == "PeftModel" and module.is_text
    batch = {"input_ids": torch.randint(0, 1000, (3, 7)), "attention_mask": torch.ones(3, 7),
             "label": torch.tensor([0, 1, 1])}
    assert module(batch).shape == (3, 2)
    groups = module.param_groups()
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for p in module.model.parameters() if p.requires_grad}
    head = {id(p) for p in module.network.head.parameters() if p.requires_grad}
    assert len(head) == 2
    assert all(g["lr"] == 1e-2 for g in groups if head & {id(p) for p in g["params"]})
    assert all(g["lr"] == 1e-3 for g in groups if not head & {id(p) for p in g["params"]})
