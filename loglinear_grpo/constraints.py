"""Convex parameter sets Θ: projections :math:`P_\\Theta` (Algorithm 1, line 9), support functions
(for the duality-gap certificate) and exact quadratic-model steps (for the Newton solver).

Every set is a :class:`ThetaSet` (an abstract base class: the one interface the solvers, the
certificate and the checkpoints use) and exposes

* ``project(theta)`` and ``contains(theta)``;
* ``bounding_ball(dim) -> (c, ρ)`` with Θ ⊆ {‖θ − c‖ ≤ ρ} (``ρ = inf`` when unbounded; used by the
  constants of Proposition 3);
* ``support(v)`` :math:`=\\sigma_\\Theta(v)=\\sup_{\\theta\\in\\Theta} v^\\top\\theta` (``inf`` when
  unbounded in the direction v) and ``min_linear(theta, g)`` :math:`=\\min_{x\\in\\Theta} g^\\top(x-\\theta)`,
  which turn any dual point into a certified lower bound;
* ``minimize_quadratic(theta, grad, hess)`` :math:`=\\arg\\min_{x\\in\\Theta}\\,
  g^\\top(x-\\theta)+\\tfrac12(x-\\theta)^\\top H(x-\\theta)` for a PSD H (the Newton step);
* ``open_coordinates(rho)``: the coordinates j along which Θ is unbounded in the direction that
  ρ_j favours, :math:`\\min_{\\theta'\\in\\Theta}\\rho_j(\\theta'_j-\\theta_j)=-\\infty` (where the
  certificate's residual must vanish);
* ``check_dim(dim)`` (the set against the data's d), ``cvxpy_constraints(var)`` (the exact
  solvers) and ``fingerprint()`` (checkpoints).

Closed forms are used wherever one exists (ball: the trust-region subproblem; box: bounded least
squares); :class:`ConvexSet` handles any other convex set through cvxpy problems compiled once (DPP)
and re-solved per call.
"""
from __future__ import annotations

import abc
import hashlib
import math
import numbers

import numpy as np
import scipy.linalg
import scipy.optimize

from ._linalg import EPS, ball_quadratic_min, jacobi_scaling, safe_norm
from ._krylov import box_quadratic_min, conjugate_gradient, lanczos_trust_region


def _hash_arrays(*arrays):
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a, dtype=np.float64))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _ridge(hess):
    """A tiny ridge (10·d·ε of the largest diagonal entry: the size of the rounding errors of a
    computed Gram matrix) that makes a PSD model strictly convex without changing its minimiser
    beyond rounding; linear directions then get a long but finite step, which the caller's line
    search shortens."""
    scale = float(np.max(np.abs(np.diag(hess)), initial=0.0))
    return max(scale, 1e-300) * 10.0 * hess.shape[0] * EPS


def _cholesky_ridged(hess):
    """Lower Cholesky factor of H + εI, the ridge grown tenfold until the factorisation succeeds."""
    ridge = _ridge(hess)
    eye = np.eye(hess.shape[0])
    for _ in range(8):
        try:
            return scipy.linalg.cholesky(hess + ridge * eye, lower=True)
        except np.linalg.LinAlgError:
            ridge *= 10.0
    raise ValueError("the Newton model's Hessian is not positive semi-definite (non-finite data?)")


