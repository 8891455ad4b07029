"""A second-order solver for Eq. (9) that certifies its own answer (``estimator="newton"``).

The worst-group objective :math:`\\max_g L_g(\\theta)` is non-smooth where groups tie, which is
exactly where its optimum lies. The solver replaces the max by its entropic smoothing
(Nesterov 2005, "Smooth minimization of non-smooth functions")

.. math::

    F_\\mu(\\theta) = (1-\\chi)\\,\\tfrac1K\\textstyle\\sum_g L_g(\\theta)
                   + \\chi\\,\\mu\\log\\sum_g e^{L_g(\\theta)/\\mu},
    \\qquad \\max_g L_g \\le \\mu\\log\\sum_g e^{L_g/\\mu} \\le \\max_g L_g + \\mu\\log K,

minimises it by Newton's method over Θ (each step minimises the exact quadratic model over Θ:
a trust-region subproblem on a ball, bounded least squares on a box, a QP for a general convex
set; then an Armijo line search — Boyd & Vandenberghe 2004, §9.5) and follows the path μ → 0,
reducing μ tenfold (0.3× for a smoothed loss) whenever the Newton decrement is small next to μ (as an interior-point
method follows its barrier parameter). For the importance-sampling and vanilla methods (α fixed)
there is no max, and the solver is Newton's method on :math:`\\sum_g\\alpha_g L_g`: an exact best
response. The non-smooth hinge loss is solved by ``solve`` as one linear (or conic) program,
:func:`loglinear_grpo.hinge.hinge_program`; where that does not fit, the matrix-free solver
(:mod:`loglinear_grpo.newton_cg`) runs this template on its softplus smoothing at the same temperature,
:math:`\\ell_\\mu(h) = \\mu\\log(1 + e^{(1-\\beta h)/\\mu})` (:attr:`~loglinear_grpo.losses.Loss.smoothed`),
and certifies the hinge itself: the value is the hinge's, and every bound uses the hinge's conjugate at
:math:`u = \\ell_\\mu'(h)` (:meth:`NewtonMinimax.set_group_weights`).

Every iteration also yields the certificate, at no extra pass over S. With
:math:`\\lambda = (1-\\chi)/K + \\chi\\,\\mathrm{softmax}(L/\\mu)` (the smoothed problem's group
weights) and :math:`u_i = \\ell'(h_i)` (a point of the conjugate's domain), weak duality gives,
for any θ' ∈ Θ (Fenchel–Young, :math:`\\ell(h) \\ge uh - \\ell^*(u)`),

.. math::

    L^* \\;\\ge\\; \\min_{\\theta'\\in\\Theta}\\sum_g \\lambda_g L_g(\\theta')
       \\;\\ge\\; \\sum_g\\frac{\\lambda_g}{N_g}\\sum_{i\\in D_g}\\big(u_i h_i - \\ell^*(u_i)\\big)
       + \\min_{\\theta'\\in\\Theta}\\nabla^\\top(\\theta' - \\theta),
    \\qquad \\nabla = \\textstyle\\sum_g\\lambda_g\\nabla L_g(\\theta),

(for a smooth loss :math:`u_ih_i - \\ell^*(u_i) = \\ell(h_i)`: the bound is the linearisation of
:math:`\\sum_g\\lambda_g L_g` at θ), and :math:`\\max_g L_g(\\theta)` is an upper bound. Their
difference, the duality gap, bounds the suboptimality of θ; the solver stops when it is at most
``tol · max(1, |value|)``. On a bounded Θ the bound is rigorous (to rounding). Where Θ is
unbounded in the direction of ∇ the linear term is −∞, and the bound instead comes from a dual point
made feasible, :math:`S^\\top(w\\odot u) = 0` to rounding in every coordinate
(:func:`loglinear_grpo.certificate.feasible_dual`; ``bound_kind="feasible dual"``): the correction
is made once the quadratic model says the bound would be useful, and costs a few passes.

When d > N and Θ is a ball or R^d, the problem is first rewritten in the row space of S
(:func:`row_space_reduction`): an LLM head with d in the thousands and N in the hundreds costs
an N × N eigen-decomposition once, then N-dimensional Newton steps.
"""
from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field

import numpy as np
from scipy.special import logsumexp, softmax

from ._linalg import EPS, solve_psd_scaled
from ._numbers import half_physical_memory, nbytes_text
from .certificate import (DualPoint, abs_rmatvec, convergence_target, feasible_dual, is_converged, linear_bound,
                          original_space_bound, refined_dual_bound)
from .constraints import L2Ball, Unconstrained
from .objective import minimax_value, trivial_bound
from .steps import mixing_weights
from .data import PreferenceData, weighted_gram
from .losses import get_loss

