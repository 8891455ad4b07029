"""The cvxpy plumbing shared by the exact reference (:mod:`loglinear_grpo.exact`), the closed-form θ
step on a general convex set (:mod:`loglinear_grpo.closed_form`) and the hinge's conic program
(:mod:`loglinear_grpo.hinge`): S in memory for cvxpy, and one solve with Clarabel, SCS as fall-back."""
from __future__ import annotations

import warnings

from .data import PreferenceData


def _cvxpy_diff(data):
    """The data with S in memory (cvxpy and the LP need its entries): a memmap is read, an implicit
    S formed when it fits (``ValueError`` otherwise)."""
    if not data.storage.in_memory:
        return PreferenceData(data.explicit_diff(), data.group_input, data.ref_margin,
                              group_names=data.group_names, check_finite=False)
    return data


def _solve_cvxpy(problem, solver=None):
    import cvxpy as cp
    tried = []
    for name in ([solver] if solver else ["CLARABEL", "SCS"]):
        try:
            problem.solve(solver=name)
        except cp.error.SolverError as exc:   # pragma: no cover - depends on installed solvers
            tried.append(f"{name}: {exc}")
            continue
        if problem.status in ("optimal", "optimal_inaccurate"):
            if problem.status == "optimal_inaccurate":
                warnings.warn("cvxpy reports optimal_inaccurate", RuntimeWarning, stacklevel=3)
            return
        tried.append(f"{name}: status {problem.status}")
    raise ValueError("cvxpy could not solve the problem (" + "; ".join(tried)[:300] + "); it may be badly "
                     "scaled (rescale diff or ref_margin) or, on an unbounded Θ, have no minimiser (give a radius)")
