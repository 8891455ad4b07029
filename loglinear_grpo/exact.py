"""Exact solutions and certificates: the minimax optimum, best responses, the duality gap and
the closed-form GR-IPO θ step.

These are the references every iterative solver is tested against. The minimax problem
(Eq. (9))

.. math::

    \\min_{\\theta\\in\\Theta}\\max_{\\alpha\\in\\Delta_K}\\sum_g \\alpha_g L_g(\\theta)
    \\;=\\; \\min_{\\theta\\in\\Theta,\\,t} \\; t \\quad\\text{s.t.}\\quad L_g(\\theta)\\le t\\ \\forall g

is solved in epigraph form with cvxpy (an exponential cone program for DPO, a QP for IPO, an
LP for the hinge); the optimal group weights α* are the dual variables of the K constraints.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.optimize

from ._validation import check_loss, check_positive_finite, check_vector
from .constraints import L2Ball, Box, Unconstrained, make_constraint
from .data import CHUNK_ROWS, PreferenceData
from .objective import _check_data, _group_losses

_PROBLEM_CACHE = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ExactResult:
    """Exact minimax optimum: ``theta``, ``value`` = min_θ max_g L_g(θ), optimal ``alpha``."""

    theta: np.ndarray
    value: float
    alpha: np.ndarray
    status: str


def _cvxpy_pair_losses(cp, data, theta_var, loss, beta):
    h = data.diff @ theta_var - data.ref_margin
    if loss == "dpo":
        return cp.logistic(-beta * h)          # log(1 + exp(-βh)) = −log σ(βh)
    if loss == "ipo":
        return cp.square(h - 0.5 / beta)
    return cp.pos(1.0 - beta * h)


def _cvxpy_diff(data):
    if isinstance(data.diff, np.memmap):
        return PreferenceData(np.asarray(data.diff, dtype=np.float64), data.groups, data.ref_margin,
                              group_names=data.group_names, check_finite=False)
    return data


def _solve_cvxpy(problem, solver=None):
    import cvxpy as cp
    tried = []
    for name in ([solver] if solver else ["CLARABEL", "SCS"]):
        try:
            problem.solve(solver=name)
        except cp.error.SolverError as exc:   # pragma: no cover - depends on installed solvers
            tried.append(f"{name}: {exc}")
            continue
        if problem.status in ("optimal", "optimal_inaccurate"):
            if problem.status == "optimal_inaccurate":
                warnings.warn("cvxpy reports optimal_inaccurate", RuntimeWarning, stacklevel=3)
            return
        tried.append(f"{name}: status {problem.status}")
    raise RuntimeError("cvxpy could not solve the problem (" + "; ".join(tried) +
                       "); an unbounded Θ with separable DPO data has no minimiser: give a radius")


def solve_exact(data, loss="dpo", beta=1.0, radius=None, center=None, constraint=None, solver=None):
    """Exact GRPO optimum :math:`\\min_{\\theta\\in\\Theta}\\max_g L_g(\\theta)` with cvxpy.

    Parameters
    ----------
    data : PreferenceData
    loss : {"dpo", "sigmoid", "ipo", "hinge"}
    beta : float > 0
    radius, center, constraint
        Θ, as in :func:`loglinear_grpo.solve`.
    solver : str, optional
        cvxpy solver (default: Clarabel, SCS as fall-back).

    Returns
    -------
    ExactResult
        ``theta`` (d,), ``value`` (the optimal worst-group loss, recomputed in NumPy at
        ``theta``), ``alpha`` (K,) the optimal group weights from the dual, on the simplex.
    """
    import cvxpy as cp
    loss = check_loss(loss)
    beta = check_positive_finite("beta", beta)
    _check_data(data)
    theta_set = make_constraint(radius, center, constraint)
    data_cp = _cvxpy_diff(data)
    theta = cp.Variable(data.dim)
    t = cp.Variable()
    pair = _cvxpy_pair_losses(cp, data_cp, theta, loss, beta)
    cons = []
    for g in range(data.n_groups):
        idx = np.flatnonzero(data.groups == g)
        cons.append(cp.sum(pair[idx]) / len(idx) <= t)
    problem = cp.Problem(cp.Minimize(t), cons + theta_set.cvxpy_constraints(theta))
    _solve_cvxpy(problem, solver)
    theta_star = np.asarray(theta.value, dtype=np.float64)
    alpha = np.array([max(float(c.dual_value), 0.0) for c in cons])
    alpha = alpha / alpha.sum() if alpha.sum() > 0 else np.full(data.n_groups, 1.0 / data.n_groups)
    value = float(np.max(_group_losses(theta_star, data, loss, beta)))
    return ExactResult(theta=theta_star, value=value, alpha=alpha, status=problem.status)


# ---------------------------------------------------------------------- weighted least squares
def _normal_equations(data, pair_weights, target):
    """H = Sᵀ(w⊙S) and q = Sᵀ(w⊙b), streamed; never an N×N matrix."""
    d = data.dim
    if data.is_sparse:
        ws = data.diff.multiply(pair_weights[:, None]).tocsr()
        hess = np.asarray((data.diff.T @ ws).todense())
        return hess, np.asarray(ws.T @ target).ravel()
    hess = np.zeros((d, d))
    rhs = np.zeros(d)
    for start in range(0, data.n_samples, CHUNK_ROWS):
        block = np.asarray(data.diff[start:start + CHUNK_ROWS], dtype=np.float64)
        wb = block * pair_weights[start:start + len(block), None]
        hess += block.T @ wb
        rhs += wb.T @ target[start:start + len(block)]
    return hess, rhs


def _solve_psd(hess, rhs):
    """Solve H u = q by Cholesky; the min-norm least-squares solution when H is (numerically)
    singular, detected by a failed factorisation or a pivot below √(d·ε) of the largest: rounding
    can let Cholesky "succeed" on a singular H and return a solution with a huge null-space part."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
            factor, lower = scipy.linalg.cho_factor(hess)
        pivots = np.abs(np.diag(factor))
        if pivots.min() > pivots.max() * np.sqrt(hess.shape[0] * np.finfo(float).eps):
            return scipy.linalg.cho_solve((factor, lower), rhs)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgWarning, ValueError):
        pass
    # cut-off d·ε·σ_max: the default (ε·σ_max) keeps rounding-level singular values of a singular H
    return scipy.linalg.lstsq(hess, rhs, cond=hess.shape[0] * np.finfo(float).eps)[0]


