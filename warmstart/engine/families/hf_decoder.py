"""Hugging Face decoder LLMs shaped like Llama: Llama, Qwen2, Qwen3, Mistral and Gemma.

They share one layer layout (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``,
``input_layernorm`` / ``post_attention_layernorm`` RMSNorms, a final ``norm``) and differ in small
ways the table :data:`DECODERS` records: Qwen2 has q/k/v biases (read from the modules), Qwen3
RMS-normalises q and k per head (``q_norm`` / ``k_norm``), Gemma's RMSNorm scales by
``1 + weight`` (``gain_offset``) and its embeddings by sqrt(hidden) (a constant on both sides of
the zero embedding delta), Mistral may use a sliding window.

Spaces. The residual stream is observed where attention and MLP read it and where both write it;
the query, key, value heads and the output projection's input are spaces with a head layout, so
:mod:`warmstart.engine.heads` builds their maps head by head; the SwiGLU hidden layer (``gate`` and
``up`` outputs, ``down`` input: ``act(gate) * up`` keeps coordinates) is one space. Qwen3's per-head
norms act on one head's coordinates; their space is observed at the first query head and mapped by
the query/key head maps.

Heads. ``lm_head`` is the task head (the whole finetuned head mapped on its input side); source and
target must share the vocabulary (its role names the vocabulary size, so other sizes are refused
before calibration). ``score`` (``*ForSequenceClassification``) and ``qa_outputs``
likewise. With tied input and output embeddings the one tensor plays one role, the head's, so the
update is applied once (the input embeddings change with it).

Not supported, with an error that says so: mixture-of-experts MLPs (Mixtral, Qwen2-MoE) and an
active sliding-window attention (set ``config.sliding_window = None`` / ``use_sliding_window =
False`` when the sequences are shorter than the window: attention is then the same).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
    linear_params,
    norm_params,
)
from .hf_encoder import prepare_text


def _no_window(config: Any) -> int | None:
    return _layer_types_window(config)


def _layer_types_window(config: Any) -> int | None:
    """Qwen2/Qwen3: layers listed as ``sliding_attention`` use ``config.sliding_window``."""
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return getattr(config, "sliding_window", None) or -1
    return None


def _mistral_window(config: Any) -> int | None:
    """Mistral: every layer uses ``config.sliding_window`` when it is shorter than the model's
    context."""
    window = getattr(config, "sliding_window", None)
    limit = getattr(config, "max_position_embeddings", None)
    if window is not None and (limit is None or window < limit):
        return window
    return _layer_types_window(config)


@dataclass(frozen=True)
class DecoderSpec:
    """What one ``config.model_type`` changes in the shared layout."""

    gain_offset: float = 0.0  # the RMSNorm scales by gain_offset + weight (Gemma: 1)
    window: Callable[[Any], int | None] = _no_window  # the active sliding window, if any


DECODERS: dict[str, DecoderSpec] = {
    "llama": DecoderSpec(),
    "mistral": DecoderSpec(window=_mistral_window),
    "qwen2": DecoderSpec(window=_layer_types_window),
    "qwen3": DecoderSpec(window=_layer_types_window),
    "gemma": DecoderSpec(gain_offset=1.0),
}
MIXTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "phimoe", "jamba")
HEADS = (("lm_head", "lm_head"), ("score", "head"), ("qa_outputs", "head"))  # (module, role)

ATTN, MLP = "self_attn", "mlp"
PROJECTIONS = (  # (module in the layer, role, output space, input space)
    (f"{ATTN}.q_proj", "attn.q", "attn_q", "resid"),
    (f"{ATTN}.k_proj", "attn.k", "attn_k", "resid"),
    (f"{ATTN}.v_proj", "attn.v", "attn_v", "resid"),
    (f"{ATTN}.o_proj", "attn.o", "resid", "attn_o"),
    (f"{MLP}.gate_proj", "mlp.gate", "mlp_hidden", "resid"),
    (f"{MLP}.up_proj", "mlp.up", "mlp_hidden", "resid"),
    (f"{MLP}.down_proj", "mlp.down", "resid", "mlp_hidden"),
)
NORMS = (("input_layernorm", "attn.norm"), ("post_attention_layernorm", "mlp.norm"))
HEAD_NORMS = ((f"{ATTN}.q_norm", "attn.q_norm"), (f"{ATTN}.k_norm", "attn.k_norm"))


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def find_hf_model(model: nn.Module, types) -> tuple[str, nn.Module] | None:
    """The first module (``model`` itself or a submodule: a user's wrapper) of a listed type."""
    for name, module in model.named_modules():
        if model_type(module) in types:
            return name, module
    return None


def _matches(model: nn.Module) -> bool:
    return find_hf_model(model, (*DECODERS, *MIXTURES)) is not None


def describe(model: nn.Module) -> ModelLayout:
    prefix, hf = find_hf_model(model, (*DECODERS, *MIXTURES))
    kind = model_type(hf)
    _refuse_variants(hf, kind)
    spec = DECODERS[kind]
    backbone = hf.base_model
    base = join(prefix, _name_of(hf, backbone))
    layers = backbone.layers
    blocks = tuple(BlockId(0, i) for i in range(len(layers)))
    first, last = SpaceKey(blocks[0], "resid"), SpaceKey(blocks[-1], "resid")
    head_params, head_points, excluded = decoder_heads(
        model, hf, prefix, join(base, "embed_tokens"), backbone.embed_tokens, last)
    rope = _rope(backbone, layers[0])
    spaces: list[Space] = []
    params: list[ParamRole] = []
    for bid, layer in zip(blocks, layers):
        p = join(base, f"layers.{bid.index}")
        heads = _heads(hf, layer, p, rope)
        key = lambda name, bid=bid: SpaceKey(bid, name)  # noqa: E731
        resid = (Point(f"{p}.{ATTN}.q_proj", "in", "attn_in"),
                 Point(f"{p}.{ATTN}.o_proj", "out", "attn_out"),
                 Point(f"{p}.{MLP}.gate_proj", "in", "mlp_in"),
                 Point(f"{p}.{MLP}.down_proj", "out", "mlp_out"),
                 *(head_points if bid == blocks[-1] else ()))
        spaces += [
            Space(key("resid"), hf.config.hidden_size, resid),
            _head_space(key("attn_q"), f"{p}.{ATTN}.q_proj", "out", heads, "query"),
            _head_space(key("attn_k"), f"{p}.{ATTN}.k_proj", "out", heads, "key"),
            _head_space(key("attn_v"), f"{p}.{ATTN}.v_proj", "out", heads, "value"),
            _head_space(key("attn_o"), f"{p}.{ATTN}.o_proj", "in", heads, "output"),
            Space(key("mlp_hidden"), layer.get_submodule(f"{MLP}.down_proj").in_features,
                  (Point(f"{p}.{MLP}.gate_proj", "out", "gate_out"),
                   Point(f"{p}.{MLP}.up_proj", "out", "up_out"),
                   Point(f"{p}.{MLP}.down_proj", "in", "down_in"))),
        ]
        for module, role, out_space, in_space in PROJECTIONS:
            params += linear_params(f"{p}.{module}", layer.get_submodule(module), role, bid,
                                    key(out_space), key(in_space))
        for module, role in NORMS:
            params += _gains(f"{p}.{module}", role, bid, key("resid"), layer.get_submodule(module),
                             spec.gain_offset)
        if _has(layer, HEAD_NORMS[0][0]):
            head_dim = key("attn_qk_head")
            spaces.append(Space(head_dim, heads.head_dim, (
                Point(f"{p}.{ATTN}.q_proj", "out", "first_head", features=(0, heads.head_dim)),),
                heads=dataclasses.replace(heads, kind="head_dim")))
            for module, role in HEAD_NORMS:
                params += _gains(f"{p}.{module}", role, bid, head_dim,
                                 layer.get_submodule(module), spec.gain_offset)
    if not any(p.name == join(base, "embed_tokens.weight") for p in head_params):
        params.append(ParamRole(join(base, "embed_tokens.weight"), "embed.tokens", None,
                                "embedding", first))
    params += _gains(join(base, "norm"), "final_norm", None, last, backbone.norm, spec.gain_offset)
    params += head_params
    return ModelLayout("hf_decoder", (blocks,), tuple(spaces), tuple(params),
                       excluded=excluded, prepare=prepare_text)


def _refuse_variants(hf: nn.Module, kind: str) -> None:
    """Mixture-of-experts MLPs and active sliding windows get an error naming the fix."""
    name = type(hf).__name__
    experts = any(sub.endswith((".experts", ".block_sparse_moe")) for sub, _ in hf.named_modules())
    if kind in MIXTURES or experts:
        raise ValueError(
            f"{name} ({kind}) is a mixture-of-experts model: its MLP routes each token to a few "
            "experts, and warmstart's decoder family transports dense MLPs only (an expert's "
            "coordinates are not one space with the router's). Transport between dense models "
            "(Llama, Qwen2, Qwen3, Mistral, Gemma).")
    window = DECODERS[kind].window(hf.config)
    if window is not None:
        raise ValueError(
            f"{name} uses sliding-window attention (sliding_window={window}), which warmstart's "
            "decoder family does not support yet (it describes full causal attention only). If "
            "your sequences are shorter than the window (attention is then the same), build the "
            "model with config.sliding_window=None (Mistral) or use_sliding_window=False "
            "(Qwen2/Qwen3).")


def _name_of(root: nn.Module, module: nn.Module) -> str:
    for name, candidate in root.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(root).__name__}")


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def _rope(backbone: nn.Module, layer: nn.Module) -> tuple[tuple[float, ...], float] | None:
    """Inverse frequencies of the rotary planes and the cos/sin scaling (``attention_scaling``)."""
    rotary = getattr(backbone, "rotary_emb", None) or getattr(layer.self_attn, "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None:
        raise ValueError(f"{type(backbone).__name__} has no rotary embedding with inv_freq; the "
                         "decoder family expects RoPE (rotary_emb.inv_freq).")
    return (tuple(float(f) for f in inv_freq.detach().double().cpu()),
            float(getattr(rotary, "attention_scaling", 1.0) or 1.0))


def _heads(hf: nn.Module, layer: nn.Module, where: str, rope) -> HeadLayout:
    """The layer's attention heads, checked against its projections."""
    attn = layer.self_attn
    config = hf.config
    head_dim = int(getattr(attn, "head_dim", 0) or config.hidden_size // config.num_attention_heads)
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    q_out, k_out = attn.q_proj.out_features, attn.k_proj.out_features
    if head_dim < 2 or head_dim % 2:
        raise ValueError(
            f"{where}: head_dim {head_dim} (hidden_size {config.hidden_size} over "
            f"{n_heads} heads) is odd: rotary embeddings turn pairs of dimensions, so the heads "
            "cannot be laid out; choose a hidden_size / head_dim that gives an even head_dim.")
    if q_out != n_heads * head_dim or k_out != n_kv * head_dim:
        raise ValueError(
            f"{where}: head_dim {head_dim} does not divide the projections as the config says "
            f"(q_proj {q_out} wide for {n_heads} heads, k_proj {k_out} for {n_kv}); fix "
            "num_attention_heads / num_key_value_heads / head_dim.")
    if n_heads % n_kv:
        raise ValueError(f"{where}: {n_heads} query heads cannot share {n_kv} key/value heads "
                         "(num_attention_heads must be a multiple of num_key_value_heads).")
    frequencies, rope_scaling = rope
    if 2 * len(frequencies) != head_dim:
        raise ValueError(f"{where}: {len(frequencies)} rotary frequencies for head_dim "
                         f"{head_dim}; partial rotary embeddings are not supported.")
    scale = float(getattr(attn, "scaling", head_dim ** -0.5)) * rope_scaling ** 2
    return HeadLayout("query", n_heads, n_kv, head_dim, frequencies, scale,
                      normed=_has(layer, HEAD_NORMS[0][0]))


def _head_space(key: SpaceKey, module: str, side: str, heads: HeadLayout, kind: str) -> Space:
    count = heads.n_kv_heads if kind in ("key", "value") else heads.n_heads
    return Space(key, count * heads.head_dim, (Point(module, side, "proj"),),
                 heads=dataclasses.replace(heads, kind=kind))


def _gains(name: str, role: str, block: BlockId | None, space: SpaceKey, module: nn.Module,
           offset: float) -> list[ParamRole]:
    """Norm roles, with Gemma's ``1 + weight`` declared on the gain."""
    return [dataclasses.replace(r, gain_offset=offset) if r.rule == "gain" else r
            for r in norm_params(name, role, block, space, module)]


def decoder_heads(model: nn.Module, hf: nn.Module, prefix: str, embed_name: str,
                  embed: nn.Module, last: SpaceKey
                  ) -> tuple[list[ParamRole], list[Point], dict[str, str]]:
    """Roles of the task heads (``lm_head``, ``score``, ``qa_outputs``), the points that read the
    last residual stream for them, and the names left out because a head is tied to the input
    embeddings (one tensor, one role: the head's, under the name ``named_parameters`` keeps)."""
    params: list[ParamRole] = []
    points: list[Point] = []
    excluded: dict[str, str] = {}
    for attr, role in HEADS:
        head = getattr(hf, attr, None)
        if not isinstance(head, nn.Linear):
            continue
        name = join(prefix, attr)
        points.append(Point(name, "in", "head_in"))
        weight = join(name, "weight")
        if head.weight is getattr(embed, "weight", None):
            excluded[weight] = (f"tied to {embed_name}.weight (one tensor): it moves once, as "
                                "the task head")
            weight = f"{embed_name}.weight"
        # a language-model head only pairs with one over the same vocabulary: the role says so,
        # and differing vocabularies are refused before any calibration
        suffix = f" over {head.out_features} tokens" if role == "lm_head" else ""
        params.append(ParamRole(weight, f"{role}.weight{suffix}", None, "head", None, last))
        if head.bias is not None:
            params.append(ParamRole(join(name, "bias"), f"{role}.bias{suffix}", None,
                                    "head_bias"))
    return params, points, excluded


FAMILY = Family("hf_decoder", _matches, describe, priority=10)