#: the temperature μ shrinks by this factor once the Newton decrement is at most DECREMENT_SHARE of it
SHRINK = 0.1
DECREMENT_SHARE = 0.1
#: the same factor on a smoothed loss's path (the hinge's softplus: its curvature is confined to a band of
#: width μ around the kink, so a Newton step from the last stage's point must not face a much narrower one)
SHRINK_SMOOTHED = 0.3
#: per-pair terms are made and reduced this many pairs at a time (block temporaries of 512 KiB)
PAIR_BLOCK = 1 << 16
#: the refined bound is also tried at the end of every temperature stage at most this many times the floor
REFINE_EARLY = 1e3

#: bytes the Newton solver's matrices may take; ``None``: half the physical memory
NEWTON_MEMORY_BUDGET = None
#: float64 m × m matrices alive at the peak, m = N in the row space (the kernel's eigenvectors, the reduced
#: rows, the basis, the Hessian and its model-step copies, the eigen-decomposition's workspace), m = d in the
#: primal (the Hessian, its rank-K update, the model step's copy and factor, the certificate's solve)
ROW_SPACE_MATRICES = 8
PRIMAL_MATRICES = 5


def newton_memory_nbytes(data, theta_set):
    """Predicted peak bytes of :func:`newton_minimax`'s matrices on ``data`` over Θ, from the shapes alone:
    :data:`ROW_SPACE_MATRICES` N × N float64 matrices when the row-space reduction applies (d > N, a ball
    or R^d, S in memory), else :data:`PRIMAL_MATRICES` d × d ones; S and the per-pair vectors are not
    counted."""
    n, d = data.n_samples, data.dim
    row_space = d > n and isinstance(theta_set, (L2Ball, Unconstrained)) and not data.storage.out_of_core
    m, count = (n, ROW_SPACE_MATRICES) if row_space else (d, PRIMAL_MATRICES)
    return 8 * count * m * m, ("row space, N × N" if row_space else "primal, d × d")


def newton_memory_budget():
    """:data:`NEWTON_MEMORY_BUDGET` in bytes (default half the physical memory)."""
    return half_physical_memory() if NEWTON_MEMORY_BUDGET is None else int(NEWTON_MEMORY_BUDGET)


def check_newton_memory(data, theta_set):
    """``MemoryError`` when :func:`newton_memory_nbytes` exceeds :data:`NEWTON_MEMORY_BUDGET` (default half
    the physical memory), before any matrix is allocated."""
    need, where = newton_memory_nbytes(data, theta_set)
    budget = newton_memory_budget()
    if need > budget:
        raise MemoryError(
            f"the certified Newton solver for N={data.n_samples} pairs, d={data.dim} works with dense matrices "
            f"({where}: about {nbytes_text(need)}), more than the budget of {nbytes_text(budget)} "
            "(loglinear_grpo.newton.NEWTON_MEMORY_BUDGET; default half the physical memory). Use the matrix-free "
            "solver (estimator='newton_cg', which estimator='auto' picks by itself), solve fewer pairs "
            "(data.subset(index)), or raise the budget if the memory is really there")


@dataclass
class NewtonResult:
    """What :func:`newton_minimax` reached: the best certified point and its certificate."""

    theta: np.ndarray
    alpha: np.ndarray
    value: float
    lower_bound: float
    converged: bool
    n_iter: int
    passes: int
    bound_kind: str
    history: list = field(default_factory=list)
    dual: DualPoint | None = None
    temperature: float | None = None        # the last temperature μ (a warm start's temperature0)
    solver: str = "newton"                  # "newton" (dense or row space) or "newton_cg" (matrix-free)
    cg_iterations: int | None = None        # newton_cg: Hessian products in all model steps
    cg_exhausted: int | None = None         # newton_cg: model steps whose product budget ran out
    model_steps: int | None = None          # newton_cg: model steps taken

    @property
    def gap(self):
        return self.value - self.lower_bound


