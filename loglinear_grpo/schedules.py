"""Step-size schedules of the first-order estimators, and Proposition 3's constants and steps.

A schedule is a callable t ↦ η_t (as an optax ``Schedule``): :class:`StepSize` (constant,
c/√t, or any user function); ``"theory"`` resolves to the steps of the analysis behind
Proposition 3 (:func:`theory_step_sizes`, from :func:`theory_constants`), ``"auto"`` to a
scale-free constant (see :func:`~loglinear_grpo.make_config`).
"""
from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ._validation import check_positive_finite
from .losses import get_loss
from .objective import margins


@dataclass(frozen=True, eq=False)
class StepSize:
    """A step-size schedule t ↦ η_t (callable, as an optax ``Schedule``): ``scale`` (``kind="constant"``),
    ``scale/√t`` (``kind="1/sqrt(t)"``) or any user function of the 1-based iteration t
    (``kind="schedule"``; ``scale`` is then η₁). A user schedule is identified in checkpoints by its
    qualified name only: give a resumed run the same function."""

    kind: str
    scale: float
    schedule: Callable | None = None

    def at(self, t):
        if self.kind == "constant":
            return self.scale
        if self.kind == "schedule":
            return float(self.schedule(t))
        return self.scale / np.sqrt(t)

    __call__ = at

    def describe(self):
        if self.kind == "schedule":
            return f"schedule {getattr(self.schedule, '__qualname__', repr(self.schedule))}"
        return f"{self.scale!r}" if self.kind == "constant" else f"{self.scale!r}/sqrt(t)"


_DECAY = re.compile(r"^\s*([0-9.eE+-]*)\s*/\s*sqrt\(t\)\s*$")


def theory_constants(data, loss, beta, theta_set, estimator="stochastic", shift=None):
    """Constants of Proposition 3's bound for this data set and Θ.

    With Θ ⊆ {‖θ − c‖ ≤ ρ} (the set's bounding ball):

    * :math:`h_{g} = \\max_{i\\in D_g} |s_i^\\top c - r_i| + \\rho\\|s_i\\|` bounds group g's margins on
      Θ; :math:`B_{l,g}` = the loss at :math:`|h| = h_g`, :math:`B_{\\nabla,g} = \\sup|\\ell'|\\max_{i\\in D_g}\\|s_i\\|`;
    * the gradient estimates' second moments (Nemirovski et al. 2009 need only these, not sup
      bounds). For Algorithm 1's estimator (g ~ N_g/N, then a pair of D_g, weights N/N_g):

      .. math::

          E\\|\\hat\\nabla_\\theta\\|^2 = \\sum_g \\frac{N}{N_g}\\lambda_g^2\\,E_{i\\in D_g}\\|\\nabla\\ell_i\\|^2
          \\le \\max_g\\frac{N}{N_g}B_{\\nabla,g}^2 =: M_\\theta^2, \\qquad
          E\\|\\hat L\\|_\\infty^2 = \\sum_g\\frac{N}{N_g}E_{i\\in D_g}\\ell_i^2 \\le \\sum_g\\frac{N}{N_g}B_{l,g}^2 =: M_\\alpha^2

      (λ on the simplex, so :math:`\\sum_g a_g\\lambda_g^2 \\le \\max_g a_g` for any a ≥ 0; averaging a batch can
      only lower a second moment). For full batches :math:`M_\\theta = \\max_g B_{\\nabla,g}` and
      :math:`M_\\alpha = \\max_g B_{l,g}`.

    With a group adjustment (``shift`` = c ≥ 0, :func:`~loglinear_grpo.objective.group_adjustment`) the
    loss of a pair of group g is :math:`\\ell_i + c_g`, so :math:`B_{l,g}` grows by :math:`c_g`; the
    gradients, and :math:`M_\\theta`, are unchanged.
    """
    center, rho = theta_set.bounding_ball(data.dim)
    if not np.isfinite(rho):
        raise ValueError("step_size='theory' needs a bounded Θ: give radius= (or a bounded constraint)")
    spec = get_loss(loss)
    norms = data.row_norms()
    center_margins = (-data.ref_margin if center is None or not np.any(center)
                      else margins(np.asarray(center, dtype=np.float64), data))
    k = data.n_groups
    h_group = data.membership.group_max(np.abs(center_margins) + rho * norms)
    norm_group = data.membership.group_max(norms)
    bounds = np.array([spec.bounds(hg, beta) for hg in h_group])
    b_loss, b_grad = bounds[:, 0], bounds[:, 1] * norm_group
    if shift is not None:
        b_loss = b_loss + shift
    ratio = data.group_sizes.sum() / data.group_sizes          # T/N_g, T = Σ_h N_h (= N for labels)
    if estimator == "stochastic":
        m_theta = float(np.sqrt(np.max(ratio * b_grad ** 2)))
        m_alpha = float(np.sqrt(np.sum(ratio * b_loss ** 2)))
    else:
        m_theta, m_alpha = float(b_grad.max()), float(b_loss.max())
    return {"D": 2.0 * rho, "rho": float(rho), "h_max": float(h_group.max()), "B_l": float(b_loss.max()),
            "B_grad": float(b_grad.max()), "M_theta": m_theta, "M_alpha": m_alpha, "K": k,
            "estimator": estimator}


