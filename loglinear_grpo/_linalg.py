"""Dense linear algebra shared by the exact solvers: PSD solves, the trust-region subproblem,
scale-safe norms. No explicit inverses; factorisations only."""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import scipy.optimize

EPS = np.finfo(float).eps


def safe_norm(x):
    """Euclidean norm without overflow or underflow: ``max|x| · ‖x / max|x|‖`` (exact for 1e±300)."""
    x = np.asarray(x, dtype=np.float64)
    top = float(np.max(np.abs(x), initial=0.0))
    if top == 0.0 or not np.isfinite(top):
        return top
    scaled = x / top
    return top * float(np.sqrt(scaled @ scaled))


def solve_psd(hess, rhs):
    """Solve H u = q for a symmetric PSD H by Cholesky; the min-norm least-squares solution when H
    is (numerically) singular, detected by a failed factorisation or a pivot below √(d·ε) of the
    largest: rounding can let Cholesky "succeed" on a singular H and return a solution with a huge
    null-space part."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
            factor, lower = scipy.linalg.cho_factor(hess)
        pivots = np.abs(np.diag(factor))
        if pivots.min() > pivots.max() * np.sqrt(hess.shape[0] * EPS):
            return scipy.linalg.cho_solve((factor, lower), rhs)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgWarning, ValueError):
        pass
    # cut-off d·ε·σ_max: the default (ε·σ_max) keeps rounding-level singular values of a singular H
    return scipy.linalg.lstsq(hess, rhs, cond=hess.shape[0] * EPS)[0]


def jacobi_scaling(hess):
    """D = diag(H)^{-1/2} (0 where the diagonal is 0): D H D has a unit diagonal, so a solve with it
    does not depend on how each coordinate is scaled (a feature in other units)."""
    diag = np.diag(hess).astype(np.float64, copy=False)
    with np.errstate(divide="ignore"):
        return np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), 0.0)


def solve_psd_scaled(hess, rhs):
    """:func:`solve_psd` on the Jacobi-scaled system (D H D)(D⁻¹u) = D q: the same solution, with the
    singularity tests and the min-norm fallback made invariant to the scale of each coordinate."""
    scale = jacobi_scaling(hess)
    return scale * solve_psd(hess * scale[:, None] * scale[None, :], scale * rhs)


def trust_region_coefficients(lam, qt, radius):
    r"""Coefficients :math:`c_j` of the solution of :math:`\min_u u^\top H u - 2q^\top u` s.t.
    :math:`\|u\|\le R`, in the eigenbasis of :math:`H = V\Lambda V^\top \succeq 0`
    (:math:`\tilde q = V^\top q`; the solution is :math:`u = Vc`).

    If :math:`\tilde q` has no component on the null space of H (up to rounding, √ε·‖q̃‖) and the
    min-norm unconstrained minimiser (μ = 0) lies in the ball, it is optimal. Otherwise the
    solution is :math:`c_j = \tilde q_j/(\lambda_j+\mu)` with μ > 0 the unique root of the
    secular equation :math:`\|c(\mu)\| = R` (Moré & Sorensen 1983), found by Brent's method on
    :math:`1/\|c(\mu)\| - 1/R`. A null-space component of q̃ (a direction in which the model is
    linear) always takes the solution to the boundary. With H ⪰ 0 the "hard case" cannot occur.
    ``radius=inf``: the min-norm least-squares solution. Returns ``(c, kept)`` where ``kept``
    marks the eigenvalues treated as non-zero.
    """
    lam = np.maximum(np.asarray(lam, dtype=np.float64), 0.0)
    qt = np.asarray(qt, dtype=np.float64)
    top = lam.max(initial=0.0)
    keep = lam > max(top, 1e-300) * lam.size * EPS
    q_norm = safe_norm(qt)
    null_q = np.where(keep, 0.0, qt)
    linear = safe_norm(null_q) > np.sqrt(EPS) * q_norm and np.isfinite(radius)
    if not linear:
        qt = np.where(keep, qt, 0.0)
        coef = qt / np.where(keep, lam, 1.0)
        if safe_norm(coef) <= radius:
            return coef, keep
    lam_eff = np.where(keep, lam, 0.0)

    def secular(mu):
        with np.errstate(divide="ignore", invalid="ignore"):
            norm = safe_norm(np.where(qt != 0, qt / (lam_eff + mu), 0.0))
        return (1.0 / norm if norm > 0 else np.inf) - 1.0 / radius

    hi = max(q_norm / radius, 1e-300)             # ‖c(μ)‖ ≤ ‖q‖/μ ≤ R at μ = ‖q‖/R
    while secular(hi) < 0:                         # pragma: no cover - guards rounding only
        hi *= 2.0
    lo = 0.0
    if secular(lo) >= 0:                           # pragma: no cover - interior after all
        return np.where(keep, qt / np.where(keep, lam, 1.0), 0.0), keep
    mu = scipy.optimize.brentq(secular, lo, hi, xtol=1e-300, rtol=4 * EPS)
    return qt / (lam_eff + mu), keep


#: above this dimension the trust-region subproblem is solved by Cholesky factorisations (Moré–Sorensen)
#: instead of one eigen-decomposition (a factorisation costs about a tenth of it)
CHOLESKY_TR_DIM = 300


def ball_quadratic_min(hess, q, radius, state=None):
    """argmin of uᵀHu − 2qᵀu over ‖u‖ ≤ R (trust-region subproblem, H ⪰ 0), in R^d: by one
    eigen-decomposition (:func:`trust_region_coefficients`) for small d, by Moré–Sorensen's Newton
    iteration on the secular equation with Cholesky factorisations (:func:`_more_sorensen`) for large d.
    ``state`` (a dict, optional) carries the last root μ from one call to the next: a Newton solver's
    consecutive subproblems have nearby multipliers, so the next solve starts there (two or three
    factorisations instead of about eight)."""
    if hess.shape[0] > CHOLESKY_TR_DIM and np.isfinite(radius):
        u = _more_sorensen(hess, q, radius, state=state)
        if u is not None:
            return u
    lam, vec = scipy.linalg.eigh(hess)
    coef, _ = trust_region_coefficients(lam, vec.T @ q, radius)
    return vec @ coef


def _more_sorensen(hess, q, radius, rtol=1e-10, max_iter=50, state=None):
    r"""Moré & Sorensen (1983) / Nocedal & Wright (2006, Alg. 4.3): u(μ) = (H + μI)⁻¹q with μ ≥ 0 the
    root of :math:`1/\|u(\mu)\| = 1/R` (or μ = 0 when u(0) lies inside the ball), by Newton's method on
    that equation, safeguarded by bisection; each step is one Cholesky factorisation (a failed one moves μ
    up: H + μI is positive definite for μ > 0 since H ⪰ 0). After ``max_iter`` steps the last iterate is
    returned (scaled onto the sphere if outside): only the step's quality, never the certificate, depends
    on it.
    ``state``: start at ``state["mu"]`` (the last call's root) when it lies in the bracket, and store the
    root found there."""
    d = hess.shape[0]
    eye_scale = max(float(np.max(np.abs(np.diag(hess)), initial=0.0)), 1e-300)
    q_norm = safe_norm(q)
    if q_norm == 0.0:
        return np.zeros(d)
    lo, hi = 0.0, q_norm / radius                       # ‖u(hi)‖ ≤ ‖q‖/hi = R
    start = 0.0 if state is None else float(state.get("mu", 0.0))
    mu = start if 0.0 < start < hi else 0.0
    zero_tried = mu == 0.0
    shifted = np.array(hess, dtype=np.float64, order="F")     # H + (μ + τ)I, its diagonal rewritten per μ
    diagonal = np.diag(hess).copy()
    tiny = d * EPS * eye_scale

    def done(u, mu):
        if state is not None:
            state["mu"] = mu
        return u

    for _ in range(max_iter):
        np.fill_diagonal(shifted, diagonal + (mu + tiny))
        try:
            factor = scipy.linalg.cholesky(shifted, lower=True, check_finite=False, overwrite_a=False)
        except np.linalg.LinAlgError:
            if mu == 0.0:
                mu = min(hi, 1e-8 * eye_scale)
                continue
            lo = mu
            mu = 0.5 * (lo + hi)
            continue
        u = scipy.linalg.cho_solve((factor, True), q, check_finite=False)
        norm = safe_norm(u)
        if mu == 0.0 and norm <= radius:
            return done(u, 0.0)
        if abs(norm - radius) <= rtol * radius:
            return done(u * (radius / norm), mu)
        if norm > radius:
            lo = mu
        else:
            hi = mu
            if not zero_tried:                          # a warm start inside the ball: is μ = 0 the answer?
                zero_tried, mu = True, 0.0
                continue
        w = scipy.linalg.solve_triangular(factor, u, lower=True, check_finite=False)
        step = (norm / safe_norm(w)) ** 2 * (norm - radius) / radius
        mu = mu + step
        if not lo < mu < hi:                            # Newton left the bracket: bisect
            mu = 0.5 * (lo + hi) if hi > lo else hi
    return done(u * (radius / norm) if norm > radius else u, mu)
