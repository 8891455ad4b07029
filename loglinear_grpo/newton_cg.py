"""The matrix-free certified solver (``estimator="newton_cg"``): memory = S plus a few vectors, time =
passes over S.

It minimises the same entropy-smoothed worst-group objective F_μ as the dense solver
(:mod:`loglinear_grpo.newton`; its module docstring has the equations), follows the same path μ → 0,
and stops on the same certificate, but never forms a matrix: S is touched only through the products
Sv and Sᵀu, and the Hessian of F_μ only through its products

.. math::

    \\nabla^2F_\\mu\\,v = S^\\top\\!\\big(c\\odot Sv + a\\big),\\qquad
    c_i = \\frac{\\lambda_{g_i}}{N_{g_i}}\\ell''(h_i),\\qquad
    a_i = \\frac{\\ell'(h_i)}{N_{g_i}}\\,\\frac{\\chi}{\\mu}\\,\\sigma_{g_i}\\big((Gv)_{g_i} - \\sigma^\\top Gv\\big),

where :math:`(Gv)_g = \\frac1{N_g}\\sum_{i\\in D_g}\\ell'(h_i)(Sv)_i` comes from the same product Sv: the
rank-K term :math:`\\frac\\chi\\mu G^\\top(\\mathrm{diag}\\,\\sigma - \\sigma\\sigma^\\top)G` of the smoothed max
costs nothing more, and the K × d matrix G of group gradients is never stored. One Hessian product is
two passes; the gradient :math:`\\nabla = S^\\top(w\\odot\\ell')` is one.

The Newton model step over Θ is solved by a Krylov method (:meth:`ThetaSet.minimize_quadratic_operator
<loglinear_grpo.constraints.ThetaSet.minimize_quadratic_operator>`): conjugate gradients on R^d
(truncated Newton; Dembo, Eisenstat & Steihaug 1982), the trust-region subproblem on a ball by GLTR's
Lanczos method (Gould, Lucidi, Roma & Toint 1999), and TRON's projected searches and subspace CG on a
box (Lin & Moré 1999, the method of LIBLINEAR). Each is solved to a relative optimality residual
η = min(0.1, √(relative gap)) (a forcing sequence: loose while far, tight near the optimum), within
``max_cg`` products.

The certificate and the stopping rule are those of the dense solver: the linearisation bound (one
gradient and the support function of Θ), on R^d the feasible dual point (its correction
:math:`H_1z = \\rho` solved by conjugate gradients, checked to rounding in every coordinate as
before), and on a ball the refined bound in the K-dimensional dual
(:func:`ball_refined_bound`: 2K + 2 passes, one d-vector at a time).

The hinge is smoothed by softplus at the temperature μ on the same path and certified with its own
conjugate (:mod:`loglinear_grpo.newton`'s docstring; on a bounded Θ only: :func:`smoothed_hinge_applies`).

References
----------
Dembo, Eisenstat & Steihaug (1982), Inexact Newton methods, SIAM J. Numer. Anal. 19.
Gould, Lucidi, Roma & Toint (1999), Solving the trust-region subproblem using the Lanczos method,
SIAM J. Optim. 9.
Lin & Moré (1999), Newton's method for large bound-constrained optimization problems, SIAM J.
Optim. 9 (TRON).
Nesterov (2005), Smooth minimization of non-smooth functions, Math. Program. 103.
"""
from __future__ import annotations

import numpy as np

from ._krylov import conjugate_gradient
from .certificate import DualPoint, refined_dual_bound
from .constraints import L2Ball, ThetaSet, Unconstrained
from ._numbers import nbytes_text
from .losses import get_loss
from .newton import DECREMENT_SHARE, REFINE_EARLY, NewtonMinimax, NewtonResult, PairOracle, newton_memory_budget, \
    newton_memory_nbytes
from .steps import mixing_weights

