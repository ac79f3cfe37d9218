"""Orthogonal Procrustes maps from streamed cross statistics. Pure maths, no ``nn.Module``.

Paired activation rows ``a_k`` (width ``d_source``) and ``b_k`` (width ``d_target``) are summarised
by :class:`CrossStatistics`. The map is the semi-orthogonal ``T`` (``d_source x d_target``) that
maximises ``trace(T^T C)`` with ``C = sum_k a_k b_k^T``; for ``d_source <= d_target`` this is
exactly the minimiser of ``sum_k ||a_k T - b_k||^2`` over matrices with orthonormal rows
(Schönemann 1966, "A generalized solution of the orthogonal Procrustes problem"). With the thin
SVD ``C = U S V^T`` the answer is the polar factor ``T = U V^T``, which is unique wherever ``C``
has full rank, even when singular values repeat.

Directions on which ``C`` vanishes are not determined by the data. They are left out (``T`` is then
a partial isometry of rank ``r``) unless ``completion="crop"`` asks for the deterministic completion
documented in :func:`procrustes_map`.

Two solvers compute the polar factor (``solver=``):

- ``svd``: a float64 thin SVD, the reference; the default on the CPU.
- ``eigh``: an eigendecomposition of the narrow-side Gram ``C C^T``, then at most two polishing
  steps (a series for the inverse square root of the rows' Gram). A GPU computes it about 15
  times faster than the SVD for the large maps (0.077 s against 1.17 s for 3072 x 3584 on an
  H100, ``bench/polar_cost.py``), so it is the default there
  (``solver="auto"``). On matrices whose singular values span six decades its factor differs
  from the SVD's by 2e-6 per direction (RMS) and is orthonormal to 3e-12; the float32 noise in
  the statistics already moves the maps by more than that. It falls back to the SVD when
  ``rank_rtol`` is below ``EIGH_MIN_RTOL`` (1e-7) or its result is not orthonormal to 1e-9.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

Completion = Literal["none", "crop"]
Solver = Literal["auto", "svd", "eigh"]
SOLVERS = ("auto", "svd", "eigh")


@dataclass
class CrossStatistics:
    """Streaming sums over paired rows, kept in float64.

    Shapes: ``cross`` [d_source, d_target], ``sum_source`` [d_source], ``sum_target`` [d_target],
    ``gram_source`` [d_source, d_source] and ``gram_target`` [d_target, d_target] (only when
    ``with_grams``). ``sq_source`` / ``sq_target`` are the summed squared row norms (traces of the
    Grams), which cost nothing and give exact residuals on the narrow side.
    """

    d_source: int
    d_target: int
    with_grams: bool = False
    device: torch.device | str = "cpu"
    n_rows: int = 0
    cross: Tensor = field(init=False)
    sum_source: Tensor = field(init=False)
    sum_target: Tensor = field(init=False)
    sq_source: Tensor = field(init=False)
    sq_target: Tensor = field(init=False)
    gram_source: Tensor | None = field(init=False, default=None)
    gram_target: Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.d_source < 1 or self.d_target < 1:
            raise ValueError(
                f"CrossStatistics needs positive widths, got d_source={self.d_source}, "
                f"d_target={self.d_target}."
            )
        kw = {"dtype": torch.float64, "device": self.device}
        self.cross = torch.zeros(self.d_source, self.d_target, **kw)
        self.sum_source = torch.zeros(self.d_source, **kw)
        self.sum_target = torch.zeros(self.d_target, **kw)
        self.sq_source = torch.zeros((), **kw)
        self.sq_target = torch.zeros((), **kw)
        if self.with_grams:
            self.gram_source = torch.zeros(self.d_source, self.d_source, **kw)
            self.gram_target = torch.zeros(self.d_target, self.d_target, **kw)

    def update(self, source_rows: Tensor, target_rows: Tensor) -> None:
        """Add paired rows: ``source_rows`` [n_rows, d_source], ``target_rows`` [n_rows, d_target].

        The products and column sums are formed in the rows' own precision (at least float32) and
        accumulated in float64: a batch contributes a few thousand rows, so float32 products and
        (pairwise) sums lose nothing that matters while running several times faster than float64
        ones on CPU (a sum cast to float64 on the fly is about ten times slower).
        """
        if source_rows.ndim != 2 or target_rows.ndim != 2:
            raise ValueError(
                f"rows must be 2-D [n_rows, width], got {tuple(source_rows.shape)} and "
                f"{tuple(target_rows.shape)}."
            )
        if source_rows.shape[0] != target_rows.shape[0]:
            raise ValueError(
                f"paired rows must have the same count, got {source_rows.shape[0]} source rows and "
                f"{target_rows.shape[0]} target rows."
            )
        if source_rows.shape[1] != self.d_source or target_rows.shape[1] != self.d_target:
            raise ValueError(
                f"row widths {source_rows.shape[1]} x {target_rows.shape[1]} do not match the "
                f"statistics' {self.d_source} x {self.d_target}."
            )
        if source_rows.shape[0] == 0:
            return
        dtype = torch.float64 if torch.float64 in (source_rows.dtype, target_rows.dtype) \
            else torch.float32
        a = source_rows.detach().to(self.device, dtype)
        b = target_rows.detach().to(self.device, dtype)
        self.cross += a.T @ b
        self.sum_source += a.sum(0)
        self.sum_target += b.sum(0)
        self.sq_source += torch.linalg.vecdot(a.flatten(), a.flatten()).double()
        self.sq_target += torch.linalg.vecdot(b.flatten(), b.flatten()).double()
        if self.with_grams:
            self.gram_source += a.T @ a
            self.gram_target += b.T @ b
        self.n_rows += int(a.shape[0])

    def tensors(self) -> list[Tensor]:
        """Every summed tensor, in a fixed order (used to all-reduce across ranks)."""
        out = [self.cross, self.sum_source, self.sum_target, self.sq_source, self.sq_target]
        if self.with_grams:
            out += [self.gram_source, self.gram_target]
        return out


@dataclass(frozen=True)
class ProcrustesMap:
    """A semi-orthogonal map ``map`` [d_source, d_target] (float64) and how well it is determined.

    ``rank`` counts the singular values of the (possibly centred/whitened) cross moment above
    ``rank_rtol * s_max``; directions beyond it are left out (``completion="none"``) or completed
    deterministically (``completion="crop"``). ``residual`` is ``||A T - B||^2 / ||B||^2`` over the
    calibration rows: exact when ``d_source <= d_target`` or when Grams were kept, otherwise an
    upper bound. ``alignment`` is ``trace(S) / sqrt(||A||^2 ||B||^2)`` (1 for an exact isometry).
    """

    map: Tensor
    rank: int
    n_rows: int
    residual: float
    alignment: float
    completed: int = 0

    @property
    def width(self) -> int:
        return min(self.map.shape)


def polar_factor(matrix: Tensor, rank_rtol: float = 1e-6, solver: Solver = "auto"
                 ) -> tuple[Tensor, int]:
    """Polar factor ``U_r V_r^T`` of ``matrix`` restricted to its numerical rank ``r``.

    Returns the factor (same shape as ``matrix``, float64) and ``r``. Singular values at or below
    ``rank_rtol * s_max`` are treated as zero: their singular vectors are not determined by the
    data. ``solver``: see the module's docstring.
    """
    factor, rank, _, _ = _polar(matrix, rank_rtol, solver)
    return factor, rank


def check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")


def resolve_solver(solver: Solver, device: torch.device) -> str:
    """``auto`` -> ``eigh`` on CUDA devices, ``svd`` elsewhere; other names are checked."""
    check_solver(solver)
    if solver == "auto":
        return "eigh" if device.type == "cuda" else "svd"
    return solver


# The Gram squares singular values, so eigh resolves them only down to about sqrt(eps) of the
# largest: below this rank_rtol the SVD is used instead.
EIGH_MIN_RTOL = 1e-7


def _polar(matrix: Tensor, rank_rtol: float, solver: Solver, rank_bound: int | None = None
           ) -> tuple[Tensor, int, Tensor, Tensor]:
    """Polar factor, rank, and orthonormal bases (columns) of the undetermined and of the kept
    directions on the narrow side (in R^rows when rows <= columns, else in R^columns).

    ``rank_bound``: a known upper bound on the rank (the number of rows behind the statistics);
    well below the narrow width, the factor is computed in the matrix's range (see
    :func:`_polar_in_range`)."""
    m = matrix.double()
    probes = None if rank_bound is None else rank_bound + RANGE_OVERSAMPLING
    if probes is not None and probes <= LOW_RANK_FRACTION * min(m.shape):
        return _polar_in_range(m, rank_rtol, solver, probes)
    if resolve_solver(solver, m.device) == "eigh" and rank_rtol >= EIGH_MIN_RTOL:
        result = _polar_eigh(m, rank_rtol)
        if result is not None:
            return result
    return _polar_svd(m, rank_rtol)


# The range-based path runs when the rank bound plus this many extra probes is at most this
# fraction of the narrow width (above it, the probes and the complement cost more than they save).
RANGE_OVERSAMPLING = 8
LOW_RANK_FRACTION = 0.75


def _polar_in_range(m: Tensor, rank_rtol: float, solver: Solver, probes: int
                    ) -> tuple[Tensor, int, Tensor, Tensor]:
    """The polar factor of a matrix whose rank is below ``probes``, from its range.

    A matrix ``C`` [d_n, d_w] of rank ``r < probes`` has the range of ``C Omega`` for a Gaussian
    ``Omega`` [d_w, probes] (with probability one), so with the orthonormal basis ``Q`` of that
    range, ``C = Q (Q^T C)`` and the polar factor of ``C`` is ``Q`` times that of the small
    ``Q^T C`` [probes, d_w]. Its singular values, and so its rank test, are ``C``'s. The
    undetermined directions are the orthogonal complement of the kept ones. ``Omega`` is drawn
    from a fixed seed, so a transport stays reproducible. Statistics summed from float32 products
    are not exactly of rank ``r``: their rounding adds directions at about 1e-7 of the largest
    singular value, which this path leaves undetermined and the full solvers may keep.
    """
    if m.shape[0] > m.shape[1]:
        factor, rank, free, used = _polar_in_range(m.T, rank_rtol, solver, probes)
        return factor.T, rank, free, used
    gen = torch.Generator().manual_seed(0)
    omega = torch.randn(m.shape[1], probes, generator=gen, dtype=m.dtype).to(m.device)
    basis, _ = torch.linalg.qr(m @ omega)  # [d_n, probes]
    factor, rank, _, used = _polar(basis.T @ m, rank_rtol, solver)
    used = basis @ used  # [d_n, rank]
    full, _ = torch.linalg.qr(used, mode="complete")
    return basis @ factor, rank, full[:, rank:], used


def _polar_svd(m: Tensor, rank_rtol: float) -> tuple[Tensor, int, Tensor, Tensor]:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    narrow = u if m.shape[0] <= m.shape[1] else vh.T
    if s.numel() == 0 or float(s[0]) == 0.0:
        return torch.zeros_like(m), 0, narrow, narrow[:, :0]
    keep = s > rank_rtol * s[0]
    factor = u[:, keep] @ vh[keep]
    return factor, int(keep.sum()), narrow[:, ~keep], narrow[:, keep]


def _polar_eigh(m: Tensor, rank_rtol: float, polish_steps: int = 2,
                orthonormality_tol: float = 1e-9) -> tuple[Tensor, int, Tensor, Tensor] | None:
    """The polar factor from the eigenvectors ``W`` of the narrow-side Gram, or ``None`` when
    its result fails the orthonormality check (the caller then uses the SVD).

    ``W^T C`` has rows ``s_i v_i^T``; their norms estimate the singular values without squaring
    them (the Gram's eigenvalues ``s_i^2`` lose everything below ``sqrt(eps) s_max``), which
    keeps the rank test in step with the SVD's for ``rank_rtol >= EIGH_MIN_RTOL``. Directions
    close to the threshold are resolved less well than by the SVD, but the float32 activations
    behind real statistics determine them less well still. Normalising the rows gives ``V^T``,
    whose rows are unit length but, for small ``s_i``, not quite orthogonal; at most
    ``polish_steps`` steps of :func:`_orthonormalize` restore that.
    """
    if m.shape[0] > m.shape[1]:
        result = _polar_eigh(m.T, rank_rtol, polish_steps, orthonormality_tol)
        return None if result is None else (result[0].T, *result[1:])
    _, basis = torch.linalg.eigh(m @ m.T)
    rotated = basis.T @ m
    sigma = torch.linalg.vector_norm(rotated, dim=1)
    s_max = float(sigma.max()) if sigma.numel() else 0.0
    if s_max == 0.0:
        return torch.zeros_like(m), 0, basis, basis[:, :0]
    keep = sigma > rank_rtol * s_max
    z = _orthonormalize(rotated[keep] / sigma[keep, None], polish_steps, orthonormality_tol)
    if z is None:
        return None
    return basis[:, keep] @ z, int(keep.sum()), basis[:, ~keep], basis[:, keep]


def _orthonormalize(z: Tensor, max_steps: int, tol: float) -> Tensor | None:
    """The polar factor ``(Z Z^T)^{-1/2} Z`` of a ``Z`` whose rows are nearly orthonormal, or
    ``None`` when ``max_steps`` steps do not bring ``Z Z^T`` within ``tol`` of the identity.

    With ``E = Z Z^T - I``, one step applies the series ``I - E/2 + 3E^2/8`` of ``(I + E)^{-1/2}``
    (matrix products only). Its Gram is exactly ``I + E'`` with ``E'`` the polynomial
    ``(I + E)(I - E/2 + 3E^2/8)^2 - I``, whose spectral norm is below ``||E||^3`` for
    ``||E|| <= 0.1`` (and contracts for ``||E|| < 1``); the Frobenius norm bounds ``||E||``.
    A step whose bound meets ``tol`` therefore needs no further check, and a ``Z`` that is already
    orthonormal (no singular value is tiny) costs a single product.
    """
    for _ in range(max_steps + 1):
        error = z @ z.T
        error.diagonal().sub_(1.0)
        if float(error.abs().max()) <= tol:
            return z
        size = float(torch.linalg.matrix_norm(error))
        if size > 1.0 or max_steps == 0:
            return None
        z = z - (0.5 * error - 0.375 * (error @ error)) @ z
        if size <= 0.1 and size ** 3 <= tol:
            return z
        max_steps -= 1
    return None


def crop_map(d_source: int, d_target: int, dtype=torch.float64, device=None) -> Tensor:
    """The naive map [d_source, d_target]: identity on the shared leading coordinates, zero
    elsewhere."""
    out = torch.zeros(d_source, d_target, dtype=dtype, device=device)
    k = min(d_source, d_target)
    out[range(k), range(k)] = 1.0
    return out


def _inverse_root(gram: Tensor, power: float, eig_floor: float) -> Tensor:
    evals, evecs = torch.linalg.eigh(gram)
    floor = eig_floor * max(float(evals.max()), 0.0)
    evals = evals.clamp_min(floor if floor > 0 else 1e-300)
    return (evecs * evals.pow(-power)) @ evecs.T


def procrustes_map(
    stats: CrossStatistics,
    *,
    center: bool = False,
    whiten: float = 0.0,
    completion: Completion = "none",
    rank_rtol: float = 1e-6,
    eig_floor: float = 1e-6,
    solver: Solver = "auto",
    rank_bound: int | None = None,
) -> ProcrustesMap:
    """Map from statistics. Default (the method's): uncentred, no whitening, no completion.

    - ``center``: use ``C - n mu_source mu_target^T`` (the cross-covariance).
    - ``whiten=p`` in [0, 0.5]: ``C <- G_source^{-p} C G_target^{-p}`` (Grams centred with
      ``center``), eigenvalues floored at ``eig_floor * max``; ``p=0.5`` is full whitening (CCA
      directions).
    - ``completion="crop"``: fill the undetermined directions with the polar factor of the naive
      crop map projected onto the orthogonal complements of the determined subspaces. Deterministic
      (a polar factor is unique) and semi-orthogonal overall.
    - ``solver``: ``svd``, ``eigh`` or ``auto`` (``eigh`` on CUDA, ``svd`` elsewhere); see the
      module's docstring.
    - ``rank_bound``: an upper bound on the cross moment's rank, e.g. ``stats.n_rows`` when the
      statistics were summed from that many paired rows (centring and whitening keep the bound).
      Well below the narrow width, the polar factor is computed in the cross moment's range
      (:func:`_polar_in_range`): far cheaper for wide spaces seen through few rows.
    """
    if not 0.0 <= whiten <= 0.5 or math.isnan(whiten):
        raise ValueError(f"whiten must be a power in [0, 0.5], got {whiten!r}.")
    if completion not in ("none", "crop"):
        raise ValueError(f"completion must be 'none' or 'crop', got {completion!r}.")
    solver = resolve_solver(solver, stats.cross.device)
    if whiten > 0 and not stats.with_grams:
        raise ValueError(
            f"whiten={whiten} needs Gram matrices; accumulate CrossStatistics(with_grams=True)."
        )
    if stats.n_rows == 0:
        raise ValueError("statistics are empty (n_rows=0): feed at least one calibration batch.")
    if not all(bool(torch.isfinite(t).all()) for t in stats.tensors()):
        raise ValueError(
            "statistics contain NaN or Inf: the calibration activations were not finite."
        )
    n = stats.n_rows
    cross = stats.cross
    gram_s, gram_t = stats.gram_source, stats.gram_target
    if center:
        mu_s, mu_t = stats.sum_source / n, stats.sum_target / n
        cross = cross - n * torch.outer(mu_s, mu_t)
        if stats.with_grams:
            gram_s = gram_s - n * torch.outer(mu_s, mu_s)
            gram_t = gram_t - n * torch.outer(mu_t, mu_t)
    if whiten > 0:
        cross = (_inverse_root(gram_s, whiten, eig_floor) @ cross
                 @ _inverse_root(gram_t, whiten, eig_floor))
    transport, rank, free, used = _polar(cross, rank_rtol, solver, rank_bound)
    completed = 0
    if completion == "crop" and rank < min(cross.shape):
        transport, completed = _complete(transport, free, used, rank_rtol)
    residual, alignment = _fit_quality(stats, transport, center)
    return ProcrustesMap(transport, rank, n, residual, alignment, completed)


def _complete(partial: Tensor, free: Tensor, used: Tensor, rank_rtol: float
              ) -> tuple[Tensor, int]:
    """Add the polar factor of the crop map restricted to the undetermined directions.

    ``free`` [d_narrow, k] and ``used`` [d_narrow, r] are orthonormal bases of the narrow side's
    undetermined and determined directions; on the wide side the undetermined directions are the
    complement of ``partial``'s span. The result is computed in closed form (see
    :func:`_crop_filler`), with one SVD of a k x r matrix instead of a polar factor of k rows.
    """
    if partial.shape[0] <= partial.shape[1]:
        filler, added = _crop_filler(partial, free, used, rank_rtol)
        return partial + free @ filler, added
    filler, added = _crop_filler(partial.T, free, used, rank_rtol)  # the crop map transposes
    return partial + (free @ filler).T, added


def _crop_filler(partial: Tensor, free: Tensor, used: Tensor, rank_rtol: float
                 ) -> tuple[Tensor, int]:
    """Polar factor of ``R = F^T E (I - T^T T)`` for a wide ``T = partial`` [d_n, d_w].

    ``E`` is the crop map [d_n, d_w], ``F = free`` [d_n, k] and ``U = used`` [d_n, r] with
    ``T = U V^T``. Because ``F^T E E^T F = I``, ``R R^T = I - M M^T`` with ``M = F^T E V``
    [k, r]: with the thin SVD ``M = P S Q^T``, ``R`` has singular values ``sqrt(1 - s_i^2)``
    along ``P`` and 1 on the rest, so its polar factor is ``R`` with the rows ``P^T R``
    normalised (their norms are those singular values, read without the cancellation of
    ``1 - s^2``) and the directions at or below ``rank_rtol`` times the largest removed.
    """
    k, (d_n, d_w) = free.shape[1], partial.shape
    v = partial.T @ used  # [d_w, r]
    restricted = torch.zeros(k, d_w, dtype=partial.dtype, device=partial.device)
    restricted[:, :d_n] = free.T  # F^T E
    m = restricted @ v  # [k, r]
    restricted -= m @ v.T
    p, _, _ = torch.linalg.svd(m, full_matrices=False)  # [k, min(k, r)]
    along = p.T @ restricted
    sigma = torch.linalg.vector_norm(along, dim=1)
    s_max = max(float(sigma.max()) if sigma.numel() else 0.0, 1.0 if p.shape[1] < k else 0.0)
    keep = sigma > rank_rtol * s_max
    scaled = torch.where(keep[:, None], along / torch.where(keep, sigma, 1.0)[:, None], 0.0)
    return restricted + p @ (scaled - along), k - int((~keep).sum())


def _fit_quality(stats: CrossStatistics, transport: Tensor, center: bool) -> tuple[float, float]:
    n = stats.n_rows
    cross, sq_s, sq_t = stats.cross, stats.sq_source, stats.sq_target
    if center:
        mu_s, mu_t = stats.sum_source / n, stats.sum_target / n
        cross = cross - n * torch.outer(mu_s, mu_t)
        sq_s = sq_s - n * mu_s.square().sum()
        sq_t = sq_t - n * mu_t.square().sum()
    aligned = float((transport * cross).sum())
    if stats.with_grams and transport.shape[0] > transport.shape[1]:
        gram = stats.gram_source
        if center:
            gram = gram - n * torch.outer(stats.sum_source / n, stats.sum_source / n)
        mapped_sq = float((transport * (gram @ transport)).sum())
    else:
        # ||A T||^2 = ||A P||^2 <= ||A||^2 with P the row-space projector of T: exact when T has
        # orthonormal rows and the data lie in their span, an upper bound otherwise.
        mapped_sq = float(sq_s)
    denom = max(float(sq_t), 1e-300)
    residual = max(mapped_sq - 2 * aligned + float(sq_t), 0.0) / denom
    alignment = aligned / max(math.sqrt(max(float(sq_s), 0.0) * max(float(sq_t), 0.0)), 1e-300)
    return residual, alignment
