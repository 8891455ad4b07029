"""Checks of plain numbers: the leaf under :mod:`loglinear_grpo._validation` and :mod:`loglinear_grpo.losses`.

It imports nothing from the package, so that the loss table (which checks β with it) and the
boundary checks of the public API (which check a loss name against that table) form no import
cycle. The public API reaches these checks through :mod:`loglinear_grpo._validation`.
"""
from __future__ import annotations

import numbers

import numpy as np


def check_positive_finite(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)