class PairOracle:
    """Full passes over S for the Newton solver, block by block (bounded temporaries; a memory-
    mapped S is never loaded whole), counting the passes."""

    def __init__(self, data, loss, beta):
        self.data = data
        self.spec = get_loss(loss)
        self.beta = beta
        self.inv_size = 1.0 / data.group_sizes
        self.passes = 0

    @property
    def pair_inv_size(self):
        """:math:`1/N_{g_i}` of every pair (gathered on each use: an N-vector the solvers need not keep)."""
        return self.data.membership.spread(self.inv_size)

    # -- S-products ------------------------------------------------------------------
    def _blocks(self):
        return self.data.row_blocks()

    def product(self, x):
        """S x, shape (N,)."""
        self.passes += 1
        return self.data.matvec(x)

    def rproduct(self, u):
        """Sᵀ u, shape (d,)."""
        self.passes += 1
        return self.data.rmatvec(u)

    def approx_product(self, x):
        """S x in the storage's approximate precision where it has one (only for products that steer a
        step, never for a bound: :meth:`~loglinear_grpo.storage.Rows.approximate_products`)."""
        fast = self._approximate()
        if fast is None:
            return self.product(x)
        self.passes += 1
        return fast[0](x)

    def approx_rproduct(self, u):
        """Sᵀ u as :meth:`approx_product`."""
        fast = self._approximate()
        if fast is None:
            return self.rproduct(u)
        self.passes += 1
        return fast[1](u)

    def _approximate(self):
        if not hasattr(self, "_fast"):
            self._fast = self.data.storage.approximate_products()
        return self._fast

    def abs_rproduct(self, v):
        """|S|ᵀ v for v ≥ 0 (the scale of each coordinate of Sᵀv, for the certificate's rounding test)."""
        self.passes += 1
        return abs_rmatvec(self.data, v)

    def margins(self, theta):
        return self.product(theta) - self.data.ref_margin

    def gradients_and_hessian(self, pair_d1, pair_curv):
        """One pass: the K × d matrix of group gradients :math:`G_g = \\frac{1}{N_g}\\sum_{i\\in D_g}
        \\ell'_i s_i` and the d × d matrix :math:`S^\\top\\mathrm{diag}(c)S` (``pair_curv`` = c ≥ 0)."""
        self.passes += 1
        data = self.data
        k, d = data.n_groups, data.dim
        grads = np.zeros((k, d))
        hess = np.zeros((d, d))
        for start, stop, block in self._blocks():          # (per-pair weights made block by block)
            indicator = data.membership.indicator(pair_d1[start:stop], start, stop, scale=self.inv_size)
            grads += data.storage.left_product(indicator, block)
            hess += weighted_gram(block, np.maximum(pair_curv[start:stop], 0.0))
        return grads, hess

    # -- per-pair terms ------------------------------------------------------------------
    def terms(self, h):
        """ℓ, ℓ', ℓ'' of every pair."""
        value, d1 = self.spec.value_and_grad(h, self.beta)
        return value, d1, self.spec.curvature(h, self.beta)

    def group_means(self, values):
        return self.data.membership.sums(values) * self.inv_size


def _objective(losses, weights, chi, mu):
    """F from group losses: Σ w_g L_g (fixed weights) or (1−χ) mean L + χ μ logsumexp(L/μ)."""
    if weights is not None:
        return float(weights @ losses)
    return float((1.0 - chi) * losses.mean() + chi * mu * logsumexp(losses / mu))


@dataclass(frozen=True)
class RowSpaceReduction:
    """θ = c + Q b with Q = Sᵀ V Λ^{-1/2} (orthonormal columns spanning the row space of S); the
    reduced rows are Z = S Q = V Λ^{1/2} and the reduced offsets r − S c."""

    data: PreferenceData
    theta_set: object
    center: np.ndarray
    basis: np.ndarray          # V Λ^{-1/2}, shape (N, r)

    def lift(self, b, original):
        return self.center + original.rmatvec(self.basis @ b)

    def reduce(self, theta, original):
        return self.basis.T @ original.matvec(theta - self.center)


_REDUCTIONS = weakref.WeakKeyDictionary()


def row_space_reduction(data, theta_set, origin=None):
    """For d > N and Θ a ball (centre c) or R^d: the same problem in r = rank(S) ≤ N dimensions.

    The objective depends on θ only through Sθ, and on a ball a component of θ − c outside the
    row space of S only uses up radius, so an optimum has θ − c = Sᵀa. From the eigen-decomposition
    of the kernel :math:`SS^\\top = V\\Lambda V^\\top` (one N × N matrix), θ = c + Q b with
    orthonormal Q = Sᵀ V Λ^{-1/2}; the margins are Z b + (Sc − r) with Z = V Λ^{1/2}, and ‖θ − c‖ =
    ‖b‖. ``origin`` (R^d only) replaces c: the reduced problem is then the correction θ − origin
    (iterative refinement of a lifted solution). Returns ``None`` when no reduction applies.
    """
    if data.dim <= data.n_samples or not isinstance(theta_set, (L2Ball, Unconstrained)) or data.storage.out_of_core:
        return None
    cached = _REDUCTIONS.get(data)                  # one kernel and eigen-decomposition per data set
    if cached is None:
        kernel = data.gram()
        lam, vec = np.linalg.eigh(kernel)
        keep = lam > max(lam.max(initial=0.0), 1e-300) * data.n_samples * EPS
        cached = _REDUCTIONS[data] = (vec[:, keep], np.sqrt(lam[keep]))
    vec, root = cached
    center = theta_set.center_vector(data.dim)
    center = np.zeros(data.dim) if center is None else center
    if origin is not None and isinstance(theta_set, Unconstrained):
        center = origin
    offsets = data.ref_margin - data.matvec(center)
    reduced = PreferenceData(vec * root, data.group_input, offsets, group_names=data.group_names,
                             check_finite=False)
    reduced_set = L2Ball(theta_set.radius) if isinstance(theta_set, L2Ball) else Unconstrained()
    return RowSpaceReduction(reduced, reduced_set, center, vec / root)


