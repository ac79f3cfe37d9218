"""Streaming cross statistics of paired activations, gathered with forward hooks.

Each calibration batch runs through the source base model first; its hooks keep that batch's
activations of the observed points. The target base model runs next; its hooks pair every target
activation with the stored source one and fold the pair into float64 sums at once, so target
activations are never stored and nothing outlives the batch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .families.base import ModelLayout, Point, SequenceInfo, SpaceKey
from .procrustes import CrossStatistics
from .progress import progress_bar
from .token_alignment import TokenAlignment, align_tokens


@dataclass(frozen=True)
class SpacePairing:
    """Statistics for ``target_space`` come from these (source point, target point) pairs."""

    target_space: SpaceKey
    source_space: SpaceKey
    d_source: int
    d_target: int
    points: tuple[tuple[Point, Point], ...]


def call_model(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def run_batch(model: nn.Module, inputs: Any, side: str, index: int,
              call: Callable[[nn.Module, Any], Any] = call_model) -> None:
    """Run one calibration batch (by ``call(model, inputs)``); a model that rejects it gets an
    error naming batch and model."""
    try:
        call(model, inputs)
    except torch.cuda.OutOfMemoryError:
        raise
    except (TypeError, RuntimeError) as err:
        raise ValueError(
            f"calibration batch {index} does not fit the {side} model ({type(model).__name__}): "
            f"{type(err).__name__}: {err}. Calibration must yield that model's inputs only (no "
            "labels): a tensor, a tuple of positional tensors or a mapping of keyword tensors; "
            "pass target_calibration=... when the target takes other inputs than the source."
        ) from err


def prepare_inputs(model: nn.Module, layout: ModelLayout, batch: Any) -> tuple[Any, SequenceInfo]:
    if layout.prepare is not None:
        return layout.prepare(model, batch)
    return batch, SequenceInfo()


def move_to(batch: Any, model: nn.Module) -> Any:
    """``batch`` on ``model``'s device, floating tensors in its dtype (e.g. bf16 models)."""
    device, dtype = model_device(model), model_dtype(model)
    if isinstance(batch, Tensor):
        if batch.is_meta and device.type != "meta":
            raise ValueError(
                f"a calibration tensor {tuple(batch.shape)} is on the meta device, which holds no "
                f"data, so it cannot be moved to the model's device ({device}); build the "
                "calibration batches from real data (on any device: they are moved to each "
                "model's device automatically)."
            )
        return batch.to(device, dtype) if batch.is_floating_point() else batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to(v, model) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(v, model) for v in batch)
    return batch


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


# ---------------------------------------------------------------------------------------------
# Row pairing


def _slice(act: Tensor, point: Point) -> Tensor:
    if point.features is None:
        return act
    start, stop = point.features
    return act[:, start:stop] if point.layout == "channels" else act[..., start:stop]


def pair_rows(source: Tensor, target: Tensor, source_info: SequenceInfo, target_info: SequenceInfo,
              layout: str, where: str = "", alignment: TokenAlignment | None = None,
              sampler: RowSampler | None = None) -> tuple[Tensor, Tensor]:
    """Paired rows ``([n_rows, d_source], [n_rows, d_target])`` from two activations of one batch.

    ``channels`` maps [B, C, H, W] are paired per spatial position after resizing the source map
    to the target's size; ``last`` activations [B, D] pair per example and [B, N, D] per token:
    by the attention masks (padding excluded), by class token and resized patch grid (ViT), or one
    to one when the token counts are equal. Text tokens pair as ``alignment`` says (default:
    ``align_tokens(source_info, target_info)``): one to one, by character offsets or per example.
    ``sampler`` picks the positions of a feature map, the real tokens of masked text and the
    tokens of two equal patch grids before their rows are copied out; the rows are the ones it
    would pick from all of them.
    """
    if source.shape[0] != target.shape[0]:
        raise ValueError(f"{where}: source batch has {source.shape[0]} examples, target "
                         f"{target.shape[0]}; feed both models the same calibration examples.")
    if layout == "last" and source.ndim == 4 and target.ndim == 4:  # channels-last maps
        source, target, layout = source.movedim(-1, 1), target.movedim(-1, 1), "channels"
    if layout == "channels":
        if source.shape[-2:] != target.shape[-2:]:
            source = F.interpolate(source.float(), size=target.shape[-2:], mode="bilinear",
                                   align_corners=False)
        pick = sampler.pick(target[:, 0].numel(), target.device) if sampler else None
        if pick is not None:  # rows b * H * W + h * W + w, gathered without copying the maps
            spatial = target[0, 0].numel()
            b, hw = pick // spatial, pick % spatial
            return (source.flatten(2)[b.to(source.device), :, hw.to(source.device)],
                    target.flatten(2)[b, :, hw])
        return (source.movedim(1, -1).reshape(-1, source.shape[1]),
                target.movedim(1, -1).reshape(-1, target.shape[1]))
    if source.ndim == 2 and target.ndim == 2:
        return source, target
    if source.ndim != 3 or target.ndim != 3:
        raise ValueError(f"{where}: cannot pair activations of shapes {tuple(source.shape)} and "
                         f"{tuple(target.shape)}; expected [B, D] or [B, N, D] on both sides.")
    if source_info.mask is not None and target_info.mask is not None:
        alignment = alignment or align_tokens(source_info, target_info)
        if alignment.kind != "one_to_one":
            return alignment.rows(source, target, where)
        return _pair_masked(source, target, source_info.mask, target_info.mask, where, sampler)
    if source_info.grid is not None and target_info.grid is not None:
        return _pair_grid(source, target, source_info, target_info, sampler)
    if source.shape[1] != target.shape[1]:
        raise ValueError(f"{where}: {source.shape[1]} source tokens cannot be paired with "
                         f"{target.shape[1]} target tokens without an attention mask or a patch "
                         "grid; give both models inputs of the same length.")
    return source.reshape(-1, source.shape[-1]), target.reshape(-1, target.shape[-1])


