"""Compute-optimal scaling laws from a grid of training runs (Hoffmann et al. 2022, "Chinchilla").

Two of the paper's three estimates of how to split a compute budget C between parameters N and tokens D:

- Approach 3, the parametric law L(N, D) = E + A / N^alpha + B / D^beta, fitted as the paper does: a Huber
  loss (delta = 1e-3) on log L between the data and LSE(a - alpha ln N, b - beta ln D, e), minimised by
  L-BFGS from a grid of initialisations, A = e^a, B = e^b, E = e^e. Under C = k N D (k = 6: forward and
  backward matmuls) its minimum over N is closed form, N_opt = G (C/k)^(beta/(alpha+beta)),
  D_opt = G^-1 (C/k)^(alpha/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)); with any other
  FLOPs-per-token function of N the minimum is found numerically.
- Approach 2, IsoFLOP profiles: per compute budget, a parabola of loss in ln N (and in ln D) whose vertex is
  the budget's best size N*(C) (and D*(C)); then power laws N* = k_N C^a, D* = k_D C^b by least squares in
  log-log space. Fitting D* from its own parabola, rather than as C / (6 N*), keeps it right when C is
  counted by a FLOPs-per-token other than 6N.

Bootstrap: the runs are resampled with replacement within each budget (so every IsoFLOP curve keeps its
points), both fits redone, and percentile intervals taken of N_opt, D_opt and the exponents at a budget.

Plain dataclasses hold the results; the plotting helpers (IsoFLOP curves, the parametric fit) write PNGs
through matplotlib's Agg canvas, with no pyplot global state. This module neither runs nor reads training
runs, and it does not choose how N or C are counted: the scaling recipe does both.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from temper.errors import InputError

FlopsPerToken = Callable[[float], float]
"""Training FLOPs per token as a function of N; None where C = 6 N D."""

# Chinchilla's grid of initialisations (appendix D.2): alpha, beta in {0, .5, ..., 2}, e in {-1, -.5, ..., 1},
# a, b in {0, 5, ..., 25}: 4500 starts. All are scored at once; L-BFGS runs from the best few.
# Bounds of (a, b, e, alpha, beta) for L-BFGS-B, far outside any sensible fit (the paper's are unbounded): they
# keep a fit of too few runs finite (E -> 0, A -> inf) where it would otherwise run off and overflow.
BOUNDS = [(-50.0, 100.0), (-50.0, 100.0), (-20.0, 10.0), (0.0, 3.0), (0.0, 3.0)]
INIT_GRID = {"a": np.arange(0.0, 26.0, 5.0), "b": np.arange(0.0, 26.0, 5.0), "e": np.arange(-1.0, 1.01, 0.5),
             "alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5)}
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
"""The paper's approach-3 fit (its eq. 10) on MassiveText, for comparison."""
CHINCHILLA_EXPONENTS = {"approach 1": (0.50, 0.50), "approach 2": (0.49, 0.51), "approach 3": (0.46, 0.54)}
"""The paper's Table 2: (a, b) of N_opt ~ C^a, D_opt ~ C^b by each approach."""


class FitError(InputError):
    """Runs that cannot support a fit (too few, degenerate, non-finite); the message says what is missing."""


@dataclass(frozen=True)
class Point:
    """One finished training run."""

    n: float
    """Parameters, counted as the caller chose (the recipe: non-embedding)."""
    d: float
    """Training tokens seen."""
    loss: float
    """Final validation loss (nats per token)."""
    budget: float = 0.0
    """The compute budget (FLOPs) it was planned under: its IsoFLOP curve; 0: none."""


@dataclass
class ParametricFit:
    """Approach 3: L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    """The Huber loss at the optimum (sum over runs)."""
    n_points: int
    at_bounds: list[str] = field(default_factory=list)
    """Parameters (a = ln A, b = ln B, e = ln E, alpha, beta) that ended on a bound of BOUNDS: the runs do
    not determine them (too few, or too narrow a range of N or D)."""

    def predict(self, n: Any, d: Any) -> Any:
        """The fitted loss at N parameters and D tokens (scalars or arrays)."""
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    @property
    def a(self) -> float:
        """N_opt ~ C^a under C = k N D."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt ~ C^b under C = k N D."""
        return self.alpha / (self.alpha + self.beta)

    def optimal(self, flops: float, flops_per_token: FlopsPerToken | None = None) -> tuple[float, float]:
        """(N_opt, D_opt) minimising the fitted loss at `flops` FLOPs; NaN when the fit has no minimum
        (an exponent <= 0). C = 6 N D unless `flops_per_token(N)` is given (then D = C / flops_per_token(N))."""
        if not (self.alpha > 0 and self.beta > 0 and self.A > 0 and self.B > 0):
            return math.nan, math.nan
        if flops_per_token is None:
            g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
            n = g * (flops / 6) ** self.a
            return n, flops / (6 * n)
        return _numeric_optimum(lambda n, d: self.predict(n, d), flops, flops_per_token)


