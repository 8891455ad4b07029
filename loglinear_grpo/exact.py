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
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.sparse as sp

from ._linalg import ball_quadratic_min as _ball_least_squares  # noqa: F401 (re-exported for tests)
from ._linalg import solve_psd as _solve_psd
from ._linalg import trust_region_coefficients as _trust_region_coefficients
from ._validation import check_loss, check_positive_finite, check_vector
from .certificate import check_consistent, hinge_dual_bound, is_converged
from .constraints import L2Ball, Box, Unconstrained, make_constraint
from .data import PreferenceData, weighted_gram
from .losses import get_loss
from .objective import _check_data, _group_losses, minimax_value
from .steps import mixing_weights


@dataclass(frozen=True)
class ExactResult:
    """Exact minimax optimum: ``theta``, ``value`` = min_θ max_g L_g(θ), optimal ``alpha``."""

    theta: np.ndarray
    value: float
    alpha: np.ndarray
    status: str


def _cvxpy_pair_losses(cp, data, theta_var, loss, beta):
    return get_loss(loss).cvxpy(cp, data.diff @ theta_var - data.ref_margin, beta)


def _cvxpy_diff(data):
    """The data with S in memory (cvxpy and the LP need its entries): a memmap is read, an implicit
    S formed when it fits (``ValueError`` otherwise)."""
    if not data.storage.in_memory:
        return PreferenceData(data.explicit_diff(), data.groups, data.ref_margin,
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
    raise ValueError("cvxpy could not solve the problem (" + "; ".join(tried)[:300] + "); it may be badly "
                     "scaled (rescale diff or ref_margin) or, on an unbounded Θ, have no minimiser (give a radius)")


def solve_exact(data, *, loss="dpo", beta=0.1, radius=None, center=None, constraint=None, solver=None):
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
    theta_set = make_constraint(radius, center, constraint).check_dim(data.dim)
    if loss == "dpo" and _improving_direction(data, theta_set):
        raise ValueError("no minimiser: a direction of Θ improves a pair of every group and worsens none, so "
                         "every group's DPO loss decreases towards its infimum without reaching it (separable "
                         "data); give a radius (or a bounded constraint)")
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
    indicator = sp.csr_matrix((np.ones(n), (data.groups, np.arange(n))), shape=(k, n))
    rows = sp.vstack([sp.hstack([-diff, sp.csr_matrix((n, 1))]),
                      sp.hstack([-(indicator @ diff), np.ones((k, 1))])]).tocsc()
    res = scipy.optimize.linprog(np.r_[np.zeros(d), -1.0], A_ub=rows, b_ub=np.zeros(n + k),
                                 bounds=bounds + [(None, 1.0)], method="highs")
    scale = max(float(np.max(np.abs(diff.data), initial=0.0)), 1e-300)
    return res.status == 0 and -res.fun > tol * scale


# ---------------------------------------------------------------------- weighted least squares
def _normal_equations(data, pair_weights, target):
    """H = Sᵀ(w⊙S) and q = Sᵀ(w⊙b), streamed; never an N×N matrix."""
    d = data.dim
    hess = np.zeros((d, d))
    rhs = np.zeros(d)
    for start, stop, block in data.row_blocks():
        hess += weighted_gram(block, pair_weights[start:stop])
        rhs += np.asarray(block.T @ (pair_weights[start:stop] * target[start:stop])).ravel()
    return hess, rhs


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
    return data.rmatvec(root * (vec @ dual))


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
        target = target - data.matvec(theta_set.center)
    if data.dim > data.n_samples and not data.storage.out_of_core:
        return RowSpaceForm(gram=data.gram(), target=target)
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
            return u if radius == np.inf else theta_set.center_vector(data.dim) + u
        grams, rhs = normal_equations
        hess = np.tensordot(w, grams, axes=1)
        q = w @ rhs
        if isinstance(theta_set, Unconstrained):
            return _solve_psd(hess, q)
        center = theta_set.center_vector(data.dim)
        return center + _ball_least_squares(hess, q, theta_set.radius)
    pair_w = (w / data.group_sizes)[data.groups]
    target = data.ref_margin + target_offset
    root_w = np.sqrt(pair_w)
    if isinstance(theta_set, Box) and data.storage.dense_rows:
        a = np.asarray(data.explicit_diff(), dtype=np.float64) * root_w[:, None]
        lower, upper = theta_set.bounds(data.dim)
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
def certified_best_response(alpha, data, loss, beta, theta_set, *, tol=1e-12, theta0=None, max_iter=100):
    r""":math:`\min_{\theta\in\Theta}\sum_g\alpha_g L_g(\theta)` with a certified lower bound
    (a :class:`~loglinear_grpo.newton.NewtonResult`).

    Newton's method with the exact model step over Θ (:mod:`loglinear_grpo.newton`): for IPO one
    step is the closed form (the model is the function), for DPO a weighted logistic regression
    converging quadratically; the hinge as one linear (or conic) program, :func:`hinge_program`.
    """
    from .newton import newton_minimax
    spec = get_loss(loss)
    if spec.name == "hinge":
        return hinge_program(data, beta, theta_set, weights=np.asarray(alpha, dtype=np.float64))
    return newton_minimax(data, spec.name, beta, theta_set, weights=np.asarray(alpha, dtype=np.float64),
                          theta0=theta0, tol=tol, max_iter=max_iter)


def best_response(alpha, data, *, loss="dpo", beta=0.1, theta_set=None):
    r""":math:`\min_{\theta'\in\Theta}\sum_g \alpha_g L_g(\theta')`: ``(theta, value)``.

    Exact to a certified relative accuracy of 10⁻¹²: Newton's method with exact model steps over Θ
    (IPO: the closed form in one step; DPO: a weighted logistic regression; hinge: a linear or
    conic program); see :func:`certified_best_response`. ``loss`` takes
    TRL's names too (``"sigmoid"`` is DPO).
    """
    loss = check_loss(loss)
    beta = check_positive_finite("beta", beta)
    _check_data(data)
    theta_set = Unconstrained() if theta_set is None else theta_set
    theta_set.check_dim(data.dim)
    alpha = _check_simplex(alpha, data.n_groups)
    res = certified_best_response(alpha, data, loss, beta, theta_set)
    return res.theta, float(alpha @ _group_losses(res.theta, data, loss, beta))


def _check_simplex(alpha, k):
    alpha = check_vector("alpha", alpha, k)
    if np.any(alpha < 0) or not np.isclose(alpha.sum(), 1.0, atol=1e-8):
        raise ValueError("alpha must lie on the probability simplex")
    return alpha / alpha.sum()


def duality_gap(theta, alpha, data, *, loss="dpo", beta=0.1, radius=None, center=None, constraint=None):
    r"""Certified duality gap :math:`\max_g L_g(\theta) - \underline{\min}_{\theta'\in\Theta}
    \sum_g\alpha_g L_g(\theta')`.

    The second term is a certified *lower bound* on the best response's value (see
    :mod:`loglinear_grpo.newton`), so by weak duality the result bounds the suboptimality
    :math:`\mathcal L_{GR}(\theta) - \min_\Theta\mathcal L_{GR}` from above for *any* α on the
    simplex, without knowing the optimum; it is zero exactly at a saddle point (θ*, α*) of Eq. (9).

    Raises
    ------
    ValueError
        If θ lies outside Θ (the bound would be meaningless) or α is not on the simplex.
    """
    loss = check_loss(loss)
    beta = check_positive_finite("beta", beta)
    _check_data(data)
    theta = check_vector("theta", theta, data.dim)
    alpha = _check_simplex(alpha, data.n_groups)
    theta_set = make_constraint(radius, center, constraint).check_dim(data.dim)
    if not theta_set.contains(theta, tol=1e-9):
        raise ValueError("theta lies outside Θ: the duality gap bounds the suboptimality of points of Θ "
                         "only (project it first, e.g. with constraint.project)")
    return _duality_gap(theta, alpha, data, loss, beta, theta_set)


def _duality_gap(theta, alpha, data, loss, beta, theta_set):
    upper = float(np.max(_group_losses(theta, data, loss, beta)))
    lower = certified_best_response(alpha, data, loss, beta, theta_set, theta0=theta).lower_bound
    if check_consistent(upper, lower, "duality_gap"):   # else warned: the bound lies above max_g L_g(θ)
        return max(upper - lower, 0.0)      # a negative difference within rounding is 0
    return upper - lower                    # beyond rounding: reported as it is, never clipped


def hinge_program(data, beta, theta_set, *, weights=None, chi=1.0):
    r"""The hinge problem solved as one linear (or conic) program, with its certificate.

    Variables (θ, ξ, t): minimise :math:`\chi t + \frac{1-\chi}{K}\sum_g \bar\xi_g` (group robust)
    or :math:`\sum_g w_g\bar\xi_g` (fixed weights), :math:`\bar\xi_g = \frac{1}{N_g}\sum_{i\in D_g}\xi_i`,
    subject to :math:`\xi_i \ge 1 - \beta(s_i^\top\theta - r_i)` (dual :math:`y_i`), ξ ≥ 0,
    :math:`\bar\xi_g \le t` (dual α_g) and θ ∈ Θ. On a box or R^d this is a linear program, solved by
    HiGHS (``scipy.optimize.linprog``, tolerances 10⁻¹⁰); on a ball or a general convex set a conic
    program, solved by cvxpy (Clarabel). Either needs S in memory, whatever its storage (a
    memory-mapped or implicit S too), and much more besides: the memory is predicted first
    (:func:`hinge_program_nbytes`) and a program over :data:`HINGE_MEMORY_BUDGET` is refused with a
    ``MemoryError`` before anything is allocated.

    The lower bound is the Lagrange dual function at the solver's duals, clipped to their domain
    :math:`0\le y_i\le\lambda_{g_i}/N_{g_i}` (λ the group weights of the objective):

    .. math::

        L^* \ge \sum_i y_i\,(1 - \beta h_i(\theta)) + \min_{\theta'\in\Theta}\,
        (-\beta S^\top y)^\top(\theta' - \theta),

    rigorous whatever the solver's accuracy (Fenchel: the hinge's conjugate is u/β on [−β, 0]).
    Where Θ is unbounded along :math:`S^\top y` the duals are first moved onto :math:`S^\top y = 0`
    to rounding (:func:`~loglinear_grpo.certificate.hinge_dual_bound`, ``bound_kind="feasible dual"``); the solver's own
    optimal value is never taken on trust, and ``converged`` is ``False`` when no bound certifies
    the answer to :data:`HINGE_TOL`.
    """
    from .newton import NewtonResult, PairOracle
    _check_hinge_memory(data, theta_set)       # before any pass over S or copy of it
    k = data.n_groups
    robust = weights is None and k > 1
    w = None if robust else (np.ones(1) if weights is None else np.asarray(weights, dtype=np.float64))
    inv = 1.0 / data.group_sizes[data.groups]
    center, rho = theta_set.bounding_ball(data.dim)
    reach = beta * float(np.max(data.row_norms(), initial=0.0)) * (rho if np.isfinite(rho) else 1.0)
    if reach > 1e15:
        raise ValueError(f"the hinge problem is badly scaled: beta × radius of Θ × max‖s_i‖ = {reach:.1e} > 1e15 "
                         "(a linear program cannot resolve it); rescale diff, beta or the constraint")
    try:
        if isinstance(theta_set, (Box, Unconstrained)):
            theta, alpha, y, reported = _hinge_highs(data, beta, theta_set, robust, w, chi, inv)
        else:
            theta, alpha, y, reported = _hinge_conic(data, beta, theta_set, robust, w, chi, inv)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"the hinge program could not be solved ({str(exc)[:160]}); it is probably badly scaled: "
                         "rescale diff, beta or the constraint") from None
    theta = theta_set.project(theta)
    losses = _group_losses(theta, data, "hinge", beta)
    lam = mixing_weights(alpha, chi) if robust else w
    value = minimax_value(losses, chi, None if robust else w)
    h = data.matvec(theta) - data.ref_margin
    lower, kind = hinge_dual_bound(PairOracle(data, "hinge", beta), beta, theta, theta_set, h, lam[data.groups] * inv,
                                   y)
    lower = max(lower, 0.0)                                   # the hinge is ≥ 0
    converged = check_consistent(value, lower, "hinge_program") and is_converged(value, lower, HINGE_TOL)
    return NewtonResult(theta=theta, alpha=np.asarray(alpha if robust else w, dtype=np.float64), value=value,
                        lower_bound=lower, converged=converged, n_iter=1, passes=2, bound_kind=kind)


