"""Chinchilla fits on synthetic runs drawn from known constants: approach 3 recovers them, approach 2 the
exponent of N*(C), the closed-form compute-optimal split equals a brute-force minimum, and the bootstrap
interval holds the truth. The numbers are computed from the constants in each test, never pinned."""

from __future__ import annotations

import math

import numpy as np
import pytest

from temper.eval.scaling import (
    FitError,
    ParametricFit,
    Point,
    bootstrap_isoflop,
    bootstrap_parametric,
    fit_isoflop,
    fit_parametric,
    plot_isoflop,
    plot_parametric,
)

TRUE = ParametricFit(E=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28, objective=0.0, n_points=0)


def grid_runs(noise: float, seed: int) -> list[Point]:
    """7 x 7 runs, N in 1e6..1e9, D in 1e8..1e11, log-normal noise of relative size `noise` on the loss."""
    rng = np.random.default_rng(seed)
    return [Point(n, d, float(TRUE.predict(n, d)) * math.exp(rng.normal(0, noise)))
            for n in np.geomspace(1e6, 1e9, 7) for d in np.geomspace(1e8, 1e11, 7)]


def isoflop_runs(noise: float, seed: int, budgets=(1e18, 1e19, 1e20, 1e21)) -> list[Point]:
    """Per budget, 9 sizes from N_opt/8 to 8 N_opt with D = C / 6N: IsoFLOP profiles as Chinchilla sampled them."""
    rng = np.random.default_rng(seed)
    out = []
    for c in budgets:
        n_opt, _ = TRUE.optimal(c)
        for n in n_opt * np.geomspace(1 / 8, 8, 9):
            d = c / (6 * n)
            out.append(Point(n, d, float(TRUE.predict(n, d)) * math.exp(rng.normal(0, noise)), budget=c))
    return out


def test_approach_3_recovers_the_constants():
    fit = fit_parametric(grid_runs(noise=0.002, seed=1))
    assert fit.alpha == pytest.approx(TRUE.alpha, rel=0.03)
    assert fit.beta == pytest.approx(TRUE.beta, rel=0.03)
    assert fit.E == pytest.approx(TRUE.E, rel=0.03)
    assert fit.A == pytest.approx(TRUE.A, rel=0.3) and fit.B == pytest.approx(TRUE.B, rel=0.3)  # A, B trade off with E
    exact = fit_parametric(grid_runs(noise=0.0, seed=0))  # without noise: the constants themselves
    for k in ("E", "A", "B", "alpha", "beta"):
        assert getattr(exact, k) == pytest.approx(getattr(TRUE, k), rel=1e-3), k


def test_compute_optimal_split_is_the_minimum_along_the_budget():
    for c in (1e18, 1e21, 1e24):
        n, d = TRUE.optimal(c)
        assert 6 * n * d == pytest.approx(c, rel=1e-9)
        grid = np.geomspace(n / 100, n * 100, 400_001)  # brute force along C = 6 N D
        brute = grid[np.argmin(TRUE.predict(grid, c / (6 * grid)))]
        assert n == pytest.approx(brute, rel=1e-3)
        # The numeric path (any FLOPs-per-token) agrees with the closed form when it is 6N ...
        assert TRUE.optimal(c, lambda x: 6 * x)[0] == pytest.approx(n, rel=1e-6)
        # ... and finds the brute-force minimum when it is not (a fixed attention-like term per token).
        fpt = lambda x: 6 * x + 3e7
        n2, d2 = TRUE.optimal(c, fpt)
        brute2 = grid[np.argmin(TRUE.predict(grid, c / (6 * grid + 3e7)))]
        assert n2 == pytest.approx(brute2, rel=1e-3) and d2 == pytest.approx(c / fpt(n2), rel=1e-9)
    assert TRUE.a == pytest.approx(0.28 / 0.62) and TRUE.b == pytest.approx(0.34 / 0.62)


