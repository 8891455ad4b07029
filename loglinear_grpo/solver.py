"""Solvers for group robust preference optimisation (Eq. (9)) that know when they are done.

:func:`solve` dispatches to one of five estimators; every one of them ends with a *certificate*:
a point θ ∈ Θ, the value of its objective and a certified lower bound on the optimum, whose
difference (the duality gap) bounds how far θ is from optimal.

``"newton"`` (the default, ``"auto"``)
    Smoothed minimax with Newton steps over Θ (:mod:`loglinear_grpo.newton`): tolerance 10⁻⁶ in a
    few dozen passes over S, for every loss, method and Θ; no step size to choose. On an unbounded
    Θ the hinge loss is solved as one HiGHS linear program instead. Its matrices are N × N (row space,
    d > N) or d × d: ``"auto"`` runs it where they fit the memory budget, else ``"newton_cg"``.
``"newton_cg"``
    The same smoothed minimax, path and certificate, matrix-free (:mod:`loglinear_grpo.newton_cg`):
    Newton–CG with Krylov model steps over a ball, a box or R^d; memory = S plus a few vectors, time =
    passes over S. For DPO and IPO at LLM-head scale, and the hinge (smoothed by softplus on the same path,
    certified with its own conjugate) on a bounded Θ.
``"full"``
    Full-batch alternating mirror descent: the α step of Algorithm 1 with exact group losses,
    then a projected gradient step on θ. First order; O(N·d) per iteration.
``"closed_form"``
    GR-IPO (§4.1, Algorithm 2): the α step, then the exact weighted least squares.
``"stochastic"``
    Algorithm 1 exactly as the paper writes it: g ~ Cat(N_1/N, …, N_K/N), a pair of D_g, the
    importance-weighted α and θ steps; the averaged iterate θ̄_T is what Proposition 3 bounds.

The first-order estimators are written as pure functions over explicit state, in the style of
optax::

    config = make_config(data, loss="dpo", estimator="stochastic", steps=T, radius=1.0)
    state = init(data, config)
    for t in range(T):
        state, info = update(state, data, config, sample_batch(config, t))
    theta_bar = averaged_theta(state)

and :func:`solve` is a thin loop over that with the certificate, logging, checkpoints and a
progress bar. Writing λ for the weights the θ step gives the groups, one iteration is

1. α step (mirror ascent, in log space): :math:`\\log\\alpha_g \\mathrel{+}= \\eta_\\alpha\\,\\chi\\,\\hat L_g`,
   then renormalise with log-sum-exp. ``group_robust`` only; the other methods keep α fixed
   (``importance_sampling``: :math:`\\alpha_g = 1/K`; ``vanilla``: :math:`\\alpha_g = N_g/N`).
2. :math:`\\lambda_g = (1-\\chi)/K + \\chi\\,\\alpha_g` (Appendix B.4 trade-off; χ = 1 is GRPO).
3. θ step: :math:`\\theta \\leftarrow P_\\Theta(\\theta - \\eta_\\theta \\hat\\nabla)` with
   :math:`\\hat\\nabla` an estimate of :math:`\\sum_g\\lambda_g\\nabla L_g(\\theta)`, or for
   ``closed_form`` (IPO) the exact minimiser of :math:`\\sum_g \\lambda_g L_g` over Θ.

Estimators of :math:`(\\hat L, \\hat\\nabla)` at :math:`\\theta^{(t-1)}`: ``"stochastic"`` —
:math:`\\hat L = (N/N_g)\\,\\ell\\,e_g` and :math:`\\hat\\nabla = (N/N_g)\\,\\lambda_g\\,\\nabla\\ell`,
both unbiased (``batch_size=B`` averages B i.i.d. draws); ``"full"`` — the exact
:math:`L(\\theta)` and :math:`\\sum_g\\lambda_g\\nabla L_g(\\theta)`.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd

from ._validation import check_positive_int, check_vector
from .certificate import check_consistent, is_converged
from .checkpoints import CheckpointFile, run_fingerprint
from .constraints import make_constraint
from .closed_form import group_normal_equations
from .duality import certified_best_response
from .hinge import hinge_program
from .losses import get_loss
from .kernels import Workspace
from .newton_cg import MAX_CG, check_matrix_free, choose_solver, has_matrix_free_step
from .objective import _check_data, _group_losses, group_adjustment, group_metrics, minimax_value, objective_name, \
    trivial_bound
from .settings import ESTIMATOR_CHOICES, Settings, with_settings_signature  # noqa: F401 (re-exported)
from .algorithm1 import (SAMPLE_BLOCK, SolverState, _full_batch_run, _single_pair_run, averaged_alpha,  # noqa: F401
                         averaged_theta, init, sample_batch, update)
from .schedules import StepSize, _largest_group_curvature, _resolve_step, theory_constants, theory_step_sizes  # noqa: F401
from .steps import log_normalize, mixing_weights  # noqa: F401 (log_normalize public here)

#: the relative duality gap the deterministic estimators stop at by default
DEFAULT_TOL = 1e-6
#: iteration budgets by estimator when ``steps`` is not given
DEFAULT_STEPS = {"newton": 200, "newton_cg": 300, "full": 20_000, "closed_form": 5_000, "stochastic": 1000}
#: the scale-free default α step: η_α = ALPHA_GAIN / (largest group loss at θ⁽⁰⁾)
ALPHA_GAIN = 1.0



class ConvergenceWarning(UserWarning):
    """``solve`` stopped without certifying the requested tolerance: its iteration budget ran out, or it
    stalled before (the message says which, and what to do)."""


# ============================================================================ state & config
@dataclass(frozen=True, eq=False)
class DerivedState:
    """What a run precomputes from the data (built by :func:`make_config`, never set by the user)."""

    n_samples: int
    group_sizes: np.ndarray                             # N_g (float)
    membership: object = field(repr=False)              # the data's groups (loglinear_grpo.groups.Membership)
    group_cum: np.ndarray = field(repr=False)           # cumulative N_g/N (sampler)
    group_offsets: np.ndarray = field(repr=False)       # start of each group in `members`
    streamed: bool = False                              # S is read block by block from outside memory
    scalar_loss: Callable | None = field(default=None, repr=False)  # (h, β) -> (ℓ, ℓ') for one float
    normal_equations: object = field(default=None, repr=False)     # closed form: (H_g, q_g) or RowSpaceForm
    theory: dict = field(default_factory=dict)          # Proposition 3's constants, when computed
    shift: np.ndarray | None = None                     # the group adjustment c_g = C_g/√N_g (None: none)
    memory: dict | None = None                          # the second-order solver's memory plan (choose_solver)

    # two per-pair arrays only the first-order estimators read: made on first use (a second-order solve of
    # 10⁷ pairs never holds their 160 MB)
    @functools.cached_property
    def pair_inv_size(self):
        """1/N_{g_i} of every pair, shape (N,) (labels only: with overlapping groups a pair has several)."""
        if self.membership.overlapping:
            raise ValueError("pair_inv_size: a pair in several groups has no single 1/N_g (overlapping groups)")
        return (1.0 / self.group_sizes)[self.membership.labels]

    @functools.cached_property
    def members(self):
        """The pairs of each group, group after group (each group's in increasing order), shape (Σ_g N_g,):
        the sampler's table (labels: the pair indices sorted by group, N of them)."""
        return self.membership.member_list()

    @property
    def total_members(self):
        """T = Σ_g N_g: the number of (group, pair) memberships (N for labels)."""
        return int(self.group_sizes.sum())


def _derived(name):
    return property(lambda self: getattr(self.derived, name),
                    doc=f"``derived.{name}`` (:class:`DerivedState`, read-only).")


@dataclass(frozen=True, eq=False)
class SolverConfig:
    """A run's settings, resolved against the data, and apart from them the derived state.

    ``settings`` is what the user gave (:class:`~loglinear_grpo.settings.Settings`); the fields
    below are the same settings with the defaults that depend on the estimator and the data resolved
    (``estimator="auto"`` → ``"newton"`` or ``"newton_cg"`` by predicted memory, ``steps``, ``tol``, the step-size schedules, Θ, θ⁽⁰⁾, α⁽⁰⁾);
    ``derived`` holds the arrays precomputed from the data. Built by :func:`make_config`.
    """

    loss: str
    beta: float
    method: str
    estimator: str
    steps: int
    tol: float | None
    check_every: int | None
    chi: float
    seed: int
    batch_size: int
    theta_step: StepSize | None
    alpha_step: StepSize | None
    theta_set: object
    theta0: np.ndarray
    alpha0: np.ndarray
    derived: DerivedState = field(repr=False)
    settings: Settings | None = field(default=None, repr=False)
    max_cg: int | None = None                           # newton_cg: Hessian products per model step at most

    n_samples = _derived("n_samples")
    group_sizes = _derived("group_sizes")
    pair_inv_size = _derived("pair_inv_size")
    total_members = _derived("total_members")
    group_cum = _derived("group_cum")
    group_offsets = _derived("group_offsets")
    members = _derived("members")
    streamed = _derived("streamed")
    scalar_loss = _derived("scalar_loss")
    normal_equations = _derived("normal_equations")
    theory = _derived("theory")
    shift = _derived("shift")
    memory = _derived("memory")

    @property
    def adaptive_alpha(self):
        return self.method == "group_robust"

    @property
    def objective_name(self):
        """What ``value`` is, in words (:func:`~loglinear_grpo.objective.objective_name`)."""
        return objective_name(self.method, self.chi, self.shift is not None)

    def replace(self, **changes):
        """A copy with some settings changed (e.g. scaled step sizes), like ``dataclasses.replace``."""
        return dataclasses.replace(self, **changes)

    def describe(self):
        """Every setting that can change the answer, as JSON-able values."""
        return {"loss": self.loss, "beta": self.beta, "method": self.method, "estimator": self.estimator,
                "steps": self.steps, "tol": self.tol, "check_every": self.check_every, "chi": self.chi,
                "seed": self.seed, "batch_size": self.batch_size,
                "adjustment": None if self.shift is None else [float(c) for c in self.shift],
                "step_size": None if self.theta_step is None else self.theta_step.describe(),
                "alpha_step_size": None if self.alpha_step is None else self.alpha_step.describe(),
                "constraint": self.theta_set.fingerprint(),
                **({"max_cg": self.max_cg} if self.estimator == "newton_cg" else {})}


@functools.partial(with_settings_signature, leading=("data", "settings"))
def make_config(data, settings=None, **options):
    """Validate ``solve``'s settings and precompute what every iteration needs.

    ``settings`` (a :class:`~loglinear_grpo.settings.Settings`) or the same options as keywords (see
    :func:`solve`; keywords given with ``settings`` replace its fields). Defaults that depend on the
    estimator:

    * ``estimator="auto"``: ``"newton"`` where its dense matrices fit the memory budget, else
      ``"newton_cg"`` (:func:`~loglinear_grpo.newton_cg.choose_solver`).
    * ``steps``: the iteration budget — 200 Newton iterations (300 for ``newton_cg``), 20 000 full-batch
      iterations, 5 000 closed-form alternations, 1 000 stochastic steps.
    * ``tol``: 10⁻⁶ (relative certified duality gap) for ``newton``, ``newton_cg``, ``full`` and ``closed_form``;
      ``None`` (run all T steps, the theory-verification mode) for ``stochastic``.
    * θ step (``full``): 1/L for DPO and IPO, L = sup ℓ''·max_g λ_max(S_gᵀS_g/N_g) (gradient
      descent on any convex combination of the L_g is then monotone); for the hinge the full-batch
      ``"theory"`` step. ``stochastic``: ``"theory"`` (Θ must be bounded).
    * α step: ``"auto"`` for ``full`` and ``closed_form``, a scale-free constant
      η_α = 1/max_g L_g(θ⁽⁰⁾) (the step measured in units of the losses, so that rescaling a loss
      does not change the iterates); ``"theory"`` for ``stochastic`` when Θ is bounded, else
      ``1/sqrt(t)``.
    """
    _check_data(data)
    if settings is None:
        settings = Settings.from_options(**options)
    elif not isinstance(settings, Settings):
        raise ValueError(f"settings must be a loglinear_grpo.Settings, got {type(settings).__name__}")
    elif options:
        Settings.check_names(options)
        settings = dataclasses.replace(settings, **options)
    loss, beta, method, chi = settings.loss, settings.beta, settings.method, settings.chi
    steps, tol, check_every = settings.steps, settings.tol, settings.check_every
    seed, batch_size = settings.seed, settings.batch_size
    step_size, alpha_step_size, theta0 = settings.step_size, settings.alpha_step_size, settings.theta0
    radius, center, constraint = settings.radius, settings.center, settings.constraint
    theta_set = make_constraint(radius, center, constraint).check_dim(data.dim)
    estimator, memory = settings.estimator, None
    if estimator in ("auto", "newton", "newton_cg"):
        chosen, memory = choose_solver(data, loss, theta_set)
        if estimator == "auto":
            estimator = chosen
        else:
            memory = {**memory, "estimator": estimator, "reason": f"estimator={estimator!r} was asked for"}
        if estimator == "newton_cg" and not has_matrix_free_step(theta_set):
            raise ValueError(f"estimator='newton_cg' needs a ball, a box or R^d; {theta_set!r} has no matrix-free "
                             "model step (use estimator='newton')")
        if estimator == "newton_cg":
            check_matrix_free(loss, theta_set, data.dim)
    shift = group_adjustment(settings.adjustment, data.group_sizes, data.group_names)
    steps = DEFAULT_STEPS[estimator] if steps is None else steps
    if isinstance(tol, str):                            # Settings' DEFAULT
        tol = None if estimator == "stochastic" else DEFAULT_TOL

    k = data.n_groups
    sizes = data.group_sizes
    alpha0 = sizes / sizes.sum() if method == "vanilla" else np.full(k, 1.0 / k)

    if theta0 is None:
        theta0 = theta_set.center_vector(data.dim)
        theta0 = np.zeros(data.dim) if theta0 is None else np.array(theta0, dtype=np.float64)
    theta0 = theta_set.project(check_vector("theta0", theta0, data.dim))

    bounded = np.isfinite(theta_set.bounding_ball(data.dim)[1])
    cache = {}

    def theory(which):
        if "eta_theta" not in cache:
            const = theory_constants(data, loss, beta, theta_set, estimator, shift=shift)
            eta_t, eta_a, bound = theory_step_sizes(const, steps)
            cache.update(const, eta_theta=eta_t, eta_alpha=eta_a, gap_bound=bound, steps=steps)
        return cache[which]

    def auto_alpha():
        losses0 = _group_losses(theta0, data, loss, beta)
        start = float(np.max(np.abs(losses0 if shift is None else losses0 + shift)))
        return ALPHA_GAIN / max(start, 1e-12)

    theta_step = alpha_step = None
    if estimator not in ("newton", "newton_cg"):
        spec = get_loss(loss)
        if estimator == "closed_form":
            pass                                        # the θ step is the exact least squares
        elif step_size is None:
            if estimator in ("full", "closed_form") and spec.smooth:
                curvature = spec.max_curvature(beta) * _largest_group_curvature(data)
                step_size = 1.0 / curvature if curvature > 0 else 1.0
            elif bounded:
                step_size = "theory"
            else:
                raise ValueError("step_size: give a number or 'c/sqrt(t)' (or a radius, for the "
                                 "'theory' default) for this loss/estimator on an unbounded Θ")
        if alpha_step_size is None:
            alpha_step_size = "auto" if estimator != "stochastic" else ("theory" if bounded else "1/sqrt(t)")
        if estimator != "closed_form":
            theta_step = _resolve_step("step_size", step_size, theory_value=lambda: theory("eta_theta"))
        alpha_step = _resolve_step("alpha_step_size", alpha_step_size, theory_value=lambda: theory("eta_alpha"),
                                   auto_value=auto_alpha)
        for name, step in (("step_size", theta_step), ("alpha_step_size", alpha_step)):
            if step is not None and not np.isfinite(step.scale):
                raise ValueError(f"{name} resolved to a non-finite value ({step.scale}); give it explicitly")

    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    derived = DerivedState(
        n_samples=data.n_samples, group_sizes=sizes.astype(np.float64), membership=data.membership,
        group_cum=np.cumsum(sizes) / sizes.sum(), group_offsets=offsets,
        streamed=data.storage.out_of_core, theory=dict(cache), scalar_loss=get_loss(loss).scalar, shift=shift,
        memory=memory,
        normal_equations=(group_normal_equations(data, 0.5 / beta, theta_set)
                          if estimator == "closed_form" else None))
    return SolverConfig(
        loss=loss, beta=beta, method=method, estimator=estimator, steps=steps, tol=tol, check_every=check_every,
        chi=chi, seed=seed, batch_size=batch_size, theta_step=theta_step, alpha_step=alpha_step,
        theta_set=theta_set, theta0=theta0, alpha0=alpha0, derived=derived, settings=settings,
        max_cg=(settings.max_cg or MAX_CG) if estimator == "newton_cg" else None)


# ============================================================================ the certificate
class Certificate(NamedTuple):
    """A point, its objective value, a certified lower bound on the optimum, and the dual weights
    that gave the bound."""

    theta: np.ndarray
    value: float
    lower_bound: float
    alpha: np.ndarray
    candidate: str
    bound_kind: str

    @property
    def gap(self):
        return self.value - self.lower_bound


def objective_value(theta, data, config):
    """The objective the method minimises at θ: :math:`(1-\\chi)\\,\\mathrm{mean}_g L_g + \\chi\\max_g L_g`
    for ``group_robust`` (χ = 1: the worst-group loss, Eq. (7)); :math:`\\sum_g \\alpha_g L_g` with
    the method's fixed α otherwise; with a group adjustment, of the adjusted :math:`L_g + c_g`."""
    losses = _group_losses(theta, data, config.loss, config.beta)
    return minimax_value(losses, config.chi, None if config.adaptive_alpha else config.alpha0, config.shift)


def certify(thetas, alphas, data, config, tol=None):
    """The best certified pair among candidate points and candidate dual weights.

    ``thetas`` and ``alphas``: dicts name → vector. Each θ's objective is an upper bound on
    nothing but itself; each α gives a certified lower bound on the optimum through an exact best
    response (:func:`~loglinear_grpo.duality.certified_best_response`, warm-started at the best θ,
    solved to a relative gap of ``tol/100``). The certificate pairs the best θ with the best bound.
    """
    values = {name: objective_value(theta, data, config) for name, theta in thetas.items()}
    best_theta = min(values, key=values.get)
    inner_tol = max(1e-12, (tol if tol is not None else DEFAULT_TOL) * 1e-2)
    trivial = trivial_bound(config.chi, None if config.adaptive_alpha else config.alpha0, config.shift)
    best = (trivial, next(iter(alphas.values())), "trivial (losses ≥ 0)")     # every loss is ≥ 0
    for name, alpha in alphas.items():
        weights = mixing_weights(alpha, config.chi) if config.adaptive_alpha else config.alpha0
        res = certified_best_response(weights, data, config.loss, config.beta, config.theta_set,
                                      tol=inner_tol, theta0=thetas[best_theta])
        # the adjusted problem's bound: Σ_g λ_g (L_g + c_g) ≥ (the best response's bound) + λᵀc
        lower = res.lower_bound + (0.0 if config.shift is None else float(weights @ config.shift))
        if lower > best[0]:
            best = (lower, alpha, res.bound_kind)
    return Certificate(theta=thetas[best_theta], value=values[best_theta], lower_bound=best[0],
                       alpha=np.asarray(best[1], dtype=np.float64), candidate=best_theta, bound_kind=best[2])


# ============================================================================ solve
@dataclass
class SolveResult:
    """Output of :func:`solve`: the solution and its certificate.

    Attributes
    ----------
    theta : ndarray (d,)
        The returned solution: for the deterministic estimators the certified best of the
        candidates (last iterate, averaged iterate); for ``stochastic`` the averaged iterate
        :math:`\\bar\\theta_T` of Proposition 3.
    converged : bool
        ``gap ≤ tol · max(1, |value|)`` (with ``tol=None``, the default tolerance 10⁻⁶).
    gap : float
        A certified upper bound on ``value − L*`` (the duality gap at (θ, α)).
    value : float
        The method's objective at θ (:func:`objective_value`; for ``group_robust`` with χ = 1 the
        worst-group loss :math:`\\max_g L_g(\\theta)`).
    lower_bound : float
        The certified lower bound on the optimum L* (the dual value).
    n_iter : int
        Iterations run.
    alpha : ndarray (K,)
        The group weights of the certificate (α⁽ᵀ⁾ or ᾱ_T for the first-order estimators; the
        smoothed problem's weights for Newton); on the simplex.
    alpha_avg : ndarray (K,)
        :math:`\\bar\\alpha_T` (= ``alpha`` for Newton).
    theta_avg, theta_last : ndarray (d,)
        :math:`\\bar\\theta_T` and :math:`\\theta^{(T)}` (both = ``theta`` for Newton).
    bound_kind : str
        ``"rigorous"`` (bounded Θ), ``"feasible dual"`` (Θ unbounded along the gradient: a dual
        point with Sᵀ(w ⊙ u) = 0 to rounding in every coordinate, :mod:`loglinear_grpo.certificate`), or
        ``"trivial (losses ≥ 0)"`` when nothing better was certified yet.
    passes : int or None
        Full passes over S the Newton solver made (``None`` for the other estimators).
    temperature : float or None
        Newton, ``group_robust`` (and the matrix-free hinge with any method): the last smoothing temperature
        μ (a warm start's ``temperature0``).
    cg_iterations, cg_exhausted : int or None
        ``newton_cg``: Hessian products in all model steps, and model steps whose budget (``max_cg``) ran
        out before their Krylov solve met its tolerance.
    memory : dict or None
        The second-order solvers: the memory plan ``estimator="auto"`` chose by
        (:func:`~loglinear_grpo.newton_cg.choose_solver`: ``estimator``, ``dense_bytes``,
        ``matrix_free_bytes``, ``budget_bytes``, ``reason``) and ``peak_rss_bytes``, the process's peak
        resident memory after the solve (``getrusage``; the whole process's, mapped pages of S
        included).
    history : pandas.DataFrame
        One row per logged step: ``step``, ``worst_loss`` and ``loss/<group>`` (at θ̄ for the
        first-order estimators, at θ for Newton), ``alpha/<group>``, and ``gap`` where a
        certificate was computed.
    config : SolverConfig
    state : SolverState
    """

    theta: np.ndarray
    converged: bool
    gap: float
    value: float
    lower_bound: float
    n_iter: int
    alpha: np.ndarray
    alpha_avg: np.ndarray
    theta_avg: np.ndarray
    theta_last: np.ndarray
    bound_kind: str
    history: pd.DataFrame
    config: SolverConfig
    state: SolverState
    passes: int | None = None
    temperature: float | None = None
    cg_iterations: int | None = None
    cg_exhausted: int | None = None
    memory: dict | None = None

    @property
    def solver(self):
        """The solver that ran: the estimator (``"newton"``, ``"newton_cg"``, ``"full"``, ...), as
        ``estimator="auto"`` resolved it."""
        return self.config.estimator

    def metrics(self, data):
        """:func:`~loglinear_grpo.group_metrics` of ``theta`` on ``data``, with the training weights α of
        this solve in a ``train_alpha`` column (α was fitted on the training data, whatever split ``data``
        is; the ``worst`` row holds the largest) and, under a group adjustment, its training shifts
        :math:`c_g = C_g/\\sqrt{N_g}` in ``train_adjustment``."""
        table = group_metrics(self.theta, data, self.config.loss, self.config.beta, alpha=self.alpha)
        table = table.rename(columns={"weight": "train_alpha"})
        if self.config.shift is not None and len(self.config.shift) == data.n_groups:
            shift = pd.Series(self.config.shift, index=list(data.group_names))
            column = [shift[name] if kind == "group" else np.nan for kind, name in table.index]
            table["train_adjustment"] = column
            table.loc[("aggregate", "worst"), "train_adjustment"] = shift[table.loc[("aggregate", "worst"), "worst_group"]]
            table.loc[("aggregate", "extreme"), "train_adjustment"] = shift.max()
        return table

    def worst_group_loss(self, data):
        return float(np.max(_group_losses(self.theta, data, self.config.loss, self.config.beta)))

    @property
    def relative_gap(self):
        return self.gap / max(1.0, abs(self.value))

    def solver_summary(self):
        """One line: which solver ran and why (the memory plan of ``estimator="auto"``), with the predicted
        and the peak memory; ``None`` for the first-order estimators."""
        if self.memory is None:
            return None
        from ._numbers import nbytes_text
        plan = self.memory
        hinge = get_loss(self.config.loss).name == "hinge"
        kind = {"newton": "the linear/conic program" if hinge else "dense/row-space Newton",
                "newton_cg": "matrix-free Newton-CG" + (", the hinge smoothed by softplus" if hinge else "")
                }.get(self.solver, self.solver)
        own = plan["dense_bytes"] if self.solver == "newton" else plan["matrix_free_bytes"]
        peak = plan.get("peak_rss_bytes")
        line = (f"solver: {self.solver} ({kind}): {plan['reason']}; predicted {nbytes_text(own)} besides S, "
                f"process peak {'unknown' if peak is None else nbytes_text(peak)} resident")
        if self.cg_iterations is not None:
            line += f"; {self.cg_iterations} Hessian products in {self.n_iter} iterations, {self.passes} passes over S"
        return line

    def summary(self):
        """One line: converged, the value with its meaning (:attr:`SolverConfig.objective_name`), the
        certified gap, iterations."""
        return (f"converged={self.converged} {self.config.objective_name}={self.value:.10g} gap={self.gap:.3e} "
                f"(relative {self.relative_gap:.2e}, {self.bound_kind}) iterations={self.n_iter}")


def _history_row(state, data, config, names, with_gap):
    theta_bar = averaged_theta(state)
    losses = _group_losses(theta_bar, data, config.loss, config.beta)
    row = {"step": state.step, "worst_loss": float(losses.max()),
           "worst_loss_last": float(_group_losses(state.theta, data, config.loss, config.beta).max())}
    alpha = np.exp(state.log_alpha)
    row.update({f"loss/{n}": float(v) for n, v in zip(names, losses)})
    row.update({f"alpha/{n}": float(v) for n, v in zip(names, alpha)})
    if with_gap:
        cert = certify({"average": theta_bar}, {"average": averaged_alpha(state)}, data, config)
        row["gap"] = cert.gap
    return row


def _candidates(state, config):
    """θ and α candidates of a first-order run: Proposition 3's averages, and for the
    deterministic estimators also the last iterate."""
    thetas = {"average": averaged_theta(state)}
    alphas = {"average": averaged_alpha(state)}
    if config.estimator != "stochastic" and state.step:
        thetas["last"] = state.theta
        alphas["last"] = np.exp(state.log_alpha)
    if not config.adaptive_alpha:
        alphas = {"fixed": config.alpha0}
    return thetas, alphas


def _next_check(t, config):
    """Iterations between certificates: ``check_every``, or 10% of the iterations so far (at least
    10) — so the checks, one or two exact best responses each, cost a bounded share of the run."""
    if config.check_every is not None:
        return t + config.check_every
    return t + max(10, t // 10)


def _check_schedule(step, config):
    """``(on, next)``: whether a run's certificate schedule (10, then :func:`_next_check` onwards — a
    function of t alone) certifies at ``step``, and its first check after ``step``. A resumed run
    checks where a fresh run would, so that extending a run stops where a fresh run with the larger
    budget stops."""
    check = config.check_every if config.check_every is not None else 10
    on = False
    while check <= step:
        on = check == step
        check = _next_check(check, config)
    return on, check


@with_settings_signature
def solve(data, config=None, *, log_every=None, duality_gap=False, checkpoint=None, checkpoint_every=None,
          progress=False, callback: Callable | None = None, temperature0=None, **settings):
    """Group robust preference optimisation of a log-linear policy (Eq. (9)), certified.

    Solves :math:`\\min_{\\theta\\in\\Theta}\\max_{\\alpha\\in\\Delta_K}\\sum_g\\alpha_g L_g(\\theta)`
    (``method="group_robust"``), or its importance-sampling / vanilla counterparts with α fixed,
    and returns the solution with a certified duality gap.

    Parameters
    ----------
    data : PreferenceData
    config : SolverConfig or Settings, optional
        Settings built by :func:`make_config` (then give no other setting), or a
        :class:`~loglinear_grpo.settings.Settings`. The options below, from ``loss`` to
        ``check_every``, are that class's fields (validated there; written once).
    loss : {"dpo", "sigmoid", "ipo", "hinge"}, default "dpo"
        ``"sigmoid"`` is TRL's name for DPO.
    beta : float > 0, default 0.1
        TRL's default β.
    method : {"group_robust", "importance_sampling", "vanilla"}
    estimator : {"auto", "newton", "newton_cg", "full", "closed_form", "stochastic"}, default "auto"
        See the module docstring. ``"auto"`` runs the dense (or row-space) Newton solver where its
        matrices fit the memory budget and the matrix-free ``"newton_cg"`` otherwise
        (:func:`~loglinear_grpo.newton_cg.choose_solver`; ``result.solver`` says which ran).
    steps : int, optional
        The iteration budget (T for ``stochastic``); defaults per estimator in :func:`make_config`.
    tol : float or None
        Stop as soon as the certified duality gap ≤ ``tol · max(1, |value|)``. Default 10⁻⁶ for the
        deterministic estimators, ``None`` (all T steps) for ``stochastic``. When the budget runs out
        first, a :class:`ConvergenceWarning` says how far it got.
    radius, center : float, array_like, optional
        Θ = L2 ball of radius R around ``center`` (default 0).
    constraint : Θ object, optional
        :class:`~loglinear_grpo.Box`, :class:`~loglinear_grpo.ConvexSet`, ... (instead of radius).
    chi : float in [0, 1], default 1
        Worst-case/average trade-off (Appendix B.4): the objective is (1−χ)·mean + χ·max.
    adjustment : float ≥ 0, array_like (K,), dict {group: C} or None
        The group adjustment of Sagawa et al. (2020): every group loss :math:`L_g` is replaced by
        :math:`L_g + C_g/\\sqrt{N_g}` (N_g the group's pairs in ``data``), so that
        ``group_robust`` minimises :math:`\\max_g (L_g + C_g/\\sqrt{N_g})`: a small group, whose
        empirical loss is the noisier estimate, counts as if its loss were higher. One C for all
        groups, one per group, or by group name (others 0). It enters every estimator, the
        certificate (the dual gains :math:`\\sum_g\\lambda_g c_g`), ``value`` and the checkpoint's
        fingerprint. With α fixed (``vanilla``, ``importance_sampling``) it only shifts ``value`` by
        :math:`\\sum_g w_g c_g`: the minimiser is the same. Choose C (and R) on validation data:
        :func:`~loglinear_grpo.solve_path`.
    seed : int
        Seed of the counter-based sampler (stochastic estimator).
    batch_size : int
        i.i.d. draws per stochastic step.
    step_size, alpha_step_size : float, "theory", "auto", "c/sqrt(t)", callable or None
        η_θ and η_α of the first-order estimators: a constant, a named rule, or a schedule
        ``t -> η_t`` (t from 1, as an optax ``Schedule``); see :func:`make_config` for the defaults and
        :func:`theory_step_sizes`.
    theta0 : array_like, optional
        θ⁽⁰⁾ (default: Θ's centre, else 0).
    check_every : int, optional
        First-order estimators: iterations between certificates (default: 10% of the iterations
        so far, at least 10). A certificate costs one or two exact best responses — about as much
        as 5–20 full-batch iterations — and is also computed once at the end.
    max_cg : int, optional
        ``newton_cg``: Krylov iterations per model step at most (default 250; each is a Hessian product,
        two passes over S, and on a ball whose Lanczos vectors do not fit in memory, two products).
    log_every : int, optional
        History period of the first-order estimators (default: T/100, at least 1).
    duality_gap : bool
        Also certify at every logged row (column ``gap``).
    checkpoint : path, optional
        First-order estimators: resume from this file if it exists (it must match the data — all of
        S, r and the labels — Θ, θ⁽⁰⁾ and the settings that change the iterates), and write the state
        to it atomically every ``checkpoint_every`` steps, at the end and on Ctrl-C. A resumed run is
        bit-identical to an uninterrupted one; a larger ``steps`` extends a finished run exactly
        (unless its step size depends on T, as ``"theory"`` does). The path is checked and locked
        before the first step (see :mod:`loglinear_grpo.checkpoints`).
    progress : bool
        Show a tqdm progress bar.
    callback : callable, optional
        ``callback(state, info)`` after every iteration (Newton: ``info`` is the iteration record).
    temperature0 : float, optional
        Newton, ``group_robust``: the first smoothing temperature μ (default: the spread of the group
        losses at θ⁽⁰⁾). A warm start near a neighbouring problem's solution
        (:func:`~loglinear_grpo.solve_path`) starts colder; the certificate and the stopping test are
        unchanged, so the answer is the same within ``tol``.

    Returns
    -------
    SolveResult

    Warns
    -----
    ConvergenceWarning
        ``tol`` was set and the budget ran out before the gap reached it.
    """
    if config is None or isinstance(config, Settings):
        config = make_config(data, config, **settings)
    elif settings:
        raise ValueError(f"give either a SolverConfig or options, not both (got config and {sorted(settings)})")
    elif isinstance(config, str):
        raise ValueError(f"solve's options are keyword-only: write solve(data, loss={config!r}, ...) (the second "
                         "positional argument is a SolverConfig from make_config)")
    elif not isinstance(config, SolverConfig):
        raise ValueError(f"config must be a SolverConfig from make_config, got {type(config).__name__}")
    else:
        _check_data(data)
        if config.n_samples != data.n_samples or config.theta0.shape != (data.dim,):
            raise ValueError("config was made for other data (N or d differ)")
    runner = RUNNERS[config.estimator]
    if runner is _solve_newton and checkpoint is not None:
        raise ValueError("checkpoint is for the iterative first-order estimators; the Newton solver "
                         "finishes in a few dozen passes over S")
    if temperature0 is not None:
        if isinstance(temperature0, bool) or not isinstance(temperature0, (int, float, np.floating)) \
                or not np.isfinite(temperature0) or temperature0 <= 0:
            raise ValueError(f"temperature0 must be a positive finite number, got {temperature0!r}")
        if runner is not _solve_newton:
            raise ValueError("temperature0 is the Newton solver's first smoothing temperature; "
                             f"estimator={config.estimator!r} has none")
        return runner(data, config, progress=progress, callback=callback, temperature0=float(temperature0))
    return runner(data, config, log_every=log_every, duality_gap=duality_gap, checkpoint=checkpoint,
                  checkpoint_every=checkpoint_every, progress=progress, callback=callback)


def _stop_reason(result, config):
    """Why an unconverged solve stopped before its budget (``None`` when it used all of it): from the
    iteration count and, for Newton, the last history row (its decrement and line-search step)."""
    if config.estimator == "newton" and get_loss(config.loss).name == "hinge":
        return ("the hinge problem is one linear (or conic) program, solved once, and its certificate "
                "falls short")
    if result.n_iter >= config.steps:
        return None
    if result.cg_exhausted:
        return (f"its Krylov budget (max_cg={config.max_cg} iterations per model step) ran out in "
                f"{result.cg_exhausted} model steps, and the inexact steps stalled; raise max_cg")
    if not np.isfinite(result.lower_bound):
        return "no certified lower bound was available at the points it reached"
    last = result.history.iloc[-1] if len(result.history) else {}
    step = last.get("step_length", np.nan) if len(last) else np.nan
    decrement = last.get("decrement", np.nan) if len(last) else np.nan
    if step == 0.0:
        return "its line search found no representable decrease at the finest smoothing"
    if np.isfinite(decrement):
        return ("the Newton decrement fell to float64 resolution (no representable decrease left) while the "
                "dual bound stayed short")
    return "it stalled (no further progress was possible)"


def _reported_gap(value, lower, consistent):
    """value − lower; a negative difference within rounding (``consistent``) is reported as 0, one
    beyond it as it is (with the :class:`~loglinear_grpo.CertificateWarning` already given)."""
    return max(value - lower, 0.0) if consistent else value - lower


def _warn_unconverged(result, config, what):
    """Warn (:class:`ConvergenceWarning`) when ``tol`` was set and not certified, saying what stopped the
    solver: its budget used up (``n_iter == steps``: raise steps) or a stall before it (no representable
    decrease, a failed line search, no bound, the hinge's single program: more steps will not help).
    The default estimator is suggested only when another one ran."""
    if config.tol is None or result.converged:
        return
    estimator = config.estimator
    other = (", or use the default estimator ('newton'), which certifies in far fewer iterations"
             if estimator not in ("newton", "newton_cg") else "")
    if result.cg_exhausted and result.n_iter >= config.steps:
        other += (f" (the Krylov budget also ran out in {result.cg_exhausted} model steps: raise max_cg, now "
                  f"{config.max_cg})")
    gap = f"a certified relative gap of {result.relative_gap:.2e} > tol={config.tol:g}"
    reason = _stop_reason(result, config)
    if reason is None:
        message = (f"solve ({estimator}) used its whole budget, steps={config.steps} {what}, and reached {gap}; "
                   f"raise steps or loosen tol{other}")
    else:
        hinge = estimator == "newton" and get_loss(config.loss).name == "hinge"
        ran = "solved the hinge program" if hinge else \
            f"stopped after {result.n_iter} of at most {config.steps} {what}, before its budget ran out"
        remedy = (f"loosen tol (to about {max(result.relative_gap, config.tol):.0e}), or rescale the problem"
                  if np.isfinite(result.relative_gap) else
                  "bound Θ (e.g. radius=...) so that a rigorous bound applies, or rescale the problem")
        message = (f"solve ({estimator}) {ran}: {reason}. It reached {gap}, and raising steps will not help: "
                   f"{remedy}{other}")
    warnings.warn(message, ConvergenceWarning, stacklevel=4)


def peak_rss_bytes():
    """The process's peak resident memory so far, in bytes (``getrusage``; ``None`` where unavailable: it
    goes into strict JSON, which has no NaN)."""
    try:
        import resource
        import sys
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) * (1 if sys.platform == "darwin" else 1024)
    except (ImportError, OSError, ValueError):           # pragma: no cover - not POSIX
        return None


def _solve_newton(data, config, *, progress, callback, temperature0=None, **_first_order_only):
    from .newton import newton_minimax
    from .newton_cg import newton_cg_minimax
    names = data.group_names
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.steps, desc=f"{config.estimator}/{config.method}/{config.loss}", unit="it",
                   mininterval=0.5)

    def record(row):
        losses, alpha = row.pop("losses"), row.pop("alpha")
        theta = row.pop("theta")
        out = {"step": row["iteration"], "worst_loss": float(np.max(losses)),
               **{f"loss/{n}": float(v) for n, v in zip(names, losses)},
               **{f"alpha/{n}": float(v) for n, v in zip(names, alpha)},
               "gap": row["gap"], **{k: v for k, v in row.items() if k not in ("iteration", "gap")}}
        rows.append(out)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(gap=f"{row['gap']:.2e}", refresh=False)
        if callback is not None:
            callback(SolverState(theta=theta, log_alpha=np.log(np.maximum(alpha, 1e-300)), theta_sum=theta,
                                 alpha_sum=alpha, step=row["iteration"]), out)

    weights = None if config.adaptive_alpha else config.alpha0
    tol = config.tol if config.tol is not None else DEFAULT_TOL
    try:
        if get_loss(config.loss).name == "hinge" and config.estimator == "newton":
            res = hinge_program(data, config.beta, config.theta_set, weights=weights, chi=config.chi,
                                shift=config.shift)
        else:
            minimax = newton_minimax if config.estimator == "newton" else \
                functools.partial(newton_cg_minimax, max_cg=config.max_cg)
            res = minimax(data, config.loss, config.beta, config.theta_set, weights=weights, chi=config.chi,
                          theta0=config.theta0, tol=tol, max_iter=config.steps, callback=record,
                          shift=config.shift, temperature0=temperature0)
    finally:
        if bar is not None:
            bar.close()
    alpha = res.alpha
    state = SolverState(theta=res.theta, log_alpha=np.log(np.maximum(alpha, 1e-300)), theta_sum=res.theta.copy(),
                        alpha_sum=alpha.copy(), step=res.n_iter)
    value = objective_value(res.theta, data, config)
    lower = res.lower_bound                        # never clipped: a bound above the value is reported
    consistent = check_consistent(value, lower, f"solve ({config.estimator})")
    result = SolveResult(theta=res.theta, converged=consistent and is_converged(value, lower, tol),
                         gap=_reported_gap(value, lower, consistent), value=value, lower_bound=lower, n_iter=res.n_iter,
                         alpha=alpha, alpha_avg=alpha, theta_avg=res.theta, theta_last=res.theta,
                         bound_kind=res.bound_kind, history=pd.DataFrame(rows), config=config, state=state,
                         passes=res.passes, temperature=res.temperature, cg_iterations=res.cg_iterations,
                         cg_exhausted=res.cg_exhausted,
                         memory=None if config.memory is None else {**config.memory, "peak_rss_bytes": peak_rss_bytes()})
    _warn_unconverged(result, config, "Newton iterations")
    return result