def _pair_masked(source: Tensor, target: Tensor, mask_s: Tensor, mask_t: Tensor,
                 where: str, sampler: RowSampler | None = None) -> tuple[Tensor, Tensor]:
    if mask_s.shape != source.shape[:2] or mask_t.shape != target.shape[:2]:
        raise ValueError(f"{where}: attention masks {tuple(mask_s.shape)} / {tuple(mask_t.shape)} "
                         f"do not match activations {tuple(source.shape)} / {tuple(target.shape)}.")
    counts_s, counts_t = mask_s.sum(1), mask_t.sum(1)
    if not torch.equal(counts_s.cpu(), counts_t.cpu()):
        bad = (counts_s.cpu() != counts_t.cpu()).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{where}: token counts differ between source and target for examples {bad} "
            f"(source {counts_s[bad].tolist()}, target {counts_t[bad].tolist()}); tokens can "
            "only be paired one to one when both tokenizers split the text identically. Use the "
            "same tokenizer for both models, or pair tokens by character offsets (both sides "
            "tokenized by fast tokenizers with return_offsets_mapping=True), or set "
            "token_pairing='example' to pair mean-pooled examples."
        )
    pick = sampler.pick(int(counts_t.sum()), target.device) if sampler else None
    if pick is not None:  # the picked real tokens, gathered without copying the others
        rows_s = mask_s.flatten().nonzero().squeeze(1).to(source.device)[pick.to(source.device)]
        rows_t = mask_t.flatten().nonzero().squeeze(1).to(target.device)[pick]
        return source.flatten(0, 1)[rows_s], target.flatten(0, 1)[rows_t]
    return source[mask_s.to(source.device)], target[mask_t.to(target.device)]