def _check_real(name, value, positive=True):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) \
            or (positive and value <= 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


class ThetaSet(abc.ABC):
    """A closed convex parameter set Θ ⊆ R^d: the interface of every set the solvers accept.

    Subclasses implement every abstract method below; :func:`make_constraint` accepts any
    instance. Vectors are float64 arrays of shape (d,).
    """

    @abc.abstractmethod
    def project(self, theta):
        """The Euclidean projection :math:`P_\\Theta(\\theta)=\\arg\\min_{x\\in\\Theta}\\|x-\\theta\\|_2`.

        Parameters
        ----------
        theta : ndarray (d,)

        Returns
        -------
        ndarray (d,)
            The projection (``theta`` itself may be returned when it lies in Θ).
        """

    @abc.abstractmethod
    def contains(self, theta, tol=1e-9):
        """Whether θ ∈ Θ, up to a tolerance.

        Parameters
        ----------
        theta : ndarray (d,)
        tol : float
            Relative and absolute slack of the membership test.

        Returns
        -------
        bool
        """

    @abc.abstractmethod
    def bounding_ball(self, dim):
        """A ball containing Θ: (c, ρ) with :math:`\\Theta\\subseteq\\{\\theta:\\|\\theta-c\\|_2\\le\\rho\\}`.

        Parameters
        ----------
        dim : int
            d.

        Returns
        -------
        (c, rho) : ndarray (d,) or None, float
            ``c = None`` means the origin; ``rho = inf`` when Θ is unbounded (or no bound is known).
            Used by the constants of Proposition 3.
        """

    @abc.abstractmethod
    def check_dim(self, dim):
        """Check that the set lives in R^d.

        Parameters
        ----------
        dim : int
            d, the data's dimension.

        Returns
        -------
        ThetaSet
            ``self``.

        Raises
        ------
        ValueError
            If the set's own vectors (centre, bounds, ``dim``) do not have d entries.
        """

    @abc.abstractmethod
    def support(self, v):
        """The support function :math:`\\sigma_\\Theta(v)=\\sup_{\\theta\\in\\Theta}v^\\top\\theta`.

        Parameters
        ----------
        v : ndarray (d,)

        Returns
        -------
        float
            ``inf`` when Θ is unbounded in the direction v.
        """

    @abc.abstractmethod
    def min_linear(self, theta, grad):
        """The linear term of the certificate, :math:`\\min_{x\\in\\Theta}g^\\top(x-\\theta)`
        :math:`=-\\sigma_\\Theta(-g)-g^\\top\\theta` (≤ 0 for θ ∈ Θ).

        Parameters
        ----------
        theta, grad : ndarray (d,)
            θ and g.

        Returns
        -------
        float
            ``-inf`` when Θ is unbounded in the direction −g.
        """

    @abc.abstractmethod
    def minimize_quadratic(self, theta, grad, hess, state=None):
        """The exact model step :math:`\\arg\\min_{x\\in\\Theta}\\,g^\\top(x-\\theta)
        +\\tfrac12(x-\\theta)^\\top H(x-\\theta)` for a PSD H (the Newton step).

        Parameters
        ----------
        theta, grad : ndarray (d,)
            θ ∈ Θ and g.
        hess : ndarray (d, d)
            H, positive semi-definite.
        state : dict, optional
            Scratch the set may keep from one call to the next of the same solve (a warm start: the
            ball keeps its trust-region multiplier); a set may ignore it.

        Returns
        -------
        ndarray (d,)
            A minimiser in Θ (a rounding-level ridge makes a merely semi-definite model strictly
            convex).
        """

    def minimize_quadratic_operator(self, theta, grad, hessp, rtol, max_iter):
        """The model step of :meth:`minimize_quadratic` with H given by its products ``hessp(v) = Hv``
        (the matrix-free Newton solver, :mod:`loglinear_grpo.newton_cg`), approximately: to a
        relative optimality residual ``rtol`` of the model at θ, in at most ``max_iter`` products.

        Parameters
        ----------
        theta, grad : ndarray (d,)
        hessp : callable
            v ↦ Hv, H positive semi-definite.
        rtol : float
        max_iter : int

        Returns
        -------
        (x, info)
            A point of Θ and ``{"iterations", "residual", "converged"}``.

        Raises
        ------
        ValueError
            For a set without a matrix-free step (a general convex set: its step is a dense QP).
        """
        raise ValueError(f"{type(self).__name__} has no matrix-free model step (a ball, a box or R^d has); "
                         "use estimator='newton'")

    @abc.abstractmethod
    def open_coordinates(self, rho):
        """The coordinates j along which Θ is unbounded in the direction that ρ_j favours:
        :math:`\\min_{\\theta'\\in\\Theta}\\rho_j(\\theta'_j-\\theta_j)=-\\infty` (where the residual ρ of
        the certificate's (⋆) must vanish; :mod:`loglinear_grpo.certificate`).

        Parameters
        ----------
        rho : ndarray (d,)

        Returns
        -------
        ndarray (d,) of bool
        """

    @abc.abstractmethod
    def cvxpy_constraints(self, var):
        """θ ∈ Θ as cvxpy constraints on ``var`` (the exact solvers).

        Parameters
        ----------
        var : cvxpy.Variable (d,)

        Returns
        -------
        list of cvxpy constraints
            Empty for R^d.
        """

    @abc.abstractmethod
    def fingerprint(self):
        """A short string that identifies the set (the same set gives the same string; checkpoints
        refuse to resume under another).

        Returns
        -------
        str
        """

    def center_vector(self, dim):
        """The centre of the set where it has a distinguished one (the ball's), else None.

        Parameters
        ----------
        dim : int
            d.

        Returns
        -------
        ndarray (d,) or None
        """
        return None


class Unconstrained(ThetaSet):
    """Θ = R^d."""

    def project(self, theta):
        return theta

    def contains(self, theta, tol=1e-9):
        return bool(np.all(np.isfinite(theta)))

    def bounding_ball(self, dim):
        return None, np.inf

    def check_dim(self, dim):
        return self

    def support(self, v):
        return 0.0 if not np.any(v) else np.inf

    def min_linear(self, theta, grad):
        return 0.0 if not np.any(grad) else -np.inf

    def open_coordinates(self, rho):
        """Every coordinate: R^d is unbounded both ways along each."""
        return np.ones(np.shape(rho), dtype=bool)

    def minimize_quadratic(self, theta, grad, hess, state=None):
        """θ − D(DHD + εI)⁻¹D g by Cholesky: Jacobi-scaled (D = diag(H)^{-1/2}, so the step does not
        depend on the units of each feature), with the rounding-level ridge of :func:`_ridge`."""
        scale = jacobi_scaling(hess)
        factor = _cholesky_ridged(hess * scale[:, None] * scale[None, :])
        return theta - scale * scipy.linalg.cho_solve((factor, True), scale * grad)

    def minimize_quadratic_operator(self, theta, grad, hessp, rtol, max_iter):
        """The Newton step by conjugate gradients, :math:`Hp = -g` (truncated Newton; Nocedal & Wright
        2006, §7.1)."""
        step, info = conjugate_gradient(hessp, -np.asarray(grad, dtype=np.float64), rtol, max_iter)
        return theta + step, info

    def cvxpy_constraints(self, var):
        return []

    def fingerprint(self):
        return "Unconstrained()"

    def __repr__(self):
        return "Unconstrained()"


class L2Ball(ThetaSet):
    """Θ = {θ : ‖θ − c‖₂ ≤ R}; :math:`P(\\theta) = c + (\\theta - c)\\min(1, R/\\|\\theta - c\\|)`.

    Parameters
    ----------
    radius : float
        R > 0.
    center : array_like, shape (d,), optional
        c (default 0). The LLM head centres the ball on the reference weights.
    """

    def __init__(self, radius, center=None):
        self.radius = _check_real("radius", radius)
        if center is None:
            self.center = None
        else:
            try:
                center = np.asarray(center, dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError("center must be a numeric vector") from None
            if center.ndim != 1:
                raise ValueError(f"center must be a vector of shape (d,), got shape {center.shape}")
            if not np.all(np.isfinite(center)):
                raise ValueError("center must be finite")
            self.center = center

    def bounding_ball(self, dim):
        return self.center, self.radius

    def check_dim(self, dim):
        if self.center is not None and self.center.shape != (dim,):
            raise ValueError(f"center must have shape ({dim},), got {self.center.shape}")
        return self

    def center_vector(self, dim):
        """c as a vector of d entries (zeros when the ball is centred on the origin)."""
        return np.zeros(dim) if self.center is None else self.center

    def _c(self, theta):
        return np.zeros_like(theta) if self.center is None else self.center

    def open_coordinates(self, rho):
        """No coordinate: the ball is bounded."""
        return np.zeros(np.shape(rho), dtype=bool)

    def project(self, theta):
        c = self._c(theta)
        delta = theta - c
        square = float(delta @ delta)
        # the plain norm where it neither overflows nor underflows, the scaled one otherwise
        norm = math.sqrt(square) if 1e-280 < square < 1e280 else safe_norm(delta)
        if norm <= self.radius:
            return theta
        if not np.isfinite(norm):
            raise ValueError("cannot project a non-finite θ onto the ball")
        return c + (delta / norm) * self.radius

    def contains(self, theta, tol=1e-9):
        return bool(safe_norm(theta - self._c(theta)) <= self.radius * (1 + tol) + tol)

    def support(self, v):
        shift = 0.0 if self.center is None else float(v @ self.center)
        return shift + self.radius * safe_norm(v)

    def min_linear(self, theta, grad):
        """min over the ball of gᵀ(x − θ) = gᵀ(c − θ) − R‖g‖ (no cancellation against a large c)."""
        return float(grad @ (self._c(theta) - theta)) - self.radius * safe_norm(grad)

    def minimize_quadratic(self, theta, grad, hess, state=None):
        """Exact trust-region step: with v = x − c and δ = θ − c, minimise
        ½vᵀHv − (Hδ − g)ᵀv over ‖v‖ ≤ R (Moré–Sorensen, :func:`ball_quadratic_min`)."""
        c = self._c(theta)
        delta = theta - c
        return c + ball_quadratic_min(hess, hess @ delta - grad, self.radius, state=state)

    def minimize_quadratic_operator(self, theta, grad, hessp, rtol, max_iter):
        """The trust-region step of :meth:`minimize_quadratic`, matrix-free: with z = x − c and δ = θ − c,
        minimise ½zᵀHz + (g − Hδ)ᵀz over ‖z‖ ≤ R by GLTR's Lanczos method
        (:func:`~loglinear_grpo._krylov.lanczos_trust_region`), to an optimality residual of ``rtol`` times
        the one at θ — ‖g‖ inside the ball, :math:`\\min_{\\nu\\ge0}\\|g + \\nu\\delta\\|` on the sphere — which
        vanishes at the solution, so the steps stay accurate as they shrink."""
        delta = theta if self.center is None else theta - self.center
        grad = np.asarray(grad, dtype=np.float64)
        square = float(delta @ delta)
        # the KKT residual at θ: inside the ball the multiplier is 0 (complementarity), on the sphere
        # the best ν ≥ 0
        on_sphere = square > 0 and math.sqrt(square) >= self.radius * (1 - 1e-9)
        nu = max(0.0, -float(grad @ delta) / square) if on_sphere else 0.0
        current = safe_norm(grad + nu * delta) if nu > 0 else safe_norm(grad)
        if current == 0.0:
            return theta, {"iterations": 0, "residual": 0.0, "converged": True}
        h_delta = hessp(delta) if square > 0 else np.zeros_like(delta)
        b = grad - h_delta
        reference = 0.5 * float(delta @ h_delta) + float(b @ delta)        # the model at θ itself
        del h_delta
        z, info = lanczos_trust_region(hessp, b, self.radius, rtol * current, max(1, max_iter - 1),
                                       reference=reference, overwrite_b=square > 0)
        info["iterations"] += 1 if square > 0 else 0
        if self.center is not None:
            z += self.center
        return self.project(z), info

    def cvxpy_constraints(self, var):
        import cvxpy as cp
        c = 0.0 if self.center is None else self.center
        return [cp.norm(var - c, 2) <= self.radius]

    def fingerprint(self):
        center = "0" if self.center is None else _hash_arrays(self.center)
        return f"L2Ball(radius={self.radius!r}, center={center})"

    def __repr__(self):
        if self.center is None:
            return f"L2Ball(radius={self.radius})"
        return f"L2Ball(radius={self.radius}, center=<{self.center.size} values, sha {_hash_arrays(self.center)}>)"


class Box(ThetaSet):
    """Θ = {θ : lower ≤ θ ≤ upper} (elementwise, scalars broadcast); the projection is a clip."""

    def __init__(self, lower, upper):
        try:
            self.lower = np.asarray(lower, dtype=np.float64)
            self.upper = np.asarray(upper, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError("Box bounds must be numbers or numeric vectors") from None
        if self.lower.ndim > 1 or self.upper.ndim > 1:
            raise ValueError("Box bounds must be scalars or vectors")
        if np.any(np.isnan(self.lower)) or np.any(np.isnan(self.upper)):
            raise ValueError("lower and upper must not be NaN")
        if self.lower.shape != self.upper.shape and self.lower.ndim and self.upper.ndim:
            raise ValueError(f"lower {self.lower.shape} and upper {self.upper.shape} differ in shape")
        if np.any(self.lower > self.upper):
            raise ValueError("lower must be <= upper everywhere")
        if np.any(self.lower == np.inf) or np.any(self.upper == -np.inf):
            raise ValueError("Box is empty: lower = +inf or upper = -inf")

    def check_dim(self, dim):
        for name, b in (("lower", self.lower), ("upper", self.upper)):
            if b.ndim == 1 and b.shape != (dim,):
                raise ValueError(f"Box {name} must be a scalar or have shape ({dim},), got {b.shape}")
        return self

    def bounds(self, dim):
        """``(lower, upper)`` broadcast to d entries each (read-only views; ±inf on open sides)."""
        return np.broadcast_to(self.lower, (dim,)), np.broadcast_to(self.upper, (dim,))

    def open_coordinates(self, rho):
        """The open sides ρ points out of: ρ_j > 0 with lower_j = −inf, or ρ_j < 0 with upper_j = +inf."""
        lower, upper = np.broadcast_to(self.lower, rho.shape), np.broadcast_to(self.upper, rho.shape)
        return ((rho > 0) & ~np.isfinite(lower)) | ((rho < 0) & ~np.isfinite(upper))

    def bounding_ball(self, dim):
        lo, hi = self.bounds(dim)
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            return None, np.inf
        return 0.5 * (lo + hi), 0.5 * safe_norm(hi - lo)

    def project(self, theta):
        return np.clip(theta, self.lower, self.upper)

    def contains(self, theta, tol=1e-9):
        return bool(np.all(theta >= self.lower - tol) and np.all(theta <= self.upper + tol))

    def support(self, v):
        lo, hi = self.bounds(v.size)
        with np.errstate(invalid="ignore"):
            terms = np.where(v > 0, v * hi, np.where(v < 0, v * lo, 0.0))
        return float(np.sum(terms))

    def min_linear(self, theta, grad):
        """min over the box of gᵀ(x − θ), coordinate by coordinate (−inf along an open side)."""
        lo, hi = self.bounds(theta.size)
        with np.errstate(invalid="ignore"):
            terms = np.where(grad > 0, grad * (lo - theta), np.where(grad < 0, grad * (hi - theta), 0.0))
        return float(np.sum(terms))

    def minimize_quadratic(self, theta, grad, hess, state=None):
        """Bounded least squares: with H + εI = LLᵀ the model is ½‖Lᵀu + L⁻¹g‖² + const over the
        box lower − θ ≤ u ≤ upper − θ (``scipy.optimize.lsq_linear``, BVLS: an exact active-set
        method)."""
        d = theta.size
        lo, hi = self.bounds(d)
        scale = jacobi_scaling(hess)               # u = D v: the ridge and tolerances in scaled units
        factor = _cholesky_ridged(hess * scale[:, None] * scale[None, :])
        rhs = -scipy.linalg.solve_triangular(factor, scale * grad, lower=True)
        free = scale > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            v_lo = np.where(free, (lo - theta) / np.where(free, scale, 1.0), 0.0)
            v_hi = np.where(free, (hi - theta) / np.where(free, scale, 1.0), 0.0)
        v_lo, v_hi = np.minimum(v_lo, 0.0), np.maximum(v_hi, 0.0)     # θ ∈ Θ: 0 is feasible
        v_hi = np.where(v_hi > v_lo, v_hi, np.nextafter(v_lo, np.inf))  # BVLS needs lower < upper; the clip
        method = "bvls" if d <= 400 else "trf"
        res = scipy.optimize.lsq_linear(factor.T, rhs, bounds=(v_lo, v_hi), method=method,
                                        tol=1e-14 if method == "bvls" else 1e-12, lsmr_tol="auto")
        return np.clip(theta + scale * res.x, lo, hi)

    def minimize_quadratic_operator(self, theta, grad, hessp, rtol, max_iter):
        """The bounded model step, matrix-free: TRON's projected searches and subspace conjugate gradients
        over the box of steps lower − θ ≤ p ≤ upper − θ (:func:`~loglinear_grpo._krylov.box_quadratic_min`)."""
        lo, hi = self.bounds(theta.size)
        step, info = box_quadratic_min(hessp, np.asarray(grad, dtype=np.float64), np.minimum(lo - theta, 0.0),
                                       np.maximum(hi - theta, 0.0), rtol, max_iter)
        return np.clip(theta + step, lo, hi), info

    def cvxpy_constraints(self, var):
        cons = []
        for bound, lower in ((self.lower, True), (self.upper, False)):
            b = np.broadcast_to(bound, var.shape)
            finite = np.flatnonzero(np.isfinite(b))
            if finite.size:
                part = var if finite.size == b.size else var[finite]
                cons.append(part >= b[finite] if lower else part <= b[finite])
        return cons

    def fingerprint(self):
        return f"Box(lower={_hash_arrays(self.lower)}, upper={_hash_arrays(self.upper)})"

    def __repr__(self):
        def show(b):
            return repr(float(b)) if b.ndim == 0 else f"<{b.size} values>"
        return f"Box(lower={show(self.lower)}, upper={show(self.upper)})"


#: Clarabel's tolerances for projections: the defaults (1e-8 on the gap) leave ~1e-5 in x
#: when the projection lands on the boundary
_TIGHT = {"tol_gap_abs": 1e-11, "tol_gap_rel": 1e-11, "tol_feas": 1e-11}


class ConvexSet(ThetaSet):
    """Any convex Θ given as cvxpy constraints; projections, support functions and Newton steps by
    cvxpy problems compiled once (DPP) and re-solved.

    Parameters
    ----------
    dim : int
        d.
    constraints : callable
        ``constraints(var) -> list`` of cvxpy constraints on the ``cp.Variable(dim)``.
    max_norm : float > 0, optional
        :math:`B_\\Theta` with ‖θ‖ ≤ B_Θ on Θ (needed only for ``step_size="theory"``).
    solver : str, optional
        cvxpy solver name (default: Clarabel, an interior-point solver accurate to ~1e-8;
        first-order QP solvers such as OSQP are only accurate to ~1e-4).

    Raises
    ------
    ValueError
        If the constraints are not DCP/DPP, ``max_norm`` is not positive, or the set is empty
        (checked once, here).

    Notes
    -----
    The problem ``min ‖x − p‖²  s.t.  x ∈ Θ`` is built once with ``p`` a ``cp.Parameter`` so that
    cvxpy canonicalises it once (Disciplined Parametrized Programming) and each projection only
    re-solves it. An interior-point solver leaves about 1e-6 of error when the projection lands
    on the boundary; the closed-form sets (:class:`L2Ball`, :class:`Box`) are exact to rounding.
    """

    def __init__(self, dim, constraints, max_norm=np.inf, solver="CLARABEL"):
        import cvxpy as cp
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real) or np.isnan(max_norm) \
                or max_norm <= 0:
            raise ValueError(f"max_norm must be a positive number (or inf), got {max_norm!r}")
        if not callable(constraints):
            raise ValueError("constraints must be a callable var -> list of cvxpy constraints")
        self.dim = int(dim)
        self._constraints_fn = constraints
        self.max_norm = float(max_norm)
        self.solver = solver
        self._x = cp.Variable(self.dim)
        self._p = cp.Parameter(self.dim)
        try:
            cons = list(constraints(self._x))
        except Exception as exc:                      # a wrong dimension inside the user's callable
            raise ValueError(f"constraints(var) failed on a cp.Variable({self.dim}): {exc}") from None
        # ‖x‖² − 2pᵀx: the same minimiser as ‖x − p‖², as a plain QP (Clarabel 0.11 mis-solves the
        # second-order-cone form of ‖x − p‖² for some p far from Θ, e.g. the simplex and p = (1/16, 0, −9))
        self._problem = cp.Problem(cp.Minimize(cp.sum_squares(self._x) - 2 * (self._p @ self._x)), cons)
        if not self._problem.is_dcp(dpp=True):
            raise ValueError("constraints must be DCP (and DPP-compatible) in the variable")
        self._support_problem = None
        self._quadratic_problem = None
        self._p.value = np.zeros(self.dim)
        self._problem.solve(solver=self.solver)
        if self._problem.status in ("infeasible", "infeasible_inaccurate"):
            raise ValueError("the convex set is empty (its constraints are infeasible)")

    def check_dim(self, dim):
        if dim != self.dim:
            raise ValueError(f"ConvexSet has dim={self.dim} but the data have d={dim}")
        return self

    def _solve(self, problem, what):
        """Solve with Clarabel's tight tolerances; where they fail (far from the set they can run into
        Clarabel's iteration limit or a numerical failure), once more with its defaults."""
        import cvxpy as cp
        attempts = [_TIGHT, {}] if self.solver == "CLARABEL" else [{}]
        for options in attempts:
            try:
                problem.solve(solver=self.solver, **options)
            except cp.error.SolverError:
                continue
            if problem.status in ("optimal", "optimal_inaccurate"):
                return
        raise RuntimeError(f"{what} failed: cvxpy status {problem.status}")

    def project(self, theta):
        self._p.value = np.asarray(theta, dtype=np.float64)
        self._solve(self._problem, "projection onto the convex set")
        return np.asarray(self._x.value, dtype=np.float64)

    def contains(self, theta, tol=1e-7):
        return bool(np.linalg.norm(self.project(theta) - theta) <= tol * (1 + np.linalg.norm(theta)))

    def bounding_ball(self, dim):
        return None, self.max_norm

    def open_coordinates(self, rho):
        """Every coordinate unless the set is known to be bounded (``max_norm`` finite)."""
        return np.full(np.shape(rho), not np.isfinite(self.max_norm), dtype=bool)

    def support(self, v):
        """:math:`\\sup_{x\\in\\Theta} v^\\top x` by a compiled LP/conic problem (``inf`` if unbounded)."""
        import cvxpy as cp
        if self._support_problem is None:
            x, direction = cp.Variable(self.dim), cp.Parameter(self.dim)
            self._support_problem = (cp.Problem(cp.Maximize(direction @ x), self.cvxpy_constraints(x)), direction)
        problem, direction = self._support_problem
        direction.value = np.asarray(v, dtype=np.float64)
        problem.solve(solver=self.solver)
        if problem.status in ("unbounded", "unbounded_inaccurate"):
            return np.inf
        if problem.status not in ("optimal", "optimal_inaccurate"):
            raise RuntimeError(f"support function of the convex set failed: cvxpy status {problem.status}")
        return float(problem.value)

    def min_linear(self, theta, grad):
        """min over Θ of gᵀ(x − θ) = −σ_Θ(−g) − gᵀθ."""
        return -self.support(-grad) - float(grad @ theta)

    def minimize_quadratic(self, theta, grad, hess, state=None):
        """The Newton step over Θ as a compiled QP: minimise ‖Lᵀx − (Lᵀθ − L⁻¹g)‖² with
        H + εI = LLᵀ (L and the target are cvxpy Parameters)."""
        import cvxpy as cp
        d = self.dim
        if self._quadratic_problem is None:
            x, lt, b = cp.Variable(d), cp.Parameter((d, d)), cp.Parameter(d)
            problem = cp.Problem(cp.Minimize(cp.sum_squares(lt @ x - b)), self.cvxpy_constraints(x))
            self._quadratic_problem = (problem, x, lt, b)
        problem, x, lt, b = self._quadratic_problem
        factor = _cholesky_ridged(hess)
        lt.value = factor.T
        b.value = factor.T @ theta - scipy.linalg.solve_triangular(factor, grad, lower=True)
        self._solve(problem, "Newton step over the convex set")
        return self.project(np.asarray(x.value, dtype=np.float64))

    def cvxpy_constraints(self, var):
        return list(self._constraints_fn(var))

    def fingerprint(self):
        """A hash of the set's canonical conic form (cvxpy's problem data for ``x ∈ Θ``): two
        ConvexSets with the same constraints hash alike, any change of a constant does not."""
        data = self._problem.get_problem_data(self.solver)[0]
        parts = []
        for key in ("A", "b", "P", "q"):
            value = data.get(key)
            if value is None:
                continue
            arr = value.toarray() if hasattr(value, "toarray") else np.asarray(value)
            parts.append(arr)
        cone = str(data.get("dims", "")).encode()
        return f"ConvexSet(dim={self.dim}, max_norm={self.max_norm!r}, " \
               f"form={_hash_arrays(*parts)}{hashlib.sha256(cone).hexdigest()[:8]})"

    def __repr__(self):
        return f"ConvexSet(dim={self.dim})"


def make_constraint(radius=None, center=None, constraint=None):
    """Θ from ``solve``'s arguments: an L2 ball (``radius``), a given :class:`ThetaSet`, or R^d."""
    if radius is not None and constraint is not None:
        raise ValueError("give either radius or constraint, not both")
    if constraint is not None:
        if not isinstance(constraint, ThetaSet):
            raise ValueError(f"constraint must be a ThetaSet (L2Ball, Box, ConvexSet, or a subclass of "
                             f"loglinear_grpo.ThetaSet), got {constraint!r}")
        return constraint
    if radius is not None:
        return L2Ball(radius, center)
    if center is not None:
        raise ValueError("center needs radius")
    return Unconstrained()
