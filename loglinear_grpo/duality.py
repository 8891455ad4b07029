"""Best responses and the certified duality gap: :math:`\\min_{\\theta\\in\\Theta}\\sum_g\\alpha_g
L_g(\\theta)` with a certified lower bound (:func:`certified_best_response`, :func:`best_response`),
and by weak duality the bound :func:`duality_gap` on the suboptimality of any θ ∈ Θ."""
from __future__ import annotations

import numpy as np

from ._validation import check_loss, check_positive_finite, check_vector
from .certificate import check_consistent
from .constraints import make_constraint
from .hinge import hinge_program
from .losses import get_loss
from .objective import _check_data, _group_losses


def certified_best_response(alpha, data, loss, beta, theta_set, *, tol=1e-12, theta0=None, max_iter=100):
    r""":math:`\min_{\theta\in\Theta}\sum_g\alpha_g L_g(\theta)` with a certified lower bound
    (a :class:`~loglinear_grpo.newton.NewtonResult`).

    Newton's method with the exact model step over Θ (:mod:`loglinear_grpo.newton`): for IPO one
    step is the closed form (the model is the function), for DPO a weighted logistic regression
    converging quadratically; the hinge as one linear (or conic) program, :func:`hinge_program`.
    """
    from .newton import newton_minimax
    from .newton_cg import choose_solver, newton_cg_minimax
    spec = get_loss(loss)
    matrix_free = choose_solver(data, spec.name, theta_set)[0] == "newton_cg"    # the dense form would not fit
    if spec.name == "hinge" and not matrix_free:
        return hinge_program(data, beta, theta_set, weights=np.asarray(alpha, dtype=np.float64))
    if matrix_free:
        floor = 1e-10 if spec.smooth else 1e-7      # the smoothed hinge pays a temperature stage per decade
        return newton_cg_minimax(data, spec.name, beta, theta_set, weights=np.asarray(alpha, dtype=np.float64),
                                 theta0=theta0, tol=max(tol, floor), max_iter=max_iter)
    return newton_minimax(data, spec.name, beta, theta_set, weights=np.asarray(alpha, dtype=np.float64),
                          theta0=theta0, tol=tol, max_iter=max_iter)


def best_response(alpha, data, *, loss="dpo", beta=0.1, radius=None, center=None, constraint=None,
                  theta_set=None):
    r""":math:`\min_{\theta'\in\Theta}\sum_g \alpha_g L_g(\theta')`: ``(theta, value)``.

    Exact to a certified relative accuracy of 10⁻¹²: Newton's method with exact model steps over Θ
    (IPO: the closed form in one step; DPO: a weighted logistic regression; hinge: a linear or
    conic program); see :func:`certified_best_response`. Where the dense form would not fit the memory
    budget the matrix-free solver runs instead, to 10⁻¹⁰ (DPO, IPO) or 10⁻⁷ (the smoothed hinge, bounded Θ
    only), within 100 iterations: θ is then as good as that solve certified. ``loss`` takes
    TRL's names too (``"sigmoid"`` is DPO).

    Θ is given as in :func:`loglinear_grpo.solve`, :func:`duality_gap` and
    :func:`~loglinear_grpo.solve_exact`: ``radius`` (and ``center``) for an L2 ball, or ``constraint``
    (a :class:`~loglinear_grpo.ThetaSet`); none of them: R^d. ``theta_set`` is a deprecated alias of
    ``constraint`` (it still works, with a :class:`DeprecationWarning`; give one of the two).
    """
    if theta_set is not None:
        if constraint is not None:
            raise ValueError("give either constraint or its deprecated alias theta_set, not both")
        import warnings
        warnings.warn("best_response(theta_set=...) is deprecated: use constraint=... (or radius=/center=), "
                      "as in solve and duality_gap", DeprecationWarning, stacklevel=2)
        constraint = theta_set
    loss = check_loss(loss)
    beta = check_positive_finite("beta", beta)
    _check_data(data)
    theta_set = make_constraint(radius, center, constraint).check_dim(data.dim)
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
