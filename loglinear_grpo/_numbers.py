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


def half_physical_memory():
    """Half the machine's physical memory in bytes (8 GiB where the system does not say): the default
    budget of the solvers that predict their memory before allocating (the hinge program, the Newton
    solver's matrices)."""
    import os
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2
    except (AttributeError, ValueError, OSError):
        return 8 << 30


def nbytes_text(nbytes):
    """Bytes for a message: GiB from 1 GiB up, MiB from 1 MiB up, else KiB."""
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"
