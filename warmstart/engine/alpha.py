"""``alpha="auto"``: score a grid of strengths by trial writes, restoring the target after each."""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn

from .apply import _restore, _touched, apply_update
from .options import check_alpha_grid
from .update import Update


def select_alpha(target: nn.Module, update: Update, evaluate, grid,
                 finish=lambda: None, also: Iterable[str] = ()) -> tuple[float, tuple]:
    """Best alpha of ``grid`` by ``evaluate(target)`` (lower is better); target restored after.

    ``finish`` runs after each trial write (e.g. BatchNorm recalibration); ``also`` names the
    tensors it writes beyond the update's own.
    """
    grid = check_alpha_grid(grid)
    backup = _touched(target, update, also)
    scores = []
    try:
        for a in grid:
            apply_update(target, update, a)
            finish()
            scores.append((a, float(evaluate(target))))
            _restore(target, backup)
    finally:
        _restore(target, backup)
    finite = [s for s in scores if math.isfinite(s[1])]
    if not finite:
        raise ValueError(f"every alpha in {grid} gave a non-finite validation score.")
    return min(finite, key=lambda s: s[1])[0], tuple(scores)