#: Krylov iterations per model step at most (``max_cg``; a two-pass Lanczos step makes up to twice as many
#: Hessian products)
MAX_CG = 250
#: the forcing term η of the inexact model steps stays in [ETA_MIN, ETA_MAX]
ETA_MAX = 0.1
ETA_MIN = 1e-10
#: a bounded box's refined bound (a cone program with d variables; the group sums hold an N × K matrix) is
#: tried up to K · max(d, N/50) of this size
REFINE_ENTRIES = 200_000
#: at the coldest temperature, the best-response bound is tried at most once in this many iterations
RESPONSE_EVERY = 5
#: the quadratic model's estimate of the feasible dual bound solves H₁z = ∇ to this relative residual
ESTIMATE_RTOL = 1e-3
#: the feasible dual's correction H₁z = ρ is solved to this relative residual (then refined, checked)
DUAL_RTOL = 1e-12

#: float64 d-vectors the matrix-free solver holds at its peak (θ, the best θ, the gradient, the model
#: point and step, four Krylov vectors, a product's output, the certificate's residual), and N-vectors
#: (margins, ℓ', the Hessian's pair weights, a product Sv, the line search's direction, the best response's
#: own; measured with tracemalloc on a memory-mapped S of 10⁶ pairs: 6.5 on a ball, 8 on a box, 10 on R^d)
D_VECTORS = 12
N_VECTORS = 12


def matrix_free_memory_nbytes(data):
    """Predicted peak bytes of the matrix-free solver's own arrays (S itself not counted):
    :data:`D_VECTORS` float64 vectors of length d and :data:`N_VECTORS` of length N."""
    return 8 * (D_VECTORS * data.dim + N_VECTORS * data.n_samples)


def has_matrix_free_step(theta_set):
    """Whether Θ has a matrix-free model step (a ball, a box, R^d)."""
    method = type(theta_set).minimize_quadratic_operator
    return method is not ThetaSet.minimize_quadratic_operator


def smoothed_hinge_applies(theta_set, dim):
    """Whether the matrix-free solver certifies the hinge on Θ: Θ bounded (a ball, a bounded box), where the
    smoothed hinge's dual points give the rigorous bound. On R^d or an open box the bound needs a dual point
    made feasible, and the softplus duals, saturated at −β or 0 for most pairs, are not moved there (measured:
    no certificate in 300 iterations on random problems), so it is refused."""
    return has_matrix_free_step(theta_set) and bool(np.isfinite(theta_set.bounding_ball(dim)[1]))


def check_matrix_free(loss, theta_set, dim):
    """``ValueError`` when the matrix-free solver cannot take this loss on Θ (the hinge on an unbounded Θ)."""
    if not get_loss(loss).smooth and not smoothed_hinge_applies(theta_set, dim):
        raise ValueError(
            "estimator='newton_cg' certifies the hinge (smoothed by softplus on the path μ → 0, its conjugate in "
            "the certificate) only on a bounded Θ (radius=... or a bounded Box): on R^d or an open box its dual "
            "points cannot be made feasible, and no certificate would come. Bound Θ, or use estimator='newton' "
            "(the hinge as one linear program, in memory)")


def choose_solver(data, loss, theta_set):
    """The second-order solver ``estimator="auto"`` runs, chosen by predicted memory: ``"newton"`` (dense
    or row space) where its matrices (:func:`~loglinear_grpo.newton.newton_memory_nbytes`) fit the budget
    (:data:`~loglinear_grpo.newton.NEWTON_MEMORY_BUDGET`, default half the physical memory), else
    ``"newton_cg"`` (matrix-free) for a smooth loss on a ball, a box or R^d. For the hinge ``"newton"`` is
    its linear or conic program (:func:`~loglinear_grpo.hinge.hinge_program_nbytes` against
    :data:`~loglinear_grpo.hinge.HINGE_MEMORY_BUDGET`); where that does not fit and Θ is bounded,
    ``"newton_cg"`` with the smoothed hinge (:func:`smoothed_hinge_applies`). A general convex set, and the
    hinge on an unbounded Θ, stay with ``"newton"``, which then refuses with the prediction if it does not
    fit.

    Returns
    -------
    (estimator, plan)
        ``plan`` = {``estimator``, ``dense_bytes``, ``dense_layout``, ``matrix_free_bytes``,
        ``budget_bytes``, ``reason``} (bytes predicted from the shapes alone; S itself not counted).
    """
    smooth = get_loss(loss).smooth
    if smooth:
        dense, layout = newton_memory_nbytes(data, theta_set)
        budget = newton_memory_budget()
        free = has_matrix_free_step(theta_set)
    else:
        from .hinge import hinge_memory_budget, hinge_program_nbytes
        dense, layout = hinge_program_nbytes(data, theta_set), "the hinge's linear or conic program"
        budget = hinge_memory_budget()
        free = smoothed_hinge_applies(theta_set, data.dim)
    light = matrix_free_memory_nbytes(data)
    if dense <= budget or not free:
        estimator = "newton"
        reason = (f"the dense solver's matrices ({layout}) need about {nbytes_text(dense)}, within the budget of "
                  f"{nbytes_text(budget)}" if dense <= budget else
                  f"the dense solver is the only one for {'this Θ' if smooth else 'the hinge on an unbounded Θ'}")
    else:
        estimator = "newton_cg"
        reason = (f"the dense solver's matrices ({layout}) would need about {nbytes_text(dense)}, more than the "
                  f"budget of {nbytes_text(budget)}; the matrix-free solver needs about {nbytes_text(light)} "
                  "besides S")
    return estimator, {"estimator": estimator, "dense_bytes": int(dense), "dense_layout": layout,
                       "matrix_free_bytes": int(light), "budget_bytes": int(budget), "reason": reason}


