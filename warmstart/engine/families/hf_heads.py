"""Task heads of the Hugging Face auto classes, as roles shared by every family.

Two head shapes exist:

- one linear layer over the backbone's features: ``classifier`` (``*ForTokenClassification``,
  ``ViTForImageClassification``), ``score`` (decoders' ``*ForSequenceClassification``);
- two layers over the first token, ``dense -> activation -> linear``. BERT's pooler followed by
  ``classifier``, the ``classifier.dense`` / ``classifier.out_proj`` head of RoBERTa, MPNet and
  XLM-R, DeBERTa's ``pooler.dense`` followed by ``classifier``, and T5's
  ``classification_head.dense`` / ``out_proj`` are the same function, so they play the same roles:
  ``head.dense`` and ``head``. A BERT source therefore pairs with an MPNet target head to head.

The head's hidden layer (``head.dense``'s output) is a space of its own, ``head_hidden``. The
target's head is new (randomly initialised), so its hidden units can be chosen freely; the default
keeps units as units (``head_hidden="units"``: a partial identity, which commutes with the
elementwise activation, so the target's head computes the source head's function on the
transported features). Target units beyond the source's keep their own initial rows in ``dense``
and get zero columns in the output layer: they change nothing at step 0 and still learn.

A BERT pooler counts as a head layer only inside a Hugging Face model class (where ``forward``
feeds it to the classifier); inside a user's module, whose ``forward`` warmstart cannot read, the
pooler stays a backbone layer with its own space.
"""

from __future__ import annotations

from torch import nn

from .base import ParamRole, Point, Space, SpaceKey, find_head, join

HIDDEN = SpaceKey(None, "head_hidden")

# (dense, output) module names of two-layer heads, relative to the top-level model.
_TWO_LAYER = (
    ("classifier.dense", "classifier.out_proj"),  # RoBERTa, MPNet, XLM-R, Electra
    ("classification_head.dense", "classification_head.out_proj"),  # T5, BART
    ("pooler.dense", "classifier"),  # DeBERTa's ContextPooler
)


def _linear(model: nn.Module, name: str) -> nn.Linear | None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None


def _is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def head_modules(model: nn.Module, backbone: str, pooler: str | None = None
                 ) -> tuple[str | None, str | None]:
    """``(dense, output)`` module names of ``model``'s task head (``None`` where absent).

    ``backbone`` is the backbone's attribute path, ``pooler`` the backbone's own pooler layer
    (full name), which is the head's first layer in a Hugging Face model class.
    """
    for dense, out in _TWO_LAYER:
        if _linear(model, dense) is not None and _linear(model, out) is not None:
            return dense, out
    head = find_head(model, backbone.split(".")[0])
    if head is None:
        return None, None
    if pooler is not None and _linear(model, pooler) is not None and _is_hf_model(model):
        return pooler, head[0]
    return None, head[0]


def describe_head(model: nn.Module, backbone: str, last: SpaceKey, pooler: str | None = None
                  ) -> tuple[list[Space], list[ParamRole], list[Point], str | None]:
    """Spaces, parameter roles and the extra points of the last residual space for the head.

    Returns ``(spaces, params, last_points, dense)``: ``last_points`` observe the features the
    head reads (they are in the last block's residual coordinates); ``dense`` is the head's first
    layer when it has two, so the backbone does not describe it again.
    """
    dense, out = head_modules(model, backbone, pooler)
    if out is None:
        return [], [], [], None
    spaces: list[Space] = []
    params: list[ParamRole] = []
    reads = dense or out
    if dense is not None:
        layer = _linear(model, dense)
        spaces.append(Space(HIDDEN, layer.out_features, (), fixed=True))
        params.append(ParamRole(join(dense, "weight"), "head.dense.weight", None, "head_linear",
                                HIDDEN, last))
        if layer.bias is not None:
            params.append(ParamRole(join(dense, "bias"), "head.dense.bias", None, "head_vector",
                                    HIDDEN))
    params.append(ParamRole(join(out, "weight"), "head.weight", None, "head", None,
                            HIDDEN if dense is not None else last))
    if _linear(model, out).bias is not None:
        params.append(ParamRole(join(out, "bias"), "head.bias", None, "head_bias"))
    return spaces, params, [Point(reads, "in", "head_in")], dense
