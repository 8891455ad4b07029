"""Convex parameter sets Θ and their Euclidean projections :math:`P_\\Theta` (Algorithm 1, line 9).

Every set exposes ``project(theta)``, ``contains(theta)``, ``bounding_ball(dim) -> (c, ρ)``
with Θ ⊆ {‖θ − c‖ ≤ ρ} (``ρ = inf`` when unbounded; used by the constants of Proposition 3)
and ``cvxpy_constraints(var)`` (used by the exact solvers). Closed forms are used wherever one exists; :class:`ConvexSet` handles any
other convex set through a cvxpy problem compiled once (DPP) and re-solved per call.
"""
from __future__ import annotations

import numpy as np


class Unconstrained:
    """Θ = R^d."""

    def project(self, theta):
        return theta

    def contains(self, theta, tol=1e-9):
        return bool(np.all(np.isfinite(theta)))

    def bounding_ball(self, dim):
        return None, np.inf

    def cvxpy_constraints(self, var):
        return []

    def __repr__(self):
        return "Unconstrained()"


class L2Ball:
    """Θ = {θ : ‖θ − c‖₂ ≤ R}; :math:`P(\\theta) = c + (\\theta - c)\\min(1, R/\\|\\theta - c\\|)`.

    Parameters
    ----------
    radius : float
        R > 0.
    center : array_like, optional
        c (default 0). The LLM head centres the ball on the reference weights.
    """

    def __init__(self, radius, center=None):
        if isinstance(radius, bool) or not np.isscalar(radius) or not np.isfinite(radius) or radius <= 0:
            raise ValueError(f"radius must be a positive finite number, got {radius!r}")
        self.radius = float(radius)
        self.center = None if center is None else np.asarray(center, dtype=np.float64)
        if self.center is not None and not np.all(np.isfinite(self.center)):
            raise ValueError("center must be finite")

    def bounding_ball(self, dim):
        return self.center, self.radius

    def _c(self, theta):
        return np.zeros_like(theta) if self.center is None else self.center

    def project(self, theta):
        c = self._c(theta)
        delta = theta - c
        norm = np.sqrt(delta @ delta)
        if norm <= self.radius:
            return theta
        return c + delta * (self.radius / norm)

    def contains(self, theta, tol=1e-9):
        return bool(np.linalg.norm(theta - self._c(theta)) <= self.radius * (1 + tol) + tol)

    def cvxpy_constraints(self, var):
        import cvxpy as cp
        c = 0.0 if self.center is None else self.center
        return [cp.norm(var - c, 2) <= self.radius]

    def __repr__(self):
        return f"L2Ball(radius={self.radius}, center={'0' if self.center is None else 'given'})"


class Box:
    """Θ = {θ : lower ≤ θ ≤ upper} (elementwise); the projection is a clip."""

    def __init__(self, lower, upper):
        self.lower = np.asarray(lower, dtype=np.float64)
        self.upper = np.asarray(upper, dtype=np.float64)
        if np.any(np.isnan(self.lower)) or np.any(np.isnan(self.upper)):
            raise ValueError("lower and upper must not be NaN")
        if np.any(self.lower > self.upper):
            raise ValueError("lower must be <= upper everywhere")

    def bounding_ball(self, dim):
        width = np.broadcast_to(self.upper - self.lower, (dim,))
        if not np.all(np.isfinite(width)):
            return None, np.inf
        center = np.broadcast_to(0.5 * (self.upper + self.lower), (dim,)).copy()
        return center, 0.5 * float(np.linalg.norm(width))

    def project(self, theta):
        return np.clip(theta, self.lower, self.upper)

    def contains(self, theta, tol=1e-9):
        return bool(np.all(theta >= self.lower - tol) and np.all(theta <= self.upper + tol))

    def cvxpy_constraints(self, var):
        return [var >= self.lower, var <= self.upper]

    def __repr__(self):
        return "Box(lower, upper)"


#: Clarabel's tolerances for projections: the defaults (1e-8 on the gap) leave ~1e-5 in x
#: when the projection lands on the boundary
_TIGHT = {"tol_gap_abs": 1e-11, "tol_gap_rel": 1e-11, "tol_feas": 1e-11}


class ConvexSet:
    """Any convex Θ given as cvxpy constraints; projection by a DPP-compiled QP.

    Parameters
    ----------
    dim : int
        d.
    constraints : callable
        ``constraints(var) -> list`` of cvxpy constraints on the ``cp.Variable(dim)``.
    max_norm : float, optional
        :math:`B_\\Theta` with ‖θ‖ ≤ B_Θ on Θ (needed only for ``step_size="theory"``).
    solver : str, optional
        cvxpy solver name (default: Clarabel, an interior-point solver accurate to ~1e-8;
        first-order QP solvers such as OSQP are only accurate to ~1e-4).

    Notes
    -----
    The problem ``min ‖x − p‖²  s.t.  x ∈ Θ`` is built once with ``p`` a ``cp.Parameter``
    so that cvxpy canonicalises it once (Disciplined Parametrized Programming) and each
    projection only re-solves it. An interior-point solver leaves about 1e-6 of error when the
    projection lands on the boundary; the closed-form sets (:class:`L2Ball`, :class:`Box`) are
    exact to rounding.
    """

    def __init__(self, dim, constraints, max_norm=np.inf, solver="CLARABEL"):
        import cvxpy as cp
        self.dim = int(dim)
        self._constraints_fn = constraints
        self.max_norm = float(max_norm)
        self.solver = solver
        self._x = cp.Variable(self.dim)
        self._p = cp.Parameter(self.dim)
        self._problem = cp.Problem(cp.Minimize(cp.sum_squares(self._x - self._p)),
                                   list(constraints(self._x)))
        if not self._problem.is_dcp(dpp=True):
            raise ValueError("constraints must be DCP (and DPP-compatible) in the variable")

    def project(self, theta):
        self._p.value = np.asarray(theta, dtype=np.float64)
        options = _TIGHT if self.solver == "CLARABEL" else {}
        self._problem.solve(solver=self.solver, **options)
        if self._problem.status not in ("optimal", "optimal_inaccurate"):
            raise RuntimeError(f"projection onto the convex set failed: cvxpy status {self._problem.status}")
        return np.asarray(self._x.value, dtype=np.float64)

    def contains(self, theta, tol=1e-7):
        return bool(np.linalg.norm(self.project(theta) - theta) <= tol * (1 + np.linalg.norm(theta)))

    def bounding_ball(self, dim):
        return None, self.max_norm

    def cvxpy_constraints(self, var):
        return list(self._constraints_fn(var))

    def __repr__(self):
        return f"ConvexSet(dim={self.dim})"


def make_constraint(radius=None, center=None, constraint=None):
    """Θ from ``solve``'s arguments: an L2 ball (``radius``), a given set, or R^d."""
    if radius is not None and constraint is not None:
        raise ValueError("give either radius or constraint, not both")
    if constraint is not None:
        if not hasattr(constraint, "project"):
            raise ValueError(f"constraint must be a Θ object (L2Ball, Box, ConvexSet, ...), got {constraint!r}")
        return constraint
    if radius is not None:
        return L2Ball(radius, center)
    if center is not None:
        raise ValueError("center needs radius")
    return Unconstrained()
