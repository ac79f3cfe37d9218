"""What a family adapter declares: coordinate spaces, the points that observe them, parameter roles.

A *space* is one coordinate system (the residual stream of a block, the hidden layer of an MLP, the
value heads of an attention). Points that share coordinates (``fc1`` output and ``fc2`` input, a
pooled feature and the tokens it pools) are members of one space and get one map, estimated from all
their statistics together.

A *role* is a family-independent name for a parameter (``attn.q.weight``, ``mlp.fc1.bias``), so that
a BERT source can be matched to an MPNet target. Fused parameters (timm's ``attn.qkv``) declare one
role per block of rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Literal

from torch import Tensor, nn

Side = Literal["in", "out"]
Rule = Literal[
    "linear",  # [out, in] weight: T_out^T tau T_in
    "vector",  # bias / norm shift / BN running mean: T_out^T v
    "gain",  # norm gain / layer scale (a diagonal operator): diag(T_out^T diag(g) T_out)
    "variance",  # BN running variance: sum_i T_ij^2 v_i
    "conv",  # [out, in, kh, kw]: the linear rule per spatial tap
    "depthwise",  # [C, 1, kh, kw]: diagonal of T^T diag(w) T per tap (or zero, by option)
    "head",  # task head weight [n_classes, d]: whole finetuned head, W_A T_in
    "head_bias",  # task head bias: copied
    "head_linear",  # a head's hidden layer: the whole finetuned weight, T_out^T W T_in
    "head_vector",  # its bias: the whole finetuned bias, T_out^T b
    "embedding",  # token / position / patch embeddings: zero delta unless embeddings="map"
]
Layout = Literal["last", "channels"]


@dataclass(frozen=True)
class BlockId:
    """A block, as ``(stage, index)`` inside its stage; transformers have one stage."""

    stage: int
    index: int

    def __str__(self) -> str:
        return f"{self.stage}.{self.index}"


@dataclass(frozen=True)
class SpaceKey:
    """A coordinate space: ``name`` inside ``block`` (``None`` for model-level spaces)."""

    block: BlockId | None
    name: str

    def __str__(self) -> str:
        return self.name if self.block is None else f"block{self.block}.{self.name}"


@dataclass(frozen=True)
class Point:
    """One observed activation: the input or output of ``module``.

    ``layout="last"`` means features on the last dimension ([B, D] or [B, N, D]); ``"channels"``
    means [B, C, H, W]. ``features=(start, stop)`` keeps a slice of the feature dimension (one of
    q, k, v in a fused projection). ``role`` pairs the point with the other model's point of the
    same space. ``sequence`` names the token sequence its rows belong to when a batch has several
    (``SequenceInfo.others``, e.g. an encoder-decoder's ``"decoder"``); ``None``: the main one.
    """

    module: str
    side: Side
    role: str
    layout: Layout = "last"
    features: tuple[int, int] | None = None
    sequence: str | None = None


HeadKind = Literal["query", "key", "value", "output", "qkv", "head_dim"]


@dataclass(frozen=True)
class HeadLayout:
    """The attention heads laid out along a space, so that its map is built head by head.

    ``kind`` says what the space holds: ``query`` (``n_heads`` heads of ``head_dim``), ``key`` /
    ``value`` (``n_kv_heads`` heads), ``output`` (the output projection's input, one head per
    query head), ``qkv`` (query, key and value heads concatenated, GPT-2's fused projection) or
    ``head_dim`` (one head's coordinates, for per-head norms such as Qwen3's ``q_norm``). Query
    head ``h`` reads key/value head ``h // (n_heads // n_kv_heads)``, as ``repeat_kv`` groups them.
    ``rope`` holds the inverse frequencies of the rotary planes (dimension ``i`` turns with
    ``i + head_dim / 2``), ``None`` without rotary embeddings; ``scale`` multiplies the q.k scores
    (default ``head_dim ** -0.5``); ``normed`` means q and k are RMS-normalised per head after the
    projection, so the norm's gain, not the projection, sets their scale. The maps are built by
    :mod:`warmstart.engine.heads`.
    """

    kind: HeadKind
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope: tuple[float, ...] | None = None
    scale: float | None = None
    normed: bool = False


@dataclass(frozen=True)
class Space:
    """A coordinate space of ``width`` channels, observed at ``points``.

    A ``fixed`` space has no statistics: its map is chosen without data (the hidden units of a
    task head the target does not have yet, see ``hf_heads``).
    """

    key: SpaceKey
    width: int
    points: tuple[Point, ...]
    fixed: bool = False
    heads: HeadLayout | None = None


@dataclass(frozen=True)
class ParamRole:
    """Parameter (or buffer) ``name`` plays ``role`` in ``block`` and moves by ``rule``.

    ``rows=(start, stop)`` selects a block of rows of a fused parameter. For a ``gain``,
    ``gain_offset`` is what the module adds to the stored weight before scaling (Gemma's RMSNorm
    scales by ``1 + weight``: offset 1).
    """

    name: str
    role: str
    block: BlockId | None
    rule: Rule
    space_out: SpaceKey | None = None
    space_in: SpaceKey | None = None
    rows: tuple[int, int] | None = None
    gain_offset: float = 0.0

    @property
    def key(self) -> tuple[BlockId | None, str]:
        return (self.block, self.role)


@dataclass(frozen=True)
class SequenceInfo:
    """How token rows of one batch are laid out, for pairing with the other model's rows.

    ``mask`` [B, N] marks real tokens (text); ``prefix`` tokens (class/register) are paired one to
    one and kept apart from a ``grid`` of patch tokens (ViT), which is resized to the other model's.
    ``offsets`` [B, N, 2] are the tokens' character spans in the text (a fast tokenizer's
    ``offset_mapping``), for pairing with another tokenization of the same text. ``others`` lays
    out further token sequences of the batch by name (an encoder-decoder's decoder tokens).
    """

    mask: Tensor | None = None
    prefix: int = 0
    grid: tuple[int, int] | None = None
    offsets: Tensor | None = None
    others: Mapping[str, SequenceInfo] = field(default_factory=dict)

    def of(self, sequence: str | None) -> SequenceInfo:
        """The layout of the named sequence of the batch (``others``); ``None``: this one."""
        if sequence is None:
            return self
        if sequence not in self.others:
            raise ValueError(f"the batch describes no token sequence {sequence!r} (it has "
                             f"{sorted(self.others) or 'only the main one'}); the family's "
                             "prepare function must give its layout in SequenceInfo.others.")
        return self.others[sequence]


@dataclass(frozen=True)
class ModelLayout:
    """Everything warmstart needs to know about one model instance."""

    family: str
    blocks: tuple[tuple[BlockId, ...], ...]
    spaces: tuple[Space, ...]
    params: tuple[ParamRole, ...]
    excluded: Mapping[str, str] = field(default_factory=dict)  # name -> reason (zero delta)
    prepare: Callable[[nn.Module, Any], tuple[Any, SequenceInfo]] | None = None

    def space(self, key: SpaceKey) -> Space | None:
        return self._spaces.get(key)

    @property
    def _spaces(self) -> dict[SpaceKey, Space]:
        return {s.key: s for s in self.spaces}


@dataclass(frozen=True)
class Family:
    """A registered adapter: ``matches(model)`` says whether ``describe(model)`` applies."""

    name: str
    matches: Callable[[nn.Module], bool]
    describe: Callable[[nn.Module], ModelLayout]
    priority: int = 0


def instance_of(module_path: str, class_name: str) -> Callable[[nn.Module], bool]:
    """A family's ``matches``: ``model`` is an instance of ``module_path.class_name``, imported
    when first asked (``False`` when that module cannot be imported)."""
    def matches(model: nn.Module) -> bool:
        try:
            cls = getattr(import_module(module_path), class_name)
        except (ImportError, AttributeError):
            return False
        return isinstance(model, cls)
    return matches


def find_submodule(model: nn.Module, cls: type | tuple[type, ...]) -> tuple[str, nn.Module] | None:
    """The first submodule (in ``named_modules`` order) that is an instance of ``cls``."""
    for name, module in model.named_modules():
        if isinstance(module, cls):
            return name, module
    return None


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def find_head(model: nn.Module, backbone_prefix: str) -> tuple[str, nn.Linear] | None:
    """The task head: timm's ``get_classifier()``, else a top-level ``nn.Linear`` called
    ``head`` / ``classifier`` / ``fc`` / ``score`` outside the backbone."""
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        for name, module in model.named_modules():
            if module is head and isinstance(module, nn.Linear) and name:
                return name, module
    for attr in ("head", "classifier", "fc", "score"):
        module = getattr(model, attr, None)
        if isinstance(module, nn.Linear) and attr != backbone_prefix:
            return attr, module
    return None


def last_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The last module that holds parameters (``named_modules`` order), if it is an
    ``nn.Linear``: the output layer of a plain network such as an ``nn.Sequential`` MLP."""
    last = None
    for name, module in model.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            last = (name, module)
    return last if last is not None and isinstance(last[1], nn.Linear) else None


def linear_params(
    module_name: str,
    module: nn.Module,
    role: str,
    block: BlockId | None,
    space_out: SpaceKey,
    space_in: SpaceKey,
) -> list[ParamRole]:
    """Roles for a linear/1x1-conv layer: its weight and (if present) its bias."""
    out = [ParamRole(join(module_name, "weight"), f"{role}.weight", block, "linear",
                     space_out, space_in)]
    if getattr(module, "bias", None) is not None:
        out.append(ParamRole(join(module_name, "bias"), f"{role}.bias", block, "vector", space_out))
    return out


def norm_params(module_name: str, role: str, block: BlockId | None, space: SpaceKey,
                module: nn.Module) -> list[ParamRole]:
    """Roles for a LayerNorm/RMSNorm/BatchNorm: the gain as a diagonal scale, the shift as a
    vector, BN running stats too."""
    out = []
    for attr, rule in (("weight", "gain"), ("bias", "vector")):
        if getattr(module, attr, None) is not None:
            out.append(ParamRole(join(module_name, attr), f"{role}.{attr}", block, rule, space))
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
        out.append(ParamRole(join(module_name, "running_mean"), f"{role}.running_mean", block,
                             "vector", space))
        out.append(ParamRole(join(module_name, "running_var"), f"{role}.running_var", block,
                             "variance", space))
    return out


def transformer_block_spaces(bid: BlockId, d: int, d_hidden: int, qkv: tuple[Point, Point, Point],
                             attn_out: str, mlp_in: str, mlp_out: str,
                             extra_resid: tuple[Point, ...] = ()) -> list[Space]:
    """The five spaces of a transformer block, shared by the transformer families.

    ``qkv``: the output points of the query, key and value projections (slices of one fused
    module, or three modules); ``attn_out`` / ``mlp_in`` / ``mlp_out``: module names of the
    attention output projection and the two MLP layers. The residual stream is observed where
    attention reads it (the query projection's input) and where both sub-layers write into it; the
    value heads share coordinates with the output projection's input; the MLP hidden layer with
    the second layer's input.
    """
    q, k, v = qkv
    resid = (Point(q.module, "in", "attn_in"), Point(attn_out, "out", "attn_out"),
             Point(mlp_in, "in", "mlp_in"), Point(mlp_out, "out", "mlp_out"), *extra_resid)
    return [
        Space(SpaceKey(bid, "resid"), d, resid),
        Space(SpaceKey(bid, "attn_q"), d, (q,)),
        Space(SpaceKey(bid, "attn_k"), d, (k,)),
        Space(SpaceKey(bid, "attn_v"), d, (v, Point(attn_out, "in", "consumer"))),
        Space(SpaceKey(bid, "mlp_hidden"), d_hidden,
              (Point(mlp_in, "out", "fc1_out"), Point(mlp_out, "in", "fc2_in"))),
    ]


class LayoutBuilder:
    """Collects the points of every space (in declaration order) and the parameter roles, for
    families that declare a space's points in several places (the CNN stages)."""

    def __init__(self) -> None:
        self.points: dict[SpaceKey, list[Point]] = {}
        self.widths: dict[SpaceKey, int] = {}
        self.params: list[ParamRole] = []

    def observe(self, key: SpaceKey, width: int, *points: Point) -> None:
        self.widths[key] = width
        self.points.setdefault(key, []).extend(points)

    def spaces(self) -> tuple[Space, ...]:
        return tuple(Space(k, self.widths[k], tuple(p)) for k, p in self.points.items())
