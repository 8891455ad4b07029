"""Lower bounds on the optimum L* that hold for the problem as given, on every Θ.

Every bound here is Fenchel weak duality for the weighted problem
:math:`\\min_{\\theta\\in\\Theta}\\sum_g\\lambda_g L_g(\\theta) \\le L^*` (λ on the simplex, or the
mixture :math:`(1-\\chi)/K + \\chi\\alpha`). With pair weights :math:`w_i = \\lambda_{g_i}/N_{g_i}`, any
dual point u (one value per pair, in the domain of the conjugate ℓ*) and its residual
:math:`\\rho = S^\\top(w\\odot u)`, the Fenchel–Young inequality :math:`\\ell(h) \\ge uh - \\ell^*(u)` gives
for every θ ∈ Θ

.. math::

    L^* \\;\\ge\\; \\sum_i w_i\\big(u_i h_i(\\theta) - \\ell^*(u_i)\\big)
        + \\min_{\\theta'\\in\\Theta}\\rho^\\top(\\theta' - \\theta).                          \\qquad (\\star)

With :math:`u = \\ell'(h(\\theta))` the first sum is :math:`\\sum_g\\lambda_g L_g(\\theta)` and (⋆) is the
linearisation of the weighted loss at θ: rigorous on a bounded Θ (:func:`linear_bound`).

Where Θ is unbounded along ρ (R^d, the default; a box with an open side) the minimum is −∞ unless
ρ = 0: the dual point must be *feasible*, :math:`S^\\top(w\\odot u) = 0`. :func:`feasible_dual` moves
:math:`u = \\ell'(h)` onto that subspace, :math:`u' = u - c\\odot(Sz)` with
:math:`(S^\\top\\mathrm{diag}(w\\odot c)S)\\,z = S^\\top(w\\odot u)` (c = ℓ'': u' is the derivative at the
Newton point, linearised; exact for IPO), refined until the residual is zero *to rounding in every
coordinate*: :math:`|\\rho_j| \\le \\tau\\sum_i|w_iu'_is_{ij}|`, τ = :data:`ROUNDING_FACTOR` · N · ε, the
rounding error of the sum itself. A dual point that passes is exactly feasible for a problem whose
entries :math:`s_{ij}` differ from the given ones by at most 2τ relative (a backward-error
statement, independent of how each column of S is scaled); one that fails, or leaves the domain of
ℓ*, gives no bound. Nothing is ridged and no direction is dropped without being checked: a row-space
solve (d > N) is re-certified on the original S (:func:`original_space_bound`).

A bound above the value it is compared with is a detected inconsistency
(:func:`check_consistent`): it is reported, never clipped.

References
----------
Boyd & Vandenberghe (2004), *Convex Optimization*, §5.1.6 and §3.3 (conjugates, weak duality).
Higham (2002), *Accuracy and Stability of Numerical Algorithms*, §3.1 (the error of a sum, γ_N).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ._linalg import EPS, solve_psd_scaled
from .steps import mixing_weights

#: τ = ROUNDING_FACTOR · N · ε: a residual coordinate below τ Σ|terms| is zero to rounding
ROUNDING_FACTOR = 4.0
#: a lower bound may exceed the value by this many ε · max(1, |value|) before it is an inconsistency
CONSISTENCY_SLACK = 1e3
#: at most this many refinements of a dual point towards feasibility
MAX_REFINEMENTS = 4
#: the Fenchel–Young sum of a dual point is taken this many pairs at a time
SUM_BLOCK = 1 << 16


class CertificateWarning(UserWarning):
    """A certified lower bound came out above the value it bounds: something is inconsistent (an S
    whose ``rmatvec`` is not the adjoint of ``matvec``, non-finite data, a solver's wrong duals)."""


@dataclass(frozen=True)
class DualPoint:
    """A dual point of (⋆): pair weights w, per-pair values u, and the bound they certified.
    ``offset`` = :math:`\\sum_i w_i c_{g_i}` under a group adjustment c (the conjugate of ℓ + c is
    ℓ* − c), included in ``bound``."""

    weights: np.ndarray
    u: np.ndarray
    bound: float
    kind: str
    offset: float = 0.0


def rounding_tolerance(n_terms):
    """τ for sums of ``n_terms`` float64 products (:data:`ROUNDING_FACTOR` · N · ε)."""
    return ROUNDING_FACTOR * max(int(n_terms), 1) * EPS


def abs_rmatvec(data, v):
    """:math:`|S|^\\top v` for v ≥ 0 (one pass over S, block by block): the size of the terms of
    every coordinate of :math:`S^\\top v`, for the rounding test (the data's adapter:
    :meth:`~loglinear_grpo.storage.Rows.abs_rmatvec`)."""
    return data.storage.abs_rmatvec(v)


def zero_to_rounding(rho, scale, n_terms):
    """ρ with every coordinate that is zero to rounding (|ρ_j| ≤ τ Σ_i |w_i u_i s_ij| = τ ``scale_j``)
    set to 0, and whether all were."""
    small = np.abs(rho) <= rounding_tolerance(n_terms) * scale
    return np.where(small, 0.0, rho), bool(np.all(small))


def conjugate_sum(spec, beta, u, h, weights):
    """:math:`\\sum_i w_i(u_ih_i - \\ell^*(u_i))`, or −∞ when some u_i lies outside the domain of ℓ*."""
    lo, hi = spec.conjugate_domain
    if not np.all(np.isfinite(u)) or np.any(u < lo * beta) or np.any(u > hi * beta):
        return -np.inf
    total = 0.0
    for a in range(0, u.size, SUM_BLOCK):        # block by block: no N-sized temporaries
        b = a + SUM_BLOCK
        total += float(weights[a:b] @ (u[a:b] * h[a:b] - spec.conjugate(u[a:b], beta)))
    return total


def residual_term(theta, theta_set, rho, abs_terms):
    """The linear term of (⋆), min over Θ of ρᵀ(θ' − θ); where Θ is unbounded along ρ, the
    coordinates that are zero to rounding are taken as zero (``abs_terms()`` gives their scale,
    computed only then), and the term is −∞ if any other coordinate points out of Θ."""
    linear = theta_set.min_linear(theta, rho)
    if np.isfinite(linear):
        return linear
    clean, _ = zero_to_rounding(rho, abs_terms(), abs_terms.n_terms)
    return theta_set.min_linear(theta, clean)


class _Scale:
    """|S|ᵀ|w ⊙ u|, computed on first use (one pass)."""

    def __init__(self, abs_rproduct, terms, n_terms):
        self._f, self._terms, self.n_terms, self._value = abs_rproduct, terms, n_terms, None

    def __call__(self):
        if self._value is None:
            self._value = self._f(np.abs(self._terms))
        return self._value


def open_coordinates(theta_set, rho):
    """The coordinates j along which Θ is unbounded in the direction that ρ_j favours (a box's open
    sides; every coordinate of any other unbounded set): where the residual ρ of (⋆) must vanish
    (:meth:`~loglinear_grpo.constraints.ThetaSet.open_coordinates`)."""
    return theta_set.open_coordinates(rho)


def feasible_dual(oracle, spec, beta, theta, theta_set, h, weights, u, curv, hess, rho, z=None):
    """A dual point of (⋆) that is feasible to rounding, from u = ℓ'(h) (module docstring).

    Parameters
    ----------
    oracle : object
        Passes over S: ``product(x)`` = Sx, ``rproduct(v)`` = Sᵀv, ``abs_rproduct(v)`` = |S|ᵀv, and
        ``data`` (N = ``data.n_samples``).
    spec : Loss
    beta : float
    theta, h : ndarray
        The point and its margins.
    theta_set : Θ object
    weights, u, curv : ndarray (N,)
        w, the starting dual point, and the metric c ≥ 0 of the correction (ℓ'').
    hess : ndarray (d, d) or callable
        :math:`H = S^\\top\\mathrm{diag}(w\\odot c)S`, or a function ``solve(rhs, free)`` returning z with
        :math:`H_{FF}z = ` ``rhs`` on the coordinates ``free`` (a matrix-free solver's conjugate gradients).
    rho : ndarray (d,)
        :math:`S^\\top(w\\odot u)` (the weighted gradient, at hand).
    z : ndarray (d,), optional
        The solution of :math:`Hz = \\rho` if already at hand.

    Returns
    -------
    (bound, u) : float and ndarray
        The certified lower bound (−∞ when no feasible dual point in the domain of ℓ* was found) and
        the dual point.
    """
    n = oracle.data.n_samples
    lo, hi = spec.conjugate_domain[0] * beta, spec.conjugate_domain[1] * beta
    free = open_coordinates(theta_set, rho)
    if not np.all(free):                        # only the open coordinates need ρ_j = 0
        z = None
    solve = hess if callable(hess) else _dense_solver(hess, free)
    for attempt in range(MAX_REFINEMENTS + 1):
        terms = weights * u
        if attempt:
            rho = oracle.rproduct(terms)
        _, feasible = zero_to_rounding(rho[free], oracle.abs_rproduct(np.abs(terms))[free], n)
        if feasible or attempt == MAX_REFINEMENTS:
            break
        if z is None:
            z = solve(rho[free], free)
        step = np.zeros(rho.size)
        step[free] = z
        z = None
        # the metric c vanishes where u is at a bound of the domain: only rounding leaves it, so clip
        u = np.clip(u - curv * oracle.product(step), lo, hi)
    value = conjugate_sum(spec, beta, u, h, weights)
    if not np.isfinite(value):
        return -np.inf, u
    terms = weights * u
    return value + residual_term(theta, theta_set, rho, _Scale(oracle.abs_rproduct, terms, n)), u


def _dense_solver(hess, free):
    """``solve(rhs, free)`` for :func:`feasible_dual` from a dense H: the Jacobi-scaled PSD solve on the
    free block."""
    block = hess if np.all(free) else hess[np.ix_(free, free)]
    return lambda rhs, _free: solve_psd_scaled(block, rhs)


def original_space_bound(data, spec, beta, theta, theta_set, h, dual):
    """Re-evaluate a dual point found on a reduced problem (same pairs) on the original S: (⋆) with
    its residual on the original S, so that no dropped direction is left unaccounted."""
    if dual is None:
        return -np.inf
    value = conjugate_sum(spec, beta, dual.u, h, dual.weights)
    if not np.isfinite(value):
        return -np.inf
    terms = dual.weights * dual.u
    scale = _Scale(lambda v: abs_rmatvec(data, v), terms, data.n_samples)
    return value + dual.offset + residual_term(theta, theta_set, data.rmatvec(terms), scale)


def convergence_target(value, tol):
    """tol · max(1, |value|): the gap at which a solve is certified (relative, absolute near 0)."""
    return tol * max(1.0, abs(value))


def is_converged(value, lower, tol):
    """The one stopping test of every solver: certified gap ≤ :func:`convergence_target`."""
    return value - lower <= convergence_target(value, tol)


def linear_bound(weighted, theta, theta_set, grad):
    """(⋆) at u = ℓ'(h): :math:`\\sum_g\\lambda_gL_g(\\theta) + \\min_\\Theta\\nabla^\\top(\\theta'-\\theta)`
    (``weighted`` = Σ_g λ_g L_g(θ); −∞ where Θ is unbounded along ∇)."""
    return weighted + theta_set.min_linear(theta, grad)


def refined_dual_bound(losses, grads, hess, theta, theta_set, data, chi, pair_d1, best_response, shift=None):
    """A better certificate from the same first-order information, for the group-robust problem.

    Near the optimum the softmax weights :math:`\\mathrm{softmax}(L/\\mu)` are a noisy estimate
    of the optimal α* (they react to loss differences of order μ), so their bound can lag. By
    convexity of every :math:`L_g`,

    .. math::

        L^* \\ge \\min_{\\theta'\\in\\Theta}\\max_g\\; L_g(\\theta) + \\nabla L_g(\\theta)^\\top(\\theta'-\\theta)
             = \\max_{\\alpha\\in\\Delta}\\; \\alpha^\\top L + \\min_{\\theta'\\in\\Theta}(G^\\top\\alpha)^\\top(\\theta'-\\theta),

    the best bound first-order information at θ gives. Its maximiser α̂ is read off the duals of
    the small epigraph problem (d + 1 variables, K constraints; cvxpy) and the bound is then
    evaluated exactly at α̂ (valid for any α on the simplex, whatever the solver's accuracy).
    On a Θ unbounded along the gradients, α̂ instead maximises the quadratic model
    :math:`\\alpha^\\top L - \\frac12\\alpha^\\top G H^{+} G^\\top\\alpha` and the bound is the certified
    best response to α̂: ``best_response(λ)`` returns a result with ``lower_bound``, ``bound_kind`` and
    ``dual`` (the Newton solver with fixed weights, warm-started at θ).
    ``pair_d1`` is ℓ'(h) at θ. Under a group adjustment ``losses`` are the adjusted :math:`L_g + c_g`
    (``shift`` = c, for the dual point's offset) and ``best_response`` solves the adjusted problem. Returns ``(lower_bound, alpha, kind, dual)``; ``(-inf, None, ..., None)``
    if no bound was found.
    """
    import cvxpy as cp
    k, d = grads.shape
    mix = (1.0 - chi) / k
    alpha_var = cp.Variable(k, nonneg=True)
    bounded = np.isfinite(theta_set.bounding_ball(d)[1])
    try:
        if bounded:
            x, t = cp.Variable(d), cp.Variable()
            scale = max(float(np.max(np.abs(grads))), 1e-300)
            group = (losses + grads @ (x - theta)) / scale <= t
            objective = chi * t + mix * cp.sum(losses + grads @ (x - theta)) / scale
            problem = cp.Problem(cp.Minimize(objective), [group] + theta_set.cvxpy_constraints(x))
            problem.solve(solver="CLARABEL")
            alpha = np.asarray(group.dual_value, dtype=np.float64) if group.dual_value is not None else None
        else:
            grad_t = np.linalg.lstsq(hess, grads.T, rcond=None)[0]
            model = grads @ grad_t
            model = 0.5 * (model + model.T)
            lam = mixing_weights(alpha_var, chi, k)
            problem = cp.Problem(cp.Maximize(lam @ losses - 0.5 * cp.quad_form(lam, cp.psd_wrap(model))),
                                 [cp.sum(alpha_var) == 1])
            problem.solve(solver="CLARABEL")
            alpha = alpha_var.value
    except (cp.error.SolverError, ValueError, np.linalg.LinAlgError):
        return -np.inf, None, "none", None
    if alpha is None or not np.all(np.isfinite(alpha)):
        return -np.inf, None, "none", None
    alpha = np.maximum(alpha, 0.0)
    if alpha.sum() <= 0:
        return -np.inf, None, "none", None
    alpha = alpha / alpha.sum()
    lam = mixing_weights(alpha, chi)
    if bounded:
        lower = float(lam @ losses) + theta_set.min_linear(theta, lam @ grads)
        offset = 0.0 if shift is None else float(lam @ shift)
        return lower, alpha, "rigorous", DualPoint(data.membership.spread(lam / data.group_sizes), pair_d1,
                                                   lower, "rigorous", offset)
    res = best_response(lam)
    return res.lower_bound, alpha, res.bound_kind, res.dual



def hinge_dual_bound(oracle, beta, theta, theta_set, h, pair_w, y):
    """The hinge's Fenchel bound (⋆) from the multipliers y of its linear (or conic) program.

    With u = −βy/w (clipped to the domain, 0 ≤ y ≤ w, i.e. u ∈ [−β, 0], where the hinge's conjugate
    is u/β), (⋆) reads :math:`\\sum_i y_i(1-\\beta h_i) + \\min_\\Theta(-\\beta S^\\top y)^\\top(\\theta'-\\theta)`:
    rigorous on a bounded Θ whatever the solver's accuracy (``"rigorous"``). On a Θ unbounded along
    Sᵀy the duals are moved onto Sᵀy = 0 to rounding by :func:`feasible_dual`, the correction's
    metric u(u + β)/β vanishing at the bounds so that pairs at a bound stay there
    (``"feasible dual"``; −∞ if that fails). The solver's own optimal value is never taken on trust.
    Returns ``(lower_bound, kind)``.
    """
    from .data import weighted_gram
    from .losses import get_loss
    data = oracle.data
    y = np.clip(y, 0.0, pair_w)
    linear = theta_set.min_linear(theta, -beta * data.rmatvec(y))
    if np.isfinite(linear):
        return float(y @ (1.0 - beta * h)) + linear, "rigorous"
    u = -beta * np.divide(y, pair_w, out=np.zeros_like(y), where=pair_w > 0)   # w = 0: y = 0, any u
    metric = np.maximum(-u * (u + beta), 0.0) / beta
    hess = np.zeros((data.dim, data.dim))
    for start, stop, block in data.row_blocks():
        hess += weighted_gram(block, (pair_w * metric)[start:stop])
    lower, _ = feasible_dual(oracle, get_loss("hinge"), beta, theta, theta_set, h, pair_w, u, metric, hess,
                             data.rmatvec(pair_w * u))
    return lower, "feasible dual"


def check_consistent(value, lower, what="solve"):
    """``True`` if ``lower ≤ value`` up to rounding; otherwise a :class:`CertificateWarning` and ``False``
    (a bound above the value is never clipped: it means something is wrong)."""
    slack = CONSISTENCY_SLACK * EPS * max(1.0, abs(value))
    if lower <= value + slack:
        return True
    warnings.warn(f"{what}: the certified lower bound {lower:.12g} lies above the value {value:.12g} "
                  f"(by {lower - value:.3e}); the certificate is inconsistent and the result is not "
                  "claimed as converged (is rmatvec the adjoint of matvec? is the data finite?)",
                  CertificateWarning, stacklevel=3)
    return False
