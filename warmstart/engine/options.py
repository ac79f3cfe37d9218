"""The one option set of a transport.

:func:`warmstart.transport`, the :class:`~warmstart.TaskVectorTransport` callback, the
``warmstart transport`` command and the transport report all read this one frozen dataclass, so an
option is added in one place. jsonargparse (which LightningCLI uses) reads its fields and their
help text from the docstring below, so YAML configs name them as ``options: {alpha: 2, ...}``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .matching import check_depth_mapping
from .procrustes import check_solver
from .token_alignment import TokenPairing, check_token_pairing

Method = Literal["theseus", "slice", "head_only"]
METHODS = ("theseus", "slice", "head_only")
DEFAULT_ALPHA_GRID = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)

_NEGATIVE_ALPHA = ("{}: the task head is replaced by the finetuned head whatever alpha is, so a "
                   "negative alpha would move the body away from the task its head predicts; use "
                   "alpha=0 to transport the head alone.")


@dataclass(frozen=True)
class TransportOptions:
    """How a task vector is moved from the source into the target.

    Args:
        method: ``theseus`` (Procrustes maps from activations), ``slice`` (crop/zero-pad every
            tensor, no activations) or ``head_only`` (only the task head, on its input side).
        alpha: strength of the update ``theta + alpha * tau``; ``auto`` takes the best of
            ``alpha_grid`` by a validation score (forward passes only).
        alpha_grid: the strengths tried by ``alpha="auto"``.
        calibration_batches: calibration batches observed (``None``: all that are given).
        rows_per_batch: at most this many paired rows (tokens, or positions of a feature map)
            of each calibration batch enter each space's statistics, a random subset seeded by
            the batch's index (``None``: every row). Cheaper statistics where batches have many
            more rows than the spaces are wide; a space gets a rank-deficient map when the rows
            it sees in all are fewer than its width.
        center: subtract the mean activations before computing the maps.
        whiten: partial whitening power in [0, 0.5] (0: the method's uncentered cross moment).
        completion: directions no calibration row determines get the crop map restricted to them
            (``crop``) or no delta (``none``).
        rank_rtol: singular values below ``rank_rtol`` times the largest count as zero.
        solver: polar factor by exact SVD (``svd``), polished Gram eigendecomposition (``eigh``),
            or ``auto`` (``eigh`` on CUDA, ``svd`` elsewhere).
        depthwise: depthwise convolutions by their diagonal (``diagonal``) or left as they are
            (``zero``).
        embeddings: token/position/patch embeddings get a zero delta (``zero``, the method's
            default) or have their feature dimension mapped (``map``).
        gains: norm gains and layer scales move by a per-channel regression of the target's
            normalised features on the mapped source ones (``regression``, exact under
            signed permutations and channel duplications of a widened stream) or by the diagonal
            of the mapped operator alone (``diagonal``, no extra statistics).
        head_hidden: the hidden units of a two-layer task head (``dense -> tanh -> out``) keep
            their identity (``units``: target unit i is source unit i; when the target has fewer,
            the source units with the largest output weights) or take the last residual
            stream's map (``stream``).
        block_group: compute statistics, maps and updates for this many consecutive target
            blocks at a time (one calibration pass each, stopped after the group's last block),
            keeping each delta in the target's dtype, so peak memory is the models plus one
            group (``None``: one pass over the whole model).
        depth_mapping: source block index for every target block (default: relative depth).
        bn_recalibration: after the update, re-estimate BatchNorm running statistics from this
            many calibration batches (0: off).
        head_fit: after the update (and the BatchNorm recalibration), refit the target's output
            layer to the finetuned source's outputs on this many calibration batches, by ridge
            regression on the layer's inputs: no labels, no gradient steps (0: off, the head is
            moved like every other parameter). With a LoRA adapter as the task vector, the
            source's outputs are those of the source with its adapter; a PEFT-wrapped target
            gets the refit in its ``modules_to_save`` copy of the head (``transport_adapter``,
            which only reads the target, refuses it).
        head_fit_ridge: the ridge of ``head_fit``, relative to the mean squared feature (> 0).
            Larger values give a smaller head: lower accuracy right after the transport; the
            default is about the best accuracy measured on the demo pair
            (``bench/head_fit_step0.py``).
        head_fit_mode: ``ridge`` refits the whole output layer as above; ``scale`` only
            multiplies the moved layer's weight and bias by one positive number, the least-squares
            scale of its logits onto the source's (each example's mean logit removed, which a
            softmax ignores): the target keeps every decision and takes the source's confidence.
        token_pairing: how text token rows of the two models pair: ``one_to_one`` (both
            tokenizers split identically), ``offsets`` (each target token with the mean of the
            source tokens covering its characters; needs fast tokenizers' ``offset_mapping``),
            ``example`` (mean-pooled examples), or ``auto`` (one to one when the splits agree,
            else ``offsets``).
        strict: refuse parameters that cannot be matched (``False``: give them a zero delta and
            list them in the report).
        source_family: family adapter of the source (default: detected).
        target_family: family adapter of the target (default: detected).
    """

    method: Method = "theseus"
    alpha: float | Literal["auto"] = 1.0
    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID
    calibration_batches: int | None = None
    rows_per_batch: int | None = None
    center: bool = False
    whiten: float = 0.0
    completion: Literal["none", "crop"] = "crop"
    rank_rtol: float = 1e-6
    solver: Literal["auto", "svd", "eigh"] = "auto"
    depthwise: Literal["diagonal", "zero"] = "diagonal"
    embeddings: Literal["zero", "map"] = "zero"
    gains: Literal["regression", "diagonal"] = "regression"
    head_hidden: Literal["units", "stream"] = "units"
    block_group: int | None = None
    depth_mapping: tuple[int, ...] | dict[int, int] | None = None
    bn_recalibration: int = 0
    head_fit: int = 0
    head_fit_ridge: float = 1.0
    head_fit_mode: Literal["ridge", "scale"] = "ridge"
    token_pairing: TokenPairing = "auto"
    strict: bool = True
    source_family: str | None = None
    target_family: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__.__get__(self)  # frozen: normalise once, here
        if isinstance(self.alpha_grid, (list, tuple)):
            set_("alpha_grid", tuple(self.alpha_grid))
        if isinstance(self.depth_mapping, list):
            set_("depth_mapping", tuple(self.depth_mapping))
        self.check()

    def check(self) -> None:
        """Every option's type and range; raises ``ValueError`` naming the option and the fix."""
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}.")
        _check_alpha(self.alpha)
        if self.alpha == "auto":
            check_alpha_grid(self.alpha_grid)
        if not _is_number(self.whiten) or not 0.0 <= self.whiten <= 0.5:
            raise ValueError(f"whiten must be a power in [0, 0.5], got {self.whiten!r}.")
        for name, allowed in (("completion", ("none", "crop")), ("depthwise", ("diagonal", "zero")),
                              ("embeddings", ("zero", "map")),
                              ("head_hidden", ("units", "stream")),
                              ("head_fit_mode", ("ridge", "scale")),
                              ("gains", ("regression", "diagonal"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        for name in ("center", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        check_solver(self.solver)
        check_depth_mapping(self.depth_mapping)
        if not _is_count(self.bn_recalibration, 0):
            raise ValueError(f"bn_recalibration must be a number of batches >= 0, got "
                             f"{self.bn_recalibration!r}.")
        if not _is_count(self.head_fit, 0):
            raise ValueError(f"head_fit must be a number of batches >= 0, got {self.head_fit!r}.")
        if (not _is_number(self.head_fit_ridge) or not math.isfinite(self.head_fit_ridge)
                or self.head_fit_ridge <= 0):
            raise ValueError(f"head_fit_ridge must be a finite number > 0, got "
                             f"{self.head_fit_ridge!r}.")
        if self.block_group is not None and not _is_count(self.block_group, 1):
            raise ValueError(f"block_group must be None (one pass) or a number of blocks >= 1, "
                             f"got {self.block_group!r}.")
        if self.calibration_batches is not None and not _is_count(self.calibration_batches, 1):
            raise ValueError(f"calibration_batches must be None (all batches) or a number of "
                             f"batches >= 1, got {self.calibration_batches!r}.")
        if self.rows_per_batch is not None and not _is_count(self.rows_per_batch, 1):
            raise ValueError(f"rows_per_batch must be None (every row) or a number of rows >= 1, "
                             f"got {self.rows_per_batch!r}.")
        if not _is_number(self.rank_rtol) or not 0.0 <= self.rank_rtol < 1.0:
            raise ValueError(f"rank_rtol must be in [0, 1), got {self.rank_rtol!r}.")
        check_token_pairing(self.token_pairing)

    def replace(self, **changes: Any) -> TransportOptions:
        """A copy with ``changes``; an unknown name gets an error listing the options."""
        unknown = sorted(set(changes) - set(option_names()))
        if unknown:
            raise TypeError(f"unknown transport option(s) {unknown}; the options are "
                            f"{option_names()} (see warmstart.TransportOptions).")
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (tuples as lists), e.g. for the report and fingerprints."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
            elif isinstance(value, Mapping):
                out[key] = {str(k): v for k, v in value.items()}
        return out


def option_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TransportOptions)]


def check_alpha_grid(grid: Any) -> list[float]:
    """The grid for ``alpha="auto"`` as floats: non-empty, finite, >= 0."""
    try:
        values = [float(a) for a in grid]
    except (TypeError, ValueError) as err:
        shown = list(grid) if isinstance(grid, tuple) else grid
        raise ValueError(f"alpha_grid must be a non-empty list of finite numbers, got {shown!r}."
                         ) from err
    if not values or not all(math.isfinite(a) for a in values):
        raise ValueError(f"alpha_grid must be a non-empty list of finite numbers, got {values!r}.")
    if min(values) < 0:
        raise ValueError(_NEGATIVE_ALPHA.format(f"alpha_grid values must be >= 0, got {values!r}"))
    return values


def _check_alpha(alpha: Any) -> None:
    if alpha == "auto":
        return
    if not _is_number(alpha) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number or 'auto', got {alpha!r}.")
    if alpha < 0:
        raise ValueError(_NEGATIVE_ALPHA.format(f"alpha must be >= 0, got {alpha!r}"))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least