def _solve_first_order(data, config, *, log_every, duality_gap, checkpoint, checkpoint_every, progress, callback):
    if log_every is None:
        log_every = max(1, config.steps // 100)
    log_every = check_positive_int("log_every", log_every)
    if checkpoint_every is None:
        checkpoint_every = max(1, config.steps // 10)
    checkpoint_every = check_positive_int("checkpoint_every", checkpoint_every)

    state = init(data, config)
    rows = []
    ckpt = fingerprint = None
    if checkpoint is not None:
        ckpt = CheckpointFile(checkpoint).acquire()       # checked and locked before the first step
        try:
            fingerprint = run_fingerprint(data, config)
            if ckpt.exists():
                state, rows = ckpt.load(fingerprint, SolverState)
                if state.step > config.steps:
                    raise ValueError(f"checkpoint {ckpt.path} is at step {state.step}, past steps={config.steps}: "
                                     "give steps >= that to continue it")
        except BaseException:
            ckpt.release()
            raise
    try:
        return _first_order_loop(data, config, state, rows, log_every, duality_gap, ckpt, fingerprint,
                                 checkpoint_every, progress, callback)
    finally:
        if ckpt is not None:
            ckpt.release()


def _first_order_loop(data, config, state, rows, log_every, duality_gap, ckpt, fingerprint, checkpoint_every,
                      progress, callback):
    names = data.group_names
    if not rows:
        rows.append(_history_row(state, data, config, names, duality_gap))

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.steps, initial=state.step, desc=f"{config.estimator}/{config.method}/{config.loss}",
                   unit="it", mininterval=0.5)
    sampler_cache = {}
    workspace = Workspace(data) if config.estimator == "full" else None
    certified = config.tol is not None
    resumed_on_check, next_check = _check_schedule(state.step, config)
    cert, cert_step = None, -1
    done = False
    if certified and state.step and resumed_on_check:     # a fresh run certifies here too: stop if it would
        cert, cert_step = certify(*_candidates(state, config), data, config, config.tol), state.step
        done = is_converged(cert.value, cert.lower_bound, config.tol)
    try:
        single = (config.estimator == "stochastic" and config.batch_size == 1 and config.scalar_loss is not None
                  and data.storage.dense_rows and not data.overlapping)
        fast = callback is None and (single or config.estimator == "full")
        while not done and state.step < config.steps:
            if fast:                     # run in place up to the next step that logs, certifies or saves
                events = [config.steps, (state.step // log_every + 1) * log_every]
                if certified:
                    events.append(max(next_check, state.step + 1))
                if ckpt is not None:
                    events.append((state.step // checkpoint_every + 1) * checkpoint_every)
                run = _single_pair_run(state, data, config, min(events), sampler_cache) if single else \
                    _full_batch_run(state, data, config, min(events), workspace)
                state, info = run, {}
            else:
                batch = sample_batch(config, state.step, sampler_cache) if config.estimator == "stochastic" else None
                state, info = update(state, data, config, batch, workspace)
            t = state.step
            logged = t % log_every == 0 or t == config.steps
            if logged:
                rows.append(_history_row(state, data, config, names, duality_gap))
            if certified and (t >= next_check or t == config.steps):
                cert, cert_step = certify(*_candidates(state, config), data, config, config.tol), t
                next_check = _next_check(t, config)
                if logged:
                    rows[-1]["gap"] = cert.gap
                if is_converged(cert.value, cert.lower_bound, config.tol):
                    if not logged:
                        rows.append({**_history_row(state, data, config, names, False), "gap": cert.gap})
                    break
            if bar is not None and logged:
                bar.update(t - bar.n)
                bar.set_postfix(worst=f"{rows[-1]['worst_loss']:.4g}", refresh=False)
            if ckpt is not None and (t % checkpoint_every == 0 or t == config.steps):
                ckpt.save(state, rows, fingerprint)
            if callback is not None:
                callback(state, info)
    except KeyboardInterrupt:
        if ckpt is not None:                                # keep the progress, then stop as asked
            ckpt.save(state, rows, fingerprint)
        raise
    finally:
        if bar is not None:
            bar.close()
    if ckpt is not None:
        ckpt.save(state, rows, fingerprint)
    if cert_step != state.step:
        cert = certify(*_candidates(state, config), data, config, config.tol)
    tol = config.tol if config.tol is not None else DEFAULT_TOL
    theta = averaged_theta(state) if config.estimator == "stochastic" else cert.theta
    value = cert.value
    lower = cert.lower_bound                       # never clipped: a bound above the value is reported
    consistent = check_consistent(value, lower, f"solve ({config.estimator})")
    result = SolveResult(theta=theta, converged=consistent and is_converged(value, lower, tol),
                         gap=_reported_gap(value, lower, consistent),
                         value=value, lower_bound=lower, n_iter=state.step, alpha=cert.alpha,
                         alpha_avg=averaged_alpha(state), theta_avg=averaged_theta(state),
                         theta_last=state.theta.copy(), bound_kind=cert.bound_kind, history=pd.DataFrame(rows),
                         config=config, state=state)
    _warn_unconverged(result, config, "iterations")
    return result


#: ``solve`` dispatches on the resolved estimator: {estimator: runner}
RUNNERS = {"newton": _solve_newton, "newton_cg": _solve_newton, "full": _solve_first_order, "closed_form": _solve_first_order,
           "stochastic": _solve_first_order}
