"""Per-pair preference losses as functions of the margin ``h`` — one table, one place.

=========  ===========================================  ==============================  =================
name       loss :math:`\\ell(h)`                         derivative :math:`\\ell'(h)`     conjugate domain
=========  ===========================================  ==============================  =================
``dpo``    :math:`-\\log\\sigma(\\beta h)`  (Eq. 5)        :math:`-\\beta\\,\\sigma(-\\beta h)`  :math:`[-\\beta, 0]`
``ipo``    :math:`(h - 1/(2\\beta))^2`  (§4.1)           :math:`2(h - 1/(2\\beta))`       :math:`\\mathbb R`
``hinge``  :math:`\\max(0, 1 - \\beta h)`                :math:`-\\beta\\,[\\beta h < 1]`  :math:`[-\\beta, 0]`
=========  ===========================================  ==============================  =================

``"sigmoid"`` is TRL's name for ``"dpo"``; :func:`get_loss` resolves it everywhere (solvers,
certificates, cvxpy forms, the CLI) and rejects unknown names with a ``ValueError``. All three
losses are convex in ``h`` and hence, with the log-linear margin :math:`h = s^\\top\\theta - r`,
convex in θ (the setting of Proposition 3).

Each :class:`Loss` holds everything the toolkit needs about one loss: value, derivative and
curvature (computed in log space, exact to rounding for any finite ``h``), the Fenchel conjugate
behind the duality-gap certificate, the bounds of Proposition 3, and the cvxpy expression of the
exact solver.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.special import expit, log_expit

from ._numbers import check_positive_finite


def _dpo_value(h, beta):
    """DPO, paper Eq. (5) per pair (Eq. (7)/(9) average it per group): ℓ(h) = −log σ(βh), in log space."""
    return -log_expit(beta * h)


def _dpo_derivative(h, beta):
    return -beta * expit(-beta * h)


def _dpo_curvature(h, beta):
    z = beta * h
    return (beta * beta) * expit(z) * expit(-z)


def _dpo_value_and_derivative(h, beta):
    r"""For DPO both come from one :math:`e^{-|\beta h|}`:
    :math:`-\log\sigma(z) = \max(-z, 0) + \log(1 + e^{-|z|})` and :math:`\sigma(-z) = e^{-|z|}/(1+e^{-|z|})`
    for z > 0, :math:`1/(1+e^{-|z|})` otherwise (no overflow, no cancellation)."""
    if h.size <= 4096:                       # few elements: fewer ufunc calls win
        return _dpo_value(h, beta), _dpo_derivative(h, beta)
    z = beta * h
    e = np.exp(-np.abs(z))
    value = np.maximum(-z, 0.0) + np.log1p(e)
    deriv = np.where(z > 0, e, 1.0)
    deriv *= -beta / (1.0 + e)
    return value, deriv


def _dpo_in_place(h, beta, z, e, value, deriv):
    """ℓ and ℓ' of DPO for one block of margins into the caller's buffers (z, e: scratch; no
    temporaries of block size but one mask), for the full-batch kernels."""
    np.multiply(h, beta, out=z)
    np.abs(z, out=e)
    np.negative(e, out=e)
    np.exp(e, out=e)                                  # e = exp(−|βh|)
    np.negative(z, out=value)
    np.maximum(value, 0.0, out=value)
    np.add(e, 1.0, out=deriv)
    value += np.log(deriv)                            # −log σ(βh) = max(−βh, 0) + log(1 + e)
    # (log rather than log1p: 2.5× faster here, and 1 + e rounds e < 1.1e-16 away — an absolute error
    # of at most 1.1e-16 per pair in a loss used only for the α step; the certificate uses log1p)
    np.divide(-beta, deriv, out=deriv)                # −β/(1 + e)
    np.multiply(deriv, e, out=deriv, where=z > 0)     # −β·σ(−βh): e/(1+e) for βh > 0, 1/(1+e) otherwise
    return value, deriv


def _dpo_conjugate(u, beta):
    # ℓ*(u) for ℓ(h) = log(1 + e^{-βh}): with p = -u/β ∈ [0, 1], ℓ*(u) = p log p + (1-p) log(1-p)
    p = np.clip(-u / beta, 0.0, 1.0)
    return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0) + \
        np.where(p < 1, (1 - p) * np.log(np.where(p < 1, 1 - p, 1.0)), 0.0)


def _dpo_scalar(h, beta):
    """(ℓ, ℓ') of one float margin, in Python floats (one pair per step: no array overhead)."""
    z = beta * h
    if z > 0:
        e = math.exp(-z)
        return math.log1p(e), -beta * e / (1.0 + e)
    e = math.exp(z)
    return -z + math.log1p(e), -beta / (1.0 + e)


def _ipo_scalar(h, beta):
    r = h - 0.5 / beta
    return r * r, 2.0 * r


def _hinge_scalar(h, beta):
    z = 1.0 - beta * h
    return (z, -beta) if z > 0 else (0.0, 0.0)


def _ipo_value(h, beta):
    """IPO (Azar et al. 2024; the GR-IPO objective of §4.1): ℓ(h) = (h − 1/(2β))²."""
    return np.square(h - 0.5 / beta)


def _ipo_derivative(h, beta):
    return 2.0 * (h - 0.5 / beta)


def _ipo_curvature(h, beta):
    return np.full(np.shape(h), 2.0)


def _ipo_conjugate(u, beta):
    return 0.25 * u * u + u * (0.5 / beta)


def _hinge_value(h, beta):
    """The hinge (SLiC; TRL's ``loss_type="hinge"``): ℓ(h) = max(0, 1 − βh)."""
    return np.maximum(0.0, 1.0 - beta * h)


def _hinge_derivative(h, beta):
    return np.where(beta * h < 1.0, -beta, 0.0)


def _hinge_curvature(h, beta):
    return np.zeros(np.shape(h))


def _hinge_conjugate(u, beta):
    return u / beta                           # on its domain [-β, 0]


def _hinge_smoothed(h, beta, nu):
    r"""The hinge smoothed by softplus at temperature ν > 0 (the matrix-free solver's path ν → 0):

    .. math::

        \ell_\nu(h) = \nu\log\big(1 + e^{z/\nu}\big),\quad z = 1 - \beta h,\qquad
        \ell_\nu' = -\beta\,\sigma(z/\nu),\qquad \ell_\nu'' = \frac{\beta^2}{\nu}\,\sigma(z/\nu)\,\sigma(-z/\nu),

    with :math:`0 \le \ell_\nu - \ell \le \nu\log 2` (Nesterov 2005's smoothing of max(0, z) by the
    entropy of a two-point distribution). ℓ'_ν lies in (−β, 0), the domain of the hinge's conjugate, so it
    is always a dual point of the hinge's own certificate. Returns ``(ℓ_ν, ℓ'_ν, ℓ''_ν)``, in log space.
    """
    t = (1.0 - beta * h) / nu
    value = nu * np.logaddexp(0.0, t)
    p = expit(t)
    return value, -beta * p, (beta * beta / nu) * p * expit(-t)


def _hinge_bounds(h_max, beta):
    return float(1.0 + beta * h_max), float(beta)


def _dpo_bounds(h_max, beta):
    return float(np.logaddexp(0.0, beta * h_max)), float(beta)


def _ipo_bounds(h_max, beta):
    top = h_max + 0.5 / beta
    return float(top * top), float(2.0 * top)


def _cvxpy_dpo(cp, h, beta):
    return cp.logistic(-beta * h)             # log(1 + exp(-βh)) = −log σ(βh)


def _cvxpy_ipo(cp, h, beta):
    return cp.square(h - 0.5 / beta)


def _cvxpy_hinge(cp, h, beta):
    return cp.pos(1.0 - beta * h)


@dataclass(frozen=True)
class Loss:
    """Everything about one per-pair loss :math:`\\ell(h)` (see the module table).

    Attributes
    ----------
    name : str
        Canonical name (``"dpo"``, ``"ipo"``, ``"hinge"``).
    value, derivative, curvature : callable ``(h, beta) -> ndarray``
        :math:`\\ell`, :math:`\\ell'` (a subgradient at the hinge's kink) and :math:`\\ell''`.
    conjugate : callable ``(u, beta) -> ndarray``
        Fenchel conjugate :math:`\\ell^*(u) = \\sup_h\\, uh - \\ell(h)` on ``conjugate_domain``.
    conjugate_domain : (float, float) as multiples of β
        Where :math:`\\ell^*` is finite; derivatives always lie there.
    smooth : bool
        :math:`\\ell'` is Lipschitz (``max_curvature`` finite).
    bounds : callable ``(h_max, beta) -> (B_l, B_dh)``
        Proposition 3's bounds for margins with :math:`|h|\\le h_{\\max}`: the largest loss and
        the largest :math:`|\\ell'|`.
    cvxpy : callable ``(cp, h_expr, beta)``
        The loss as a DCP expression, for :func:`~loglinear_grpo.solve_exact`.
    value_and_derivative : callable, optional
        ``(ℓ(h), ℓ'(h))`` in one sweep over an array, where that is cheaper than two.
    scalar : callable ``(h: float, beta) -> (ℓ, ℓ')``
        The same for one Python float (Algorithm 1 with one pair per step).
    in_place : callable ``(h, beta, z, e, value, deriv) -> (value, deriv)``, optional
        The same for one block of margins, into preallocated buffers (the full-batch kernels).
    smoothed : callable ``(h, beta, nu) -> (ℓ_ν, ℓ'_ν, ℓ''_ν)``, optional
        A non-smooth loss's smooth approximation at temperature ν (the hinge's softplus), with
        ℓ'_ν in the conjugate's domain: the second-order solvers follow ν → 0 and certify the loss
        itself with these dual points.
    """

    name: str
    value: Callable
    derivative: Callable
    curvature: Callable
    conjugate: Callable
    conjugate_domain: tuple
    smooth: bool
    bounds: Callable
    cvxpy: Callable
    value_and_derivative: Callable | None = None
    scalar: Callable | None = None
    in_place: Callable | None = None
    smoothed: Callable | None = None

    def max_curvature(self, beta):
        """:math:`\\sup_h \\ell''(h)` (``inf`` for the hinge)."""
        return {"dpo": beta * beta / 4.0, "ipo": 2.0}.get(self.name, np.inf)

    def block_terms(self, h, beta, z, e, value, deriv):
        """``(ℓ(h), ℓ'(h))`` of one block of margins, into the buffers where the loss has an in-place
        form (DPO), else :meth:`value_and_grad` (z, e: scratch of the block's length)."""
        if self.in_place is not None:
            return self.in_place(h, beta, z, e, value, deriv)
        return self.value_and_grad(h, beta)

    def value_and_grad(self, h, beta):
        """``(ℓ(h), ℓ'(h))`` in one sweep where that is cheaper."""
        if self.value_and_derivative is not None:
            return self.value_and_derivative(h, beta)
        return self.value(h, beta), self.derivative(h, beta)


LOSSES = {
    "dpo": Loss("dpo", _dpo_value, _dpo_derivative, _dpo_curvature, _dpo_conjugate, (-1.0, 0.0), True,
                _dpo_bounds, _cvxpy_dpo, _dpo_value_and_derivative, _dpo_scalar, _dpo_in_place),
    "ipo": Loss("ipo", _ipo_value, _ipo_derivative, _ipo_curvature, _ipo_conjugate, (-np.inf, np.inf), True,
                _ipo_bounds, _cvxpy_ipo, None, _ipo_scalar),
    "hinge": Loss("hinge", _hinge_value, _hinge_derivative, _hinge_curvature, _hinge_conjugate, (-1.0, 0.0),
                  False, _hinge_bounds, _cvxpy_hinge, None, _hinge_scalar, smoothed=_hinge_smoothed),
}

#: TRL's names (``loss_type``) and ours
LOSS_ALIASES = {"sigmoid": "dpo", "dpo": "dpo", "ipo": "ipo", "hinge": "hinge"}


def get_loss(loss):
    """The :class:`Loss` for a name or alias (``"sigmoid"`` is DPO); ``ValueError`` otherwise."""
    if isinstance(loss, Loss):
        return loss
    if not isinstance(loss, str) or loss not in LOSS_ALIASES:
        raise ValueError(f"loss must be one of {sorted(LOSS_ALIASES)}, got {loss!r}")
    return LOSSES[LOSS_ALIASES[loss]]


# ---------------------------------------------------------------------- public, validated forms
def pair_loss(h, loss="dpo", beta=0.1):
    """The loss :math:`\\ell(h)` of each margin in ``h`` (see the module table)."""
    spec = get_loss(loss)
    beta = check_positive_finite("beta", beta)
    return spec.value(np.asarray(h, dtype=np.float64), beta)


def pair_loss_derivative(h, loss="dpo", beta=0.1):
    """:math:`\\ell'(h)` of each margin in ``h`` (a subgradient at the hinge's kink)."""
    spec = get_loss(loss)
    beta = check_positive_finite("beta", beta)
    return spec.derivative(np.asarray(h, dtype=np.float64), beta)
