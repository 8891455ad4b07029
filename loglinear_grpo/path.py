"""Certified regularisation paths: one solve per point of a grid of radii R and adjustments C, each
warm-started from its neighbour (:func:`solve_path`).

The radius R of Θ = ball(c, R) and the group adjustment C (:func:`~loglinear_grpo.objective.group_adjustment`)
are the regularisers of group robust preference optimisation: group DRO overfits small groups unless it
is strongly regularised (Sagawa et al. 2020). They are chosen on validation data, which takes a solve at
every point of a grid. Neighbouring points have neighbouring solutions, so each solve starts from the
last one's θ (projected onto its Θ) and, for the Newton solver, from a temperature μ near the last
one's, instead of from the centre at the spread of the losses; every point is still certified to the same
tolerance by the same test, so a warm-started point equals a cold-started one within ``tol``.

R = 0 is the reference point itself, Θ = {c} (for an LLM head: the frozen model, θ_ref): its value is
exact (gap 0) and it is always a candidate of a selection (:func:`select_point`).
"""
from __future__ import annotations

import numbers
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .objective import _check_data, _group_losses, group_metrics, minimax_value
from .settings import Settings
from .solver import SolveResult, make_config, solve

#: ``warm_start="temperature"``: a warm start begins this many times warmer than the neighbour's last
#: temperature (it then cools tenfold per solved stage, as a cold start does)
WARM_TEMPERATURE_FACTOR = 100.0


@dataclass
class ReferencePoint:
    """The point R = 0 of a path: θ = c (Θ = {c}), exact. It has the fields of a
    :class:`~loglinear_grpo.SolveResult` that a table or a selection reads."""

    theta: np.ndarray
    value: float
    alpha: np.ndarray
    objective_name: str
    loss: str
    beta: float
    converged: bool = True
    gap: float = 0.0
    n_iter: int = 0
    passes: int = 1
    bound_kind: str = "exact (Θ = {c})"

    @property
    def lower_bound(self):
        return self.value

    @property
    def relative_gap(self):
        return 0.0

    def metrics(self, data):
        """:func:`~loglinear_grpo.group_metrics` of θ = c, with the certificate's α in ``train_alpha`` (as
        :meth:`~loglinear_grpo.SolveResult.metrics`)."""
        alpha = self.alpha if len(self.alpha) == data.n_groups else None
        return group_metrics(self.theta, data, self.loss, self.beta, alpha=alpha).rename(columns={"weight": "train_alpha"})

    def summary(self):
        return f"reference (R = 0, θ = c): {self.objective_name}={self.value:.10g}, exact"


@dataclass
class PathResult:
    """What :func:`solve_path` returns.

    Attributes
    ----------
    table : pandas.DataFrame
        One row per point, in the order solved: ``radius``, ``adjustment`` (C), ``value`` (the training
        objective, :attr:`~loglinear_grpo.SolverConfig.objective_name`), ``gap`` (certified),
        ``relative_gap``, ``converged``, ``seconds``, ``iterations``, ``passes`` (over S; Newton) and
        ``warm``: ``True`` (warm-started), ``False`` (cold: the first point, R = 0, or ``warm_start=False``)
        or ``"retried cold"`` (the warm start stalled short of ``tol`` and the point was solved again from
        a cold start, whose result is kept; ``seconds`` and ``iterations`` count only that solve).
    results : list
        The solutions, in the rows' order (:class:`~loglinear_grpo.SolveResult`, or
        :class:`ReferencePoint` for R = 0).
    """

    table: pd.DataFrame
    results: list = field(repr=False)

    def result(self, radius, adjustment=0.0):
        """The solution at (R, C)."""
        hit = np.flatnonzero(np.isclose(self.table["radius"], radius, rtol=1e-12, atol=0)
                             & np.isclose(self.table["adjustment"], adjustment, rtol=1e-12, atol=0))
        if hit.size == 0:
            raise KeyError(f"no point R={radius}, C={adjustment} on this path")
        return self.results[int(hit[0])]


def _grid(name, values, default):
    if values is None:
        if default is None:
            raise ValueError(f"{name}: give the grid (a sequence of numbers >= 0)")
        return [default]
    values = list(np.ravel(np.asarray(values, dtype=object)))        # a number, a list or an array alike
    if not values:
        raise ValueError(f"{name}: the grid is empty; give at least one value")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be finite numbers >= 0, got {v!r}")
        out.append(float(v))
    return sorted(set(out))


