"""Boundary checks shared by the public API (one place, one message style).

The numeric check the loss table itself needs (:func:`check_positive_finite`) lives in
:mod:`loglinear_grpo._numbers` and is re-exported here: this module imports
:mod:`loglinear_grpo.losses` (for :func:`check_loss`) and the loss table must not import it back.
"""
from __future__ import annotations

import numbers

import numpy as np

from ._numbers import check_positive_finite  # noqa: F401 (re-exported: the API's checks in one place)
from .losses import get_loss

METHODS = ("group_robust", "importance_sampling", "vanilla")
ESTIMATORS = ("auto", "newton", "newton_cg", "full", "stochastic", "closed_form")


def check_choice(name, value, choices, aliases=None):
    """Return the canonical spelling of ``value`` or raise ``ValueError`` naming ``name``."""
    table = aliases if aliases is not None else {c: c for c in choices}
    if not isinstance(value, str) or value not in table:
        raise ValueError(f"{name} must be one of {sorted(table)}, got {value!r}")
    return table[value]


def check_loss(loss):
    """Canonical loss name (``"sigmoid"`` → ``"dpo"``); ``ValueError`` for an unknown name."""
    return get_loss(loss).name


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_unit_interval(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return float(value)


def check_vector(name, value, dim):
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (dim,):
        raise ValueError(f"{name} must have shape ({dim},), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return arr
