"""Algorithm 1 as pure functions over explicit state (in the manner of optax): :func:`init` → state,
:func:`update` → (state, info), for the stochastic, full-batch and closed-form estimators; the
counter-based sampler (:func:`sample_batch`); and the in-place loops that :func:`~loglinear_grpo.solve`
runs between the iterations it logs (bit-identical to :func:`update`, tested). The α and θ steps
themselves are :mod:`loglinear_grpo.steps`.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .closed_form import weighted_least_squares
from .kernels import full_pass, make_pass
from .losses import get_loss
from .objective import _group_losses
from .steps import mirror_ascent, mixing_weights, projected_step

#: steps drawn per call of the counter-based sampler (one Generator per block)
SAMPLE_BLOCK = 1024


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


def init(data, config):
    """Initial state: θ⁽⁰⁾ = ``config.theta0`` (projected), α⁽⁰⁾ uniform (or fixed), t = 0."""
    return SolverState(theta=config.theta0.copy(), log_alpha=np.log(config.alpha0),
                       theta_sum=np.zeros_like(config.theta0), alpha_sum=np.zeros_like(config.alpha0),
                       step=0)


def sample_batch(config, step, cache=None):
    """Pair indices for iteration ``step`` (0-based): a pure function of ``(seed, step)``.

    Draws exactly as Algorithm 1: :math:`g \\sim \\mathrm{Cat}(N_1/N,\\dots,N_K/N)`, then a
    pair of :math:`D_g` uniformly, ``batch_size`` times independently. Draws are made a block
    of steps at a time from a generator seeded by ``(seed, block)``; a block holds at most
    ``SAMPLE_BLOCK`` steps and at most ~2²⁰ indices (8 MiB), so memory stays bounded whatever
    ``batch_size``. ``cache`` (a dict, optional) keeps the last block between calls.
    """
    per_block = max(1, min(SAMPLE_BLOCK, (1 << 20) // config.batch_size))
    block, offset = divmod(step, per_block)
    if cache is not None and cache.get("key") == (block, per_block):
        return cache["indices"][offset]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([config.seed, block])))
    shape = (per_block, config.batch_size)
    groups = np.searchsorted(config.group_cum, rng.random(shape), side="right")
    np.minimum(groups, len(config.group_sizes) - 1, out=groups)   # guards cum[-1] rounding
    within = (rng.random(shape) * config.group_sizes[groups]).astype(np.intp)
    idx = config.members[config.group_offsets[groups] + within]
    if cache is not None:
        cache.update(key=(block, per_block), indices=idx)
    return idx[offset]


def _alpha_step(log_alpha, loss_estimate, config, t):
    """Mirror ascent on the simplex (Algorithm 1, lines 7–8): α_g ← α_g·exp(η_α χ L̂_g), renormalised."""
    if not config.adaptive_alpha:
        return log_alpha, config.alpha0
    log_alpha = log_alpha.copy()
    return log_alpha, mirror_ascent(log_alpha, config.alpha_step.at(t) * config.chi, loss_estimate,
                                    config.alpha_step, t)


def _projected_step(theta, grad, config, t):
    """θ ← P_Θ(θ − η_θ ∇̂) on a copy of θ (:func:`~loglinear_grpo.steps.projected_step`)."""
    return projected_step(theta.copy(), np.array(grad, dtype=np.float64), config.theta_step.at(t), config.theta_set,
                          config.theta_step, t)


def _adjusted(losses, config):
    """The group losses the α step ascends: :math:`L_g + c_g` under a group adjustment (Sagawa et al.
    2020; :func:`~loglinear_grpo.objective.group_adjustment`), else :math:`L_g`. Stochastic estimates
    adjust each drawn pair instead, :math:`\\hat L = (N/N_g)(\\ell_i + c_g)e_g`, still unbiased for
    :math:`L + c`."""
    return losses if config.shift is None else losses + config.shift


def _theta_weights(alpha, config):
    """λ = (1−χ)/K + χα, the group weights of the θ step (χ = 1: λ = α)."""
    return mixing_weights(alpha, config.chi)


def update(state, data, config, batch=None, workspace=None):
    """One iteration of Algorithm 1 (or its full-batch / closed-form variant).

    Parameters
    ----------
    state : SolverState
    data : PreferenceData
    config : SolverConfig
    batch : ndarray of int, optional
        Pair indices for the stochastic estimator (default: :func:`sample_batch` at this step).
    workspace : loglinear_grpo.kernels.Workspace, optional
        Scratch buffers of the full-batch pass, reused across calls (they never change the result).

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
        theta, log_alpha, alpha, losses = _full_step(state, data, config, t, workspace)
    elif config.estimator == "closed_form":
        losses = _adjusted(_group_losses(state.theta, data, config.loss, config.beta), config)
        log_alpha, alpha = _alpha_step(state.log_alpha, losses, config, t)
        if not config.adaptive_alpha and state.step > 0:
            theta = state.theta          # fixed weights: the same regression, the same answer
        else:
            theta = weighted_least_squares(data, _theta_weights(alpha, config), 0.5 / config.beta,
                                           config.theta_set, config.normal_equations)
    else:
        raise ValueError(f"update() runs the first-order estimators; estimator={config.estimator!r} "
                         "is solved by solve() directly")
    new = SolverState(theta=theta, log_alpha=log_alpha, theta_sum=state.theta_sum + theta,
                      alpha_sum=state.alpha_sum + alpha, step=t)
    return new, {"losses": losses}