def theory_step_sizes(constants, steps):
    """Step sizes of the mirror-descent analysis behind Proposition 3, for T = ``steps``.

    *Stochastic* (Algorithm 1; Nemirovski, Juditsky, Lan & Shapiro 2009, §3.1, constant steps):
    in the joint geometry of θ (Euclidean, ω-diameter ρ/√2 on a ball of radius ρ) and α (entropy,
    ω-diameter √log K), with :math:`M_*^2 = \\rho^2M_\\theta^2 + 2\\log K\\,M_\\alpha^2`
    and :math:`\\gamma = 2/(M_*\\sqrt{5T})`,

    .. math::

        \\eta_\\theta = \\gamma\\rho^2, \\qquad \\eta_\\alpha = 2\\gamma\\log K, \\qquad
        E[\\mathrm{gap}(\\bar\\theta_T, \\bar\\alpha_T)] \\le 2M_*\\sqrt{5/T}.

    *Full batch* (deterministic; the regret bounds of the two players): with D = 2ρ,

    .. math::

        \\eta_\\theta = \\frac{D}{M_\\theta\\sqrt T}, \\qquad
        \\eta_\\alpha = \\frac{\\sqrt{2\\log K}}{M_\\alpha\\sqrt T}, \\qquad
        \\mathrm{gap} \\le \\frac{D M_\\theta + M_\\alpha\\sqrt{2\\log K}}{\\sqrt T}.

    Returns ``(eta_theta, eta_alpha, bound)``.
    """
    c = constants
    root_t = np.sqrt(steps)
    log_k = np.log(c["K"])
    if c.get("estimator", "stochastic") == "stochastic":
        m_star = np.sqrt(c["rho"] ** 2 * c["M_theta"] ** 2 + 2.0 * log_k * c["M_alpha"] ** 2)
        if m_star == 0:
            return 1.0, 0.0, 0.0
        gamma = 2.0 / (m_star * np.sqrt(5.0 * steps))
        return float(gamma * c["rho"] ** 2), float(2.0 * gamma * log_k), float(2.0 * m_star * np.sqrt(5.0 / steps))
    eta_theta = c["D"] / (c["M_theta"] * root_t) if c["M_theta"] > 0 else 1.0
    eta_alpha = np.sqrt(2.0 * log_k) / (c["M_alpha"] * root_t) if c["M_alpha"] > 0 else 0.0
    bound = (c["D"] * c["M_theta"] + c["M_alpha"] * np.sqrt(2.0 * log_k)) / root_t
    return float(eta_theta), float(eta_alpha), float(bound)


def _largest_group_curvature(data, iters=30, seed=0):
    """max_g λ_max(S_gᵀS_g/N_g) by power iteration on each group (used for a safe 1/L step); the
    vectors are scaled by S's largest entry, so that no product over- or underflows whatever the
    scale of the features."""
    rng = np.random.default_rng(seed)
    scale = _max_abs(data)
    if scale == 0.0:
        return 0.0
    best = 0.0
    for g in range(data.n_groups):
        rows = data.membership.members(g)
        sub = data.storage.subset(rows)
        product, adjoint = sub.matvec, sub.rmatvec
        v = rng.standard_normal(data.dim)
        v /= np.linalg.norm(v)
        lam = 0.0
        for _ in range(iters):
            w = adjoint(product(v / scale) / scale) / len(rows)
            lam = float(np.linalg.norm(w))
            if lam == 0.0:
                break
            v = w / lam
        best = max(best, lam)
    return best * scale * scale


def _max_abs(data):
    """The largest |entry| of S (for an implicit S, the largest row norm: an upper bound)."""
    return data.storage.max_abs()


def _resolve_step(name, value, *, theory_value, auto_value=None):
    if isinstance(value, StepSize):
        return value
    if callable(value):
        first = value(1)
        if isinstance(first, bool) or not isinstance(first, numbers.Real) or not np.isfinite(first) or first < 0:
            raise ValueError(f"{name}: a schedule must map the iteration t (from 1) to a non-negative finite "
                             f"number, got {first!r} at t = 1")
        return StepSize("schedule", float(first), schedule=value)
    if isinstance(value, str):
        if value == "theory":
            return StepSize("constant", theory_value())
        if value == "auto" and auto_value is not None:
            return StepSize("constant", auto_value())
        match = _DECAY.match(value)
        if match:
            try:
                scale = float(match.group(1)) if match.group(1) else 1.0
            except ValueError:
                scale = None
            if scale is not None:
                return StepSize("1/sqrt(t)", check_positive_finite(name, scale))
        raise ValueError(f"{name} must be a number, 'theory', 'auto' or 'c/sqrt(t)', got {value!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative finite number, 'theory', 'auto' or 'c/sqrt(t)', "
                         f"got {value!r}")
    return StepSize("constant", float(value))
