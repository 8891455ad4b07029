"""Algorithm 1's two steps, written once (Ramesh et al. 2024, Algorithm 1, lines 7–9).

Every path through the first-order solver — :func:`loglinear_grpo.update` for a user's own loop,
and the in-place loops :func:`solve` runs between the iterations it logs — calls these functions,
so a change to a step is made here and nowhere else:

* :func:`mixing_weights` — the group weights of the θ step, :math:`\\lambda = (1-\\chi)/K + \\chi\\alpha`
  (Appendix B.4; χ = 1 gives λ = α), also used by the Newton solver, the hinge program and the
  certificate;
* :func:`mirror_ascent` — lines 7–8: :math:`\\alpha_g \\leftarrow \\alpha_g\\exp(\\eta_\\alpha\\chi\\hat L_g)`,
  renormalised, in log space (a group whose weight underflows to 0 keeps a finite log α and can
  recover);
* :func:`projected_step` — line 9: :math:`\\theta \\leftarrow P_\\Theta(\\theta - \\eta_\\theta\\hat\\nabla)`.

The steps work in place on the caller's buffers (the fast loops own theirs; ``update`` copies the
state first), and refuse a step that overflows with an error naming the step size. Their cost per
call is measured by ``python benchmarks/speed.py`` (item 1, "step calls").
"""
from __future__ import annotations

import math

import numpy as np

from .constraints import L2Ball


def mixing_weights(alpha, chi, k=None):
    """:math:`\\lambda = (1-\\chi)/K + \\chi\\alpha` (``alpha`` may be one group's entry, then give ``k``;
    or a cvxpy expression); χ = 1 returns ``alpha`` itself."""
    if chi == 1.0:
        return alpha
    return (1.0 - chi) / (alpha.size if k is None else k) + chi * alpha


def log_normalize(log_w):
    r"""``(log α, α)`` with :math:`\alpha = w/\sum w`, computed from ``log w`` without overflow (a new
    array; :func:`normalize_in_place` is the same arithmetic in place).

    Shifting by the max keeps every weight representable: a group whose log-weight trails by
    more than ~745 gets α = 0.0 in floating point but keeps a finite log α, so it can recover.
    """
    log_alpha = np.array(log_w, dtype=np.float64)
    return log_alpha, normalize_in_place(log_alpha)


def normalize_in_place(log_alpha):
    """Shift ``log_alpha`` so that logsumexp = 0 (first by its max: top + log(total) would lose
    log(total) to rounding); returns α = exp(log α)."""
    log_alpha -= np.maximum.reduce(log_alpha)        # = .max() and .sum(), without their Python wrappers
    e = np.exp(log_alpha)
    total = np.add.reduce(e)
    log_alpha -= np.log(total)
    return e / total


_ZEROS = {}


def mirror_ascent(log_alpha, step, losses, step_size, t, group=None):
    """Algorithm 1, lines 7–8, in place on ``log_alpha``: log α ← log α + step·L̂, renormalised.

    Parameters
    ----------
    log_alpha : ndarray (K,)
        Normalised log-weights; updated in place.
    step : float
        :math:`\\eta_\\alpha\\chi` at this iteration.
    losses : ndarray (K,) or float
        The group-loss estimate :math:`\\hat L` (for ``group`` given: that group's entry alone, the
        others being 0 — one pair per step).
    step_size : StepSize
        The α step size (its ``describe()`` names it in the overflow error).
    t : int
        The iteration (1-based), for the error.
    group : int, optional

    Returns
    -------
    ndarray (K,)
        α.
    """
    if group is None:
        log_alpha += step * losses
        zeros = _ZEROS.get(log_alpha.size)
        if zeros is None:
            zeros = _ZEROS[log_alpha.size] = np.zeros(log_alpha.size)
        # every entry finite ⇔ log α · 0 = 0 (inf·0 and NaN·0 are NaN; no overflow, no temporary)
        finite = math.isfinite(log_alpha @ zeros)
    else:
        log_alpha[group] += step * losses
        finite = math.isfinite(log_alpha[group])
    if not finite:
        raise ValueError(f"alpha_step_size ({step_size.describe()}) times the group losses overflows at step {t}: use a "
                         "smaller alpha_step_size")
    return normalize_in_place(log_alpha)


def projected_step(theta, grad, eta, theta_set, step_size, t):
    """Algorithm 1, line 9: θ ← P_Θ(θ − η ∇̂), with ``grad`` = ∇̂ and ``eta`` = η_θ at this iteration.
    Both buffers are the caller's: ``grad`` is scaled in place, θ is updated in place where Θ's
    projection allows, and returned.

    A ball centred at 0 is projected in place with :meth:`L2Ball.project`'s arithmetic; any other Θ
    through its ``project``. A step that overflows is refused, naming ``step_size.describe()``."""
    grad *= eta
    theta -= grad
    square = float(theta @ theta)            # one dot product: finite iff every entry is (but for overflow)
    if type(theta_set) is L2Ball and theta_set.center is None and 1e-280 < square < 1e280:
        norm = math.sqrt(square)
        if norm > theta_set.radius:
            theta /= norm
            theta *= theta_set.radius
        return theta
    if math.isfinite(square) or np.all(np.isfinite(theta)):
        try:
            theta = theta_set.project(theta)
        except ValueError:              # finite entries whose norm overflows: the same overflow
            theta = None
        if theta is not None and (math.isfinite(square) or np.all(np.isfinite(theta))):
            return theta
    raise ValueError(f"step_size ({step_size.describe()}) times the gradient overflows at step {t}: use a smaller step_size "
                     "(or rescale the features)")
