"""Hugging Face T5 (``T5Model``, ``T5EncoderModel``, ``T5ForConditionalGeneration`` and the task
classes built on them): an encoder and a decoder stack of pre-norm blocks.

Decisions, and why:

- Stage 0 is the encoder, stage 1 the decoder, so blocks pair by relative depth within each stack.
- Rows of the decoder are decoder tokens, paired by the decoder's own mask
  (``SequenceInfo.others["decoder"]``; the points say so with ``sequence="decoder"``).
- Cross-attention keys and values read the encoder's output, its final norm's output, which is in
  the encoder's last residual coordinates: that space is their input space, and their output rows
  are encoder tokens (the encoder's mask). Queries and the output projection are decoder rows.
- The gated MLP (v1.1, flan): ``wi_0`` (gate) and ``wi_1`` (up) write the same hidden units that
  ``wo`` reads, so the three points share one space.
- ``T5LayerNorm`` is an RMS norm without a shift: its weight is a gain.
- ``relative_attention_bias`` ([buckets, heads], block 0 of each stack) keeps a zero delta,
  listed in the report: its columns are heads, and nothing pairs the target's heads with the
  source's (the attention maps are maps of the whole q/k/v spaces and may mix heads).
- Token embeddings (``shared``; the stacks' ``embed_tokens`` are the same tensor) move by the
  embedding rule into the encoder's first residual space (zero delta by default).
- ``lm_head``: tied to ``shared`` (always so in transformers 5), it is that tensor and moves once,
  as the embedding. Untied, it is the task head (same vocabulary): the whole finetuned head mapped
  on its input side. Its input is observed where ``lm_head`` reads it, after T5's
  ``d_model**-0.5`` rescale of the decoder output, so the map and the head rule see the numbers
  the head multiplies; the rescale also makes the inputs of models of different widths alike in
  size (RMS-normalised features of width d have norm about sqrt(d)).
- Any other tensor that is tied to a described one (a second name of the same tensor) is listed
  as such and never updated twice.
"""

from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .base import (
    BlockId,
    Family,
    ModelLayout,
    ParamRole,
    Point,
    SequenceInfo,
    Space,
    SpaceKey,
    find_submodule,
    join,
    linear_params,
    norm_params,
)
from .hf_encoder import prepare_text
from .hf_heads import describe_head

DECODER = "decoder"
_REL_BIAS = ("T5's relative position bias [buckets, heads] is indexed by head, and no map pairs "
             "the target's heads with the source's")


def _stack_cls() -> type | None:
    try:
        from transformers.models.t5.modeling_t5 import T5Stack
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return T5Stack


def _matches(model: nn.Module) -> bool:
    cls = _stack_cls()
    return cls is not None and find_submodule(model, cls) is not None


def _attention(p: str, attn: nn.Module, bid: BlockId, kind: str, resid: SpaceKey,
               kv_in: SpaceKey, seq_q: str | None, seq_kv: str | None
               ) -> tuple[list[Space], list[ParamRole]]:
    """One ``T5Attention`` at ``p``: queries read ``resid``, keys and values read ``kv_in``."""
    inner = attn.q.out_features
    q, k, v = (SpaceKey(bid, f"{kind}_{n}") for n in "qkv")
    spaces = [
        Space(q, inner, (Point(f"{p}.q", "out", "proj", sequence=seq_q),)),
        Space(k, inner, (Point(f"{p}.k", "out", "proj", sequence=seq_kv),)),
        Space(v, inner, (Point(f"{p}.v", "out", "proj", sequence=seq_kv),
                         Point(f"{p}.o", "in", "consumer", sequence=seq_q))),
    ]
    params: list[ParamRole] = []
    for name, out_space, in_space in (("q", q, resid), ("k", k, kv_in), ("v", v, kv_in),
                                      ("o", resid, v)):
        params += linear_params(f"{p}.{name}", getattr(attn, name), f"{kind}.{name}", bid,
                                out_space, in_space)
    return spaces, params