def newton_minimax(data, loss, beta, theta_set, *, weights=None, chi=1.0, theta0=None, tol=1e-6,
                   max_iter=200, callback=None, reduce=True, shift=None, temperature0=None):
    """Certified solution of :math:`\\min_{\\theta\\in\\Theta}\\max_{\\alpha}\\sum_g
    ((1-\\chi)/K + \\chi\\alpha_g) L_g(\\theta)` (``weights=None``) or of
    :math:`\\min_{\\theta\\in\\Theta}\\sum_g w_g L_g(\\theta)` (fixed ``weights``: a best response),
    by smoothing and Newton's method (module docstring).

    Parameters
    ----------
    data : PreferenceData
    loss : str
    beta : float
    theta_set : Θ object
    weights : ndarray (K,), optional
        Fixed group weights (on the simplex); ``None`` for the group-robust max.
    chi : float in [0, 1]
        Worst-case/average trade-off (Appendix B.4), group-robust only.
    theta0 : ndarray (d,), optional
        Starting point (projected onto Θ); default Θ's centre, else 0.
    tol : float
        Stop when the certified gap ≤ tol · max(1, |value|).
    max_iter : int
        Newton iterations at most (each costs about two passes over S).
    callback : callable, optional
        ``callback(row)`` with the iteration's record (a dict).
    shift : ndarray (K,), optional
        The group adjustment c (:func:`~loglinear_grpo.objective.group_adjustment`): every :math:`L_g`
        becomes :math:`L_g + c_g`, and every bound gains :math:`\\sum_g\\lambda_g c_g` (the conjugate of
        :math:`\\ell + c` is :math:`\\ell^* - c`).
    temperature0 : float, optional
        The first temperature μ (default: from the spread of the group losses at θ⁰). A warm start
        near the solution of a neighbouring problem (:func:`~loglinear_grpo.solve_path`) may start
        colder; the path to μ → 0, the certificate and the stopping test are the same.

    Returns
    -------
    NewtonResult
    """
    theta_set = Unconstrained() if theta_set is None else theta_set
    if reduce:
        check_newton_memory(data, theta_set)           # before the kernel, the Hessian or any d × d matrix
    reduction = row_space_reduction(data, theta_set) if reduce else None
    options = {"shift": shift, "temperature0": temperature0}
    if reduction is not None:
        return _newton_row_space(data, loss, beta, theta_set, reduction, weights, chi, theta0, tol, max_iter,
                                 callback, options)
    return _newton(data, loss, beta, theta_set, weights, chi, theta0, tol, max_iter, callback, options)


#: on R^d, a lifted row-space solution that does not certify on the original S is refined this many times
REFINE_ROUNDS = 2


def _newton_row_space(data, loss, beta, theta_set, reduction, weights, chi, theta0, tol, max_iter, callback, options):
    """Newton in the row space (:func:`row_space_reduction`), the answer lifted and certified on the
    original S. The kernel squares S's condition number, so a lifted point can lose accuracy in
    directions of tiny singular value (near-duplicate rows); on R^d the solve is then repeated for
    the correction, θ = θ_lifted + Q b (iterative refinement), at most :data:`REFINE_ROUNDS` times."""
    fixed = None if weights is None else np.asarray(weights, dtype=np.float64)
    start = None if theta0 is None else reduction.reduce(np.asarray(theta0, dtype=np.float64), data)
    best, passes, n_iter, history = None, 0, 0, []
    for round_ in range(1 + REFINE_ROUNDS):
        res = newton_minimax(reduction.data, loss, beta, reduction.theta_set, weights=weights, chi=chi,
                             theta0=start, tol=tol, max_iter=max_iter, callback=callback, reduce=False,
                             **(options if round_ == 0 else {**options, "temperature0": None}))
        theta = theta_set.project(reduction.lift(res.theta, data))
        oracle = PairOracle(data, loss, beta)
        h = oracle.margins(theta)
        res.value = minimax_value(oracle.group_means(oracle.spec.value(h, beta)), chi, fixed, options["shift"])
        # the reduced problem's bound holds for the original only if no dropped direction of S
        # matters: re-certify its dual point on the original S (loglinear_grpo.certificate)
        if res.dual is not None:
            res.lower_bound = max(original_space_bound(data, oracle.spec, beta, theta, theta_set, h, res.dual),
                                  trivial_bound(chi, fixed, options["shift"]))
        res.theta = theta
        passes += res.passes + oracle.passes + 2
        n_iter += res.n_iter
        history += res.history
        if best is None:
            best = res
        else:                                   # the best point and, apart, the best bound
            bound = max(best, res, key=lambda r: r.lower_bound)
            point = min(best, res, key=lambda r: r.value)
            point.lower_bound, point.alpha, point.dual, point.bound_kind = \
                bound.lower_bound, bound.alpha, bound.dual, bound.bound_kind
            best = point
        best.converged = is_converged(best.value, best.lower_bound, tol)
        if best.converged or not isinstance(theta_set, Unconstrained) or n_iter >= max_iter:
            break
        reduction, start = row_space_reduction(data, theta_set, origin=best.theta), None
    best.passes, best.n_iter, best.history = passes, n_iter, history
    return best