@dataclass
class IsoFlopCurve:
    """One budget's IsoFLOP profile: loss = c2 x^2 + c1 x + c0 with x = ln N."""

    budget: float
    coeffs: tuple[float, float, float]
    """(c2, c1, c0) of the parabola in ln N."""
    n_opt: float
    d_opt: float
    """The vertex of the parabola of loss in ln D."""
    loss_opt: float
    inside: bool
    """The vertex lies within the sampled sizes (else it is an extrapolation)."""
    n_points: int


@dataclass
class IsoFlopFit:
    """Approach 2: the budgets' minima and the power laws N* = n_scale C^a, D* = d_scale C^b through them."""

    curves: list[IsoFlopCurve]
    skipped: list[tuple[float, str]]
    """(budget, reason) of the budgets that gave no minimum."""
    a: float
    n_scale: float
    b: float
    d_scale: float

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N*, D*) of the power laws at `flops` FLOPs."""
        return self.n_scale * flops ** self.a, self.d_scale * flops ** self.b


@dataclass
class Interval:
    """A percentile bootstrap interval around the full-data estimate."""

    estimate: float
    low: float
    high: float


@dataclass
class Bootstrap:
    """Percentile intervals of one approach's quantities over resampled runs."""

    resamples: int
    failed: int
    """Resamples whose fit failed (too few distinct sizes left in a budget, ...); left out of the intervals."""
    level: float
    intervals: dict[str, Interval] = field(default_factory=dict)


def check_points(points: Sequence[Point]) -> None:
    """Refuse non-finite or non-positive N, D or loss, naming the run."""
    for i, p in enumerate(points):
        if not all(math.isfinite(v) and v > 0 for v in (p.n, p.d, p.loss)):
            raise FitError(f"run {i}: N={p.n}, D={p.d}, loss={p.loss}: all must be finite and > 0")


def _arrays(points: Sequence[Point]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    check_points(points)
    return (np.log([p.n for p in points]), np.log([p.d for p in points]), np.log([p.loss for p in points]))


def _huber_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
                     delta: float) -> tuple[float, np.ndarray]:
    """Sum of Huber_delta(LSE(a - alpha ln N, b - beta ln D, e) - ln L) / delta, and its gradient in
    theta = (a, b, e, alpha, beta). Divided by delta so that L-BFGS's tolerances see residuals of order 1."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, runs)
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    total = w.sum(axis=0)
    r = top + np.log(total) - log_loss
    w /= total  # softmax: d LSE / d term
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum() / delta
    g = np.clip(r, -delta, delta) / delta  # Huber'(r) / delta
    grad = np.array([(g * w[0]).sum(), (g * w[1]).sum(), (g * w[2]).sum(),
                     -(g * w[0] * log_n).sum(), -(g * w[1] * log_d).sum()])
    return float(loss), grad


def _grid_scores(log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Every initialisation of INIT_GRID as rows (a, b, e, alpha, beta), and its objective."""
    grid = np.array(list(itertools.product(*(INIT_GRID[k] for k in ("a", "b", "e", "alpha", "beta")))))
    a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
    terms = np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e + 0 * log_n))  # (3, inits, runs)
    r = np.logaddexp.reduce(terms, axis=0) - log_loss
    score = np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum(axis=1) / delta
    return grid, score