def _block(p: str, block: nn.Module, bid: BlockId, seq: str | None, enc_out: SpaceKey | None,
           extra: tuple[Point, ...]) -> tuple[list[Space], list[ParamRole]]:
    """A T5 block at ``p``: self-attention, cross-attention when ``enc_out`` is given, the MLP."""
    resid, hidden = SpaceKey(bid, "resid"), SpaceKey(bid, "mlp_hidden")
    layers = block.layer
    self_attn = f"{p}.layer.0.SelfAttention"
    spaces, params = _attention(self_attn, layers[0].SelfAttention, bid, "attn", resid, resid,
                                seq, seq)
    params += norm_params(f"{p}.layer.0.layer_norm", "attn.norm", bid, resid,
                          layers[0].layer_norm)
    points = [Point(f"{self_attn}.q", "in", "attn_in", sequence=seq),
              Point(f"{self_attn}.o", "out", "attn_out", sequence=seq)]
    if enc_out is not None:
        cross = f"{p}.layer.1.EncDecAttention"
        s, pr = _attention(cross, layers[1].EncDecAttention, bid, "cross", resid, enc_out, seq,
                           None)
        spaces += s
        params += pr + norm_params(f"{p}.layer.1.layer_norm", "cross.norm", bid, resid,
                                   layers[1].layer_norm)
        points += [Point(f"{cross}.q", "in", "cross_in", sequence=seq),
                   Point(f"{cross}.o", "out", "cross_out", sequence=seq)]
    ff = len(layers) - 1
    mlp = layers[ff].DenseReluDense
    m = f"{p}.layer.{ff}.DenseReluDense"
    gated = hasattr(mlp, "wi_0")
    ins = ((("wi_0", "mlp.gate", "gate_out"), ("wi_1", "mlp.up", "up_out")) if gated
           else (("wi", "mlp.fc1", "fc1_out"),))
    for name, role, _ in ins:
        params += linear_params(f"{m}.{name}", getattr(mlp, name), role, bid, hidden, resid)
    params += linear_params(f"{m}.wo", mlp.wo, "mlp.fc2", bid, resid, hidden)
    params += norm_params(f"{p}.layer.{ff}.layer_norm", "mlp.norm", bid, resid,
                          layers[ff].layer_norm)
    points += [Point(f"{m}.{ins[0][0]}", "in", "mlp_in", sequence=seq),
               Point(f"{m}.wo", "out", "mlp_out", sequence=seq), *extra]
    spaces.append(Space(resid, block.layer[0].SelfAttention.d_model, tuple(points)))
    spaces.append(Space(hidden, mlp.wo.in_features, (
        *(Point(f"{m}.{name}", "out", point, sequence=seq) for name, _, point in ins),
        Point(f"{m}.wo", "in", "fc2_in", sequence=seq))))
    return spaces, params