def _trust_region_coefficients(lam, qt, radius):
    r"""Coefficients :math:`c_j = \tilde q_j/(\lambda_j+\mu)` of the solution of
    :math:`\min_u u^\top H u - 2q^\top u` s.t. :math:`\|u\|\le R`, in the eigenbasis of
    :math:`H = V\Lambda V^\top \succeq 0` (:math:`\tilde q = V^\top q`).

    If the min-norm unconstrained minimiser (μ = 0 on range(H)) lies in the ball it is optimal;
    otherwise μ > 0 is the unique root of the secular equation :math:`\|u(\mu)\| = R`, solved
    with Brent's method on :math:`1/\|u(\mu)\| - 1/R`. Since q ∈ range(H) the "hard case"
    cannot occur for a PSD H. ``radius=inf``: the min-norm least-squares solution.
    """
    lam = np.maximum(lam, 0.0)
    tol = max(lam.max(initial=0.0), 1e-300) * lam.size * np.finfo(float).eps
    keep = lam > tol
    # components in the null space of H carry q̃ = 0 (q ∈ range(H)); drop their rounding noise
    qt = np.where(keep, qt, 0.0)
    lam = np.where(keep, lam, 1.0)
    coef = qt / lam
    if np.linalg.norm(coef) <= radius:
        return coef, keep

    def secular(mu):
        return 1.0 / np.linalg.norm(qt / (lam + mu)) - 1.0 / radius

    hi = np.linalg.norm(qt) / radius             # ‖u(μ)‖ ≤ ‖q‖/μ ≤ R at μ = ‖q‖/R
    while secular(hi) < 0:                        # pragma: no cover - guards rounding only
        hi *= 2.0
    mu = scipy.optimize.brentq(secular, 0.0, hi, xtol=1e-300, rtol=4 * np.finfo(float).eps)
    return qt / (lam + mu), keep


def _ball_least_squares(hess, rhs, radius):
    """min uᵀHu − 2qᵀu s.t. ‖u‖ ≤ R exactly (trust-region subproblem, H ⪰ 0), in R^d."""
    lam, vec = scipy.linalg.eigh(hess)
    coef, _ = _trust_region_coefficients(lam, vec.T @ rhs, radius)
    return vec @ coef


@dataclass(frozen=True)
class RowSpaceForm:
    r"""The GR-IPO regression in the row space of S, for d > N: the kernel :math:`G = SS^\top`
    (N × N) and the targets :math:`b = r + \frac{1}{2\beta} - Sc`.

    With pair weights :math:`w_i` and :math:`A = \mathrm{diag}(\sqrt w)S`, the push-through
    identity :math:`(A^\top A+\mu I)^{-1}A^\top = A^\top(AA^\top+\mu I)^{-1}` gives the same
    trust-region solution from the eigen-decomposition of the N × N matrix
    :math:`AA^\top = \mathrm{diag}(\sqrt w)\,G\,\mathrm{diag}(\sqrt w)` instead of the d × d
    :math:`A^\top A`: :math:`u = S^\top(\sqrt w \odot V c/\sqrt\Lambda)`.
    """

    gram: np.ndarray
    target: np.ndarray


