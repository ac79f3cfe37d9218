"""Decoder LLM families (Llama, Qwen2, Qwen3, Mistral, Gemma, GPT-2) and head-wise attention maps.

Each exactness case builds a target that computes the source's function exactly in a wider model
(a stream embedded by a partial permutation, norms compensated for the wider RMS, MLP units
embedded with the extra ones silent, attention heads kept or duplicated), fine-tunes the source,
transports, and checks that the target now computes the fine-tuned source's logits.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from warmstart.engine import heads
from warmstart.engine.families import describe_model
from warmstart.engine.transport import transport

VOCAB = 48
SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
         "tie_word_embeddings": False, "max_position_embeddings": 64}
WIDE = {**SMALL, "hidden_size": 48, "intermediate_size": 96}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is several times faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(cls, **kw):
    config = cls(**kw)
    config._attn_implementation = "eager"
    return config


def _base(cls, config, seed: int = 0) -> nn.Module:
    """A random-init model with non-trivial gains and biases (full-rank activations)."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or ".ln_" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
    return model


def _finetune(model: nn.Module, gains: bool | tuple[str, ...] = False, embeddings: bool = False,
              seed: int = 7) -> nn.Module:
    """A stand-in fine-tune: every linear weight (and bias) moves; gains (all, or those whose
    names contain one of ``gains``) and the input embedding table only when asked; position
    embeddings never (they get a zero delta)."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    tied = {id(p) for p in out.get_input_embeddings().parameters()}
    with torch.no_grad():
        for name, p in out.named_parameters():
            is_gain = "norm" in name or ".ln_" in name
            is_embedding = id(p) in tied
            if is_embedding != embeddings and (is_embedding or "wpe" in name or "embed" in name):
                continue
            if is_gain and not (gains is True or (gains and any(k in name for k in gains))):
                continue
            p.add_(0.05 * p.abs().mean().clamp_min(0.02) * torch.randn(p.shape, generator=g))
    return out


def _calibration(n_batches: int = 4, batch: int = 4, length: int = 16, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, length - 3:] = 0  # right padding: excluded from the rows
        out.append({"input_ids": torch.randint(0, VOCAB, (batch, length), generator=g),
                    "attention_mask": mask})
    return out


def _perm(d_s: int, d_t: int, seed: int, signed: bool = True) -> torch.Tensor:
    """A partial permutation [d_s, d_t] (signed unless asked): orthonormal rows."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.randperm(d_t, generator=g)[:d_s]
    signs = (torch.randint(0, 2, (d_s,), generator=g) * 2 - 1).float() if signed else \
        torch.ones(d_s)
    p = torch.zeros(d_s, d_t)
    p[torch.arange(d_s), cols] = signs
    return p


def _head_rows(weight: torch.Tensor, pairing: list[int], head_dim: int) -> torch.Tensor:
    """Rows of target head ``t`` = rows of source head ``pairing[t]``."""
    return torch.cat([weight[s * head_dim:(s + 1) * head_dim] for s in pairing])


def _widen_llama(source: nn.Module, target: nn.Module, stream: torch.Tensor,
                 hidden: torch.Tensor, q_pair: list[int], kv_pair: list[int],
                 gain_offset: float = 0.0, embed_scale: float = 1.0) -> None:
    """Write into ``target`` the source's function: stream ``x_t = x_s stream``, MLP units
    ``hidden`` (unsigned: SwiGLU's gate is not odd), target head t copies source head
    ``q_pair[t]`` (kv ``kv_pair``) with the output projection split among the copies."""
    d_s, d_t = stream.shape
    c = math.sqrt(d_s / d_t)  # RMS over the wider stream is smaller by this factor
    hd = source.config.head_dim
    shared = torch.tensor([q_pair.count(h) for h in range(source.config.num_attention_heads)],
                          dtype=torch.float32)
    src = source.state_dict()
    new = {}
    for name in target.state_dict():
        v = src.get(name)
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            pairing = q_pair if "q_proj" in name else kv_pair
            new[name] = _head_rows(v, pairing, hd) @ stream
        elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            new[name] = _head_rows(v, q_pair if "q_proj" in name else kv_pair, hd)
        elif name.endswith("o_proj.weight"):
            cols = (v.T.reshape(-1, hd, d_s) / shared[:, None, None]).reshape(-1, d_s)
            new[name] = stream.T @ _head_rows(cols, q_pair, hd).T
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            new[name] = hidden.T @ v @ stream
        elif name.endswith("down_proj.weight"):
            new[name] = stream.T @ v @ hidden
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            new[name] = v
        elif name.endswith("norm.weight"):  # effective gain (offset + w), scaled by c
            mapped = stream.abs().sum(0)  # 1 on the source's channels, 0 on the silent ones
            new[name] = (stream.abs().T @ (v + gain_offset)) * c - gain_offset * mapped
        elif name.endswith("embed_tokens.weight"):
            new[name] = v @ stream * embed_scale
        elif name.endswith("lm_head.weight") or name.endswith("score.weight"):
            new[name] = v @ stream
        else:
            raise AssertionError(f"unexpected parameter {name}")
    target.load_state_dict(new)
    _set_eps(target, source.config.rms_norm_eps * d_s / d_t)


