"""What the user sets for :func:`~loglinear_grpo.solve`: one declarative, validated object.

In the style of TRL's ``DPOConfig`` (a frozen settings object) and scikit-learn's
``_parameter_constraints`` (the checks as a table, not as code spread through the solver):
:class:`Settings` holds exactly the user's choices, each checked by its entry of
:data:`CONSTRAINTS` and by the cross-field :data:`RULES`. What is *derived* from the data — group
sizes, the sampler's tables, resolved step sizes, the closed form's normal equations — is built
from it by :func:`~loglinear_grpo.make_config`, into a :class:`~loglinear_grpo.SolverConfig`.
The option list of :func:`~loglinear_grpo.solve` and :func:`~loglinear_grpo.make_config` is this
class's fields: written once.
"""
from __future__ import annotations

import dataclasses
import inspect
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._validation import METHODS, check_choice, check_loss, check_positive_finite, check_positive_int, \
    check_unit_interval

ESTIMATOR_CHOICES = ("auto", "newton", "newton_cg", "full", "stochastic", "closed_form")

class _DefaultTol(str):
    """``tol``'s default: 10⁻⁶ for the deterministic estimators, ``None`` (all T steps, Algorithm 1 as
    written) for ``stochastic``. Equal to the string ``"default"`` (accepted too); shown as what it means."""

    def __repr__(self):
        return "1e-6 (None for estimator='stochastic')"


DEFAULT = _DefaultTol("default")


def _steps(name, value):
    if value is None:
        return None
    value = check_positive_int(name, value)
    if value > 2 ** 62:
        raise ValueError(f"{name} must be at most 2**62, got {value}")
    return value


def _tol(name, value):
    if value is None or (isinstance(value, str) and value == DEFAULT):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number or None, got {value!r}")
    return float(value)


def _seed(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _optional_positive_int(name, value):
    return None if value is None else check_positive_int(name, value)


def _adjustment(name, value):
    """C of the group adjustment c_g = C_g/√N_g: ``None``, a number ≥ 0, one per group, or {group: C}
    (checked against the data by :func:`~loglinear_grpo.objective.group_adjustment`)."""
    def number(v, where=""):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not np.isfinite(v) or v < 0:
            raise ValueError(f"{name}{where} must be a finite number >= 0, got {v!r}")
        return float(v)
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be None, a number >= 0, one number per group or a dict {{group: C}}, "
                         f"got {value!r}")
    if isinstance(value, dict):
        if not value:
            raise ValueError(f"{name}: an empty dict names no group; give None for no adjustment")
        return {str(k): number(v, f"[{k!r}]") for k, v in value.items()}
    if isinstance(value, (numbers.Real, np.generic)) and not isinstance(value, bool):
        return number(value)
    try:
        values = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be None, a number >= 0, one number per group or a dict "
                         f"{{group: C}}, got {value!r}") from None
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{name} must be one number or a 1-D sequence of one per group, got shape {values.shape}")
    return tuple(number(float(v), f"[{i}]") for i, v in enumerate(values))


def _as_is(name, value):
    return value


#: one check per setting: ``check(name, value) -> canonical value`` (``ValueError`` naming the setting)
CONSTRAINTS = {
    "loss": lambda name, v: check_loss(v),
    "beta": check_positive_finite,
    "method": lambda name, v: check_choice(name, v, METHODS),
    "estimator": lambda name, v: check_choice(name, v, ESTIMATOR_CHOICES),
    "steps": _steps,
    "tol": _tol,
    "radius": _as_is,           # Θ is checked as a whole by make_constraint (it needs d)
    "center": _as_is,
    "constraint": _as_is,
    "chi": check_unit_interval,
    "adjustment": _adjustment,
    "seed": _seed,
    "batch_size": check_positive_int,
    "step_size": _as_is,        # resolved against the data by make_config ("theory", "auto", c/sqrt(t))
    "alpha_step_size": _as_is,
    "theta0": _as_is,           # needs d
    "check_every": _optional_positive_int,
    "max_cg": _optional_positive_int,
}

#: cross-field rules: ``(applies(settings), message)``, checked in order after every field's own check
RULES = (
    (lambda s: s.estimator == "closed_form" and s.loss != "ipo",
     "estimator='closed_form' is the GR-IPO weighted least squares: it needs loss='ipo'"),
    (lambda s: s.chi != 1.0 and s.method != "group_robust",
     "chi trades worst-case for average loss in method='group_robust' only"),
    (lambda s: s.estimator in ("auto", "newton", "newton_cg") and (s.step_size is not None or s.alpha_step_size is not None),
     "step_size and alpha_step_size belong to the first-order estimators (estimator='full', 'stochastic' or "
     "'closed_form'); the Newton solver needs none"),
    (lambda s: s.max_cg is not None and s.estimator not in ("auto", "newton_cg"),
     "max_cg: only for the matrix-free solver (estimator='newton_cg' or 'auto'): its Krylov iterations per "
     "model step"),
    (lambda s: s.estimator == "closed_form" and s.step_size is not None,
     "step_size: the closed-form θ step is exact; only alpha_step_size applies"),
)


@dataclass(frozen=True)
class Settings:
    """The options of :func:`~loglinear_grpo.solve` (documented there), validated on construction.

    Every field is checked by its entry of :data:`CONSTRAINTS` (and stored in canonical form:
    ``loss="sigmoid"`` becomes ``"dpo"``), then by :data:`RULES`. Frozen: a variant is
    ``dataclasses.replace(settings, ...)`` (validated again).
    """

    loss: str = "dpo"
    beta: float = 0.1
    method: str = "group_robust"
    estimator: str = "auto"
    steps: int | None = None
    tol: Any = DEFAULT
    radius: Any = None
    center: Any = None
    constraint: Any = None
    chi: float = 1.0
    adjustment: Any = None
    seed: int = 0
    batch_size: int = 1
    step_size: Any = None
    alpha_step_size: Any = None
    theta0: Any = None
    check_every: int | None = None
    max_cg: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, CONSTRAINTS[f.name](f.name, getattr(self, f.name)))
        for applies, message in RULES:
            if applies(self):
                raise ValueError(message)

    @classmethod
    def from_options(cls, **options):
        """``Settings(**options)``, with a ``TypeError`` that lists the valid names for a mistyped one."""
        cls.check_names(options)
        return cls(**options)

    @staticmethod
    def check_names(options):
        unknown = sorted(set(options) - set(NAMES))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}: the settings are {list(NAMES)}")


#: the settings' names, in signature order
NAMES = tuple(f.name for f in dataclasses.fields(Settings))


def with_settings_signature(func, leading=("data", "config")):
    """Give ``func(data, config=None, *, <runtime options>, **settings)`` the full signature (the
    settings as keyword-only parameters with their defaults), for ``help()`` and editors."""
    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    head = [p for p in params if p.name in leading]
    rest = [p for p in params if p.name not in leading]
    settings = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
                for f in dataclasses.fields(Settings)]
    func.__signature__ = sig.replace(parameters=head + settings + rest)
    return func
