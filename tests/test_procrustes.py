"""Properties of the Procrustes maps: recovery, orthonormality, invariances, errors.

The properties that define the map are checked for both polar-factor solvers (``svd`` and the
polished ``eigh``); the two are also compared with each other on ill-conditioned matrices.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from warmstart.engine.procrustes import CrossStatistics, crop_map, polar_factor, procrustes_map

SOLVERS = pytest.mark.parametrize("solver", ["svd", "eigh"])


def _semi_orthogonal(d_s: int, d_t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(max(d_s, d_t), max(d_s, d_t), generator=g,
                                       dtype=torch.float64))
    return q[:d_s, :d_t] if d_s <= d_t else q[:d_t, :d_s].T


def _stats(a: torch.Tensor, b: torch.Tensor, grams: bool = False) -> CrossStatistics:
    s = CrossStatistics(a.shape[1], b.shape[1], with_grams=grams)
    for chunk_a, chunk_b in zip(a.split(97), b.split(97)):
        s.update(chunk_a, chunk_b)
    return s


@SOLVERS
@settings(max_examples=25, deadline=None, derandomize=True)
@given(d_s=st.integers(2, 24), extra=st.integers(0, 16), seed=st.integers(0, 10_000))
def test_planted_map_is_recovered_when_widening(d_s, extra, seed, solver):
    d_t = d_s + extra
    planted = _semi_orthogonal(d_s, d_t, seed)
    a = torch.randn(4 * d_t + 10, d_s, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed + 1))
    m = procrustes_map(_stats(a, a @ planted), solver=solver)
    torch.testing.assert_close(m.map, planted, atol=1e-8, rtol=0)
    assert m.rank == d_s
    assert m.residual < 1e-10
    assert m.alignment == pytest.approx(1.0, abs=1e-10)


@SOLVERS
@settings(max_examples=25, deadline=None, derandomize=True)
@given(d_s=st.integers(1, 20), d_t=st.integers(1, 20), seed=st.integers(0, 10_000))
def test_orthonormal_on_the_narrow_side(d_s, d_t, seed, solver):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(64, d_s, generator=g, dtype=torch.float64)
    b = torch.randn(64, d_t, generator=g, dtype=torch.float64)
    t = procrustes_map(_stats(a, b), solver=solver).map
    narrow = t @ t.T if d_s <= d_t else t.T @ t
    torch.testing.assert_close(narrow, torch.eye(min(d_s, d_t), dtype=torch.float64),
                               atol=1e-9, rtol=0)


@SOLVERS
@pytest.mark.parametrize("scale_s,scale_t", [(10.0, 1.0), (1.0, 1e-3), (7.5, 250.0)])
def test_invariant_to_scaling_the_activations(scale_s, scale_t, solver):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(200, 12, generator=g, dtype=torch.float64)
    b = torch.randn(200, 20, generator=g, dtype=torch.float64) + a @ _semi_orthogonal(12, 20, 4)
    base = procrustes_map(_stats(a, b), solver=solver).map
    scaled = procrustes_map(_stats(scale_s * a, scale_t * b), solver=solver).map
    torch.testing.assert_close(base, scaled, atol=1e-10, rtol=0)


def test_beats_the_naive_crop_map_on_planted_data():
    planted = _semi_orthogonal(16, 24, 5)
    g = torch.Generator().manual_seed(6)
    a = torch.randn(500, 16, generator=g, dtype=torch.float64)
    b = a @ planted + 0.1 * torch.randn(500, 24, generator=g, dtype=torch.float64)
    learned = procrustes_map(_stats(a, b)).map
    err_learned = (a @ learned - b).norm()
    err_crop = (a @ crop_map(16, 24) - b).norm()
    assert err_learned < 0.2 * err_crop


def test_residual_is_exact_when_widening():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(300, 8, generator=g, dtype=torch.float64)
    b = torch.randn(300, 11, generator=g, dtype=torch.float64)
    m = procrustes_map(_stats(a, b))
    expected = ((a @ m.map - b).square().sum() / b.square().sum()).item()
    assert m.residual == pytest.approx(expected, rel=1e-9)


def test_streaming_equals_one_shot():
    g = torch.Generator().manual_seed(8)
    a = torch.randn(1000, 10, generator=g, dtype=torch.float64)
    b = torch.randn(1000, 14, generator=g, dtype=torch.float64)
    chunked = _stats(a, b)
    torch.testing.assert_close(chunked.cross, a.T @ b)
    torch.testing.assert_close(chunked.sum_source, a.sum(0))
    assert chunked.n_rows == 1000


def test_centering_removes_a_shared_offset():
    planted = _semi_orthogonal(6, 9, 9)
    g = torch.Generator().manual_seed(10)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64)
    b = a @ planted + 50.0  # a large constant offset on every target coordinate
    centred = procrustes_map(_stats(a, b), center=True).map
    torch.testing.assert_close(centred, planted, atol=1e-8, rtol=0)
    plain = procrustes_map(_stats(a, b)).map
    assert (plain - planted).abs().max() > 1e-3


def test_full_whitening_recovers_a_map_under_anisotropic_scaling():
    g = torch.Generator().manual_seed(11)
    planted = _semi_orthogonal(5, 5, 12)
    a = torch.randn(2000, 5, generator=g, dtype=torch.float64) * torch.tensor(
        [10.0, 3.0, 1.0, 0.3, 0.1], dtype=torch.float64)
    b = a @ planted
    m = procrustes_map(_stats(a, b, grams=True), whiten=0.5)
    torch.testing.assert_close(m.map, planted, atol=1e-6, rtol=0)


@SOLVERS
def test_rank_deficient_directions_are_left_out_or_completed(solver):
    g = torch.Generator().manual_seed(13)
    basis = torch.randn(3, 8, generator=g, dtype=torch.float64)
    a = torch.randn(100, 3, generator=g, dtype=torch.float64) @ basis  # rank 3 of 8
    b = torch.cat([a, torch.zeros(100, 4, dtype=torch.float64)], 1)
    left_out = procrustes_map(_stats(a, b), solver=solver)
    assert left_out.rank == 3 and left_out.completed == 0
    assert torch.linalg.matrix_rank(left_out.map).item() == 3
    completed = procrustes_map(_stats(a, b), completion="crop", solver=solver)
    assert completed.rank == 3 and completed.completed == 5
    torch.testing.assert_close(completed.map @ completed.map.T,
                               torch.eye(8, dtype=torch.float64), atol=1e-10, rtol=0)
    # The determined part is the same either way, and the data are still mapped exactly.
    torch.testing.assert_close(a @ completed.map, b, atol=1e-9, rtol=0)


@SOLVERS
def test_polar_factor_is_unique_under_repeated_singular_values(solver):
    m = torch.diag(torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64))
    q = _semi_orthogonal(3, 3, 14)
    factor, rank = polar_factor(m @ q, solver=solver)
    assert rank == 3
    torch.testing.assert_close(factor, q, atol=1e-12, rtol=0)


def test_bad_input_raises_clear_errors():
    s = CrossStatistics(3, 4)
    with pytest.raises(ValueError, match="statistics are empty"):
        procrustes_map(s)
    with pytest.raises(ValueError, match=r"whiten must be a power in \[0, 0.5\], got 0.7"):
        procrustes_map(s, whiten=0.7)
    with pytest.raises(ValueError, match="needs Gram matrices"):
        s.update(torch.randn(5, 3), torch.randn(5, 4))
        procrustes_map(s, whiten=0.25)
    with pytest.raises(ValueError, match="completion must be 'none' or 'crop'"):
        procrustes_map(s, completion="zeros")
    with pytest.raises(ValueError, match=r"solver must be one of \('auto', 'svd', 'eigh'\)"):
        procrustes_map(s, solver="qr")
    with pytest.raises(ValueError, match="same count"):
        s.update(torch.randn(5, 3), torch.randn(6, 4))
    with pytest.raises(ValueError, match="do not match the statistics' 3 x 4"):
        s.update(torch.randn(5, 2), torch.randn(5, 4))
    with pytest.raises(ValueError, match="must be 2-D"):
        s.update(torch.randn(5, 3, 1), torch.randn(5, 4))
    with pytest.raises(ValueError, match="positive widths"):
        CrossStatistics(0, 4)
    bad = CrossStatistics(2, 2)
    bad.update(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="NaN or Inf"):
        procrustes_map(bad)


@SOLVERS
@pytest.mark.parametrize("d_s,d_t", [(8, 12), (12, 8), (10, 10)])
def test_completion_equals_the_projected_crop_map(d_s, d_t, solver):
    g = torch.Generator().manual_seed(15)
    a = torch.randn(60, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, d_s, generator=g, dtype=torch.float64)  # rank 3 on the source side
    b = torch.randn(60, d_t, generator=g, dtype=torch.float64)
    stats = _stats(a, b)
    partial = procrustes_map(stats, solver=solver).map
    free_s = torch.eye(d_s, dtype=torch.float64) - partial @ partial.T
    free_t = torch.eye(d_t, dtype=torch.float64) - partial.T @ partial
    filler, _ = polar_factor(free_s @ crop_map(d_s, d_t) @ free_t)
    completed = procrustes_map(stats, completion="crop", solver=solver)
    torch.testing.assert_close(completed.map, partial + filler, atol=1e-10, rtol=0)
    narrow = completed.map @ completed.map.T if d_s <= d_t else completed.map.T @ completed.map
    torch.testing.assert_close(narrow, torch.eye(min(d_s, d_t), dtype=torch.float64),
                               atol=1e-10, rtol=0)


def _spread_spectrum(d_s: int, d_t: int, decades: float, seed: int) -> torch.Tensor:
    """A d_s x d_t matrix with singular values log-spaced from 1 down to 10**-decades."""
    u = _semi_orthogonal(d_s, min(d_s, d_t), seed) if d_s > d_t else _semi_orthogonal(
        d_s, d_s, seed)
    v = _semi_orthogonal(min(d_s, d_t), d_t, seed + 1)
    k = min(d_s, d_t)
    return (u[:, :k] * torch.logspace(0, -decades, k, dtype=torch.float64)) @ v


@pytest.mark.parametrize("d_s,d_t", [(96, 128), (128, 96)])
@pytest.mark.parametrize("decades", [2.0, 5.5])
def test_eigh_solver_agrees_with_the_svd_on_ill_conditioned_matrices(d_s, d_t, decades):
    # The Gram squares the condition number: unpolished, eigh's factor is off by ~1e-5 here.
    m = _spread_spectrum(d_s, d_t, decades, seed=16)
    exact, rank_svd = polar_factor(m, solver="svd")
    fast, rank_eigh = polar_factor(m, solver="eigh")
    assert rank_svd == rank_eigh == min(d_s, d_t)
    tolerance = 1e-10 if decades < 3 else 1e-6
    torch.testing.assert_close(fast, exact, atol=tolerance, rtol=0)
    narrow = fast @ fast.T if d_s <= d_t else fast.T @ fast
    torch.testing.assert_close(narrow, torch.eye(min(d_s, d_t), dtype=torch.float64),
                               atol=1e-11, rtol=0)


def test_eigh_solver_finds_the_rank_the_svd_finds():
    # Singular values straddle the 1e-6 threshold: 1 ... 1e-5 kept, 1e-7 and exact zeros dropped.
    s = torch.tensor([1.0, 0.1, 1e-3, 1e-5, 1e-7, 0.0, 0.0], dtype=torch.float64)
    u, v = _semi_orthogonal(7, 7, 17), _semi_orthogonal(7, 11, 18)
    m = (u * s) @ v
    for matrix in (m, m.T):
        exact, rank_svd = polar_factor(matrix, solver="svd")
        fast, rank_eigh = polar_factor(matrix, solver="eigh")
        assert rank_svd == rank_eigh == 4
        # The direction of s = 1e-5 is resolved to about eps / 1e-10 through the Gram; float32
        # statistics (relative noise ~1e-7) determine it far less well than that.
        torch.testing.assert_close(fast, exact, atol=1e-6, rtol=0)


def test_auto_solver_is_svd_on_cpu():
    from warmstart.engine.procrustes import resolve_solver

    assert resolve_solver("auto", torch.device("cpu")) == "svd"
    assert resolve_solver("auto", torch.device("cuda", 0)) == "eigh"
    assert resolve_solver("eigh", torch.device("cpu")) == "eigh"


def test_eigh_solver_falls_back_to_the_svd_where_the_gram_cannot_resolve():
    from warmstart.engine.procrustes import EIGH_MIN_RTOL, _polar_eigh

    # Singular values over ten decades: the Gram's eigenvalues resolve them only down to about
    # sqrt(eps), so a rank threshold of 1e-9 is out of its reach and the SVD answers instead.
    m = _spread_spectrum(60, 80, 10.0, seed=19)
    for rtol in (1e-9, 0.0):
        assert rtol < EIGH_MIN_RTOL
        exact, rank_svd = polar_factor(m, rtol, solver="svd")
        fallback, rank_eigh = polar_factor(m, rtol, solver="eigh")
        assert rank_eigh == rank_svd
        torch.testing.assert_close(fallback, exact, atol=1e-12, rtol=0)
    # Unpolished, the factor is not orthonormal on a six-decade spectrum: the check refuses it.
    six = _spread_spectrum(60, 80, 6.0, seed=20)
    assert _polar_eigh(six, 1e-6, polish_steps=0) is None
    assert _polar_eigh(six, 1e-6) is not None


def _low_rank(d_s: int, d_t: int, rank: int, decades: float, seed: int) -> torch.Tensor:
    """A d_s x d_t matrix of the given rank, its singular values log-spaced over ``decades``."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_s, rank, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_t, rank, generator=g, dtype=torch.float64))
    return (u * torch.logspace(0, -decades, rank, dtype=torch.float64)) @ v.T