def _newton(data, loss, beta, theta_set, weights, chi, theta0, tol, max_iter, callback, options):
    return NewtonMinimax(data, loss, beta, theta_set, weights=weights, chi=chi, tol=tol, max_iter=max_iter,
                         callback=callback, **options).solve(theta0)


class NewtonMinimax:
    """Newton's method on the smoothed objective F_μ, with the certificate at every iterate.

    A template of small steps, in the shape of scikit-learn's ``_glm/_newton_solver.NewtonSolver``;
    :meth:`solve` runs ``setup``, then ``gradient_hessian → certify → check_convergence →
    model_step → line_search`` until the certified gap reaches the tolerance, then ``finalize``.
    Each step reads and writes the solver's state (θ, the margins h, the temperature μ, the best
    point and the best bound); the equations are in the module docstring, the bounds in
    :mod:`loglinear_grpo.certificate`.

    Parameters
    ----------
    data : PreferenceData
    loss : str
        A smooth loss (DPO, IPO), or the hinge, replaced by its softplus smoothing on the path (module
        docstring; reliable on a bounded Θ — ``solve`` routes the hinge to its linear program or, bounded,
        to the matrix-free solver).
    beta : float
    theta_set : Θ object
    weights : ndarray (K,), optional
        Fixed group weights (a best response); ``None`` for the group-robust max.
    chi : float in [0, 1]
    tol : float
        Stop when the certified gap ≤ tol · max(1, |value|) (:func:`~loglinear_grpo.certificate.is_converged`).
    max_iter : int
    callback : callable, optional
        ``callback(row)`` with each iteration's record (``losses``: the unadjusted L_g).
    shift, temperature0
        As in :func:`newton_minimax`.
    """

    def __init__(self, data, loss, beta, theta_set, *, weights=None, chi=1.0, tol=1e-6, max_iter=200,
                 callback=None, shift=None, temperature0=None):
        self.data, self.loss, self.beta, self.theta_set = data, loss, beta, theta_set
        self.chi, self.tol, self.max_iter, self.callback = chi, tol, max_iter, callback
        self.shift = np.zeros(data.n_groups) if shift is None else np.asarray(shift, dtype=np.float64)
        self.temperature0 = temperature0
        # the model steps' warm start (the ball's trust-region multiplier), for sets whose step takes one
        takes_state = "state" in inspect.signature(theta_set.minimize_quadratic).parameters
        self.model_kw = {"state": {}} if takes_state else {}
        self.oracle = PairOracle(data, loss, beta)
        spec = self.oracle.spec
        if not spec.smooth and spec.smoothed is None:
            raise ValueError(f"the Newton solver needs a smooth loss or a smoothing of it, got {loss!r}")
        # a non-smooth loss (the hinge) is replaced by its smoothing at the same temperature μ (module docstring)
        self.smoothed_loss = not spec.smooth
        k = data.n_groups
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        self.robust = self.weights is None and k > 1
        if self.weights is None and k == 1:
            self.weights = np.ones(1)
        self.fixed = None if self.robust else self.weights
        self.log_k = np.log(max(k, 2))
        # a temperature path μ → 0: for the smoothed max, and for a smoothed loss even with fixed weights
        self.on_path = self.robust or self.smoothed_loss
        self.shrink = SHRINK_SMOOTHED if self.smoothed_loss else SHRINK

    # ------------------------------------------------------------------ steps
    def group_losses(self, h):
        """The (adjusted) group losses :math:`L_g + c_g` at margins h, of the loss the model steps minimise
        (a smoothed loss at the current temperature)."""
        spec = self.oracle.spec
        values = spec.smoothed(h, self.beta, self.temp)[0] if self.smoothed_loss and self.temp > 0 else \
            spec.value(h, self.beta)
        return self.oracle.group_means(values) + self.shift

    def pair_terms(self, h):
        """ℓ, ℓ', ℓ'' of every pair, of the loss the model steps minimise: the loss itself, or its smoothing
        at the temperature μ (:attr:`~loglinear_grpo.losses.Loss.smoothed`; ℓ' is then a dual point of the
        loss's own certificate)."""
        if self.smoothed_loss:
            return self.oracle.spec.smoothed(h, self.beta, self.temp)
        return self.oracle.terms(h)

    def setup(self, theta0):
        """θ⁰ projected onto Θ (default: Θ's centre, else 0), its margins, the first temperature (the
        spread of the group losses, or a tenth of their size) and the trivial bound L* ≥ 0."""
        data, oracle = self.data, self.oracle
        if theta0 is None:
            center = self.theta_set.bounding_ball(data.dim)[0]
            theta0 = np.zeros(data.dim) if center is None else np.asarray(center, dtype=np.float64)
        self.theta = self.theta_set.project(np.array(theta0, dtype=np.float64))
        self.h = oracle.margins(self.theta)
        self.temp = 0.0
        losses0 = self.group_losses(self.h)
        self.temp = max(float(np.ptp(losses0)), 0.1 * max(float(np.max(np.abs(losses0))), 1e-300)) \
            if self.on_path else 0.0
        if self.on_path and self.temperature0 is not None:
            self.temp = min(self.temp, float(self.temperature0))
        # every loss is ≥ 0: L* ≥ the objective of the adjustment's shifts alone (0 without one)
        trivial = trivial_bound(self.chi, self.fixed, None if not np.any(self.shift) else self.shift)
        self.best = {"value": np.inf, "lower": trivial, "theta": self.theta, "alpha": None, "dual": None}
        self.bound_kind = "trivial (losses ≥ 0)"
        self.history, self.converged, self.it = [], False, 0

    # -- per-pair work, in blocks: the solver keeps two per-pair vectors of its own between passes besides
    # the margins h, ℓ'(h) and c = w ⊙ max(ℓ''(h), 0); every other per-pair quantity (the losses, the pair
    # weights w, ℓ'', the Fenchel–Young terms, the line search's trial losses) is made and reduced
    # PAIR_BLOCK pairs at a time, so that the heap stays far below a memory-mapped S
    def _blocks(self):
        n = self.data.n_samples
        return ((a, min(a + PAIR_BLOCK, n)) for a in range(0, n, PAIR_BLOCK))

    def _group_sums(self, fn):
        """Σ over the pairs of each group of ``fn(a, b)`` (the values of pairs a..b−1), block by block."""
        membership = self.data.membership
        total = np.zeros(self.data.n_groups)
        for a, b in self._blocks():
            total += membership.sums(fn(a, b), a, b)
        return total

    def evaluate_pairs(self):
        """Block by block over the margins h: ℓ' (``d1``) and the Hessian's pair weights
        c = w ⊙ max(ℓ'', 0) (``curv``), kept; the group means of ℓ (and, for a smoothed loss, of the loss
        itself and of the Fenchel–Young terms), reduced on the way, give the weights
        (:meth:`set_group_weights`)."""
        oracle, data, spec, beta = self.oracle, self.data, self.oracle.spec, self.beta
        self.d1 = self.curv = None                   # the last iterate's: their memory is needed now
        n, k, membership = data.n_samples, data.n_groups, data.membership
        d1, curv = np.empty(n), np.empty(n)
        sums = np.zeros((3, k))
        for a, b in self._blocks():
            h = self.h[a:b]
            value, d1[a:b], curv[a:b] = self.pair_terms(h)
            sums[0] += membership.sums(value, a, b)
            if self.smoothed_loss:
                sums[1] += membership.sums(spec.value(h, beta), a, b)
                sums[2] += membership.sums(d1[a:b] * h - spec.conjugate(d1[a:b], beta), a, b)
        means = sums * oracle.inv_size + self.shift
        self.set_group_weights(means[0], *((means[1], means[2]) if self.smoothed_loss else ()))
        scale = self.lam * oracle.inv_size               # w_i = Σ_{g∋i} scale_g
        for a, b in self._blocks():
            np.maximum(curv[a:b], 0.0, out=curv[a:b])
            curv[a:b] *= membership.spread(scale, a, b)
        self.d1, self.curv = d1, curv

    def pair_weights(self):
        """w_i = λ_{g_i}/N_{g_i} of this iterate (a new N-vector, for the certificate's dual points)."""
        return self.data.membership.spread(self.lam * self.oracle.inv_size)

    @property
    def d2(self):
        """max(ℓ''(h), 0) of every pair, as c / w block by block (0 where w = 0, where any metric serves): the
        feasible dual point's metric, on an unbounded Θ only."""
        scale, membership = self.lam * self.oracle.inv_size, self.data.membership
        out = np.zeros(self.data.n_samples)
        for a, b in self._blocks():
            w = membership.spread(scale, a, b)
            np.divide(self.curv[a:b], w, out=out[a:b], where=w > 0)
        return out

    def gradient_hessian(self):
        """One pass: per-pair ℓ', ℓ'' and the group losses (:meth:`evaluate_pairs`); the weights
        λ = (1−χ)/K + χ softmax(L/μ) (or the fixed weights); the group gradients G, the weighted gradient
        ∇ = λᵀG and the loss part of the Hessian, H₁ = Sᵀ diag(λ_g ℓ''_i / N_g) S."""
        self.evaluate_pairs()
        self.grads, self.hess1 = self.oracle.gradients_and_hessian(self.d1, self.curv)
        self.grad = self.lam @ self.grads

    def set_group_weights(self, losses, value_losses=None, bound_losses=None):
        """From the (adjusted) group means: the smoothed weights σ = softmax(L/μ) and λ = (1−χ)/K + χσ (or the
        fixed weights) and the objective's value.

        With a smoothed loss three sets of group values differ: ``losses`` (the smoothed loss: the model,
        the weights, the line search), ``value_losses`` (the loss itself: the objective's value, an upper
        bound on L*) and ``bound_losses``, the group means of the Fenchel–Young terms
        :math:`u_ih_i - \\ell^*(u_i)` at :math:`u = \\ell_\\mu'(h)` (the hinge: :math:`\\sigma_i(1-\\beta h_i)`),
        which every bound uses in place of the group losses (:mod:`loglinear_grpo.certificate`, (⋆))."""
        self.losses = losses
        self.value_losses = losses if value_losses is None else value_losses
        self.bound_losses = losses if bound_losses is None else bound_losses
        if self.robust:
            self.soft = softmax(self.losses / self.temp)
            self.lam = mixing_weights(self.soft, self.chi)
        else:
            self.soft = self.lam = self.weights
        self.upper = minimax_value(self.value_losses, self.chi, self.fixed)

    def trial_losses(self, t, direction):
        """The (adjusted) group losses of the model's loss at the margins h + t·``direction`` (the line search),
        block by block."""
        inv, spec, beta = self.oracle.inv_size, self.oracle.spec, self.beta

        def values(a, b):
            h = self.h[a:b] + t * direction[a:b]
            if self.smoothed_loss:
                return spec.smoothed(h, beta, self.temp)[0]
            return spec.value(h, beta)
        return self._group_sums(values) * inv + self.shift


    def dual_point(self, u, lower, kind, offset):
        """The :class:`~loglinear_grpo.certificate.DualPoint` of this iterate's bound, kept with the best bound
        (the row-space solve re-certifies it on the original S)."""
        return DualPoint(self.pair_weights(), u, lower, kind, offset)

    def certify(self):
        """The bound at this iterate (:mod:`loglinear_grpo.certificate`): the linearisation where Θ is
        bounded along ∇, else a feasible dual point — made once the quadratic model says it would be
        useful (it costs a few passes); at the coldest temperature, the refined bound. Keeps the best
        point and the best bound."""
        best, theta_set = self.best, self.theta_set
        if self.upper < best["value"]:
            best.update(value=self.upper, theta=self.theta)      # θ is rebound each step, never changed in place
        self.target = convergence_target(best["value"], self.tol)
        weighted = float(self.lam @ self.bound_losses)
        offset = float(self.lam @ self.shift)                  # Σ_g λ_g c_g = Σ_i w_i c_{g_i}
        lower, kind, dual_u = linear_bound(weighted, self.theta, theta_set, self.grad), "rigorous", self.d1
        if not np.isfinite(lower):
            kind = "feasible dual"
            z = self.solve_loss_hessian(self.grad)
            estimate = weighted - 0.5 * float(self.grad @ z)
            if best["value"] - estimate <= max(self.target, 0.25 * (best["value"] - best["lower"])):
                lower, dual_u = feasible_dual(self.oracle, self.oracle.spec, self.beta, self.theta, theta_set,
                                              self.h, self.pair_weights(), self.d1, self.d2,
                                              self.loss_hessian(), self.grad, z=z)
                lower += offset
        self._keep_bound(lower, np.array(self.soft, dtype=np.float64), self.dual_point(dual_u, lower, kind, offset),
                         kind)
        self.temp_floor = 0.1 * self.target / self.log_k
        if self.robust and not self.check_convergence() and (self.temp <= self.temp_floor or self._stage_end()):
            lower_r, alpha_hat, kind_r, dual = self.refined_bound()
            self._keep_bound(lower_r, alpha_hat, dual, kind_r)
            lower = lower_r
        self.row = {"iteration": self.it, "value": self.upper, "lower_bound": lower, "gap": self.gap,
                    "temperature": self.temp, "passes": self.oracle.passes}

    def solve_loss_hessian(self, rhs):
        """z with :math:`H_1z = ` ``rhs`` (H₁ the loss part of the Hessian; min-norm where singular): the
        quadratic model's estimate of the feasible dual bound."""
        return solve_psd_scaled(self.hess1, rhs)

    def loss_hessian(self):
        """H₁ as :func:`~loglinear_grpo.certificate.feasible_dual` takes it (here the d × d matrix)."""
        return self.hess1

    def refined_bound(self):
        """The refined bound at this iterate (:func:`~loglinear_grpo.certificate.refined_dual_bound`):
        ``(lower, alpha, kind, dual)``."""
        theta_set = self.theta_set
        return refined_dual_bound(
            self.bound_losses, self.grads, self.hess1, self.theta, theta_set, self.data, self.chi, self.d1,
            best_response=lambda lam: newton_minimax(self.data, self.loss, self.beta, theta_set, weights=lam,
                                                     theta0=self.theta, tol=1e-3 * self.tol, max_iter=50,
                                                     shift=self.shift),
            shift=self.shift)

    def _stage_end(self):
        """Whether this iterate ends a temperature stage that is cold enough (at most
        :data:`REFINE_EARLY` times the floor) for the refined bound to be worth its small solve: the
        point is near the smoothed problem's optimum, where the first-order bound is at its best."""
        return (self.temp <= REFINE_EARLY * self.temp_floor and getattr(self, "decrement", np.inf)
                <= DECREMENT_SHARE * self.temp)

    def _keep_bound(self, lower, alpha, dual, kind):
        if lower > self.best["lower"]:
            self.best.update(lower=lower, alpha=alpha, dual=dual)
            self.bound_kind = kind

    @property
    def gap(self):
        return self.best["value"] - self.best["lower"]

    def check_convergence(self):
        """The one stopping test: certified gap ≤ tol · max(1, |value|)."""
        return is_converged(self.best["value"], self.best["lower"], self.tol)

    def model_step(self):
        """The exact minimiser x of the quadratic model of F_μ over Θ (the Hessian adds the smoothed
        max's rank-K term (χ/μ) Gᵀ(diag(σ) − σσᵀ)G), and its Newton decrement. Returns ``"colder"``
        when this temperature's stage is solved (μ shrinks by ``shrink``), ``"stop"`` when the decrement is
        at float64 resolution, else ``"step"``."""
        hess = self.hess1
        if self.robust:
            centred = self.grads - self.soft @ self.grads
            hess = self.hess1 + (self.chi / self.temp) * (centred.T * self.soft) @ centred
        self.x = self.theta_set.minimize_quadratic(self.theta, self.grad, hess, **self.model_kw)
        self.p = self.x - self.theta
        self.decrement = max(-float(self.grad @ self.p), 0.0)
        self.row["decrement"] = self.decrement
        return self.decrement_action()

    def decrement_action(self):
        """What the Newton decrement says: ``"colder"`` when this temperature's stage is solved (μ shrinks
        by ``shrink``: tenfold, 0.3× for a smoothed loss), ``"stop"`` when it is at float64 resolution, else
        ``"step"``."""
        if self.on_path and self.temp > self.temp_floor and self.decrement <= DECREMENT_SHARE * self.temp:
            self.temp = max(self.temp * self.shrink, self.temp_floor)
            self.row["step_length"] = 0.0
            return "colder"
        if self.decrement <= EPS * max(1.0, abs(self.upper)):
            return "stop"
        return "step"

    def line_search(self):
        """Armijo backtracking on F_μ along p (Boyd & Vandenberghe 2004, §9.5), on the margins
        h + t·Sp (one product); on success θ moves (a convex combination of two points of Θ) and the
        margins are recomputed from S every 10 iterations. Returns whether a step was accepted."""
        oracle = self.oracle
        sp_dir = oracle.product(self.p)
        f0 = _objective(self.losses, self.fixed, self.chi, self.temp)
        t, accepted = 1.0, False
        for _ in range(60):
            f_try = _objective(self.trial_losses(t, sp_dir), self.fixed, self.chi, self.temp)
            if np.isfinite(f_try) and f_try <= f0 - 1e-4 * t * self.decrement:
                accepted = True
                break
            t *= 0.5
        self.row["step_length"] = t if accepted else 0.0
        if accepted:
            self.theta = self.theta + t * self.p if t < 1.0 else self.x
            self.h = oracle.margins(self.theta) if self.it % 10 == 0 else self.h + t * sp_dir
        return accepted

    def emit(self):
        self.history.append(self.row)
        if self.callback is not None:
            self.callback({**self.row, "losses": self.value_losses - self.shift, "alpha": np.array(self.soft, dtype=np.float64),
                           "theta": self.theta_at_row})

    def finalize(self):
        """The best certified point and the best bound found, as a :class:`NewtonResult`."""
        best, k = self.best, self.data.n_groups
        alpha = best["alpha"] if best["alpha"] is not None else \
            (self.weights if self.weights is not None else np.full(k, 1.0 / k))
        return NewtonResult(theta=best["theta"], alpha=np.asarray(alpha, dtype=np.float64), value=best["value"],
                            lower_bound=best["lower"], converged=self.converged, n_iter=self.it,
                            passes=self.oracle.passes, bound_kind=self.bound_kind, history=self.history,
                            dual=best["dual"], temperature=self.temp if self.on_path else None)

    # ------------------------------------------------------------------ the loop
    def solve(self, theta0=None):
        self.setup(theta0)
        while self.it < self.max_iter:
            self.it += 1
            self.gradient_hessian()
            self.theta_at_row = self.theta
            self.certify()
            if self.check_convergence():
                self.converged = True
                self.emit()
                break
            action = self.model_step()
            if action == "colder":
                self.emit()
                continue
            if action == "stop":
                self.emit()
                break                                   # nothing left to gain in floating point
            accepted = self.line_search()
            self.emit()
            if not accepted:
                if self.on_path and self.temp > self.temp_floor:     # no decrease representable: go colder
                    self.temp = max(self.temp * self.shrink, self.temp_floor)
                    continue
                break
        return self.finalize()