def fit_parametric(points: Sequence[Point], *, delta: float = 1e-3, starts: int = 16,
                   extra_starts: Sequence[Sequence[float]] = ()) -> ParametricFit:
    """Approach 3 on `points`: L-BFGS from the `starts` best of Chinchilla's 4500 initialisations (and any
    `extra_starts` rows (a, b, e, alpha, beta)); the best optimum wins."""
    from scipy.optimize import minimize  # the `experiments` extra

    if len(points) < 5:
        raise FitError(f"the parametric fit has 5 parameters: it needs at least 5 runs, got {len(points)}")
    log_n, log_d, log_loss = _arrays(points)
    if np.ptp(log_n) == 0 or np.ptp(log_d) == 0:
        raise FitError("the parametric fit needs runs of more than one model size and more than one token count")
    grid, score = _grid_scores(log_n, log_d, log_loss, delta)
    inits = [np.clip(x, *np.array(BOUNDS).T) for x in (*map(np.asarray, extra_starts),
                                                       *grid[np.argsort(score, kind="stable")[:starts]])]
    best = None
    for x0 in inits:
        res = minimize(_huber_objective, np.asarray(x0, dtype=float), args=(log_n, log_d, log_loss, delta),
                       jac=True, method="L-BFGS-B", bounds=BOUNDS, options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
        if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
            best = res
    if best is None:
        raise FitError("the parametric fit diverged from every initialisation")
    a, b, e, alpha, beta = (float(v) for v in best.x)
    at_bounds = [name for name, v, (lo, hi) in zip(("a", "b", "e", "alpha", "beta"), best.x, BOUNDS)
                 if min(v - lo, hi - v) < 1e-6]
    return ParametricFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta,
                         objective=float(best.fun) * delta, n_points=len(points), at_bounds=at_bounds)


def _theta(fit: ParametricFit) -> list[float]:
    """The fit as an L-BFGS start (a, b, e, alpha, beta)."""
    return [math.log(fit.A), math.log(fit.B), math.log(fit.E), fit.alpha, fit.beta]