def _aliases(model: nn.Module) -> dict[str, str]:
    """Second names of tied tensors -> the name the tensor is updated under (its first)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            out[name] = first[id(param)]
        else:
            first[id(param)] = name
    return out


def describe(model: nn.Module) -> ModelLayout:
    stack_cls = _stack_cls()
    enc_name, encoder = find_submodule(model, stack_cls)
    if "." not in enc_name and enc_name != "encoder":
        raise ValueError(f"{type(model).__name__}: describe the whole T5 model (T5Model, "
                         "T5EncoderModel, T5ForConditionalGeneration, ...), not one T5Stack.")
    prefix = enc_name.rpartition(".")[0]
    backbone = model.get_submodule(prefix) if prefix else model
    decoder = getattr(backbone, "decoder", None)
    decoder = decoder if isinstance(decoder, stack_cls) else None
    aliases = _aliases(model)
    stacks = [("encoder", encoder, 0, None)]
    if decoder is not None:
        stacks.append(("decoder", decoder, 1, DECODER))
    blocks = tuple(tuple(BlockId(stage, i) for i in range(len(stack.block)))
                   for _, stack, stage, _ in stacks)
    first_enc, enc_out = SpaceKey(blocks[0][0], "resid"), SpaceKey(blocks[0][-1], "resid")
    last = SpaceKey(blocks[-1][-1], "resid")  # what a task head reads
    head_spaces, head_params, head_points, _ = describe_head(model, prefix, last)
    lm_head = getattr(backbone, "lm_head", None)
    lm_name = join(prefix, "lm_head")
    tied_lm = lm_head is not None and join(lm_name, "weight") in aliases
    spaces: list[Space] = []
    params: list[ParamRole] = []
    excluded: dict[str, str] = {}
    for attr, stack, stage, seq in stacks:
        s = join(prefix, attr)
        for bid, block in zip(blocks[stage], stack.block):
            p = f"{s}.block.{bid.index}"
            extra: list[Point] = []
            if bid == blocks[stage][-1]:
                extra.append(Point(f"{s}.final_layer_norm", "out", "final_norm_out",
                                   sequence=seq))
                if bid == blocks[-1][-1]:
                    extra += head_points
                    if lm_head is not None and not tied_lm:
                        extra.append(Point(lm_name, "in", "lm_head_in", sequence=seq))
            sp, pr = _block(p, block, bid, seq, enc_out if stage == 1 else None, tuple(extra))
            spaces += sp
            params += pr
            rel = f"{p}.layer.0.SelfAttention.relative_attention_bias.weight"
            if getattr(block.layer[0].SelfAttention, "has_relative_attention_bias", False):
                excluded[rel] = _REL_BIAS
        params += norm_params(f"{s}.final_layer_norm", f"{attr}.final_norm", None,
                              SpaceKey(blocks[stage][-1], "resid"), stack.final_layer_norm)
    embeddings = [(join(prefix, "shared.weight"), "embed.tokens", first_enc)]
    embeddings += [(join(prefix, f"{attr}.embed_tokens.weight"), f"embed.tokens.{attr}",
                    SpaceKey(blocks[stage][0], "resid")) for attr, _, stage, _ in stacks]
    for name, role, space in embeddings:
        if name not in aliases and _has_param(model, name):
            params.append(ParamRole(name, role, None, "embedding", space))
    if lm_head is not None and not tied_lm:
        params.append(ParamRole(join(lm_name, "weight"), "head.weight", None, "head", None, last))
        if lm_head.bias is not None:
            params.append(ParamRole(join(lm_name, "bias"), "head.bias", None, "head_bias"))
    for name, canonical in aliases.items():
        excluded[name] = (f"under this name; it is the same tensor as {canonical} (tied), "
                          "which moves once, under that name")
    return ModelLayout("hf_t5", blocks, tuple(spaces + head_spaces), tuple(params + head_params),
                       excluded, prepare=lambda m, batch: _prepare(m, batch, prefix,
                                                                   decoder is not None))


def _prepare(model: nn.Module, inputs: Any, backbone: str, has_decoder: bool
             ) -> tuple[Any, SequenceInfo]:
    """Tokenizer outputs for ``model.forward``; the decoder's rows are paired by its own mask.

    Without ``decoder_input_ids``, they are made the way the model classes make them: from 2-D
    ``labels`` (shifted right), or, for ``T5ForSequenceClassification``, from ``input_ids``.
    """
    kwargs, info = prepare_text(model, inputs)
    if not has_decoder:
        return kwargs, info
    kwargs.pop("labels", None)  # calibration computes no loss
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params:
        kwargs["use_cache"] = False
    ids, mask = inputs.get("decoder_input_ids"), inputs.get("decoder_attention_mask")
    if ids is None:
        owner = model.get_submodule(backbone) if backbone else model
        labels = inputs.get("labels")
        if isinstance(labels, Tensor) and labels.ndim == 2:
            ids, mask = owner._shift_right(labels), _shifted(labels != -100)
        elif _is_sequence_classifier(model):
            ids, mask = owner._shift_right(inputs["input_ids"]), _shifted(info.mask)
        else:
            raise ValueError(
                f"{type(model).__name__} has a decoder: each calibration batch needs "
                "'decoder_input_ids' (and 'decoder_attention_mask' when padded) or 2-D 'labels' "
                f"(token ids, -100 for padding), got keys {sorted(inputs)}; tokenize the target "
                "text of the calibration examples too.")
        kwargs["decoder_input_ids"] = ids
    if mask is None:
        mask = torch.ones_like(ids)
    return kwargs, replace(info, others={DECODER: SequenceInfo(mask=mask.bool())})


def _shifted(mask: Tensor) -> Tensor:
    """The mask of right-shifted ids: the start token is real, the last position drops out."""
    return torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1).bool()


def _is_sequence_classifier(model: nn.Module) -> bool:
    try:
        from transformers import T5ForSequenceClassification
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, T5ForSequenceClassification)


def _has_param(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False


FAMILY = Family("hf_t5", _matches, describe, priority=10)

__all__ = ["DECODER", "FAMILY", "describe"]