def _row_space_least_squares(data, form, pair_weights, radius):
    root = np.sqrt(pair_weights)
    lam, vec = scipy.linalg.eigh(form.gram * root[:, None] * root[None, :])
    lam = np.maximum(lam, 0.0)
    yt = vec.T @ (root * form.target)
    coef, keep = _trust_region_coefficients(lam, np.sqrt(lam) * yt, radius)
    dual = np.where(keep, coef / np.sqrt(np.where(keep, lam, 1.0)), 0.0)
    return np.asarray(data.diff.T @ (root * (vec @ dual))).ravel()


def group_normal_equations(data, target_offset, theta_set=None):
    """Per-group normal equations ``(H_g, q_g)`` of the GR-IPO regression, shapes (K,d,d), (K,d):

    :math:`H_g = S_g^\\top S_g/N_g`, :math:`q_g = S_g^\\top (b_g - S_g c)/N_g` with
    :math:`b = r + 1/(2\\beta)` and c the centre of an L2-ball Θ (0 otherwise). Then
    :math:`\\sum_g w_g H_g` and :math:`\\sum_g w_g q_g` are the normal equations for any
    group weights w, at O(K·d²) per α step instead of O(N·d²). When d > N (e.g. an LLM's
    last layer), a :class:`RowSpaceForm` (one N × N kernel) is returned instead, which is
    smaller and gives the same solution. ``None`` for Θ without a closed form (box, general
    convex set).
    """
    theta_set = Unconstrained() if theta_set is None else theta_set
    if not isinstance(theta_set, (Unconstrained, L2Ball)):
        return None
    target = data.ref_margin + target_offset
    if isinstance(theta_set, L2Ball) and theta_set.center is not None and np.any(theta_set.center):
        target = target - np.asarray(data.diff @ theta_set.center).ravel()
    if data.dim > data.n_samples and not data.streamed:
        gram = data.diff @ data.diff.T
        gram = gram.toarray() if hasattr(gram, "toarray") else np.asarray(gram, dtype=np.float64)
        return RowSpaceForm(gram=np.asarray(gram, dtype=np.float64), target=target)
    k, d = data.n_groups, data.dim
    grams, rhs = np.empty((k, d, d)), np.empty((k, d))
    for g in range(k):
        one_hot = (data.groups == g) / data.group_sizes[g]
        grams[g], rhs[g] = _normal_equations(data, one_hot, target)
    return grams, rhs


def weighted_least_squares(data, group_weights, target_offset, theta_set=None, normal_equations=None):
    """Closed-form GR-IPO θ step (§4.1, Algorithm 2):

    .. math::

        \\hat\\theta = \\arg\\min_{\\theta\\in\\Theta} \\sum_i \\frac{w_{g_i}}{N_{g_i}}
        \\big(s_i^\\top\\theta - r_i - \\tfrac{1}{2\\beta}\\big)^2,

    i.e. :math:`\\hat\\theta = (S^\\top W S)^{-1} S^\\top W (r + \\tfrac{1}{2\\beta}\\mathbf 1)` on
    R^d (the paper's formula with r = 0), computed by Cholesky (``lstsq`` when rank-deficient),
    never with an explicit inverse or an N×N matrix. On an L2 ball the exact trust-region
    solution is returned (not a clipped one); on a box, bounded least squares
    (``scipy.optimize.lsq_linear``); on a general convex set, cvxpy.

    Parameters
    ----------
    data : PreferenceData
    group_weights : ndarray (K,)
        :math:`w_g` (α, or the χ-mixed weights).
    target_offset : float
        :math:`1/(2\\beta)`.
    theta_set : Θ object, optional
    normal_equations : tuple or RowSpaceForm, optional
        :func:`group_normal_equations` of the same data, offset and Θ, to reuse across calls
        (d > N: the row-space form, solved through an N × N eigen-decomposition).
    """
    theta_set = Unconstrained() if theta_set is None else theta_set
    w = np.asarray(group_weights, dtype=np.float64)
    if isinstance(theta_set, (Unconstrained, L2Ball)):
        if normal_equations is None:
            normal_equations = group_normal_equations(data, target_offset, theta_set)
        radius = theta_set.radius if isinstance(theta_set, L2Ball) else np.inf
        if isinstance(normal_equations, RowSpaceForm):
            u = _row_space_least_squares(data, normal_equations, (w / data.group_sizes)[data.groups], radius)
            return u if radius == np.inf else theta_set._c(np.zeros(data.dim)) + u
        grams, rhs = normal_equations
        hess = np.tensordot(w, grams, axes=1)
        q = w @ rhs
        if isinstance(theta_set, Unconstrained):
            return _solve_psd(hess, q)
        center = theta_set._c(np.zeros(data.dim))
        return center + _ball_least_squares(hess, q, theta_set.radius)
    pair_w = (w / data.group_sizes)[data.groups]
    target = data.ref_margin + target_offset
    root_w = np.sqrt(pair_w)
    if isinstance(theta_set, Box) and not data.is_sparse:
        a = np.asarray(data.diff, dtype=np.float64) * root_w[:, None]
        lower = np.broadcast_to(theta_set.lower, (data.dim,))
        upper = np.broadcast_to(theta_set.upper, (data.dim,))
        res = scipy.optimize.lsq_linear(a, root_w * target, bounds=(lower, upper), method="bvls",
                                        tol=1e-14, lsmr_tol="auto")
        return res.x
    import cvxpy as cp
    theta = cp.Variable(data.dim)
    resid = cp.multiply(root_w, _cvxpy_diff(data).diff @ theta - target)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(resid)), theta_set.cvxpy_constraints(theta))
    _solve_cvxpy(problem)
    return np.asarray(theta.value, dtype=np.float64)


