"""The closed-form GR-IPO θ step (§4.1, Algorithm 2): the weighted least squares
:func:`weighted_least_squares` over Θ, from the per-group normal equations
(:func:`group_normal_equations`) or, when d > N, their row-space form (:class:`RowSpaceForm`)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.optimize

from ._cvxpy import _cvxpy_diff, _solve_cvxpy
from ._linalg import ball_quadratic_min as _ball_least_squares
from ._linalg import solve_psd as _solve_psd
from ._linalg import trust_region_coefficients as _trust_region_coefficients
from .constraints import L2Ball, Box, Unconstrained
from .data import weighted_gram


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
        one_hot = data.membership.column(g) / data.group_sizes[g]
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
            u = _row_space_least_squares(data, normal_equations, data.membership.spread(w / data.group_sizes), radius)
            return u if radius == np.inf else theta_set.center_vector(data.dim) + u
        grams, rhs = normal_equations
        hess = np.tensordot(w, grams, axes=1)
        q = w @ rhs
        if isinstance(theta_set, Unconstrained):
            return _solve_psd(hess, q)
        center = theta_set.center_vector(data.dim)
        return center + _ball_least_squares(hess, q, theta_set.radius)
    pair_w = data.membership.spread(w / data.group_sizes)
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
