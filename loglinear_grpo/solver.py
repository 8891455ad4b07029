"""Mirror descent for group robust preference optimisation (Algorithm 1) and its variants.

The algorithm is written as pure functions over explicit state, in the style of optax::

    config = make_config(data, loss="dpo", estimator="stochastic", steps=T, radius=1.0)
    state = init(data, config)
    for t in range(T):
        state, info = update(state, data, config, sample_batch(config, t))
    theta_bar = averaged_theta(state)

and :func:`solve` is a thin loop over that with logging, checkpoints and a progress bar.

Every method and estimator is one code path. Writing λ for the weights the θ step gives the
groups, one iteration is

1. α step (mirror ascent, in log space): :math:`\\log\\alpha_g \\mathrel{+}= \\eta_\\alpha\\,\\chi\\,\\hat L_g`,
   then renormalise with log-sum-exp. ``group_robust`` only; the other methods keep α fixed
   (``importance_sampling``: :math:`\\alpha_g = 1/K`; ``vanilla``: :math:`\\alpha_g = N_g/N`).
2. :math:`\\lambda_g = (1-\\chi)/K + \\chi\\,\\alpha_g` (Appendix B.4 trade-off; χ = 1 is GRPO).
3. θ step: :math:`\\theta \\leftarrow P_\\Theta(\\theta - \\eta_\\theta \\hat\\nabla)` with
   :math:`\\hat\\nabla` an estimate of :math:`\\sum_g\\lambda_g\\nabla L_g(\\theta)`, or for
   ``closed_form`` (IPO) the exact minimiser of :math:`\\sum_g \\lambda_g L_g` over Θ.

Estimators of :math:`(\\hat L, \\hat\\nabla)` at :math:`\\theta^{(t-1)}`:

``"stochastic"`` — Algorithm 1 exactly: :math:`g\\sim\\mathrm{Cat}(N_1/N,\\dots,N_K/N)`, a pair
    of :math:`D_g` uniformly; :math:`\\hat L = (N/N_g)\\,\\ell\\,e_g` and
    :math:`\\hat\\nabla = (N/N_g)\\,\\lambda_g\\,\\nabla\\ell`, both unbiased. ``batch_size=B``
    averages B such draws (i.i.d.).
``"full"`` — :math:`\\hat L = L(\\theta)` and :math:`\\hat\\nabla = \\sum_g\\lambda_g\\nabla L_g(\\theta)`.
``"closed_form"`` — IPO only: the α step above, then the weighted least squares of §4.1.

The returned ``theta`` is the averaged iterate :math:`\\bar\\theta_T=\\frac1T\\sum_{t=1}^T\\theta^{(t)}`
that Proposition 3 bounds.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd

from ._io import atomic_write
from ._validation import (ESTIMATORS, METHODS, check_choice, check_loss, check_positive_finite,
                          check_positive_int, check_unit_interval, check_vector)
from .constraints import make_constraint
from .data import CHUNK_ROWS
from .exact import _duality_gap, group_normal_equations, weighted_least_squares
from .losses import loss_and_derivative, loss_bounds, smoothness
from .objective import (FUSED_MAX_GROUPS, _check_data, _group_losses, group_metrics,
                        losses_and_group_gradients, margins)

#: steps drawn per call of the counter-based sampler (one Generator per block)
SAMPLE_BLOCK = 1024


# ============================================================================ state & config
class SolverState(NamedTuple):
    """Everything that changes during a run (a resumable checkpoint is exactly this).

    The random state is counter-based: the pairs of step ``t`` are a pure function of
    ``(seed, t)`` (see :func:`sample_batch`), so ``step`` is the RNG state.
    """

    theta: np.ndarray       # θ^(t)
    log_alpha: np.ndarray   # log α^(t), normalised (logsumexp = 0)
    theta_sum: np.ndarray   # Σ_{s=1..t} θ^(s)
    alpha_sum: np.ndarray   # Σ_{s=1..t} α^(s)
    step: int               # t


@dataclass(frozen=True, eq=False)
class StepSize:
    """η_t = ``scale`` (``kind="constant"``) or ``scale/√t`` (``kind="1/sqrt(t)"``)."""

    kind: str
    scale: float

    def at(self, t):
        return self.scale if self.kind == "constant" else self.scale / np.sqrt(t)

    def describe(self):
        return f"{self.scale:.6g}" if self.kind == "constant" else f"{self.scale:.6g}/sqrt(t)"


@dataclass(frozen=True, eq=False)
class SolverConfig:
    """Static settings of a run plus arrays precomputed from the data (built by :func:`make_config`)."""

    loss: str
    beta: float
    method: str
    estimator: str
    steps: int
    chi: float
    seed: int
    batch_size: int
    theta_step: StepSize
    alpha_step: StepSize
    theta_set: object
    theta0: np.ndarray
    alpha0: np.ndarray
    # precomputed from the data
    n_samples: int
    group_sizes: np.ndarray
    pair_inv_size: np.ndarray = field(repr=False)     # 1/N_{g_i}, shape (N,)
    group_cum: np.ndarray = field(repr=False)         # cumulative N_g/N (sampler)
    group_offsets: np.ndarray = field(repr=False)     # start of each group in `members`
    members: np.ndarray = field(repr=False)           # pair indices sorted by group
    fused: bool = False
    streamed: bool = False
    normal_equations: object = field(default=None, repr=False)   # closed form: (H_g, q_g) or RowSpaceForm
    theory: dict = field(default_factory=dict)

    @property
    def adaptive_alpha(self):
        return self.method == "group_robust"

    def describe(self):
        return {"loss": self.loss, "beta": self.beta, "method": self.method,
                "estimator": self.estimator, "steps": self.steps, "chi": self.chi,
                "seed": self.seed, "batch_size": self.batch_size,
                "step_size": self.theta_step.describe(), "alpha_step_size": self.alpha_step.describe(),
                "constraint": repr(self.theta_set)}


# ============================================================================ step sizes
_DECAY = re.compile(r"^\s*([0-9.eE+-]*)\s*/\s*sqrt\(t\)\s*$")


def theory_constants(data, loss, beta, theta_set, estimator="stochastic"):
    """Constants of Proposition 3 for this data set and Θ.

    With Θ ⊆ {‖θ − c‖ ≤ ρ} (the set's bounding ball) and :math:`\\|s_i\\|\\le S_{\\max}`:

    * :math:`D = 2\\rho` bounds the diameter of Θ (:math:`2B_\\Theta` in the paper's notation);
    * :math:`h_{\\max} = \\max_i |s_i^\\top c - r_i| + \\rho\\|s_i\\|` bounds every margin on Θ;
    * :math:`B_l` = the loss at :math:`|h| = h_{\\max}` and :math:`B_\\nabla = \\sup|\\ell'|\\cdot S_{\\max}`;
    * the gradient estimates are bounded by :math:`G_\\theta = c_N B_\\nabla` (θ, Euclidean norm)
      and :math:`G_\\alpha = c_N B_l` (α, max-norm), with :math:`c_N = N/\\min_g N_g` for the
      stochastic estimator of Algorithm 1 and :math:`c_N = 1` for full batches.
    """
    center, rho = theta_set.bounding_ball(data.dim)
    if not np.isfinite(rho):
        raise ValueError("step_size='theory' needs a bounded Θ: give radius= (or a bounded constraint)")
    norms = data.row_norms()
    center_margins = (-data.ref_margin if center is None or not np.any(center)
                      else margins(np.asarray(center, dtype=np.float64), data))
    h_max = float(np.max(np.abs(center_margins) + rho * norms))
    b_l, b_dh = loss_bounds(h_max, loss, beta)
    b_grad = b_dh * float(norms.max())
    c_n = data.n_samples / data.group_sizes.min() if estimator == "stochastic" else 1.0
    return {"D": 2.0 * rho, "h_max": h_max, "B_l": b_l, "B_grad": b_grad,
            "G_theta": c_n * b_grad, "G_alpha": c_n * b_l, "K": data.n_groups}


def theory_step_sizes(constants, steps):
    """Step sizes that minimise the online mirror-descent regret bounds (Nemirovski et al. 2009):

    .. math::

        \\eta_\\theta = \\frac{D}{G_\\theta\\sqrt T}, \\qquad
        \\eta_\\alpha = \\frac{\\sqrt{2\\log K}}{G_\\alpha\\sqrt T},

    for which the expected duality gap of the averaged iterates is at most

    .. math::

        \\frac{D\\,G_\\theta + G_\\alpha\\sqrt{2\\log K}}{\\sqrt T} = O(T^{-1/2})
        \\quad\\text{(Proposition 3)}.

    Returns ``(eta_theta, eta_alpha, bound)``.
    """
    c = constants
    root_t = np.sqrt(steps)
    log_k = np.log(c["K"])
    eta_theta = c["D"] / (c["G_theta"] * root_t) if c["G_theta"] > 0 else 1.0
    eta_alpha = np.sqrt(2.0 * log_k) / (c["G_alpha"] * root_t) if c["G_alpha"] > 0 else 0.0
    bound = (c["D"] * c["G_theta"] + c["G_alpha"] * np.sqrt(2.0 * log_k)) / root_t
    return float(eta_theta), float(eta_alpha), float(bound)


def _largest_group_curvature(data, iters=30, seed=0):
    """max_g λ_max(S_gᵀS_g/N_g) by power iteration on each group (used for a safe 1/L step)."""
    rng = np.random.default_rng(seed)
    best = 0.0
    for g in range(data.n_groups):
        rows = np.flatnonzero(data.groups == g)
        sub = data.diff[rows]
        v = rng.standard_normal(data.dim)
        v /= np.linalg.norm(v)
        lam = 0.0
        for _ in range(iters):
            w = np.asarray(sub.T @ np.asarray(sub @ v).ravel()).ravel() / len(rows)
            lam = float(np.linalg.norm(w))
            if lam == 0.0:
                break
            v = w / lam
        best = max(best, lam)
    return best


def _resolve_step(name, value, *, theory_value, default):
    if value is None:
        value = default
    if isinstance(value, StepSize):
        return value
    if isinstance(value, str):
        if value == "theory":
            return StepSize("constant", theory_value())
        match = _DECAY.match(value)
        if match:
            scale = float(match.group(1)) if match.group(1) else 1.0
            return StepSize("1/sqrt(t)", check_positive_finite(name, scale))
        raise ValueError(f"{name} must be a number, 'theory' or 'c/sqrt(t)', got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative finite number, 'theory' or 'c/sqrt(t)', got {value!r}")
    return StepSize("constant", float(value))


def make_config(data, loss="dpo", beta=1.0, method="group_robust", estimator="full", steps=1000,
                radius=None, center=None, constraint=None, chi=1.0, seed=0, batch_size=1,
                step_size=None, alpha_step_size=None, theta0=None):
    """Validate ``solve``'s settings and precompute what every iteration needs.

    Default step sizes (``None``):

    * θ, ``full`` with DPO/IPO: :math:`1/L`, the inverse of the largest curvature of any group
      loss, :math:`L=\\sup\\ell''\\cdot\\max_g\\lambda_{\\max}(S_g^\\top S_g/N_g)` (gradient
      descent on any convex combination of the :math:`L_g` is then monotone);
    * θ otherwise, and α always: ``"theory"`` (:func:`theory_step_sizes`) when Θ is bounded;
      for an unbounded Θ, α defaults to ``1/sqrt(t)`` and the stochastic θ step must be given.
    """
    _check_data(data)
    loss = check_loss(loss)
    beta = check_positive_finite("beta", beta)
    method = check_choice("method", method, METHODS)
    estimator = check_choice("estimator", estimator, ESTIMATORS)
    steps = check_positive_int("steps", steps)
    chi = check_unit_interval("chi", chi)
    batch_size = check_positive_int("batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if estimator == "closed_form" and loss != "ipo":
        raise ValueError("estimator='closed_form' is the GR-IPO weighted least squares: it needs loss='ipo'")
    if chi != 1.0 and method != "group_robust":
        raise ValueError("chi trades worst-case for average loss in method='group_robust' only")
    theta_set = make_constraint(radius, center, constraint)
    if getattr(theta_set, "center", None) is not None and np.shape(theta_set.center) not in ((data.dim,), ()):
        raise ValueError(f"center must have shape ({data.dim},)")

    k = data.n_groups
    sizes = data.group_sizes
    if method == "vanilla":
        alpha0 = sizes / sizes.sum()
    else:
        alpha0 = np.full(k, 1.0 / k)

    bounded = np.isfinite(theta_set.bounding_ball(data.dim)[1])
    cache = {}

    def theory(which):
        if "steps" not in cache:
            const = theory_constants(data, loss, beta, theta_set, estimator)
            eta_t, eta_a, bound = theory_step_sizes(const, steps)
            cache.update(const, eta_theta=eta_t, eta_alpha=eta_a, gap_bound=bound, steps=steps)
        return cache[which]

    if step_size is None:
        if estimator in ("full", "closed_form") and loss != "hinge":
            step_size = 1.0 / (smoothness(loss, beta) * max(_largest_group_curvature(data), 1e-300))
        elif bounded:
            step_size = "theory"
        else:
            raise ValueError("step_size: give a number or 'c/sqrt(t)' (or a radius, for the "
                             "'theory' default) for this loss/estimator on an unbounded Θ")
    if alpha_step_size is None:
        alpha_step_size = "theory" if bounded else "1/sqrt(t)"
    theta_step = _resolve_step("step_size", step_size, theory_value=lambda: theory("eta_theta"),
                               default="theory")
    alpha_step = _resolve_step("alpha_step_size", alpha_step_size,
                               theory_value=lambda: theory("eta_alpha"), default="theory")

    if theta0 is None:
        theta0 = getattr(theta_set, "center", None)
        theta0 = np.zeros(data.dim) if theta0 is None else np.broadcast_to(theta0, (data.dim,)).copy()
    theta0 = theta_set.project(check_vector("theta0", theta0, data.dim))

    members = np.argsort(data.groups, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return SolverConfig(
        loss=loss, beta=beta, method=method, estimator=estimator, steps=steps, chi=chi, seed=int(seed),
        batch_size=batch_size, theta_step=theta_step, alpha_step=alpha_step, theta_set=theta_set,
        theta0=theta0, alpha0=alpha0, n_samples=data.n_samples, group_sizes=sizes.astype(np.float64),
        pair_inv_size=(1.0 / sizes)[data.groups], group_cum=np.cumsum(sizes) / sizes.sum(),
        group_offsets=offsets, members=members,
        fused=data.streamed and k <= FUSED_MAX_GROUPS, streamed=data.streamed, theory=dict(cache),
        normal_equations=(group_normal_equations(data, 0.5 / beta, theta_set)
                          if estimator == "closed_form" else None))


# ============================================================================ pure functions
def init(data, config):
    """Initial state: θ⁽⁰⁾ = ``config.theta0`` (projected), α⁽⁰⁾ uniform (or fixed), t = 0."""
    return SolverState(theta=config.theta0.copy(), log_alpha=np.log(config.alpha0),
                       theta_sum=np.zeros_like(config.theta0), alpha_sum=np.zeros_like(config.alpha0),
                       step=0)


def sample_batch(config, step):
    """Pair indices for iteration ``step`` (0-based): a pure function of ``(seed, step)``.

    Draws exactly as Algorithm 1: :math:`g \\sim \\mathrm{Cat}(N_1/N,\\dots,N_K/N)`, then a
    pair of :math:`D_g` uniformly, ``batch_size`` times independently. Draws are made a block
    of ``SAMPLE_BLOCK`` steps at a time from a generator seeded by ``(seed, block)``.
    """
    block, offset = divmod(step, SAMPLE_BLOCK)
    return _sample_block(config, block)[offset]


def _sample_block(config, block):
    cached = getattr(config, "_block_cache", None)
    if cached is not None and cached[0] == block:
        return cached[1]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([config.seed, block])))
    shape = (SAMPLE_BLOCK, config.batch_size)
    groups = np.searchsorted(config.group_cum, rng.random(shape), side="right")
    np.minimum(groups, len(config.group_sizes) - 1, out=groups)   # guards cum[-1] rounding
    within = (rng.random(shape) * config.group_sizes[groups]).astype(np.intp)
    idx = config.members[config.group_offsets[groups] + within]
    object.__setattr__(config, "_block_cache", (block, idx))
    return idx


def log_normalize(log_w):
    r"""``(log α, α)`` with :math:`\alpha = w/\sum w`, computed from ``log w`` without overflow.

    Shifting by the max keeps every weight representable: a group whose log-weight trails by
    more than ~745 gets α = 0.0 in floating point but keeps a finite log α, so it can recover.
    """
    top = log_w.max()
    e = np.exp(log_w - top)
    total = e.sum()
    return log_w - (top + np.log(total)), e / total


def _alpha_step(log_alpha, loss_estimate, config, t):
    """Mirror ascent on the simplex (Algorithm 1, lines 7–8): α_g ← α_g·exp(η_α χ L̂_g), renormalised."""
    if not config.adaptive_alpha:
        return log_alpha, config.alpha0
    return log_normalize(log_alpha + (config.alpha_step.at(t) * config.chi) * loss_estimate)


def _theta_weights(alpha, config):
    """λ = (1−χ)/K + χα, the group weights of the θ step (χ = 1: λ = α)."""
    if config.chi == 1.0:
        return alpha
    return (1.0 - config.chi) / alpha.size + config.chi * alpha


def update(state, data, config, batch=None):
    """One iteration of Algorithm 1 (or its full-batch / closed-form variant).

    Parameters
    ----------
    state : SolverState
    data : PreferenceData
    config : SolverConfig
    batch : ndarray of int, optional
        Pair indices for the stochastic estimator (default: :func:`sample_batch` at this step).

    Returns
    -------
    state : SolverState
        The next state; the input is not modified.
    info : dict
        ``losses``: the group-loss estimate the α step used (exact for full batches).
    """
    t = state.step + 1
    if config.estimator == "stochastic":
        if batch is None:
            batch = sample_batch(config, state.step)
        theta, log_alpha, alpha, losses = _stochastic_step(state, data, config, batch, t)
    elif config.estimator == "full":
        theta, log_alpha, alpha, losses = _full_step(state, data, config, t)
    else:
        losses = _group_losses(state.theta, data, config.loss, config.beta)
        log_alpha, alpha = _alpha_step(state.log_alpha, losses, config, t)
        if not config.adaptive_alpha and state.step > 0:
            theta = state.theta          # fixed weights: the same regression, the same answer
        else:
            theta = weighted_least_squares(data, _theta_weights(alpha, config), 0.5 / config.beta,
                                           config.theta_set, config.normal_equations)
    new = SolverState(theta=theta, log_alpha=log_alpha, theta_sum=state.theta_sum + theta,
                      alpha_sum=state.alpha_sum + alpha, step=t)
    return new, {"losses": losses}


def _full_step(state, data, config, t):
    loss, beta = config.loss, config.beta
    if config.fused:
        losses, grad_sum = losses_and_group_gradients(state.theta, data, loss, beta)
        log_alpha, alpha = _alpha_step(state.log_alpha, losses, config, t)
        grad = (_theta_weights(alpha, config) / config.group_sizes) @ grad_sum
    else:
        h = (margins(state.theta, data) if config.streamed or data.is_sparse
             else data.diff @ state.theta - data.ref_margin)
        values, dl = loss_and_derivative(h, loss, beta)
        losses = np.bincount(data.groups, weights=values,
                             minlength=config.group_sizes.size) / config.group_sizes
        log_alpha, alpha = _alpha_step(state.log_alpha, losses, config, t)
        lam = _theta_weights(alpha, config)
        u = lam[data.groups] * config.pair_inv_size * dl
        grad = _rmatvec(data, u) if config.streamed else np.asarray(data.diff.T @ u).ravel()
    theta = config.theta_set.project(state.theta - config.theta_step.at(t) * grad)
    return theta, log_alpha, alpha, losses


def _rmatvec(data, u):
    out = np.zeros(data.dim)
    for start in range(0, data.n_samples, CHUNK_ROWS):
        out += data.diff[start:start + CHUNK_ROWS].T @ u[start:start + CHUNK_ROWS]
    return out


def _stochastic_step(state, data, config, batch, t):
    loss, beta = config.loss, config.beta
    rows = data.diff[batch]
    if data.is_sparse:
        h = np.asarray(rows @ state.theta).ravel() - data.ref_margin[batch]
    else:
        h = rows @ state.theta - data.ref_margin[batch]
    groups = data.groups[batch]
    scale = config.n_samples * config.pair_inv_size[batch] / batch.size    # N/(N_g B)
    values, dl = loss_and_derivative(h, loss, beta)
    losses = np.bincount(groups, weights=scale * values, minlength=config.group_sizes.size)
    log_alpha, alpha = _alpha_step(state.log_alpha, losses, config, t)
    u = scale * _theta_weights(alpha, config)[groups] * dl
    grad = np.asarray(rows.T @ u).ravel()
    theta = config.theta_set.project(state.theta - config.theta_step.at(t) * grad)
    return theta, log_alpha, alpha, losses


def averaged_theta(state):
    """:math:`\\bar\\theta_t = \\frac1t\\sum_{s=1}^t\\theta^{(s)}` (θ⁽⁰⁾ before the first step)."""
    return state.theta_sum / state.step if state.step else state.theta.copy()


def averaged_alpha(state):
    """:math:`\\bar\\alpha_t = \\frac1t\\sum_{s=1}^t\\alpha^{(s)}`."""
    return state.alpha_sum / state.step if state.step else np.exp(state.log_alpha)


# ============================================================================ checkpoints
def _fingerprint(data, config):
    h = hashlib.sha256()
    h.update(json.dumps(config.describe(), sort_keys=True).encode())
    h.update(np.asarray(config.theta0).tobytes())
    h.update(np.asarray([data.n_samples, data.dim, data.n_groups]).tobytes())
    h.update(data.groups.tobytes())
    h.update(data.ref_margin.tobytes())
    for rows in (slice(0, 64), slice(-64, None)):
        block = data.diff[rows]
        h.update(np.asarray(block.todense() if data.is_sparse else block, dtype=np.float64).tobytes())
    return h.hexdigest()


def save_checkpoint(path, state, history_rows, fingerprint):
    """Write the state atomically (temp file in the same folder, fsync, ``os.replace``)."""
    def write(tmp):
        np.savez(tmp, theta=state.theta, log_alpha=state.log_alpha, theta_sum=state.theta_sum,
                 alpha_sum=state.alpha_sum, step=np.int64(state.step),
                 fingerprint=np.array(fingerprint), history=np.array(json.dumps(history_rows)))

    atomic_write(path, write, prefix=".ckpt-", suffix=".npz")


def load_checkpoint(path, fingerprint):
    """Read a checkpoint; ``ValueError`` if it belongs to other data or settings."""
    with np.load(path, allow_pickle=False) as z:
        if str(z["fingerprint"]) != fingerprint:
            raise ValueError(f"checkpoint {path!r} was written for other data or settings; "
                             "delete it or choose another path")
        state = SolverState(theta=z["theta"].copy(), log_alpha=z["log_alpha"].copy(),
                            theta_sum=z["theta_sum"].copy(), alpha_sum=z["alpha_sum"].copy(),
                            step=int(z["step"]))
        rows = json.loads(str(z["history"]))
    return state, rows


# ============================================================================ solve
@dataclass
class SolveResult:
    """Output of :func:`solve`.

    Attributes
    ----------
    theta : ndarray (d,)
        The averaged iterate :math:`\\bar\\theta_T` (what Proposition 3 bounds).
    theta_last : ndarray (d,)
        :math:`\\theta^{(T)}`.
    alpha : ndarray (K,)
        Final group weights :math:`\\alpha^{(T)}`.
    alpha_avg : ndarray (K,)
        :math:`\\bar\\alpha_T`, the dual average (used by the duality gap).
    history : pandas.DataFrame
        One row per logged step: ``step``, ``worst_loss`` (at θ̄), ``worst_loss_last`` (at
        θ⁽ᵗ⁾), ``loss/<group>`` (at θ̄), ``alpha/<group>`` (α⁽ᵗ⁾) and, when asked, ``gap``
        (duality gap at (θ̄, ᾱ)).
    config : SolverConfig
    state : SolverState
    """

    theta: np.ndarray
    theta_last: np.ndarray
    alpha: np.ndarray
    alpha_avg: np.ndarray
    history: pd.DataFrame
    config: SolverConfig
    state: SolverState

    def metrics(self, data):
        """:func:`~loglinear_grpo.group_metrics` of the averaged iterate on ``data``."""
        return group_metrics(self.theta, data, self.config.loss, self.config.beta, alpha=self.alpha)

    def worst_group_loss(self, data):
        return float(np.max(_group_losses(self.theta, data, self.config.loss, self.config.beta)))


def _history_row(state, data, config, names, with_gap):
    theta_bar = averaged_theta(state)
    losses = _group_losses(theta_bar, data, config.loss, config.beta)
    row = {"step": state.step, "worst_loss": float(losses.max()),
           "worst_loss_last": float(_group_losses(state.theta, data, config.loss, config.beta).max())}
    alpha = np.exp(state.log_alpha)
    row.update({f"loss/{n}": float(v) for n, v in zip(names, losses)})
    row.update({f"alpha/{n}": float(v) for n, v in zip(names, alpha)})
    if with_gap:
        row["gap"] = _duality_gap(theta_bar, averaged_alpha(state), data, config.loss, config.beta,
                                  config.theta_set)
    return row


def solve(data, loss="dpo", beta=1.0, method="group_robust", estimator="full", steps=1000,
          radius=None, center=None, constraint=None, chi=1.0, seed=0, batch_size=1,
          step_size=None, alpha_step_size=None, theta0=None, log_every=None, duality_gap=False,
          checkpoint=None, checkpoint_every=None, progress=False, callback: Callable | None = None):
    """Group robust preference optimisation of a log-linear policy (Eq. (9), Algorithm 1).

    Solves :math:`\\min_{\\theta\\in\\Theta}\\max_{\\alpha\\in\\Delta_K}\\sum_g\\alpha_g L_g(\\theta)`
    (``method="group_robust"``), or its importance-sampling / vanilla counterparts with α
    fixed, by the estimator chosen (see the module docstring).

    Parameters
    ----------
    data : PreferenceData
    loss : {"dpo", "sigmoid", "ipo", "hinge"}, default "dpo"
    beta : float > 0, default 1.0
    method : {"group_robust", "importance_sampling", "vanilla"}
    estimator : {"full", "stochastic", "closed_form"}
    steps : int >= 1
        T, the number of iterations.
    radius, center : float, array_like, optional
        Θ = L2 ball of radius R around ``center`` (default 0).
    constraint : Θ object, optional
        :class:`~loglinear_grpo.Box`, :class:`~loglinear_grpo.ConvexSet`, ... (instead of radius).
    chi : float in [0, 1], default 1
        Worst-case/average trade-off (Appendix B.4): the θ step weighs group g by
        (1−χ)/K + χα_g and the α exponent is scaled by χ.
    seed : int
        Seed of the counter-based sampler (stochastic estimator).
    batch_size : int
        i.i.d. draws per stochastic step.
    step_size, alpha_step_size : float, "theory", "c/sqrt(t)" or None
        η_θ and η_α; see :func:`make_config` for the defaults and :func:`theory_step_sizes`.
    theta0 : array_like, optional
        θ⁽⁰⁾ (default: Θ's centre, else 0).
    log_every : int, optional
        History period (default: T/100, at least 1). Each log costs about one full pass.
    duality_gap : bool
        Also log the duality gap (one best-response solve per log).
    checkpoint : path, optional
        Resume from this file if it exists (it must match data and settings), and write the
        state to it atomically every ``checkpoint_every`` steps and at the end. A resumed run
        is bit-identical to an uninterrupted one.
    progress : bool
        Show a tqdm progress bar.
    callback : callable, optional
        ``callback(state, info)`` after every step.

    Returns
    -------
    SolveResult
    """
    config = make_config(data, loss=loss, beta=beta, method=method, estimator=estimator,
                         steps=steps, radius=radius, center=center, constraint=constraint, chi=chi,
                         seed=seed, batch_size=batch_size, step_size=step_size,
                         alpha_step_size=alpha_step_size, theta0=theta0)
    if log_every is None:
        log_every = max(1, config.steps // 100)
    log_every = check_positive_int("log_every", log_every)
    if checkpoint_every is None:
        checkpoint_every = max(1, config.steps // 10)
    checkpoint_every = check_positive_int("checkpoint_every", checkpoint_every)

    state = init(data, config)
    rows = []
    fingerprint = None
    if checkpoint is not None:
        fingerprint = _fingerprint(data, config)
        if os.path.exists(checkpoint):
            state, rows = load_checkpoint(checkpoint, fingerprint)
    names = data.group_names
    if not rows:
        rows.append(_history_row(state, data, config, names, duality_gap))

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.steps, initial=state.step, desc=f"{config.method}/{config.loss}",
                   unit="it", mininterval=0.5)
    step_fn = update
    try:
        while state.step < config.steps:
            state, info = step_fn(state, data, config)
            t = state.step
            if t % log_every == 0 or t == config.steps:
                rows.append(_history_row(state, data, config, names, duality_gap))
                if bar is not None:
                    bar.update(t - bar.n)
                    bar.set_postfix(worst=f"{rows[-1]['worst_loss']:.4g}", refresh=False)
            if fingerprint is not None and (t % checkpoint_every == 0 or t == config.steps):
                save_checkpoint(checkpoint, state, rows, fingerprint)
            if callback is not None:
                callback(state, info)
    finally:
        if bar is not None:
            bar.close()

    return SolveResult(theta=averaged_theta(state), theta_last=state.theta.copy(),
                       alpha=np.exp(state.log_alpha), alpha_avg=averaged_alpha(state),
                       history=pd.DataFrame(rows), config=config, state=state)