#: the relative certified gap at which the hinge program counts as solved (its solvers' tolerances are 1e-10)
HINGE_TOL = 1e-6


#: bytes the hinge's linear or conic program may take; ``None``: half the physical memory (os.sysconf)
HINGE_MEMORY_BUDGET = None
#: peak resident bytes of the hinge programs, measured (HiGHS and cvxpy + Clarabel, dense and sparse S,
#: N = 2500..20000, d = 5..80: about 200 per stored entry of S and 1600-2800 per pair) and rounded up
HINGE_BYTES_PER_ENTRY = 256
HINGE_BYTES_PER_PAIR = 4096


def hinge_program_nbytes(data):
    """Predicted peak memory (bytes) of :func:`hinge_program` on ``data``: ``HINGE_BYTES_PER_ENTRY`` per
    stored entry of S (N·d for a dense or memory-mapped S, its nonzeros for a sparse one, the explicit
    CSR's entries for an implicit one) plus ``HINGE_BYTES_PER_PAIR`` per pair (the slack variables,
    their constraints and the K group rows) and a little per coordinate of θ (its bounds and costs).
    Computed from the shapes alone: nothing is read."""
    n, d = data.n_samples, data.dim
    entries = data.storage.explicit_entries()
    return HINGE_BYTES_PER_ENTRY * entries + HINGE_BYTES_PER_PAIR * n + 256 * d + 8 * data.n_groups * n