# ---------------------------------------------------------------------- best response / gap
def best_response(alpha, data, loss="dpo", beta=1.0, theta_set=None, solver=None):
    """:math:`\\min_{\\theta'\\in\\Theta}\\sum_g \\alpha_g L_g(\\theta')`: ``(theta, value)``.

    Exact: the closed form for IPO (:func:`weighted_least_squares`), otherwise a cvxpy problem
    with the pair weights as a parameter, compiled once per (data, loss, β, Θ) and re-solved.
    """
    theta_set = Unconstrained() if theta_set is None else theta_set
    alpha = np.asarray(alpha, dtype=np.float64)
    if loss == "ipo":
        theta = weighted_least_squares(data, alpha, 0.5 / beta, theta_set)
    else:
        import cvxpy as cp
        per_data = _PROBLEM_CACHE.setdefault(data, {})
        key = (loss, beta, id(theta_set), solver)
        if key not in per_data:
            var = cp.Variable(data.dim)
            weights = cp.Parameter(data.n_samples, nonneg=True)
            pair = _cvxpy_pair_losses(cp, _cvxpy_diff(data), var, loss, beta)
            problem = cp.Problem(cp.Minimize(weights @ pair), theta_set.cvxpy_constraints(var))
            per_data[key] = (problem, var, weights, theta_set)
        problem, var, weights, _ = per_data[key]
        weights.value = (alpha / data.group_sizes)[data.groups]
        _solve_cvxpy(problem, solver)
        theta = np.asarray(var.value, dtype=np.float64)
    value = float(alpha @ _group_losses(theta, data, loss, beta))
    return theta, value


def duality_gap(theta, alpha, data, loss="dpo", beta=1.0, radius=None, center=None,
                constraint=None, solver=None):
    """Duality gap :math:`\\max_g L_g(\\theta) - \\min_{\\theta'\\in\\Theta}\\sum_g\\alpha_g L_g(\\theta')`.

    By weak duality it bounds the suboptimality :math:`\\mathcal L_{GR}(\\theta) - \\min_\\Theta
    \\mathcal L_{GR}` from above for *any* α on the simplex, without knowing the optimum; it is
    zero exactly at a saddle point (θ*, α*) of Eq. (9).
    """
    loss = check_loss(loss)
    beta = check_positive_finite("beta", beta)
    _check_data(data)
    theta = check_vector("theta", theta, data.dim)
    alpha = check_vector("alpha", alpha, data.n_groups)
    if np.any(alpha < 0) or not np.isclose(alpha.sum(), 1.0, atol=1e-8):
        raise ValueError("alpha must lie on the probability simplex")
    theta_set = make_constraint(radius, center, constraint)
    return _duality_gap(theta, alpha, data, loss, beta, theta_set, solver)


def _duality_gap(theta, alpha, data, loss, beta, theta_set, solver=None):
    upper = float(np.max(_group_losses(theta, data, loss, beta)))
    _, lower = best_response(alpha, data, loss, beta, theta_set, solver)
    return upper - lower
