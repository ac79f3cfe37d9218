"""Norm gains and layer scales: per-channel scales, moved by a regression on calibration rows.

A gain ``g`` multiplies normalised features ``n`` channel by channel, ``y = g * n (+ b)``. It is a
diagonal operator, not a vector in the stream's coordinates, and the target's normalised features
are not the mapped source ones: a norm over a wider stream divides by another RMS, so
``n_t ~ c * T^T n_s`` with a scale ``c`` that differs per channel. The target gain change that best
reproduces the mapped source change ``T^T (tau * n_s)`` with a per-channel scale of ``n_t`` is the
least-squares coefficient

    delta_j = sum_i T_ij tau_i K_ij / q_j,    K = sum_rows n_s n_t^T,   q_j = sum_rows n_t,j^2,

computed from the same calibration rows as the maps. It is exact when the target is a signed
permutation of the source (a sign never flips a gain; the RMS ratio is compensated) and when the
target duplicates source channels. Channels no calibration row reaches fall back to the diagonal
rule ``diag(T^T diag(tau) T)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import rules
from .families.base import ParamRole, Point, Space, SpaceKey


class GainStatistics:
    """Streaming sums over paired norm outputs, unscaled to the normalised features on both sides.

    ``update`` receives the paired output rows ``y`` of the two (base) norm layers and divides out
    each side's gain (and shift): ``n = (y - b) / g``. Channels whose gain is zero carry nothing.
    The statistics are optional: rows that cannot be paired (a pooled norm against a per-token
    one) mark them ``unpaired`` and the gain falls back to the diagonal rule.
    """

    optional = True

    def __init__(self, scale_source: tuple[Tensor, Tensor | None],
                 scale_target: tuple[Tensor, Tensor | None], device: torch.device) -> None:
        self._source = _unscaler(*scale_source, device)
        self._target = _unscaler(*scale_target, device)
        d_s, d_t = len(self._source[0]), len(self._target[0])
        self.cross = torch.zeros(d_s, d_t, dtype=torch.float64, device=device)
        self.sq_target = torch.zeros(d_t, dtype=torch.float64, device=device)
        self.n_rows = 0
        self.unpaired = False

    def update(self, source_rows: Tensor, target_rows: Tensor) -> None:
        # float32 products summed in float64, as in CrossStatistics.update
        a = _unscale(source_rows, self._source)
        b = _unscale(target_rows, self._target)
        self.cross += a.T @ b
        self.sq_target += b.square().sum(0)
        self.n_rows += int(a.shape[0])

    def tensors(self) -> list[Tensor]:
        return [self.cross, self.sq_target]


def _unscaler(gain: Tensor, shift: Tensor | None, device) -> tuple[Tensor, Tensor, Tensor]:
    gain = gain.detach().to(device, torch.float64)
    alive = gain.abs() > 1e-6 * gain.abs().max().clamp_min(1e-30)
    inverse = torch.where(alive, 1.0 / torch.where(alive, gain, 1.0), 0.0)
    shift = torch.zeros_like(gain) if shift is None else shift.detach().to(device, torch.float64)
    return inverse, shift, alive


def _unscale(rows: Tensor, unscaler) -> Tensor:
    """Normalised features in float32 (float64 rows stay float64)."""
    inverse, shift, _ = unscaler
    dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    return (rows.to(inverse.device, dtype) - shift.to(dtype)) * inverse.to(dtype)


def gain(tau: Tensor, t: Tensor, stats: GainStatistics | None) -> Tensor:
    """The target's gain change for a source change ``tau`` through map ``t`` [d_s, d_t]."""
    diagonal = rules.gain(tau, t)
    if stats is None or stats.n_rows == 0 or stats.unpaired:
        return diagonal
    cross, q = stats.cross.to(t.device), stats.sq_target.to(t.device)
    reached = q > 1e-12 * q.max().clamp_min(1e-300)
    regression = ((t * cross).T @ tau) / torch.where(reached, q, 1.0)
    return torch.where(reached, regression, diagonal)


def module_of(role: ParamRole) -> tuple[str, str]:
    """``(module, attribute)`` of a gain parameter, e.g. ``("blocks.0.norm1", "weight")``."""
    module, _, attribute = role.name.rpartition(".")
    return module, attribute


def gain_space(role: ParamRole) -> SpaceKey:
    return SpaceKey(role.block, f"gain:{role.name}")


def gain_point(role: ParamRole, space: Space | None) -> Point:
    """Where the gain's normalised features are seen: its module's output, laid out (and in the
    token sequence) like the points of the space it scales."""
    module, _ = module_of(role)
    points = space.points if space is not None else ()
    own = [p for p in points if p.module == module and p.side == "out"]
    first = own[0] if own else (points[0] if points else None)
    layout = first.layout if first is not None else "last"
    point = Point(module, "out", "gain", layout)
    sequence = getattr(first, "sequence", None)
    if sequence is not None:
        point = type(point)(**{**point.__dict__, "sequence": sequence})
    return point


def scale_of(model: nn.Module, role: ParamRole) -> tuple[Tensor, Tensor | None]:
    """The effective gain (``weight + gain_offset``) and the shift of the gain's module."""
    module_name, attribute = module_of(role)
    module = model.get_submodule(module_name)
    value = getattr(module, attribute).detach() + role.gain_offset
    shift = getattr(module, "bias", None) if attribute == "weight" else None
    return value, (shift.detach() if isinstance(shift, Tensor) else None)