@SOLVERS
@pytest.mark.parametrize("d_s,d_t", [(50, 70), (70, 50)])
def test_range_solver_matches_the_full_solver_on_a_low_rank_matrix(d_s, d_t, solver):
    from warmstart.engine.procrustes import _polar

    m = _low_rank(d_s, d_t, 12, 3.0, seed=31)
    exact, rank, free, used = _polar(m, 1e-6, "svd")
    fast, fast_rank, fast_free, fast_used = _polar(m, 1e-6, solver, rank_bound=12)
    assert fast_rank == rank == 12
    torch.testing.assert_close(fast, exact, atol=1e-9, rtol=0)
    # the same kept subspace, and its exact complement
    torch.testing.assert_close(fast_used @ fast_used.T, used @ used.T, atol=1e-9, rtol=0)
    narrow = min(d_s, d_t)
    assert fast_free.shape == (narrow, narrow - 12)
    torch.testing.assert_close(fast_free.T @ fast_free, torch.eye(narrow - 12, dtype=m.dtype),
                               atol=1e-12, rtol=0)
    assert float((fast_free.T @ fast_used).abs().max()) < 1e-12


@pytest.mark.parametrize("d_s,d_t", [(40, 64), (64, 40)])
def test_few_rows_give_the_same_completed_map_through_the_range(d_s, d_t):
    g = torch.Generator().manual_seed(32)
    a = torch.randn(9, d_s, generator=g, dtype=torch.float64)
    b = torch.randn(9, d_t, generator=g, dtype=torch.float64)
    stats = _stats(a, b)
    kw = {"completion": "crop", "solver": "svd"}
    full = procrustes_map(stats, **kw)
    fast = procrustes_map(stats, rank_bound=stats.n_rows, **kw)
    assert fast.rank == full.rank == 9 and fast.completed == full.completed
    torch.testing.assert_close(fast.map, full.map, atol=1e-9, rtol=0)
    assert fast.residual == pytest.approx(full.residual, abs=1e-9)
    # a bound near the width is not worth the range: the full solver answers, bit for bit
    near = procrustes_map(stats, rank_bound=min(d_s, d_t) - 4, **kw)
    assert torch.equal(near.map, full.map)