def _pair_grid(source: Tensor, target: Tensor, info_s: SequenceInfo, info_t: SequenceInfo,
               sampler: RowSampler | None = None) -> tuple[Tensor, Tensor]:
    n_prefix = min(info_s.prefix, info_t.prefix)
    n_patch = math.prod(info_t.grid)
    pick = None
    if sampler is not None and tuple(info_s.grid) == tuple(info_t.grid):
        pick = sampler.pick(target.shape[0] * (n_prefix + n_patch), target.device)
    if pick is not None:
        # rows in the order built below: every example's prefix tokens, then its patch tokens
        patch_row = pick - target.shape[0] * n_prefix
        is_patch = patch_row >= 0
        example = torch.where(is_patch, patch_row // n_patch, pick // max(n_prefix, 1))
        token = torch.where(is_patch, patch_row % n_patch, pick % max(n_prefix, 1))
        token_s = torch.where(is_patch, token + info_s.prefix, token).to(source.device)
        token_t = torch.where(is_patch, token + info_t.prefix, token)
        return source[example.to(source.device), token_s], target[example, token_t]
    rows_s = [source[:, :n_prefix].reshape(-1, source.shape[-1])]
    rows_t = [target[:, :n_prefix].reshape(-1, target.shape[-1])]
    b, d_s = source.shape[0], source.shape[-1]
    patches = source[:, info_s.prefix:].reshape(b, *info_s.grid, d_s).permute(0, 3, 1, 2)
    if tuple(info_s.grid) != tuple(info_t.grid):
        patches = F.interpolate(patches.float(), size=info_t.grid, mode="bilinear",
                                align_corners=False)
    rows_s.append(patches.permute(0, 2, 3, 1).reshape(-1, d_s))
    rows_t.append(target[:, info_t.prefix:].reshape(-1, target.shape[-1]))
    return torch.cat(rows_s), torch.cat(rows_t)


# ---------------------------------------------------------------------------------------------
# Hooks


def _first_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    raise TypeError(f"cannot read an activation tensor from {type(value).__name__}")


def _capture(side: str, args: tuple, kwargs: dict, output: Any) -> Tensor:
    if side == "out":
        return _first_tensor(output)
    if args:
        return _first_tensor(args[0])
    return _first_tensor(next(iter(kwargs.values())))


@contextmanager
def _hooks(model: nn.Module, callbacks: Mapping[tuple[str, str], Any]):
    handles = []
    try:
        for (module_name, side), fn in callbacks.items():
            try:
                module = model.get_submodule(module_name)
            except AttributeError as err:
                raise ValueError(f"layer {module_name!r} does not exist in "
                                 f"{type(model).__name__}") from err

            def hook(mod, args, kwargs, output, fn=fn, side=side):
                fn(_capture(side, args, kwargs, output))

            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def eval_mode(*models: nn.Module):
    """Eval mode (no dropout, frozen BatchNorm statistics) for the block, restored afterwards."""
    flags = [[(m, m.training) for m in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for pairs in flags:
            for module, training in pairs:
                module.training = training


class _Enough(Exception):
    """Raised from a hook to end a forward pass whose remaining layers are not observed."""


def collect_statistics(
    source: nn.Module,
    target: nn.Module,
    source_layout: ModelLayout,
    target_layout: ModelLayout,
    pairings: Iterable[SpacePairing],
    calibration: Iterable[Any],
    target_calibration: Iterable[Any] | None = None,
    *,
    with_grams: bool = False,
    max_batches: int | None = None,
    progress: bool = True,
    accumulators: Mapping[SpaceKey, Any] | None = None,
    stop_early: bool = False,
    token_pairing: str = "auto",
    pairings_used: dict[str, int] | None = None,
    rows_per_batch: int | None = None,
) -> dict[SpaceKey, CrossStatistics]:
    """Float64 cross statistics for every pairing, keyed by target space.

    ``calibration`` yields model inputs (a tensor, or a mapping of keyword tensors) for both models;
    ``target_calibration``, when given, yields the target's own inputs for the same examples (e.g.
    its own tokenization). Memory is O(sum of d_source x d_target) plus one batch of source
    activations, whatever the number of batches. ``accumulators`` replace the cross statistics
    of some pairings by other sums with the same ``update(a, b)`` / ``tensors()`` interface (the
    norm gains' :class:`~.gains.GainStatistics`). ``stop_early`` ends each forward pass as soon as
    every observed layer has run. Text token rows pair by ``token_pairing`` (see
    :mod:`.token_alignment`); ``pairings_used``, when given, counts the batches per pairing.
    ``rows_per_batch`` keeps at most that many of a batch's paired rows per pairing (see
    :class:`RowSampler`).
    """
    pairings = list(pairings)
    device_t = model_device(target)
    stats = {p.target_space: CrossStatistics(p.d_source, p.d_target, with_grams, device_t)
             for p in pairings if p.target_space not in (accumulators or {})}
    stats.update(accumulators or {})
    stored: dict[tuple[str, str], Tensor] = {}
    consumed: set[tuple[str, str]] = set()
    infos: dict[str, SequenceInfo] = {}
    alignment: list[TokenAlignment | None] = [None]  # this batch's token pairing
    consumers: dict[tuple[str, str], list] = defaultdict(list)
    for p in pairings:
        for point_s, point_t in p.points:
            consumers[(point_t.module, point_t.side)].append((stats[p.target_space], point_s,
                                                              point_t, p.target_space))
    source_keys = {(s.module, s.side) for p in pairings for s, _ in p.points}
    sampler = RowSampler(rows_per_batch)

    def check_finite(act: Tensor, model: str, key: tuple[str, str]) -> None:
        # one reduction instead of a mask: NaN and Inf propagate into the sum, which is taken
        # in float32 at least (a float16 sum of finite values can overflow)
        wide = torch.float64 if act.dtype == torch.float64 else torch.float32
        if not torch.isfinite(act.sum(dtype=wide)):
            raise ValueError(f"{model} layer {key[0]!r} ({key[1]}put): calibration activations "
                             "contain NaN or Inf; check the calibration inputs and the models' "
                             "dtype.")

    def store(key):
        def fn(act: Tensor) -> None:
            check_finite(act, "source", key)
            # a module called again in one forward pass (DeBERTa-v3's query/key projections
            # also project the relative position embeddings) is observed at its first call
            if key not in stored:  # a copy: later in-place ops (ReLU, residual adds) reuse it
                stored[key] = act.detach().clone()
            if stop_early and len(stored) == len(source_keys):
                raise _Enough
        return fn

    def consume(key):
        def fn(act: Tensor) -> None:
            check_finite(act, "target", key)
            if key in consumed:  # its first call only, as on the source side
                return
            consumed.add(key)
            for acc, point_s, point_t, space in consumers[key]:
                where = (f"{space} ({point_s.module}:{point_s.side} -> "
                         f"{point_t.module}:{point_t.side})")
                if (point_s.module, point_s.side) not in stored:
                    raise ValueError(f"{where}: the source layer produced no activation in this "
                                     "batch; it is not on the source model's forward path.")
                src = _slice(stored[(point_s.module, point_s.side)], point_s).to(act.device)
                # the batch's alignment pairs its main token sequence; another one (a
                # decoder's, named by the points) pairs by its own layout
                main = point_s.sequence is None and point_t.sequence is None
                try:
                    a, b = pair_rows(src, _slice(act.detach(), point_t),
                                     infos["source"].of(point_s.sequence),
                                     infos["target"].of(point_t.sequence), point_t.layout,
                                     where, alignment[0] if main else None, sampler)
                except ValueError:
                    if not getattr(acc, "optional", False):
                        raise
                    acc.unpaired = True  # e.g. a pooled norm against a per-token one
                    continue
                a, b = sampler(a, b)
                acc.update(a, b)
            if stop_early and len(consumed) == len(consumers):
                raise _Enough
        return fn

    pairs = _batches(calibration, target_calibration, max_batches)
    n_batches = 0
    with torch.no_grad(), eval_mode(source, target), \
            _hooks(source, {k: store(k) for k in source_keys}), \
            _hooks(target, {k: consume(k) for k in consumers}):
        for batch_s, batch_t in progress_bar(pairs, "calibration", total=max_batches,
                                             enabled=progress):
            inputs_s, infos["source"] = prepare_inputs(source, source_layout,
                                                       move_to(batch_s, source))
            inputs_t, infos["target"] = prepare_inputs(target, target_layout,
                                                       move_to(batch_t, target))
            alignment[0] = align_tokens(infos["source"], infos["target"], token_pairing)
            sampler.new_batch(n_batches)
            if alignment[0] is not None and pairings_used is not None:
                pairings_used[alignment[0].kind] = pairings_used.get(alignment[0].kind, 0) + 1
            for model, inputs, side in ((source, inputs_s, "source"),
                                        (target, inputs_t, "target")):
                try:
                    run_batch(model, inputs, side, n_batches)
                except _Enough:  # every observed layer has run: the rest of the pass is not needed
                    pass
            stored.clear()
            consumed.clear()
            n_batches += 1
    if n_batches == 0:
        raise ValueError("the calibration data yielded no batches; pass a non-empty iterable of "
                         "model inputs (e.g. a DataLoader over the task's training data).")
    _all_reduce(stats)
    return stats


class RowSampler:
    """At most ``limit`` of a batch's paired rows, the same ones for every pairing with as many.

    The rows are a random subset drawn by a generator seeded with the batch's index, so a
    transport is reproducible and every space with the same rows (e.g. all token-level points of
    a ViT) sees the same tokens. ``None`` keeps every row.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.batch = 0
        self._picks: dict[tuple[int, torch.device], Tensor] = {}

    def new_batch(self, index: int) -> None:
        self.batch = index
        self._picks.clear()

    def pick(self, n: int, device: torch.device) -> Tensor | None:
        """The sorted indices of the rows kept out of ``n``, or ``None`` to keep them all."""
        if self.limit is None or n <= self.limit:
            return None
        key = (n, device)
        if key not in self._picks:
            gen = torch.Generator().manual_seed(self.batch)
            pick = torch.randperm(n, generator=gen)[:self.limit].sort().values
            self._picks[key] = pick.to(device)
        return self._picks[key]

    def __call__(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        pick = self.pick(a.shape[0], a.device)
        if pick is None:
            return a, b
        return a[pick], b[pick.to(b.device)]


def _batches(calibration, target_calibration, max_batches):
    source_iter = iter(calibration)
    if target_calibration is None:
        pairs = ((b, b) for b in source_iter)
    else:
        def zipped():
            for b_s, b_t in zip_longest(source_iter, iter(target_calibration)):
                if b_s is None or b_t is None:
                    raise ValueError("calibration and target_calibration yield different numbers "
                                     "of batches; they must describe the same examples.")
                yield b_s, b_t
        pairs = zipped()
    for i, pair in enumerate(pairs):
        if max_batches is not None and i >= max_batches:
            return
        yield pair


def _all_reduce(stats: Mapping[SpaceKey, CrossStatistics]) -> None:
    """Sum the statistics over ranks so every rank computes the same maps."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for key in sorted(stats, key=str):
        acc = stats[key]
        for tensor in acc.tensors():
            dist.all_reduce(tensor)
        count = torch.tensor([acc.n_rows], dtype=torch.float64, device=acc.cross.device)
        dist.all_reduce(count)
        acc.n_rows = int(count.item())