def solve_path(data, radii, adjustments=None, *, center=None, warm_start=False, progress=False, **settings):
    """Certified solves over a grid of radii R and group adjustments C, optionally warm-started from
    their neighbours.

    Θ = ball(``center``, R) for every R of ``radii`` (R = 0: the point θ = ``center``, see
    :class:`ReferencePoint`), and the objective of :func:`~loglinear_grpo.solve` with
    ``adjustment=C`` for every C of ``adjustments``. The points are solved C by C, the radii in a
    snake order (ascending, then descending, ...), so that every point's neighbour is one step away
    in R or C; with ``warm_start=True`` each solve starts at the previous solution projected onto its Θ
    (``theta0``), and with ``warm_start="temperature"`` the Newton solver also starts colder, at
    :data:`WARM_TEMPERATURE_FACTOR` times the previous final temperature. Neither is the default:
    measured in ``benchmarks/path.py``, the Newton solver's smoothing path (μ → 0, like an interior-point
    method's barrier parameter, and as hard to warm-start: Yildirim & Wright 2002) sets the iteration
    count, not the starting point. On a random wide head a warm θ saved 2% of the iterations and the
    colder start 38%; on the TRL-pairs head a warm θ saved 8% and the colder start cost 46% more
    iterations (3.7× the time: two of its warm starts stalled and were solved again cold). A cold point
    is also exactly the independent solve that ``train`` reproduces. Each point is certified to ``tol`` as a cold solve would be: a warm start that stalls
    before ``tol`` is solved again from a cold start. (With ``tol=None``, e.g. the stochastic estimator's
    default, nothing is certified to a tolerance and a warm start is a different run, not the same answer.)

    Parameters
    ----------
    data : PreferenceData
    radii : sequence of float ≥ 0
        The radii (duplicates merged).
    adjustments : sequence of float ≥ 0, optional
        The values of C (one C for every group; default: only C = 0).
    center : array_like (d,), optional
        The ball's centre (default 0; an LLM head: θ_ref).
    warm_start : bool or "temperature"
        ``False`` (default): every point cold-started, from the centre; ``True``: θ⁽⁰⁾ from the neighbour;
        ``"temperature"``: and a colder first temperature.
    progress : bool
        Print one line per point.
    **settings
        Any other setting of :func:`~loglinear_grpo.solve` (the fields of :class:`~loglinear_grpo.Settings`:
        ``loss``, ``beta``, ``method``, ``tol``, ...), the same at every point; not ``radius``,
        ``constraint``, ``adjustment`` or ``theta0``, nor the run-time options (``callback``, ...).

    Returns
    -------
    PathResult

    Raises
    ------
    ValueError
        An empty grid, a negative or non-finite R or C, or a setting the path sets itself.
    """
    _check_data(data)
    if warm_start not in (True, False, "temperature"):
        raise ValueError(f"warm_start must be True, False or 'temperature', got {warm_start!r}")
    for own in ("radius", "constraint", "adjustment", "theta0"):
        if own in settings:
            raise ValueError(f"solve_path sets {own!r} itself (give radii=, adjustments= and center=)")
    radii = _grid("radii", radii, None)
    adjustments = _grid("adjustments", adjustments, 0.0)
    Settings.from_options(**settings)                       # every other setting checked before any solve
    rows, results = [], []
    previous = None
    for j, c_value in enumerate(adjustments):
        order = radii if j % 2 == 0 else radii[::-1]
        for radius in order:
            tic = time.perf_counter()
            if radius == 0.0:
                res = _reference_point(data, center, c_value, settings)
                warm = False
            else:
                kw = dict(settings)
                warm = bool(warm_start and isinstance(previous, SolveResult))
                if warm:
                    kw["theta0"] = previous.theta
                config = make_config(data, radius=radius, center=center, adjustment=c_value, **kw)
                temperature = previous.temperature if warm and warm_start == "temperature" else None
                if temperature is not None:
                    temperature = temperature * WARM_TEMPERATURE_FACTOR
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    res = solve(data, config, temperature0=temperature)
                if warm and config.tol is not None and not res.converged:   # a warm start that stalls:
                    tic = time.perf_counter()                                  # the cold solve decides
                    res = solve(data, make_config(data, radius=radius, center=center, adjustment=c_value,
                                                  **settings))
                    warm = "retried cold"
                else:
                    for w in caught:
                        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                previous = res
            seconds = time.perf_counter() - tic
            results.append(res)
            rows.append({"radius": radius, "adjustment": c_value, "value": res.value, "gap": res.gap,
                         "relative_gap": res.relative_gap, "converged": bool(res.converged), "seconds": seconds,
                         "iterations": res.n_iter, "passes": res.passes, "warm": warm})
            if progress:
                print(f"  R={radius:g} C={c_value:g}: {res.summary()} ({seconds:.1f} s)", flush=True)
    return PathResult(pd.DataFrame(rows), results)


def _reference_point(data, center, c_value, settings):
    config = make_config(data, radius=1.0, center=center, adjustment=c_value,
                         **{k: v for k, v in settings.items() if k not in ("estimator", "step_size", "alpha_step_size")})
    theta = config.theta_set.center_vector(data.dim).copy()
    losses = _group_losses(theta, data, config.loss, config.beta)
    weights = None if config.adaptive_alpha else config.alpha0
    value = minimax_value(losses, config.chi, weights, config.shift)
    adjusted = losses if config.shift is None else losses + config.shift
    if config.adaptive_alpha:
        alpha = (adjusted == adjusted.max()).astype(np.float64)
        alpha /= alpha.sum()
    else:
        alpha = config.alpha0.copy()
    return ReferencePoint(theta=theta, value=value, alpha=alpha, objective_name=config.objective_name,
                          loss=config.loss, beta=config.beta)