def hinge_memory_budget():
    """:data:`HINGE_MEMORY_BUDGET`, or half the physical memory when it is ``None`` (8 GiB where the
    system does not say)."""
    if HINGE_MEMORY_BUDGET is not None:
        return int(HINGE_MEMORY_BUDGET)
    import os
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2
    except (AttributeError, ValueError, OSError):
        return 8 << 30


def _nbytes_text(nbytes):
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _check_hinge_memory(data, theta_set):
    """``MemoryError`` when the hinge program would need more than the budget (nothing allocated yet)."""
    need, budget = hinge_program_nbytes(data), hinge_memory_budget()
    if need > budget:
        program = "linear program (HiGHS)" if isinstance(theta_set, (Box, Unconstrained)) else \
            "conic program (cvxpy + Clarabel)"
        storage = data.storage.description
        raise MemoryError(
            f"the hinge loss is solved as one {program} over S in memory: for N={data.n_samples} pairs, "
            f"d={data.dim}, K={data.n_groups} ({storage} S) it would need about {_nbytes_text(need)}, more than "
            f"the budget of {_nbytes_text(budget)} (loglinear_grpo.exact.HINGE_MEMORY_BUDGET; default half "
            "the physical memory). Use a smooth loss (loss='dpo' or 'ipo', whose Newton solver streams S), "
            "solve a subset of the pairs (data.subset(index)), or raise HINGE_MEMORY_BUDGET if the memory is "
            "really there")


