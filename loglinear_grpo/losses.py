"""Per-pair preference losses as functions of the margin ``h`` (TRL names and β semantics).

=========  ===========================================  ==============================
name       loss :math:`\\ell(h)`                         derivative :math:`\\ell'(h)`
=========  ===========================================  ==============================
``dpo``    :math:`-\\log\\sigma(\\beta h)`  (Eq. 5)        :math:`-\\beta\\,\\sigma(-\\beta h)`
``ipo``    :math:`(h - 1/(2\\beta))^2`  (§4.1)           :math:`2(h - 1/(2\\beta))`
``hinge``  :math:`\\max(0, 1 - \\beta h)`                :math:`-\\beta\\,[\\beta h < 1]`
=========  ===========================================  ==============================

``"sigmoid"`` is TRL's name for ``"dpo"``. All three are convex in ``h`` and hence, with the
log-linear margin :math:`h = s^\\top\\theta - r`, convex in θ (the setting of Proposition 3).
Values are computed in log space so that ``|h|`` up to 1e6 is exact to rounding.
"""
from __future__ import annotations

import numpy as np
from scipy.special import expit, log_expit

from ._validation import check_loss, check_positive_finite


def loss_value(h, loss, beta):
    """Per-pair loss :math:`\\ell(h)` (table above); ``loss`` already canonical."""
    if loss == "dpo":
        return -log_expit(beta * h)
    if loss == "ipo":
        return np.square(h - 0.5 / beta)
    return np.maximum(0.0, 1.0 - beta * h)


def loss_derivative(h, loss, beta):
    """:math:`d\\ell/dh` (a subgradient for the hinge at its kink)."""
    if loss == "dpo":
        return -beta * expit(-beta * h)
    if loss == "ipo":
        return 2.0 * (h - 0.5 / beta)
    return np.where(beta * h < 1.0, -beta, 0.0)


def loss_and_derivative(h, loss, beta):
    r"""``(ℓ(h), ℓ'(h))`` in one sweep; for DPO both come from one :math:`e^{-|\beta h|}`:

    :math:`-\log\sigma(z) = \max(-z, 0) + \log(1 + e^{-|z|})` and
    :math:`\sigma(-z) = e^{-|z|}/(1+e^{-|z|})` for z > 0, :math:`1/(1+e^{-|z|})` otherwise,
    exact to rounding for any finite z (no overflow, no cancellation).
    """
    if loss == "dpo" and h.size <= 4096:      # few elements: fewer ufunc calls win
        return -log_expit(beta * h), -beta * expit(-beta * h)
    if loss == "dpo":
        z = beta * h
        e = np.exp(-np.abs(z))
        value = np.maximum(-z, 0.0) + np.log1p(e)
        deriv = np.where(z > 0, e, 1.0)
        deriv *= -beta / (1.0 + e)
        return value, deriv
    return loss_value(h, loss, beta), loss_derivative(h, loss, beta)


def pair_loss(h, loss="dpo", beta=1.0):
    """Validated public form of :func:`loss_value`: the loss of each margin in ``h``."""
    loss = check_loss(loss)
    beta = check_positive_finite("beta", beta)
    return loss_value(np.asarray(h, dtype=np.float64), loss, beta)


def pair_loss_derivative(h, loss="dpo", beta=1.0):
    """Validated public form of :func:`loss_derivative`."""
    loss = check_loss(loss)
    beta = check_positive_finite("beta", beta)
    return loss_derivative(np.asarray(h, dtype=np.float64), loss, beta)


def loss_bounds(h_max, loss, beta):
    """Bounds of Proposition 3 for margins with ``|h| <= h_max``.

    Returns ``(B_l, B_dh)``: the largest loss value and the largest ``|dℓ/dh|``. With
    :math:`\\nabla_\\theta\\ell = \\ell'(h)\\,s`, the gradient bound is
    :math:`B_\\nabla = B_{dh}\\max_i\\|s_i\\|`.
    """
    if loss == "dpo":
        return float(np.logaddexp(0.0, beta * h_max)), float(beta)
    if loss == "ipo":
        top = h_max + 0.5 / beta
        return float(top * top), float(2.0 * top)
    return float(1.0 + beta * h_max), float(beta)


def smoothness(loss, beta):
    """Largest curvature :math:`\\sup_h \\ell''(h)` (``inf`` for the non-smooth hinge)."""
    if loss == "dpo":
        return beta * beta / 4.0
    if loss == "ipo":
        return 2.0
    return np.inf
