"""The hinge loss solved as one linear program (HiGHS, Θ a box or R^d) or conic program (cvxpy +
Clarabel, Θ a ball or a general convex set), with its certificate (:func:`hinge_program`), and the
memory guard that refuses a program over :data:`HINGE_MEMORY_BUDGET` before anything is allocated."""
from __future__ import annotations

import numpy as np
import scipy.optimize
import scipy.sparse as sp

from ._cvxpy import _cvxpy_diff, _solve_cvxpy
from .certificate import check_consistent, hinge_dual_bound, is_converged
from .constraints import Box, Unconstrained
from ._numbers import half_physical_memory, nbytes_text
from .objective import _group_losses, minimax_value
from .steps import mixing_weights


def hinge_program(data, beta, theta_set, *, weights=None, chi=1.0, shift=None):
    r"""The hinge problem solved as one linear (or conic) program, with its certificate.

    Variables (θ, ξ, t): minimise :math:`\chi t + \frac{1-\chi}{K}\sum_g \bar\xi_g` (group robust)
    or :math:`\sum_g w_g\bar\xi_g` (fixed weights), :math:`\bar\xi_g = \frac{1}{N_g}\sum_{i\in D_g}\xi_i`,
    subject to :math:`\xi_i \ge 1 - \beta(s_i^\top\theta - r_i)` (dual :math:`y_i`), ξ ≥ 0,
    :math:`\bar\xi_g + c_g \le t` (dual α_g; c the group adjustment ``shift``, 0 by default) and θ ∈ Θ. On a box or R^d this is a linear program, solved by
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
    inv = 1.0 / data.group_sizes                 # per group: a pair's weights are sums over its groups
    center, rho = theta_set.bounding_ball(data.dim)
    reach = beta * float(np.max(data.row_norms(), initial=0.0)) * (rho if np.isfinite(rho) else 1.0)
    if reach > 1e15:
        raise ValueError(f"the hinge problem is badly scaled: beta × radius of Θ × max‖s_i‖ = {reach:.1e} > 1e15 "
                         "(a linear program cannot resolve it); rescale diff, beta or the constraint")
    try:
        if isinstance(theta_set, (Box, Unconstrained)):
            theta, alpha, y, reported = _hinge_highs(data, beta, theta_set, robust, w, chi, inv, shift)
        else:
            theta, alpha, y, reported = _hinge_conic(data, beta, theta_set, robust, w, chi, inv, shift)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"the hinge program could not be solved ({str(exc)[:160]}); it is probably badly scaled: "
                         "rescale diff, beta or the constraint") from None
    theta = theta_set.project(theta)
    losses = _group_losses(theta, data, "hinge", beta)
    lam = mixing_weights(alpha, chi) if robust else w
    value = minimax_value(losses, chi, None if robust else w, shift)
    h = data.matvec(theta) - data.ref_margin
    lower, kind = hinge_dual_bound(PairOracle(data, "hinge", beta), beta, theta, theta_set, h,
                                   data.membership.spread(lam * inv), y)
    lower = max(lower, 0.0)                                   # the hinge is ≥ 0
    if shift is not None:                                     # the adjusted problem's dual gains λᵀc
        lower += float(lam @ shift)
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


def hinge_program_nbytes(data, theta_set=None):
    """Predicted peak memory (bytes) of :func:`hinge_program` on ``data``: ``HINGE_BYTES_PER_ENTRY`` per
    stored entry of S (N·d for a dense or memory-mapped S, its nonzeros for a sparse one, the explicit
    CSR's entries for an implicit one) plus ``HINGE_BYTES_PER_PAIR`` per pair (the slack variables,
    their constraints and the K group rows), a little per coordinate of θ (its bounds and costs), and, when
    ``theta_set`` is unbounded (R^d, an open box), the d × d matrix the certificate builds to make the duals
    feasible (:func:`~loglinear_grpo.certificate.hinge_dual_bound`). Computed from the shapes alone: nothing is read."""
    n, d = data.n_samples, data.dim
    entries = data.storage.explicit_entries()
    unbounded = theta_set is not None and not np.isfinite(theta_set.bounding_ball(d)[1])
    return (HINGE_BYTES_PER_ENTRY * entries + HINGE_BYTES_PER_PAIR * n + 256 * d + 8 * data.n_groups * n
            + (8 * d * d if unbounded else 0))


def hinge_memory_budget():
    """:data:`HINGE_MEMORY_BUDGET`, or half the physical memory when it is ``None`` (8 GiB where the
    system does not say)."""
    if HINGE_MEMORY_BUDGET is not None:
        return int(HINGE_MEMORY_BUDGET)
    return half_physical_memory()


_nbytes_text = nbytes_text


def _check_hinge_memory(data, theta_set):
    """``MemoryError`` when the hinge program would need more than the budget (nothing allocated yet)."""
    need, budget = hinge_program_nbytes(data, theta_set), hinge_memory_budget()
    if need > budget:
        program = "linear program (HiGHS)" if isinstance(theta_set, (Box, Unconstrained)) else \
            "conic program (cvxpy + Clarabel)"
        storage = data.storage.description
        raise MemoryError(
            f"the hinge loss is solved as one {program} over S in memory: for N={data.n_samples} pairs, "
            f"d={data.dim}, K={data.n_groups} ({storage} S) it would need about {_nbytes_text(need)}, more than "
            f"the budget of {_nbytes_text(budget)} (loglinear_grpo.hinge.HINGE_MEMORY_BUDGET; default half "
            "the physical memory). Use a smooth loss (loss='dpo' or 'ipo', whose Newton solver streams S), "
            "solve a subset of the pairs (data.subset(index)), or raise HINGE_MEMORY_BUDGET if the memory is "
            "really there")


def _hinge_highs(data, beta, theta_set, robust, w, chi, inv, shift=None):
    n, d, k = data.n_samples, data.dim, data.n_groups
    diff = sp.csr_matrix(data.explicit_diff(), dtype=np.float64)
    rows = [sp.hstack([-beta * diff, -sp.identity(n, format="csr"), sp.csr_matrix((n, 1))])]
    rhs = [-(1.0 + beta * data.ref_margin)]
    if robust:
        indicator = data.membership.indicator(np.ones(n), scale=inv)        # ξ̄_g = Σ_{i∈D_g} ξ_i / N_g
        rows.append(sp.hstack([sp.csr_matrix((k, d)), indicator, -np.ones((k, 1))]))
        rhs.append(np.zeros(k) if shift is None else -np.asarray(shift, dtype=np.float64))
        cost = np.concatenate([np.zeros(d), (1.0 - chi) / k * data.membership.spread(inv), [chi]])
    else:
        cost = np.concatenate([np.zeros(d), data.membership.spread(w * inv), [0.0]])
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


def _hinge_conic(data, beta, theta_set, robust, w, chi, inv, shift=None):
    import cvxpy as cp
    n, d, k = data.n_samples, data.dim, data.n_groups
    theta, xi, t = cp.Variable(d), cp.Variable(n, nonneg=True), cp.Variable()
    pair = xi >= 1.0 - beta * (_cvxpy_diff(data).diff @ theta - data.ref_margin)
    indicator = data.membership.indicator(np.ones(n), scale=inv)
    cons = [pair] + theta_set.cvxpy_constraints(theta)
    if robust:
        group = (indicator @ xi if shift is None else indicator @ xi + shift) <= t
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