def _hinge_highs(data, beta, theta_set, robust, w, chi, inv):
    n, d, k = data.n_samples, data.dim, data.n_groups
    diff = sp.csr_matrix(data.explicit_diff(), dtype=np.float64)
    rows = [sp.hstack([-beta * diff, -sp.identity(n, format="csr"), sp.csr_matrix((n, 1))])]
    rhs = [-(1.0 + beta * data.ref_margin)]
    if robust:
        indicator = sp.csr_matrix((inv, (data.groups, np.arange(n))), shape=(k, n))
        rows.append(sp.hstack([sp.csr_matrix((k, d)), indicator, -np.ones((k, 1))]))
        rhs.append(np.zeros(k))
        cost = np.concatenate([np.zeros(d), (1.0 - chi) / k * inv, [chi]])
    else:
        cost = np.concatenate([np.zeros(d), w[data.groups] * inv, [0.0]])
    if isinstance(theta_set, Box):
        lo, hi = theta_set.bounds(d)
        theta_bounds = [(a if np.isfinite(a) else None, b if np.isfinite(b) else None) for a, b in zip(lo, hi)]
    else:
        theta_bounds = [(None, None)] * d
    bounds = theta_bounds + [(0, None)] * n + [(None, None) if robust else (0, 0)]
    res = scipy.optimize.linprog(cost, A_ub=sp.vstack(rows).tocsc(), b_ub=np.concatenate(rhs), bounds=bounds,
                                 method="highs", options={"primal_feasibility_tolerance": 1e-10,
                                                          "dual_feasibility_tolerance": 1e-10})
    if res.status != 0:
        raise RuntimeError(f"HiGHS could not solve the hinge linear program: {res.message}")
    duals = -np.asarray(res.ineqlin.marginals)
    alpha = np.full(k, 1.0 / k)
    if robust:
        alpha = np.maximum(duals[n:], 0.0)
        alpha = alpha / alpha.sum() if alpha.sum() > 0 else np.full(k, 1.0 / k)
    return res.x[:d], alpha, duals[:n], float(res.fun)


def _hinge_conic(data, beta, theta_set, robust, w, chi, inv):
    import cvxpy as cp
    n, d, k = data.n_samples, data.dim, data.n_groups
    theta, xi, t = cp.Variable(d), cp.Variable(n, nonneg=True), cp.Variable()
    pair = xi >= 1.0 - beta * (_cvxpy_diff(data).diff @ theta - data.ref_margin)
    indicator = sp.csr_matrix((inv, (data.groups, np.arange(n))), shape=(k, n))
    cons = [pair] + theta_set.cvxpy_constraints(theta)
    if robust:
        group = indicator @ xi <= t
        cons.append(group)
        objective = chi * t + (1.0 - chi) / k * cp.sum(indicator @ xi)
    else:
        objective = (indicator.T @ w) @ xi
    problem = cp.Problem(cp.Minimize(objective), cons)
    _solve_cvxpy(problem)
    alpha = np.full(k, 1.0 / k)
    if robust:
        alpha = np.maximum(np.asarray(group.dual_value, dtype=np.float64), 0.0)
        alpha = alpha / alpha.sum() if alpha.sum() > 0 else np.full(k, 1.0 / k)
    return (np.asarray(theta.value, dtype=np.float64), alpha, np.asarray(pair.dual_value, dtype=np.float64),
            float(problem.value))