def _set_eps(model: nn.Module, eps: float) -> None:
    """The stream RMSNorms' epsilon (compensating the wider stream's smaller mean square)."""
    width = model.config.hidden_size
    model.config.rms_norm_eps = eps
    for module in model.modules():
        if hasattr(module, "variance_epsilon") and module.weight.shape[0] == width:
            module.variance_epsilon = eps
        elif hasattr(module, "eps") and getattr(module, "weight", None) is not None \
                and module.weight.shape[0] == width:
            module.eps = eps


def _logits(model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _llama_pair(cls=LlamaForCausalLM, config_cls=LlamaConfig, source_kw=None, target_kw=None,
                q_pair=None, kv_pair=None, gain_offset=0.0, embed_scale=1.0, seed=0):
    source = _base(cls, _config(config_cls, **{**SMALL, **(source_kw or {})}), seed)
    target = _base(cls, _config(config_cls, **{**WIDE, **(target_kw or {})}), seed + 1)
    n_q, n_kv = source.config.num_attention_heads, source.config.num_key_value_heads
    stream, hidden = _perm(32, 48, seed=11), _perm(64, 96, seed=12, signed=False)
    _widen_llama(source, target, stream, hidden, q_pair or list(range(n_q)),
                 kv_pair or list(range(n_kv)), gain_offset, embed_scale)
    probe = _calibration(1, seed=5)[0]
    torch.testing.assert_close(_logits(target, probe), _logits(source, probe), atol=1e-4, rtol=0)
    return source, target


def _check_transport(source, target, finetuned, atol=2e-4, **options):
    report = transport(source, finetuned, target, _calibration(), progress=False, **options)
    probe = _calibration(1, seed=5)[0]
    torch.testing.assert_close(_logits(target, probe), _logits(finetuned, probe), atol=atol,
                               rtol=0)
    return report


@pytest.mark.parametrize("mode", heads.MODES)
def test_gqa_llama_exact_widening_linear_finetune(mode):
    source, target = _llama_pair()
    with heads.head_mode(mode):
        report = _check_transport(source, target, _finetune(source))
    maps = {m.target_space: m for m in report.maps}
    assert maps["block0.0.resid"].d_source == 32 and maps["block0.0.resid"].d_target == 48
    assert maps["block0.0.attn_k"].rank == 16 and maps["block0.0.mlp_hidden"].rank == 64
    assert report.source_family == report.target_family == "hf_decoder"


@pytest.mark.parametrize("options", [{"center": True}, {"whiten": 0.25}, {"solver": "eigh"}],
                         ids=["center", "whiten", "eigh"])
def test_head_maps_follow_the_map_options(options):
    source, target = _llama_pair()
    _check_transport(source, target, _finetune(source), **options)


def test_gqa_llama_exact_widening_with_gains_finetuned():
    source, target = _llama_pair()
    _check_transport(source, target, _finetune(source, gains=True))


def test_qwen2_biases_exact_widening():
    source, target = _llama_pair(Qwen2ForCausalLM, Qwen2Config)
    assert source.model.layers[0].self_attn.q_proj.bias is not None
    report = _check_transport(source, target, _finetune(source))
    assert any(p.role == "attn.q.bias" for p in report.params)


@pytest.mark.parametrize("gains", ["diagonal", "regression"])
def test_qwen3_head_norms_exact_widening(gains):
    """The per-head norms' outputs ([B, N, heads, head_dim]) do not pair as rows, so their gains
    move by the diagonal rule under either option (exact here: head_dim is kept)."""
    source, target = _llama_pair(Qwen3ForCausalLM, Qwen3Config)
    # the stream gains need the RMS ratio, which only the regression applies
    tuned = ("q_norm", "k_norm") if gains == "diagonal" else True
    report = _check_transport(source, target, _finetune(source, gains=tuned), gains=gains)
    norms = [p for p in report.params if p.role == "attn.q_norm.weight"]
    assert norms and norms[0].space_out.endswith("attn_qk_head") and norms[0].norm_target > 0


def test_mistral_without_window_exact_widening():
    kw = {"sliding_window": None}
    source, target = _llama_pair(MistralForCausalLM, MistralConfig, kw, kw)
    _check_transport(source, target, _finetune(source))


def test_tied_embeddings_move_once_as_the_head():
    kw = {"tie_word_embeddings": True}
    source, target = _llama_pair(source_kw=kw, target_kw=kw)
    assert target.lm_head.weight is target.model.embed_tokens.weight
    finetuned = _finetune(source, embeddings=True)  # the tied table is the LM head: it moves
    report = _check_transport(source, target, finetuned)
    heads_ = [p for p in report.params if p.rule == "head"]
    assert [p.name for p in heads_] == ["model.embed_tokens.weight"]
    assert any(name == "lm_head.weight" and "tied" in reason for name, reason in report.skipped)


@pytest.mark.parametrize("target_heads", [(8, 4), (8, 2)], ids=["kv2to4", "group2to4"])
def test_head_count_change_duplicates_heads_exactly(target_heads):
    n_q, n_kv = target_heads
    g_t = n_q // n_kv
    in_group = [int(r * (2 - 1) / (g_t - 1) + 0.5) for r in range(g_t)]
    kv_pair = [int(j * (2 - 1) / (n_kv - 1) + 0.5) for j in range(n_kv)]
    q_pair = [kv_pair[h // g_t] * 2 + in_group[h % g_t] for h in range(n_q)]
    source, target = _llama_pair(target_kw={"num_attention_heads": n_q,
                                            "num_key_value_heads": n_kv},
                                 q_pair=q_pair, kv_pair=kv_pair)
    finetuned = _finetune(source)
    for mode in ("heads", "rope"):
        trial = copy.deepcopy(target)
        with heads.head_mode(mode):
            _check_transport(source, trial, finetuned)
    dense = copy.deepcopy(target)  # a dense map cannot copy a head into two: not exact
    with heads.head_mode("dense"), pytest.raises(AssertionError):
        _check_transport(source, dense, finetuned)


def test_permuted_heads_need_matched_pairing():
    """kv groups swapped and query heads shuffled inside them (the same function): pairing heads
    by position maps the wrong heads; pairing them by their statistics is exact."""
    q_pair, kv_pair = [3, 2, 0, 1], [1, 0]
    source, target = _llama_pair(q_pair=q_pair, kv_pair=kv_pair)
    finetuned = _finetune(source)
    with heads.head_mode("rope", "matched"):
        _check_transport(source, copy.deepcopy(target), finetuned)
    with heads.head_mode("rope", "position"), pytest.raises(AssertionError):
        _check_transport(source, copy.deepcopy(target), finetuned)


@pytest.mark.parametrize("target_heads", [(8, 4), (8, 2)], ids=["kv2to4", "group2to4"])
def test_matched_pairing_duplicates_heads_exactly(target_heads):
    n_q, n_kv = target_heads
    g_t = n_q // n_kv
    kv_pair = [int(j / (n_kv - 1) + 0.5) for j in range(n_kv)]
    q_pair = [kv_pair[h // g_t] * 2 + int((h % g_t) / (g_t - 1) + 0.5) for h in range(n_q)]
    source, target = _llama_pair(target_kw={"num_attention_heads": n_q,
                                            "num_key_value_heads": n_kv},
                                 q_pair=q_pair, kv_pair=kv_pair)
    with heads.head_mode("rope", "matched"):
        _check_transport(source, target, _finetune(source))


def test_head_dim_change_keeps_rotary_planes_and_scores():
    """head_dim 8 -> 16 at the same RoPE base: source plane i turns exactly like target plane 2i;
    a target whose heads embed the source's planes there (scaled to keep the scores) is exact."""
    source = _base(LlamaForCausalLM, _config(LlamaConfig, **SMALL))
    target = _base(LlamaForCausalLM, _config(LlamaConfig, **{**WIDE, "head_dim": 16}), 1)
    stream, hidden = _perm(32, 48, seed=11), _perm(64, 96, seed=12, signed=False)
    plane = torch.zeros(8, 16)  # dims (i, i + 4) -> (2i, 2i + 8)
    for i in range(4):
        plane[i, 2 * i] = plane[i + 4, 2 * i + 8] = 1.0
    f = (16 / 8) ** 0.25  # scores scale by head_dim ** -0.5
    kept = _base(LlamaForCausalLM, _config(LlamaConfig, **WIDE), 1)  # head_dim 8 widening
    _widen_llama(source, kept, stream, hidden, list(range(4)), list(range(2)))
    target.load_state_dict({k: v for k, v in kept.state_dict().items() if "self_attn" not in k},
                           strict=False)
    _set_eps(target, kept.config.rms_norm_eps)
    with torch.no_grad():
        for ls, lt in zip(source.model.layers, target.model.layers):
            for name, scale in (("q_proj", f), ("k_proj", f), ("v_proj", 1.0)):
                w = getattr(ls.self_attn, name).weight.view(-1, 8, 32)
                new = torch.einsum("hds,de->hes", w, plane).reshape(-1, 32) @ stream * scale
                getattr(lt.self_attn, name).weight.copy_(new)
            o = ls.self_attn.o_proj.weight.view(32, -1, 8)
            lt.self_attn.o_proj.weight.copy_(
                stream.T @ torch.einsum("shd,de->she", o, plane).reshape(32, -1))
    probe = _calibration(1, seed=5)[0]
    torch.testing.assert_close(_logits(target, probe), _logits(source, probe), atol=1e-4, rtol=0)
    finetuned = _finetune(source)
    trial = copy.deepcopy(target)
    with heads.head_mode("rope"):
        report = _check_transport(source, trial, finetuned)
    assert {m.target_space: m.d_target for m in report.maps}["block0.0.attn_q"] == 64


def test_sequence_classification_score_is_the_head():
    source = _base(LlamaForSequenceClassification,
                   _config(LlamaConfig, **SMALL, num_labels=3, pad_token_id=0))
    target = _base(LlamaForSequenceClassification,
                   _config(LlamaConfig, **WIDE, num_labels=3, pad_token_id=0), 1)
    finetuned = _finetune(source)
    report = transport(source, finetuned, target, _calibration(), progress=False)
    score = [p for p in report.params if p.rule == "head"]
    assert [p.name for p in score] == ["score.weight"]
    assert target.score.weight.shape == (3, 48)


def _widen_gpt2(source: GPT2LMHeadModel, target: GPT2LMHeadModel, order: torch.Tensor,
                hidden: torch.Tensor) -> None:
    """Target stream ``x_s D / sqrt(2)``: every source channel twice (so the LayerNorm's mean
    and the stream's RMS carry over), heads duplicated with the output projection halved."""
    d, hd = source.config.n_embd, source.config.n_embd // source.config.n_head
    dup = torch.zeros(d, 2 * d)
    dup[torch.arange(d), order[:d]] = 1.0
    dup[torch.arange(d), order[d:]] = 1.0
    stream = dup / math.sqrt(2)
    n_h = source.config.n_head
    head_dup = torch.zeros(d, 2 * d)  # head h -> target heads 2h, 2h + 1
    for h in range(n_h):
        for t in (2 * h, 2 * h + 1):
            head_dup[h * hd:(h + 1) * hd, t * hd:(t + 1) * hd] = torch.eye(hd)
    qkv = torch.block_diag(head_dup, head_dup, head_dup)
    src, new = source.state_dict(), {}
    for name in target.state_dict():
        v = src[name]
        if name.endswith("c_attn.weight"):
            new[name] = stream.T @ v @ qkv
        elif name.endswith("c_attn.bias"):
            new[name] = v @ qkv
        elif name.endswith("attn.c_proj.weight"):
            new[name] = head_dup.T @ v @ stream / 2
        elif name.endswith("c_fc.weight"):
            new[name] = stream.T @ v @ hidden
        elif name.endswith("c_fc.bias"):
            new[name] = v @ hidden
        elif name.endswith("mlp.c_proj.weight"):
            new[name] = hidden.T @ v @ stream
        elif name.endswith(("c_proj.bias", "ln_1.bias", "ln_2.bias", "ln_f.bias")):
            new[name] = v @ stream
        elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            new[name] = v @ dup / math.sqrt(2)
        elif name.endswith(("wte.weight", "wpe.weight", "lm_head.weight")):
            new[name] = v @ stream
        else:
            raise AssertionError(f"unexpected parameter {name}")
    target.load_state_dict(new)
    for module in target.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = source.config.layer_norm_epsilon / 2


def _gpt2(width: int, heads_: int, inner: int, seed: int) -> GPT2LMHeadModel:
    config = _config(GPT2Config, vocab_size=VOCAB, n_embd=width, n_layer=2, n_head=heads_,
                     n_inner=inner, n_positions=64, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = _base(GPT2LMHeadModel, config, seed)
    with torch.no_grad():  # pre-activations of order one: GELU's outputs span all units
        for block in model.transformer.h:
            block.mlp.c_fc.weight.mul_(8.0)
    return model


@pytest.mark.parametrize("gains", [False, True], ids=["linear", "gains"])
def test_gpt2_conv1d_fused_qkv_exact_widening(gains):
    source, target = _gpt2(32, 4, 64, 0), _gpt2(64, 8, 128, 1)
    _widen_gpt2(source, target, torch.randperm(64, generator=torch.Generator().manual_seed(4)),
                _perm(64, 128, seed=6, signed=False))
    probe = _calibration(1, seed=5)[0]
    torch.testing.assert_close(_logits(target, probe), _logits(source, probe), atol=1e-4, rtol=0)
    options = {"block_group": 1} if gains else {}  # head maps one block at a time, too
    report = _check_transport(source, target, _finetune(source, gains=gains, embeddings=True),
                              **options)
    assert {m.target_space: m.d_target for m in report.maps}["block0.0.attn_qkv"] == 192
    assert [p.name for p in report.params if p.rule == "head"] == ["transformer.wte.weight"]


def test_gemma_offset_gains_exact_widening():
    kw = {"hidden_act": "gelu_pytorch_tanh"}
    source, target = _llama_pair(GemmaForCausalLM, GemmaConfig, kw, kw, gain_offset=1.0,
                                 embed_scale=math.sqrt(32 / 48))
    layout = describe_model(target)
    offsets = {p.gain_offset for p in layout.params if p.rule == "gain"}
    assert offsets == {1.0}
    _check_transport(source, target, _finetune(source, gains=True))


# --------------------------------------------------------------------------------------------
# Bad inputs: a clear error, the target untouched


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _refused(source, target, match: str, finetuned=None) -> None:
    before = _snapshot(target)
    with pytest.raises(ValueError, match=match):
        transport(source, finetuned if finetuned is not None else _finetune(source), target,
                  _calibration(), progress=False)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())


def test_different_vocabularies_are_refused_at_the_lm_head():
    source = _base(LlamaForCausalLM, _config(LlamaConfig, **SMALL))
    target = _base(LlamaForCausalLM, _config(LlamaConfig, **{**WIDE, "vocab_size": VOCAB + 8}))
    _refused(source, target, r"lm_head\.weight: the source \(hf_decoder\) has no "
                             r"'lm_head\.weight over 56 tokens'")


def test_head_dim_that_does_not_divide_the_projection_is_refused():
    source = _base(LlamaForCausalLM, _config(LlamaConfig, **SMALL))
    target = _base(LlamaForCausalLM, _config(LlamaConfig, **WIDE))
    for layer in target.model.layers:
        layer.self_attn.head_dim = 6  # 32-wide projections do not split into 4 heads of 6
    _refused(source, target, r"head_dim 6 does not divide")


@pytest.mark.parametrize("cls,config", [
    (MistralForCausalLM, MistralConfig(**SMALL, sliding_window=8)),
    (Qwen2ForCausalLM, Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=8,
                                   max_window_layers=0)),
], ids=["mistral", "qwen2"])
def test_active_sliding_window_is_refused(cls, config):
    source = _base(LlamaForCausalLM, _config(LlamaConfig, **SMALL))
    target = cls(config).eval()
    _refused(source, target, "sliding-window attention")


@pytest.mark.parametrize("cls,config", [
    (MixtralForCausalLM, MixtralConfig(**{k: v for k, v in SMALL.items() if k != "head_dim"},
                                       num_local_experts=2)),
    (Qwen2MoeForCausalLM, Qwen2MoeConfig(**SMALL, num_experts=2, moe_intermediate_size=16)),
], ids=["mixtral", "qwen2_moe"])
def test_mixture_of_experts_is_refused(cls, config):
    source = _base(LlamaForCausalLM, _config(LlamaConfig, **SMALL))
    target = cls(config).eval()
    _refused(source, target, "mixture-of-experts")