def test_approach_2_recovers_the_exponents():
    fit = fit_isoflop(isoflop_runs(noise=0.001, seed=0))
    assert [k.inside for k in fit.curves] == [True] * 4
    assert fit.a == pytest.approx(TRUE.a, abs=0.01) and fit.b == pytest.approx(TRUE.b, abs=0.01)
    assert fit.a + fit.b == pytest.approx(1.0, abs=1e-9)  # C = 6 N D on every curve: D* = C / 6N*
    n, d = fit.optimal(1e22)
    n_true, d_true = TRUE.optimal(1e22)
    assert n == pytest.approx(n_true, rel=0.1) and d == pytest.approx(d_true, rel=0.1)


def test_bootstrap_intervals_hold_the_truth():
    runs = grid_runs(noise=0.005, seed=1)
    fit = fit_parametric(runs)
    boot = bootstrap_parametric(runs, fit, 1e21, resamples=40, seed=0)
    n_true, d_true = TRUE.optimal(1e21)
    iv = boot.intervals
    assert boot.failed == 0
    assert iv["n_opt"].low < n_true < iv["n_opt"].high and iv["d_opt"].low < d_true < iv["d_opt"].high
    assert iv["alpha"].low < TRUE.alpha < iv["alpha"].high and iv["beta"].low < TRUE.beta < iv["beta"].high
    assert iv["n_opt"].low < iv["n_opt"].estimate < iv["n_opt"].high

    iso_runs = isoflop_runs(noise=0.003, seed=2)
    iso = bootstrap_isoflop(iso_runs, fit_isoflop(iso_runs), 1e21, resamples=100, seed=0)
    assert iso.intervals["a"].low < TRUE.a < iso.intervals["a"].high


def test_plots(tmp_path):
    runs = isoflop_runs(noise=0.001, seed=0)
    assert plot_isoflop(runs, fit_isoflop(runs), tmp_path / "iso.png").stat().st_size > 10_000
    fit = fit_parametric(runs)
    assert plot_parametric(runs[2:], fit, tmp_path / "fit.png", held_out=runs[:2]).stat().st_size > 10_000


def test_runs_that_cannot_support_a_fit():
    runs = grid_runs(noise=0.0, seed=0)
    with pytest.raises(FitError, match="at least 5 runs"):
        fit_parametric(runs[:4])
    with pytest.raises(FitError, match="more than one model size"):
        fit_parametric([Point(1e6, d, 3.0) for d in (1e8, 1e9, 1e10, 1e11, 1e12)])
    with pytest.raises(FitError, match="run 3: .*loss=nan"):
        fit_parametric([*runs[:3], Point(1e6, 1e8, math.nan), *runs[4:]])
    iso = isoflop_runs(noise=0.0, seed=0)
    with pytest.raises(FitError, match="at least 2 budgets"):
        fit_isoflop([p for p in iso if p.budget == 1e18])
    with pytest.raises(FitError, match="1e\\+19: 2 model size"):
        fit_isoflop([p for p in iso if p.budget == 1e18] + [p for p in iso if p.budget == 1e19][:2])
    fewer = fit_isoflop([p for p in iso if p.budget != 1e19] + [p for p in iso if p.budget == 1e19][:2])
    assert [k.budget for k in fewer.curves] == [1e18, 1e20, 1e21] and fewer.skipped[0][0] == 1e19
    with pytest.raises(FitError, match="no budgets given"):
        fit_isoflop(runs)  # no budget labels


def test_a_nearly_flat_isoflop_curve_is_skipped_not_extrapolated():
    """A parabola through almost equal losses has its vertex anywhere (e^800 parameters here): that budget is
    skipped with its reason rather than trusted (or overflowing), as a bootstrap resample can draw it."""
    flat = [Point(math.exp(x), 1e12 / 6 / math.exp(x), 2.0 + 1e-6 * (x - 800) ** 2 / 1e5, budget=1e12)
            for x in (10.0, 11.0, 12.0)]
    fit = fit_isoflop([*isoflop_runs(noise=0.001, seed=0), *flat])
    assert [c for c, _ in fit.skipped] == [1e12] and "outside the sampled sizes" in fit.skipped[0][1]
