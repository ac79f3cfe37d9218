"""Hugging Face GPT-2 (``GPT2Model``, ``GPT2LMHeadModel``, ``GPT2ForSequenceClassification``).

GPT-2's projections are ``Conv1D`` layers that store their weight as ``[in, out]`` (the transpose of
``nn.Linear``). The linear rule ``T_out^T W T_in`` applied to such a weight with the two spaces
swapped gives ``T_in^T W T_out``, the transpose of the rule on ``W^T``: so each role below names its
*input* space as the rule's ``space_out`` and its output space as ``space_in``. The fused
``c_attn`` concatenates the query, key and value heads along its output (the stored tensor's
columns); its output is one space with a ``qkv`` head layout, whose map
:mod:`warmstart.engine.heads` builds block-diagonally (queries and keys per head pair, values with
the output projection's input), so the fused weight and bias move without being split. Learned
position embeddings (``wpe``) are embeddings (zero delta by default); the language-model head is
tied to ``wte`` and moves once, as the task head.
"""

from __future__ import annotations

from torch import nn

from .base import (
    BlockId,
    Family,
    HeadLayout,
    ModelLayout,
    ParamRole,
    Point,
    Space,
    SpaceKey,
    join,
    norm_params,
)
from .hf_decoder import decoder_heads, find_hf_model
from .hf_encoder import prepare_text

# (module in the block, role, rule's left space = the input, rule's right space = the output)
CONV1D = (
    ("attn.c_attn", "attn.qkv", "resid", "attn_qkv"),
    ("attn.c_proj", "attn.o", "attn_o", "resid"),
    ("mlp.c_fc", "mlp.fc1", "resid", "mlp_hidden"),
    ("mlp.c_proj", "mlp.fc2", "mlp_hidden", "resid"),
)
NORMS = (("ln_1", "attn.norm"), ("ln_2", "mlp.norm"))


def _matches(model: nn.Module) -> bool:
    return find_hf_model(model, ("gpt2",)) is not None


def describe(model: nn.Module) -> ModelLayout:
    prefix, hf = find_hf_model(model, ("gpt2",))
    config = hf.config
    if getattr(config, "add_cross_attention", False):
        raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is not supported "
                         "by the gpt2 family; transport the decoder-only model.")
    d, n_heads = config.n_embd, config.n_head
    if d % n_heads:
        raise ValueError(f"GPT-2's n_embd {d} is not a multiple of n_head {n_heads}: head_dim does "
                         "not divide the width, so the heads cannot be laid out.")
    backbone = hf.base_model
    base = join(prefix, next(n for n, m in hf.named_modules() if m is backbone))
    blocks = tuple(BlockId(0, i) for i in range(len(backbone.h)))
    first, last = SpaceKey(blocks[0], "resid"), SpaceKey(blocks[-1], "resid")
    head_params, head_points, excluded = decoder_heads(
        model, hf, prefix, join(base, "wte"), backbone.wte, last)
    spaces: list[Space] = []
    params: list[ParamRole] = []
    for bid, block in zip(blocks, backbone.h):
        p = join(base, f"h.{bid.index}")
        scale = (d // n_heads) ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= bid.index + 1
        heads = HeadLayout("qkv", n_heads, n_heads, d // n_heads, None, scale)
        inner = block.mlp.c_fc.weight.shape[1]
        spaces += [
            Space(SpaceKey(bid, "resid"), d, (
                Point(f"{p}.attn.c_attn", "in", "attn_in"),
                Point(f"{p}.attn.c_proj", "out", "attn_out"),
                Point(f"{p}.mlp.c_fc", "in", "mlp_in"),
                Point(f"{p}.mlp.c_proj", "out", "mlp_out"),
                *(head_points if bid == blocks[-1] else ()))),
            Space(SpaceKey(bid, "attn_qkv"), 3 * d, (Point(f"{p}.attn.c_attn", "out", "proj"),),
                  heads=heads),
            Space(SpaceKey(bid, "attn_o"), d, (Point(f"{p}.attn.c_proj", "in", "proj"),),
                  heads=HeadLayout("output", n_heads, n_heads, d // n_heads, None, scale)),
            Space(SpaceKey(bid, "mlp_hidden"), inner, (Point(f"{p}.mlp.c_fc", "out", "fc1_out"),
                                                       Point(f"{p}.mlp.c_proj", "in", "fc2_in"))),
        ]
        for module, role, left, right in CONV1D:
            layer = block.get_submodule(module)
            params.append(ParamRole(f"{p}.{module}.weight", f"{role}.weight", bid, "linear",
                                    SpaceKey(bid, left), SpaceKey(bid, right)))
            if layer.bias is not None:
                params.append(ParamRole(f"{p}.{module}.bias", f"{role}.bias", bid, "vector",
                                        SpaceKey(bid, right)))
        for module, role in NORMS:
            params += norm_params(f"{p}.{module}", role, bid, SpaceKey(bid, "resid"),
                                  block.get_submodule(module))
    if not any(p.name == join(base, "wte.weight") for p in head_params):
        params.append(ParamRole(join(base, "wte.weight"), "embed.tokens", None, "embedding", first))
    params.append(ParamRole(join(base, "wpe.weight"), "embed.positions", None, "embedding", first))
    params += norm_params(join(base, "ln_f"), "final_norm", None, last, backbone.ln_f)
    params += head_params
    return ModelLayout("hf_gpt2", (blocks,), tuple(spaces), tuple(params), excluded=excluded,
                       prepare=prepare_text)


FAMILY = Family("hf_gpt2", _matches, describe, priority=10)
