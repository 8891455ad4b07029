"""The exact reference: the minimax optimum with cvxpy (:func:`solve_exact`).

This is the reference every iterative solver is tested against. The minimax problem
(Eq. (9))

.. math::

    \\min_{\\theta\\in\\Theta}\\max_{\\alpha\\in\\Delta_K}\\sum_g \\alpha_g L_g(\\theta)
    \\;=\\; \\min_{\\theta\\in\\Theta,\\,t} \\; t \\quad\\text{s.t.}\\quad L_g(\\theta)\\le t\\ \\forall g

is solved in epigraph form with cvxpy (an exponential cone program for DPO, a QP for IPO, an
LP for the hinge); the optimal group weights α* are the dual variables of the K constraints.

The solvers the package runs itself live in their own modules: the best response and the
duality gap in :mod:`loglinear_grpo.duality`, the hinge's linear/conic program in
:mod:`loglinear_grpo.hinge`, the closed-form GR-IPO θ step in :mod:`loglinear_grpo.closed_form`
(their names stay importable from here).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.optimize
import scipy.sparse as sp

from ._cvxpy import _cvxpy_diff, _solve_cvxpy
from ._validation import METHODS, check_choice, check_loss, check_positive_finite, check_unit_interval
from .constraints import Box, Unconstrained, make_constraint
from .losses import get_loss
from .objective import _check_data, _group_losses, group_adjustment, minimax_value


@dataclass(frozen=True)
class ExactResult:
    """Exact minimax optimum: ``theta``, ``value`` = min_θ max_g L_g(θ), optimal ``alpha``."""

    theta: np.ndarray
    value: float
    alpha: np.ndarray
    status: str


def _cvxpy_pair_losses(cp, data, theta_var, loss, beta):
    return get_loss(loss).cvxpy(cp, data.diff @ theta_var - data.ref_margin, beta)


def solve_exact(data, *, loss="dpo", beta=0.1, method="group_robust", chi=1.0, radius=None, center=None,
                constraint=None, solver=None, adjustment=None):
    """Exact optimum of the training objective :func:`loglinear_grpo.solve` minimises, with cvxpy: by default
    GRPO's :math:`\\min_{\\theta\\in\\Theta}\\max_g L_g(\\theta)`.

    Parameters
    ----------
    data : PreferenceData
    loss : {"dpo", "sigmoid", "ipo", "hinge"}
    beta : float > 0
    method : {"group_robust", "importance_sampling", "vanilla"}
        As in :func:`loglinear_grpo.solve`: ``"group_robust"`` minimises
        :math:`(1-\\chi)\\,\\mathrm{mean}_g L_g + \\chi\\max_g L_g`; the other two minimise
        :math:`\\sum_g w_g L_g` with solve's fixed weights, :math:`w_g = 1/K` (importance sampling) or
        :math:`w_g = N_g/N` (vanilla, every pair alike).
    chi : float in [0, 1], default 1
        The worst-case/average trade-off (Appendix B.4), ``method="group_robust"`` only.
    radius, center, constraint
        Θ, as in :func:`loglinear_grpo.solve`.
    solver : str, optional
        cvxpy solver (default: Clarabel, SCS as fall-back).
    adjustment : float, array_like, dict or None
        The group adjustment of :func:`loglinear_grpo.solve`: every :math:`L_g` becomes
        :math:`L_g + C_g/\\sqrt{N_g}` (:func:`~loglinear_grpo.objective.group_adjustment`).

    Returns
    -------
    ExactResult
        ``theta`` (d,), ``value`` (the optimal worst-group loss, recomputed in NumPy at
        ``theta``), ``alpha`` (K,) the optimal group weights from the dual, on the simplex.
        For ``chi < 1`` ``value`` is :math:`(1-\\chi)\\,\\mathrm{mean}_g L_g + \\chi\\max_g L_g` and
        ``alpha`` the normalised duals of the max (uniform at χ = 0); for the fixed-weight methods
        ``value`` is :math:`\\sum_g w_g L_g` and ``alpha`` the weights w.
    """
    import cvxpy as cp
    loss = check_loss(loss)
    beta = check_positive_finite("beta", beta)
    _check_data(data)
    method = check_choice("method", method, METHODS)
    chi = check_unit_interval("chi", chi)
    if chi != 1.0 and method != "group_robust":
        raise ValueError("chi trades worst-case for average loss in method='group_robust' only")
    theta_set = make_constraint(radius, center, constraint).check_dim(data.dim)
    shift = group_adjustment(adjustment, data.group_sizes, data.group_names)
    if loss == "dpo" and _improving_direction(data, theta_set):
        raise ValueError("no minimiser: a direction of Θ improves a pair of every group and worsens none, so "
                         "every group's DPO loss decreases towards its infimum without reaching it (separable "
                         "data); give a radius (or a bounded constraint)")
    data_cp = _cvxpy_diff(data)
    theta = cp.Variable(data.dim)
    t = cp.Variable()
    pair = _cvxpy_pair_losses(cp, data_cp, theta, loss, beta)
    group_loss = [cp.sum(pair[idx]) / len(idx) + (0.0 if shift is None else float(shift[g])) for g, idx in
                  enumerate(data.membership.members(g) for g in range(data.n_groups))]
    k = data.n_groups
    weights = None
    if method == "group_robust":
        cons = [lg <= t for lg in group_loss]
        objective = chi * t + (1.0 - chi) * cp.sum(cp.hstack(group_loss)) / k if chi < 1.0 else t
    else:                                       # solve's fixed weights (make_config's alpha0)
        sizes = data.group_sizes
        weights = sizes / sizes.sum() if method == "vanilla" else np.full(k, 1.0 / k)
        cons = []
        objective = cp.hstack(group_loss) @ weights
    problem = cp.Problem(cp.Minimize(objective), cons + theta_set.cvxpy_constraints(theta))
    _solve_cvxpy(problem, solver)
    theta_star = np.asarray(theta.value, dtype=np.float64)
    if weights is not None:
        alpha = np.asarray(weights, dtype=np.float64)
    else:
        alpha = np.array([max(float(c.dual_value), 0.0) for c in cons])
        alpha = alpha / alpha.sum() if alpha.sum() > 0 else np.full(k, 1.0 / k)
    value = minimax_value(_group_losses(theta_star, data, loss, beta), chi, weights, shift)
    return ExactResult(theta=theta_star, value=value, alpha=alpha, status=problem.status)


def _improving_direction(data, theta_set, tol=1e-9):
    """Whether some recession direction v of Θ has s_iᵀv ≥ 0 for every pair and Σ_{i∈D_g} s_iᵀv > 0 for
    every group: then each group's DPO loss strictly decreases along v forever, and the worst-group
    loss has no minimiser (Rockafellar 1970, Thm 27.1). One small LP (HiGHS): maximise t over
    −1 ≤ v ≤ 1 (within Θ's recession cone) with S v ≥ 0 and the group sums ≥ t."""
    if isinstance(theta_set, Unconstrained):
        bounds = [(-1.0, 1.0)] * data.dim
    elif isinstance(theta_set, Box):
        lo, hi = theta_set.bounds(data.dim)
        bounds = [(-1.0 if not np.isfinite(a) else 0.0, 1.0 if not np.isfinite(b) else 0.0) for a, b in zip(lo, hi)]
        if not any(a < 0 or b > 0 for a, b in bounds):
            return False
    else:
        return False
    n, d, k = data.n_samples, data.dim, data.n_groups
    diff = sp.csr_matrix(data.explicit_diff(), dtype=np.float64)
    indicator = data.membership.indicator(np.ones(n))
    rows = sp.vstack([sp.hstack([-diff, sp.csr_matrix((n, 1))]),
                      sp.hstack([-(indicator @ diff), np.ones((k, 1))])]).tocsc()
    res = scipy.optimize.linprog(np.r_[np.zeros(d), -1.0], A_ub=rows, b_ub=np.zeros(n + k),
                                 bounds=bounds + [(None, 1.0)], method="highs")
    scale = max(float(np.max(np.abs(diff.data), initial=0.0)), 1e-300)
    return res.status == 0 and -res.fun > tol * scale


# ---------------------------------------------------------------------- moved, kept importable from here
from .closed_form import RowSpaceForm, group_normal_equations, weighted_least_squares  # noqa: E402,F401 (moved there; kept importable)
from .closed_form import _ball_least_squares, _normal_equations, _solve_psd  # noqa: E402,F401 (moved there; kept importable)
from .duality import best_response, certified_best_response, duality_gap  # noqa: E402,F401 (moved there; kept importable)
from .hinge import HINGE_BYTES_PER_ENTRY, HINGE_BYTES_PER_PAIR, HINGE_TOL  # noqa: E402,F401 (moved there; kept importable)
from .hinge import hinge_memory_budget, hinge_program, hinge_program_nbytes  # noqa: E402,F401 (moved there; kept importable)


def __getattr__(name):
    """``HINGE_MEMORY_BUDGET``, read live from :mod:`loglinear_grpo.hinge` (moved there: set it there)."""
    if name == "HINGE_MEMORY_BUDGET":
        from . import hinge
        return hinge.HINGE_MEMORY_BUDGET
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