class MatrixFreeNewton(NewtonMinimax):
    """Newton–CG on F_μ with the certificate at every iterate (module docstring).

    The steps and the loop are :class:`~loglinear_grpo.newton.NewtonMinimax`'s; this class replaces
    the ones that formed matrices: :meth:`gradient_hessian` (the gradient only, and the Hessian as an
    operator), :meth:`model_step` (a Krylov solve), the feasible dual's solve and the refined bound.

    Parameters
    ----------
    max_cg : int
        Krylov iterations per model step at most (default :data:`MAX_CG`; on a ball whose Lanczos vectors
        do not fit in memory each iteration's product is made twice, in the second pass).
    Others
        As :class:`~loglinear_grpo.newton.NewtonMinimax`.
    """

    def __init__(self, data, loss, beta, theta_set, *, max_cg=MAX_CG, **kw):
        check_matrix_free(loss, theta_set, data.dim)
        super().__init__(data, loss, beta, theta_set, **kw)
        self.max_cg = int(max_cg)
        self._responded_at = -RESPONSE_EVERY     # the iteration of the last best-response bound
        # True once the approximate products have failed a step, or from the start when there are none
        self.exact_hessian = data.storage.approximate_products() is None
        # the best response's own tolerance, a share of this one's: its gap adds to ours (a smoothed loss
        # pays for each decade of it with a temperature stage)
        self.response_share = 0.1 if self.smoothed_loss else 1e-3
        self.cg_iterations = 0
        self.cg_exhausted = 0          # model steps whose Krylov solve used its whole budget unconverged
        self.model_steps = 0

    # ------------------------------------------------------------------ steps
    def gradient_hessian(self):
        """One pass for the gradient ∇ = Sᵀ(w ⊙ ℓ'); the Hessian stays an operator (:meth:`hessp`). The
        per-pair terms are made block by block (:meth:`NewtonMinimax.evaluate_pairs
        <loglinear_grpo.newton.NewtonMinimax.evaluate_pairs>`)."""
        oracle, membership = self.oracle, self.data.membership
        self.x = self.p = self.grad = None          # the last step's vectors: their memory is needed now
        self.evaluate_pairs()
        scale = self.lam * oracle.inv_size
        weighted = np.empty(self.data.n_samples)
        for a, b in self._blocks():
            np.multiply(membership.spread(scale, a, b), self.d1[a:b], out=weighted[a:b])
        self.grad = oracle.rproduct(weighted)
        del weighted
        self.grads = None

    def hessp(self, v):
        """:math:`\\nabla^2F_\\mu v` (module docstring): two passes, in the storage's approximate products
        where it has them (:meth:`~loglinear_grpo.storage.Rows.approximate_products`: the Hessian only
        steers the model step; the gradient, the margins and every bound use the exact products). The
        coefficients c ⊙ Sv + a are written over Sv block by block (no other per-pair vector)."""
        oracle, membership = self.oracle, self.data.membership
        sv = oracle.product(v) if self.exact_hessian else oracle.approx_product(v)
        if not sv.flags.writeable or sv.dtype != np.float64:
            sv = np.array(sv, dtype=np.float64)
        mix = None
        if self.robust:
            gv = self._group_sums(lambda a, b: self.d1[a:b] * sv[a:b]) * oracle.inv_size
            # a_i = ℓ'_i Σ_{g∋i} (χ/μ) σ_g ((Gv)_g − σᵀGv) / N_g
            mix = (self.chi / self.temp) * self.soft * (gv - float(self.soft @ gv)) * oracle.inv_size
        for a, b in self._blocks():
            block = sv[a:b]
            block *= self.curv[a:b]
            if mix is not None:
                block += membership.spread(mix, a, b) * self.d1[a:b]
        return oracle.rproduct(sv) if self.exact_hessian else oracle.approx_rproduct(sv)

    def loss_hessp(self, v):
        """:math:`H_1v = S^\\top(c\\odot Sv)`, the loss part only (the feasible dual's metric)."""
        return self.oracle.rproduct(self.curv * self.oracle.product(v))

    def solve_loss_hessian(self, rhs, free=None, rtol=None):
        """:math:`H_1z = ` ``rhs`` by conjugate gradients (on the coordinates ``free`` when given): to
        :data:`ESTIMATE_RTOL` for the quadratic model's estimate of the feasible dual bound (which only
        decides whether to compute it), to :data:`DUAL_RTOL` for the bound's own correction (then its
        refinement and rounding test do the rest)."""
        if free is None or np.all(free):
            hessp = self.loss_hessp
        else:
            def hessp(v):
                full = np.zeros(self.data.dim)
                full[free] = v
                return self.loss_hessp(full)[free]
        z, info = conjugate_gradient(hessp, rhs, ESTIMATE_RTOL if rtol is None else rtol, 10 * self.max_cg)
        self.cg_iterations += info["iterations"]
        return z

    def loss_hessian(self):
        return lambda rhs, free: self.solve_loss_hessian(rhs, free, DUAL_RTOL)

    def refined_bound(self):
        r"""The refined bound, in two tiers.

        1. On a ball, :func:`ball_refined_bound` (first-order information at θ, 2K + 2 passes); on a
           bounded box with K · d ≤ :data:`REFINE_ENTRIES`, the dense solver's
           (:func:`~loglinear_grpo.certificate.refined_dual_bound`, K vectors of length d).
        2. At the end of a temperature stage (the smoothed problem solved): the certified best response
           :math:`L^*\ge\min_{\theta'\in\Theta}\sum_g\lambda_gL_g(\theta')` with λ = (1−χ)/K + χα̂, α̂ from
           tier 1 where it ran, else softmax(L/μ) (:meth:`best_response_bound`, by this solver with the
           weights fixed, warm-started at θ). With α fixed there is no max, so no 1/μ curvature: the
           inner solve certifies quickly where the linearisation at θ would need θ to a precision the
           Krylov steps cannot give at small μ (the rank-K term makes the Hessian's condition number grow
           as 1/μ). And by concavity of the dual function its value is below L* only to second order
           in λ − α*.

        This method is tier 1; it returns ``(lower, alpha, kind, dual)``.
        """
        best = (-np.inf, None, "none", None)
        if isinstance(self.theta_set, L2Ball):
            best = ball_refined_bound(self.oracle, self.bound_losses, self.d1, self.theta, self.theta_set, self.chi,
                                      self.shift)
        elif np.isfinite(self.theta_set.bounding_ball(self.data.dim)[1]) and \
                max(self.data.dim, self.data.n_samples // 50) * self.data.n_groups <= REFINE_ENTRIES:
            # a bounded box: the dense refined bound's cone program, over K group-gradient vectors of length d
            grads = self.data.membership.group_row_sums(self.data.storage, self.d1) * \
                self.oracle.inv_size[:, None]
            self.oracle.passes += 1
            best = refined_dual_bound(self.bound_losses, grads, None, self.theta, self.theta_set, self.data, self.chi,
                                      self.d1, best_response=None, shift=self.shift)
        return best

    def best_response_bound(self):
        """Tier 2 of :meth:`refined_bound`, kept as the best bound when it is better: called by
        :meth:`model_step` when a temperature stage is solved (its decrement ≤ DECREMENT_SHARE · μ), at
        most every :data:`RESPONSE_EVERY` iterations at the coldest temperature."""
        self._responded_at = self.it
        alpha = self.soft
        hat = self.refined_bound()[1]              # the first-order α̂: stabler than softmax(L/μ) at small μ
        alpha = hat if hat is not None else alpha
        # this iterate's per-pair vectors are recomputed after: the inner solve gets their memory
        self.d1 = self.curv = None
        inner = MatrixFreeNewton(self.data, self.loss, self.beta, self.theta_set, max_cg=self.max_cg,
                                 weights=mixing_weights(alpha, self.chi), tol=self.response_share * self.tol,
                                 max_iter=50, shift=self.shift)
        res = inner.solve(self.theta)
        self.oracle.passes += res.passes
        self.cg_iterations += res.cg_iterations
        self._keep_bound(res.lower_bound, np.array(alpha, dtype=np.float64), res.dual, res.bound_kind)

    def forcing(self):
        """η = min(:data:`ETA_MAX`, √(best relative gap)), at least :data:`ETA_MIN`."""
        gap = self.best["value"] - self.best["lower"]
        relative = gap / max(1.0, abs(self.best["value"])) if np.isfinite(gap) else 1.0
        return float(np.clip(np.sqrt(max(relative, 0.0)), ETA_MIN, ETA_MAX))

    def model_step(self):
        """The model step by a Krylov method over Θ; then the decrement test and the temperature, as
        in :meth:`NewtonMinimax.model_step <loglinear_grpo.newton.NewtonMinimax.model_step>`."""
        for _ in range(2):
            self.x, info = self.theta_set.minimize_quadratic_operator(self.theta, self.grad, self.hessp,
                                                                      self.forcing(), self.max_cg)
            self.model_steps += 1
            self.cg_iterations += info["iterations"]
            self.p = self.x - self.theta
            self.decrement = max(-float(self.grad @ self.p), 0.0)
            if self.exact_hessian or (info["converged"] and self.decrement > 0):
                break
            # the approximate (float32) products have lost the model's small directions (its condition
            # number grows as 1/μ): exact products from here on
            self.exact_hessian = True
        if not info["converged"] and info["iterations"] >= self.max_cg:
            self.cg_exhausted += 1
        self.row["cg_iterations"] = info["iterations"]
        self.row["decrement"] = self.decrement
        if self.robust and not self.smoothed_loss and self.decrement <= DECREMENT_SHARE * self.temp \
                and self.temp <= REFINE_EARLY * self.temp_floor and self.it - self._responded_at >= RESPONSE_EVERY:
            self.x = self.p = self.grad = None      # the best response's own vectors take their memory
            self.best_response_bound()             # this stage is solved: its weights are near α*
            self.row.update(lower_bound=self.best["lower"], gap=self.gap, step_length=0.0)
            if self.check_convergence():
                self.converged = True
                return "stop"
            if self.temp > self.temp_floor:
                self.temp = max(self.temp * self.shrink, self.temp_floor)
            return "colder"                          # (at the floor: the same temperature, a fresh step)
        return self.decrement_action()

    def dual_point(self, u, lower, kind, offset):
        # a dual point's per-pair arrays are only read by the dense solver's row-space re-certification: none
        # is made or kept here (two N-vectors of an old iterate)
        return None

    def _keep_bound(self, lower, alpha, dual, kind):
        super()._keep_bound(lower, alpha, None, kind)

    def finalize(self):
        result = super().finalize()
        result.solver, result.cg_iterations = "newton_cg", self.cg_iterations
        result.cg_exhausted, result.model_steps = self.cg_exhausted, self.model_steps
        return result


def ball_refined_bound(oracle, losses, d1, theta, ball, chi, shift):
    """The refined bound of :func:`~loglinear_grpo.certificate.refined_dual_bound` on a ball, in the
    K-dimensional dual, matrix-free.

    On :math:`\\Theta = \\{\\|\\theta - c\\|\\le R\\}`, :math:`\\min_{\\theta'}(G^\\top\\lambda)^\\top(\\theta'-\\theta)
    = \\lambda^\\top G(c - \\theta) - R\\|G^\\top\\lambda\\|`, so the best first-order bound is

    .. math::

        \\max_{\\alpha\\in\\Delta}\\;\\lambda^\\top(L + v) - R\\sqrt{\\lambda^\\top M\\lambda},\\qquad
        \\lambda = \\tfrac{1-\\chi}{K} + \\chi\\alpha,\\quad v = G(c-\\theta),\\quad M = GG^\\top,

    a K-variable second-order cone program (cvxpy). M's column h is :math:`G(G_h)`, from the products
    :math:`G_h = S^\\top u_h` and :math:`SG_h` (2K passes, one d-vector at a time), v from S(c − θ).
    The bound is then evaluated exactly at the maximiser α̂, :math:`\\hat\\lambda^\\top L +
    \\min_\\Theta(G^\\top\\hat\\lambda)^\\top(\\theta'-\\theta)` (one more pass): rigorous whatever the cone
    solver's accuracy. Returns ``(lower, alpha, kind, dual)``.
    """
    import cvxpy as cp
    data = oracle.data
    k = data.n_groups
    m = np.zeros((k, k))
    for h in range(k):                              # G_h = Sᵀ(ℓ' on the pairs of group h) / N_h
        g_h = oracle.rproduct(data.membership.column(h) * (d1 * oracle.inv_size[h]))
        m[:, h] = oracle.group_means(d1 * oracle.product(g_h))
    m = 0.5 * (m + m.T)
    center = ball.center_vector(data.dim)
    v = oracle.group_means(d1 * oracle.product(center - theta))
    lam_eig, vec = np.linalg.eigh(m)
    root = (vec * np.sqrt(np.maximum(lam_eig, 0.0))).T            # M = rootᵀ root
    alpha = cp.Variable(k, nonneg=True)
    lam = mixing_weights(alpha, chi, k)
    scale = max(float(np.max(np.abs(losses + v))), float(np.sqrt(max(lam_eig.max(initial=0.0), 0.0))) *
                ball.radius, 1e-300)
    problem = cp.Problem(cp.Maximize((lam @ (losses + v) - ball.radius * cp.norm(root @ lam, 2)) / scale),
                         [cp.sum(alpha) == 1])
    try:
        problem.solve(solver="CLARABEL")
    except (cp.error.SolverError, ValueError):
        return -np.inf, None, "none", None
    if alpha.value is None or not np.all(np.isfinite(alpha.value)):
        return -np.inf, None, "none", None
    hat = np.maximum(alpha.value, 0.0)
    if hat.sum() <= 0:
        return -np.inf, None, "none", None
    hat = hat / hat.sum()
    lam_hat = mixing_weights(hat, chi)
    pair_w = data.membership.spread(lam_hat * oracle.inv_size)
    lower = float(lam_hat @ losses) + ball.min_linear(theta, oracle.rproduct(pair_w * d1))
    offset = float(lam_hat @ shift)
    return lower, hat, "rigorous", DualPoint(pair_w, d1, lower, "rigorous", offset)


def newton_cg_minimax(data, loss, beta, theta_set, *, weights=None, chi=1.0, theta0=None, tol=1e-6, max_iter=200,
                      callback=None, shift=None, temperature0=None, max_cg=MAX_CG):
    """:func:`~loglinear_grpo.newton.newton_minimax`'s problem and certificate, matrix-free (module
    docstring). Θ must be a ball, a box or R^d. Returns a :class:`~loglinear_grpo.newton.NewtonResult`
    with ``solver="newton_cg"``, ``cg_iterations`` (Hessian products in all model steps),
    ``cg_exhausted`` (model steps whose budget ran out) and ``model_steps``."""
    theta_set = Unconstrained() if theta_set is None else theta_set
    solver = MatrixFreeNewton(data, loss, beta, theta_set, max_cg=max_cg, weights=weights, chi=chi, tol=tol,
                              max_iter=max_iter, callback=callback, shift=shift, temperature0=temperature0)
    return solver.solve(theta0)


__all__ = ["MatrixFreeNewton", "NewtonResult", "PairOracle", "ball_refined_bound", "check_matrix_free",
           "choose_solver", "has_matrix_free_step", "matrix_free_memory_nbytes", "newton_cg_minimax",
           "smoothed_hinge_applies"]