def _numeric_optimum(loss: Callable[[Any, Any], Any], flops: float, flops_per_token: FlopsPerToken) -> tuple[float, float]:
    """argmin over N of loss(N, C / flops_per_token(N)): a log-spaced scan, then a bounded refinement."""
    from scipy.optimize import minimize_scalar

    log_n = np.linspace(0.0, math.log(flops), 4001)
    fpt = np.array([flops_per_token(math.exp(x)) for x in log_n])
    ok = fpt < flops  # at least one token
    if not ok.any():
        return math.nan, math.nan
    values = np.where(ok, loss(np.exp(log_n), flops / np.where(ok, fpt, 1.0)), np.inf)
    i = int(np.argmin(values))
    lo, hi = log_n[max(i - 1, 0)], log_n[min(i + 1, len(log_n) - 1)]
    res = minimize_scalar(lambda x: float(loss(math.exp(x), flops / flops_per_token(math.exp(x)))),
                          bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
    n = math.exp(res.x)
    return n, flops / flops_per_token(n)


FAR = math.log(100.0)
"""How far (a factor, in log space) outside the sampled sizes an IsoFLOP minimum is still trusted."""


def _vertex(x: np.ndarray, y: np.ndarray) -> tuple[tuple[float, float, float], float, float] | None:
    """(coefficients, x at the minimum, y there) of the least-squares parabola, or None when it opens down."""
    c2, c1, c0 = (float(c) for c in np.polyfit(x, y, 2))
    if not c2 > 0:
        return None
    xm = -c1 / (2 * c2)
    return (c2, c1, c0), xm, c0 - c1 * c1 / (4 * c2)


def fit_isoflop(points: Sequence[Point]) -> IsoFlopFit:
    """Approach 2: a parabola per budget (points grouped by `budget`), then the power laws through the minima."""
    check_points(points)
    budgets = sorted({p.budget for p in points if p.budget > 0})
    curves, skipped = [], []
    for c in budgets:
        group = [p for p in points if p.budget == c]
        x = np.log([p.n for p in group])
        if len(np.unique(x)) < 3:
            skipped.append((c, f"{len(np.unique(x))} model size(s); a parabola needs 3"))
            continue
        y = np.array([p.loss for p in group])
        in_n = _vertex(x, y)
        in_d = _vertex(np.log([p.d for p in group]), y)
        if in_n is None or in_d is None:
            skipped.append((c, "the losses curve downwards: no minimum"))
            continue
        log_d = np.log([p.d for p in group])
        if not (x.min() - FAR <= in_n[1] <= x.max() + FAR and log_d.min() - FAR <= in_d[1] <= log_d.max() + FAR):
            # A nearly flat parabola (a bootstrap resample of few distinct runs) puts its vertex anywhere.
            skipped.append((c, "its minimum lies over 100x outside the sampled sizes: the curve does not locate it"))
            continue
        coeffs, xm, ym = in_n
        curves.append(IsoFlopCurve(budget=c, coeffs=coeffs, n_opt=math.exp(xm), d_opt=math.exp(in_d[1]),
                                   loss_opt=ym, inside=bool(x.min() <= xm <= x.max()), n_points=len(group)))
    if len(curves) < 2:
        detail = "; ".join(f"{c:.3g}: {why}" for c, why in skipped) or "no budgets given"
        raise FitError(f"IsoFLOP fits need at least 2 budgets with a minimum, got {len(curves)} ({detail})")
    log_c = np.log([k.budget for k in curves])
    a, log_kn = np.polyfit(log_c, np.log([k.n_opt for k in curves]), 1)
    b, log_kd = np.polyfit(log_c, np.log([k.d_opt for k in curves]), 1)
    return IsoFlopFit(curves=curves, skipped=skipped, a=float(a), n_scale=math.exp(log_kn), b=float(b),
                      d_scale=math.exp(log_kd))


def resample(points: Sequence[Point], rng: np.random.Generator) -> list[Point]:
    """Runs drawn with replacement within each budget (stratum), as many as it had."""
    out: list[Point] = []
    for c in sorted({p.budget for p in points}):
        group = [p for p in points if p.budget == c]
        out += [group[i] for i in rng.integers(0, len(group), len(group))]
    return out


def _interval(estimate: float, values: list[float], level: float) -> Interval:
    v = np.asarray([x for x in values if math.isfinite(x)])
    if not len(v):
        return Interval(estimate, math.nan, math.nan)
    lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return Interval(estimate, float(lo), float(hi))


def bootstrap_parametric(points: Sequence[Point], fit: ParametricFit, flops: float, *, resamples: int = 200,
                         level: float = 0.9, seed: int = 0, flops_per_token: FlopsPerToken | None = None,
                         starts: int = 2) -> Bootstrap:
    """Intervals of N_opt, D_opt, alpha, beta, E, a at `flops` from refits of resampled runs, each started at
    the full fit and at the `starts` best grid initialisations."""
    rng = np.random.default_rng(seed)
    keys = ("n_opt", "d_opt", "alpha", "beta", "E", "a")
    values: dict[str, list[float]] = {k: [] for k in keys}
    failed = 0
    for _ in range(resamples):
        try:
            f = fit_parametric(resample(points, rng), starts=starts, extra_starts=[_theta(fit)])
        except FitError:
            failed += 1
            continue
        n, d = f.optimal(flops, flops_per_token)
        for k, v in zip(keys, (n, d, f.alpha, f.beta, f.E, f.a)):
            values[k].append(v)
    n, d = fit.optimal(flops, flops_per_token)
    full = dict(zip(keys, (n, d, fit.alpha, fit.beta, fit.E, fit.a)))
    return Bootstrap(resamples, failed, level, {k: _interval(full[k], values[k], level) for k in keys})


def bootstrap_isoflop(points: Sequence[Point], fit: IsoFlopFit, flops: float, *, resamples: int = 200,
                      level: float = 0.9, seed: int = 0) -> Bootstrap:
    """Intervals of N*, D*, a, b at `flops` from approach 2 on resampled runs."""
    rng = np.random.default_rng(seed)
    keys = ("n_opt", "d_opt", "a", "b")
    values: dict[str, list[float]] = {k: [] for k in keys}
    failed = 0
    for _ in range(resamples):
        try:
            f = fit_isoflop(resample(points, rng))
        except (FitError, np.linalg.LinAlgError):
            failed += 1
            continue
        for k, v in zip(keys, (*f.optimal(flops), f.a, f.b)):
            values[k].append(v)
    full = dict(zip(keys, (*fit.optimal(flops), fit.a, fit.b)))
    return Bootstrap(resamples, failed, level, {k: _interval(full[k], values[k], level) for k in keys})


def json_safe(value: Any) -> Any:
    """Strict JSON data: dataclasses as dicts, tuples as lists, NaN and inf as None."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): json_safe(x) for k, x in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(x) for x in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---- plots -------------------------------------------------------------------------------------------------

def _figure(cols: int):  # noqa: ANN202 (matplotlib is an optional extra)
    from matplotlib.figure import Figure  # no pyplot: no global backend switch, no GUI

    fig = Figure(figsize=(6 * cols, 4.5), layout="constrained")
    return fig, fig.subplots(1, cols, squeeze=False)[0]


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.ticker import NullFormatter

    for ax in fig.axes:  # a short log axis labels its minor ticks too, on top of each other
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale == "log":
                axis.set_minor_formatter(NullFormatter())
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(path)
    return path


def plot_isoflop(points: Sequence[Point], fit: IsoFlopFit, path: str | Path) -> Path:
    """Loss vs N per budget with each parabola and its minimum; N* and D* vs C with their power laws."""
    fig, (ax, ax2) = _figure(2)
    budgets = sorted({p.budget for p in points if p.budget > 0})
    colours = {c: f"C{i % 10}" for i, c in enumerate(budgets)}
    for c in budgets:
        group = [p for p in points if p.budget == c]
        ax.scatter([p.n for p in group], [p.loss for p in group], color=colours[c], label=f"C = {c:.2g}")
    for k in fit.curves:
        group = [p.n for p in points if p.budget == k.budget]
        x = np.linspace(math.log(min(min(group), k.n_opt)), math.log(max(max(group), k.n_opt)), 100)
        ax.plot(np.exp(x), np.polyval(k.coeffs, x), color=colours[k.budget], lw=1)
        ax.plot([k.n_opt], [k.loss_opt], marker="*", ms=12, color=colours[k.budget], mec="black")
    ax.set(xscale="log", xlabel="parameters N", ylabel="validation loss", title="IsoFLOP profiles (approach 2)")
    ax.legend(fontsize="small")
    c = np.array([k.budget for k in fit.curves])
    line = np.geomspace(c.min(), c.max(), 50)
    ax2.scatter(c, [k.n_opt for k in fit.curves], color="C0", label="N* (parabola vertex)")
    ax2.plot(line, fit.n_scale * line ** fit.a, color="C0", label=f"N* ~ C^{fit.a:.2f}")
    ax2.scatter(c, [k.d_opt for k in fit.curves], color="C1", label="D*")
    ax2.plot(line, fit.d_scale * line ** fit.b, color="C1", label=f"D* ~ C^{fit.b:.2f}")
    ax2.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="N* or D*", title="compute-optimal size")
    ax2.legend(fontsize="small")
    return _save(fig, Path(path))


def plot_parametric(points: Sequence[Point], fit: ParametricFit, path: str | Path,
                    held_out: Sequence[Point] = ()) -> Path:
    """Predicted vs measured loss (held-out runs marked); loss vs D per model size with the fitted curves."""
    fig, (ax, ax2) = _figure(2)
    every = [*points, *held_out]
    ax.scatter([p.loss for p in points], [fit.predict(p.n, p.d) for p in points], label="fitted runs")
    if held_out:
        ax.scatter([p.loss for p in held_out], [fit.predict(p.n, p.d) for p in held_out], marker="D", color="C3",
                   label="held out")
    lo, hi = min(p.loss for p in every), max(p.loss for p in every)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
    ax.set(xlabel="measured loss", ylabel="predicted L(N, D)",
           title=f"E={fit.E:.3g} A={fit.A:.3g} B={fit.B:.3g} alpha={fit.alpha:.3f} beta={fit.beta:.3f}")
    ax.legend(fontsize="small")
    sizes = sorted({p.n for p in every})
    for i, n in enumerate(sizes):
        group = [p for p in every if p.n == n]
        colour = f"C{i % 10}"
        ax2.scatter([p.d for p in group], [p.loss for p in group], color=colour,
                    marker="D" if all(p in held_out for p in group) else "o")
        d = np.geomspace(min(p.d for p in every), max(p.d for p in every), 100)
        ax2.plot(d, fit.predict(n, d), color=colour, lw=1, label=f"N = {n:.3g}")
    ax2.set(xscale="log", xlabel="tokens D", ylabel="validation loss", title="loss vs tokens, fitted L(N, D) per size")
    if len(sizes) <= 10:  # a legend of more sizes would hide the plot
        ax2.legend(fontsize="small")
    return _save(fig, Path(path))