def _full_step(state, data, config, t, workspace=None):
    """Losses and group gradients in one pass over S (:mod:`loglinear_grpo.kernels`), then the α
    step, then the θ step with the gradient :math:`\\sum_g (\\lambda_g/N_g)\\,G_g`."""
    result = full_pass(state.theta, data, config.loss, config.beta, workspace)
    losses = _adjusted(result.loss_sums / config.group_sizes, config)
    log_alpha, alpha = _alpha_step(state.log_alpha, losses, config, t)
    grad = result.gradient(_theta_weights(alpha, config) / config.group_sizes, data)
    theta = _projected_step(state.theta, grad, config, t)
    return theta, log_alpha, alpha, losses


def _single_pair_step(state, data, config, i, t):
    """Algorithm 1 with one pair (batch size 1) on a dense S: the same arithmetic as
    :func:`_stochastic_step` with scalars instead of length-1 arrays (no per-step overhead beyond
    what a bare NumPy loop of the update has)."""
    row = data.diff[i]
    h = float(row @ state.theta) - data.ref_margin[i]
    g = data.groups[i]
    scale = config.n_samples * config.pair_inv_size[i]                  # N/N_g
    value, deriv = config.scalar_loss(h, config.beta)
    if config.shift is not None:
        value = value + config.shift[g]             # the adjusted pair loss ℓ_i + c_g
    if config.adaptive_alpha:
        log_alpha = state.log_alpha.copy()
        alpha = mirror_ascent(log_alpha, config.alpha_step.at(t) * config.chi * scale, value, config.alpha_step, t,
                              group=g)
    else:
        log_alpha, alpha = state.log_alpha, config.alpha0
    weight = mixing_weights(alpha[g], config.chi, alpha.size)
    theta = _projected_step(state.theta, (scale * weight * deriv) * row, config, t)
    losses = np.zeros(alpha.size)
    losses[g] = scale * value
    return theta, log_alpha, alpha, losses


def _loop_buffers(state, config):
    """The in-place loops' own copies of the state: θ, Σθ, log α, Σα, and α."""
    log_alpha = state.log_alpha.copy()
    alpha = np.exp(log_alpha) if config.adaptive_alpha else config.alpha0
    return state.theta.copy(), state.theta_sum.copy(), log_alpha, state.alpha_sum.copy(), alpha


def _full_batch_run(state, data, config, stop, workspace):
    """Iterations ``state.step + 1 .. stop`` of the full-batch estimator in place: the arithmetic of
    :func:`_full_step` in the same order (bit-identical iterates, tested), without building a state per
    iteration. :func:`solve` uses it between the iterations where it logs, certifies or saves."""
    theta, theta_sum, log_alpha, alpha_sum, alpha = _loop_buffers(state, config)
    sizes, chi = config.group_sizes, config.chi
    theta_set, theta_step, alpha_step = config.theta_set, config.theta_step, config.alpha_step
    one_pass = make_pass(data, config.loss, config.beta, workspace)
    for t in range(state.step + 1, stop + 1):
        result = one_pass(theta)
        losses = _adjusted(result.loss_sums / sizes, config)
        if config.adaptive_alpha:
            alpha = mirror_ascent(log_alpha, alpha_step.at(t) * chi, losses, alpha_step, t)
        weights = mixing_weights(alpha, chi)
        grads = result.group_gradients
        grad = (weights / sizes) @ grads if grads is not None else result.gradient(weights / sizes, data)
        theta = projected_step(theta, grad, theta_step.at(t), theta_set, theta_step, t)
        theta_sum += theta
        alpha_sum += alpha
    return SolverState(theta, log_alpha, theta_sum, alpha_sum, stop)


def _single_pair_run(state, data, config, stop, sampler_cache):
    """Steps ``state.step + 1 .. stop`` of Algorithm 1 with one pair per step on a dense S, in place.

    The arithmetic of :func:`_single_pair_step` in the same order — the iterates are bit-identical to
    ``stop − state.step`` calls of :func:`update` (tested) — on buffers owned by this loop, so that a
    step costs what a bare NumPy loop of the update costs. :func:`solve` uses it between the steps
    where it logs, certifies, checkpoints or calls back."""
    diff, ref, groups = data.diff, data.ref_margin, data.groups
    over = config.n_samples * config.pair_inv_size                  # N/N_g per pair
    loss_fn, beta, chi = config.scalar_loss, config.beta, config.chi
    theta, theta_sum, log_alpha, alpha_sum, alpha = _loop_buffers(state, config)
    adaptive, k = config.adaptive_alpha, log_alpha.size
    theta_set, theta_step, alpha_step = config.theta_set, config.theta_step, config.alpha_step
    buf = np.empty_like(theta)
    shift = config.shift
    for t in range(state.step + 1, stop + 1):
        i = int(sample_batch(config, t - 1, sampler_cache)[0])
        row = diff[i]
        value, deriv = loss_fn(float(row @ theta) - ref[i], beta)
        g = groups[i]
        if shift is not None:
            value = value + shift[g]
        scale = over[i]
        if adaptive:
            alpha = mirror_ascent(log_alpha, alpha_step.at(t) * chi * scale, value, alpha_step, t, group=g)
        weight = mixing_weights(alpha[g], chi, k)
        np.multiply(row, scale * weight * deriv, out=buf)
        theta = projected_step(theta, buf, theta_step.at(t), theta_set, theta_step, t)
        theta_sum += theta
        alpha_sum += alpha
    return SolverState(theta, log_alpha, theta_sum, alpha_sum, stop)


