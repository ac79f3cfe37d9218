"""The transport report: what happened to every parameter, and how well every map is determined."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ParamReport:
    """One target parameter (or one row block of a fused one).

    ``norm_source`` is ``||tau_A||`` of the source role, ``norm_target`` is ``||tau_B||`` before
    scaling by alpha (for the head: the norm of the new head weight).
    """

    name: str
    role: str
    rule: str
    source: str | None
    norm_source: float
    norm_target: float
    space_out: str | None = None
    space_in: str | None = None
    residual_out: float | None = None
    residual_in: float | None = None
    note: str = ""


@dataclass(frozen=True)
class MapReport:
    """One coordinate-space map: widths, rows seen, rank observed and fit."""

    target_space: str
    source_space: str
    d_source: int
    d_target: int
    n_rows: int
    rank: int
    residual: float
    alignment: float
    completed: int = 0

    @property
    def determined(self) -> bool:
        return self.rank + self.completed >= min(self.d_source, self.d_target)


@dataclass(frozen=True)
class TransportReport:
    method: str
    alpha: float
    source_family: str
    target_family: str
    block_map: tuple[tuple[str, str], ...]
    params: tuple[ParamReport, ...]
    maps: tuple[MapReport, ...]
    skipped: tuple[tuple[str, str], ...]
    timings: Mapping[str, float]
    options: Mapping[str, Any]
    alpha_scores: tuple[tuple[float, float], ...] = field(default_factory=tuple)
    # how text token rows paired: one_to_one, offsets, example (per batch when they differed), or
    # none (no token rows: images, or no calibration)
    token_pairing: str = "none"
    # what head_fit did at the final write (empty when it was off): its mode, the rows it used,
    # the mean squared gap between the target's and the source's logits before and after it,
    # and the scale in scale mode
    head_fit: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["summary"] = self.summary()
        out["maps"] = [dict(asdict(m), determined=m.determined) for m in self.maps]
        return out

    def write_json(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(
                f"transport report {path} exists already; pass overwrite=True or choose another "
                "path."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        return path

    def summary(self) -> dict[str, float]:
        """A few scalars for loggers: counts, rank deficits and wall time."""
        moved = [p for p in self.params if p.norm_target > 0]
        fit = {f"head_fit_{k}": float(v) for k, v in self.head_fit.items() if k != "mode"}
        return {
            "params_transported": float(len(moved)),
            "params_zero": float(len(self.params) - len(moved)),
            "params_skipped": float(len(self.skipped)),
            "maps": float(len(self.maps)),
            "maps_rank_deficient": float(sum(not m.determined for m in self.maps)),
            "mean_map_residual": (sum(m.residual for m in self.maps) / len(self.maps)
                                  if self.maps else 0.0),
            "alpha": float(self.alpha),
            "seconds": float(self.timings.get("total", 0.0)),
            **fit,
        }