def test_range_solver_on_statistics_that_determine_nothing():
    from warmstart.engine.procrustes import _polar

    factor, rank, free, used = _polar(torch.zeros(30, 50, dtype=torch.float64), 1e-6, "svd",
                                      rank_bound=3)
    assert rank == 0 and used.shape == (30, 0) and free.shape == (30, 30)
    assert not factor.any()


@pytest.mark.parametrize("noise", [1e-12, 1e-5, 3e-3, 1e-2])
def test_polishing_returns_the_polar_factor_of_nearly_orthonormal_rows(noise):
    from warmstart.engine.procrustes import _orthonormalize

    g = torch.Generator().manual_seed(23)
    z = _semi_orthogonal(40, 70, seed=24) + noise * torch.randn(40, 70, generator=g,
                                                                 dtype=torch.float64)
    u, _, vh = torch.linalg.svd(z, full_matrices=False)
    polished = _orthonormalize(z.clone(), 3, 1e-9)
    assert polished is not None
    # accepted either by a measured Gram or by the cubic bound of its last step
    gram = polished @ polished.T
    assert float((gram - torch.eye(40, dtype=gram.dtype)).abs().max()) <= 1e-9
    torch.testing.assert_close(polished, u @ vh, atol=1e-9, rtol=0)


def test_polishing_refuses_rows_far_from_orthonormal_or_out_of_steps():
    from warmstart.engine.procrustes import _orthonormalize

    z = _semi_orthogonal(10, 20, seed=25)
    assert _orthonormalize(3.0 * z, 2, 1e-9) is None  # ||E|| = 8: no series step converges
    g = torch.Generator().manual_seed(26)
    rough = z + 0.05 * torch.randn(10, 20, generator=g, dtype=torch.float64)
    assert _orthonormalize(rough.clone(), 0, 1e-9) is None
    assert _orthonormalize(rough.clone(), 3, 1e-9) is not None


@pytest.mark.parametrize("d_s,d_t", [(6, 9), (9, 6)])
def test_completion_of_statistics_that_determine_nothing_is_the_crop_map(d_s, d_t):
    stats = _stats(torch.zeros(20, d_s, dtype=torch.float64),
                   torch.randn(20, d_t, dtype=torch.float64))
    completed = procrustes_map(stats, completion="crop")
    assert completed.rank == 0 and completed.completed == min(d_s, d_t)
    torch.testing.assert_close(completed.map, crop_map(d_s, d_t), atol=1e-12, rtol=0)