def _stochastic_step(state, data, config, batch, t):
    if data.overlapping:
        return _overlapping_step(state, data, config, batch, t)
    if batch.size == 1 and config.scalar_loss is not None and data.storage.dense_rows:
        return _single_pair_step(state, data, config, int(batch[0]), t)
    loss, beta = config.loss, config.beta
    rows = data.rows(batch)
    h = np.asarray(rows @ state.theta).ravel() - data.ref_margin[batch]
    groups = data.groups[batch]
    scale = config.n_samples * config.pair_inv_size[batch] / batch.size    # N/(N_g B)
    values, dl = get_loss(loss).value_and_grad(h, beta)
    adjusted = values if config.shift is None else values + config.shift[groups]
    losses = np.bincount(groups, weights=scale * adjusted, minlength=config.group_sizes.size)
    log_alpha, alpha = _alpha_step(state.log_alpha, losses, config, t)
    u = scale * _theta_weights(alpha, config)[groups] * dl
    grad = np.asarray(rows.T @ u).ravel()
    theta = _projected_step(state.theta, grad, config, t)
    return theta, log_alpha, alpha, losses


def _overlapping_step(state, data, config, batch, t):
    r"""Algorithm 1's step with overlapping groups (a pair in :math:`m_i \ge 1` groups).

    The sampler draws as Algorithm 1 does: :math:`g \sim \mathrm{Cat}(N_g/T)` with
    :math:`T = \sum_h N_h` (the number of memberships), then a member of :math:`D_g` uniformly. Each
    membership (g, i) is then drawn with probability 1/T, so pair i with :math:`p_i = m_i/T`. The
    estimates use the pair only, averaged over which of its groups drew it (Rao–Blackwell: unbiased, and
    no more variable than the estimates from the drawn group alone):

    .. math::

        \hat L_h = \frac{T}{m_i N_h}\,M_{ih}\,(\ell_i + c_h),\qquad
        \hat\nabla_\theta = \frac{T}{m_i}\Big(\sum_{h\ni i}\frac{\lambda_h}{N_h}\Big)\,\nabla\ell_i,

    unbiased because :math:`E[\hat L_h] = \sum_i \frac{m_i}{T}\frac{T}{m_iN_h}M_{ih}\ell_i = L_h` and
    :math:`E[\hat\nabla_\theta] = \sum_i\sum_{h\ni i}\frac{\lambda_h}{N_h}\nabla\ell_i = \sum_h\lambda_h\nabla L_h`;
    a batch of B draws averages B such estimates. With labels (every :math:`m_i = 1`, T = N) these are
    Algorithm 1's :math:`(N/N_g)\,\ell_i\,e_g` and :math:`(N/N_g)\lambda_g\nabla\ell_i`, and Proposition 3's
    constants (:func:`~loglinear_grpo.schedules.theory_constants`) hold with N replaced by T.
    """
    loss, beta = config.loss, config.beta
    rows = data.rows(batch)
    h = np.asarray(rows @ state.theta).ravel() - data.ref_margin[batch]
    member = data.membership.matrix[batch]                    # B × K, 0/1 (a pair drawn twice: two rows)
    counts = np.diff(member.indptr)                           # m_i
    scale = config.total_members / (counts * batch.size)      # T/(m_i B)
    values, dl = get_loss(loss).value_and_grad(h, beta)
    inv = 1.0 / config.group_sizes
    sums = member.T @ (scale * values)
    if config.shift is not None:
        sums = sums + config.shift * (member.T @ scale)
    losses = np.asarray(sums).ravel() * inv
    log_alpha, alpha = _alpha_step(state.log_alpha, losses, config, t)
    u = scale * (member @ (_theta_weights(alpha, config) * inv)) * dl
    grad = np.asarray(rows.T @ u).ravel()
    theta = _projected_step(state.theta, grad, config, t)
    return theta, log_alpha, alpha, losses


def averaged_theta(state):
    """:math:`\\bar\\theta_t = \\frac1t\\sum_{s=1}^t\\theta^{(s)}` (θ⁽⁰⁾ before the first step)."""
    return state.theta_sum / state.step if state.step else state.theta.copy()


def averaged_alpha(state):
    """:math:`\\bar\\alpha_t = \\frac1t\\sum_{s=1}^t\\alpha^{(s)}`."""
    return state.alpha_sum / state.step if state.step else np.exp(state.log_alpha)
