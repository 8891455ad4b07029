"""Issue 18, item 1: the certificate never claims more than it proves.

A column of S in other units, near-duplicate rows, d > N: on R^d (the default), a ball and a box, the
reported gap must bound the true suboptimality, measured against cvxpy on an equivalent
well-conditioned problem (a column rescaling of S is undone by rescaling θ, so L* is known
without solving the badly conditioned problem), and a lower bound above the value is reported,
never clipped.
"""
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loglinear_grpo as lg
import loglinear_grpo.solver as solver_module
from conftest import make_problem
from loglinear_grpo.certificate import CertificateWarning, check_consistent


def exact(data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lg.solve_exact(data, **kw).value


def quiet_solve(data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lg.ConvergenceWarning)
        return lg.solve(data, **kw)


def rescaled(data, scales):
    return lg.PreferenceData(np.asarray(data.diff) * scales, data.groups, data.ref_margin,
                             group_names=data.group_names)


def assert_honest(res, reference, slack=2e-7):
    """The gap bounds the true error (``slack``: the reference's own accuracy)."""
    excess = res.value - reference
    assert excess <= res.gap + slack * max(1.0, abs(reference)), \
        f"{res.summary()}: {excess:.3e} above the optimum, gap says ≤ {res.gap:.3e}"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("loss", ["ipo", "dpo"])
def test_item01_column_rescaling_keeps_the_certificate_honest(loss, seed):
    """One feature in other units (×1e-7) leaves L* on R^d unchanged; the gap stays a bound and the
    solve still converges. Old code: IPO reported gap 0 while 1e-2 above L* for some seeds."""
    data = make_problem(dim=5, seed=seed)
    scales = np.ones(data.dim)
    scales[seed % data.dim] = 1e-7
    reference = exact(data, loss=loss)
    res = quiet_solve(rescaled(data, scales), loss=loss)
    assert_honest(res, reference)
    assert res.converged
    assert abs(res.value - reference) <= 1e-5 * max(1.0, abs(reference))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_item01_near_duplicate_rows_in_the_row_space_are_not_certified_away(seed):
    """d > N, two rows 1e-6 apart: IPO's optimum 0 is reachable on R^d. Old code: the row-space
    reduction lost that direction and certified a worst-group loss of ~1e-2 with gap 0."""
    rng = np.random.default_rng(seed)
    n, d = 40, 100
    s = rng.normal(size=(n, d))
    s[1] = s[0] + 1e-6 * rng.normal(size=d)
    data = lg.PreferenceData(s, np.arange(n) % 3, rng.normal(size=n))
    res = quiet_solve(data, loss="ipo")
    assert_honest(res, 0.0, slack=0.0)             # L* = 0: the linear system Sθ = r + 1/(2β) is solvable
    assert res.converged


def test_item01_bound_above_the_value_is_reported_not_clipped(monkeypatch):
    """A lower bound above the value means something is wrong: a CertificateWarning, converged=False,
    and the negative gap as it is (old code: min(lower, value), gap 0, converged)."""
    import loglinear_grpo.newton as newton_module
    data = make_problem()
    real = newton_module.newton_minimax

    def broken(*args, **kwargs):
        res = real(*args, **kwargs)
        res.lower_bound = res.value + 1e-3
        return res

    monkeypatch.setattr(newton_module, "newton_minimax", broken)
    with pytest.warns(CertificateWarning, match="inconsistent"):
        res = quiet_solve(data, loss="dpo", radius=2.0)
    assert not res.converged
    assert res.gap < -5e-4
    assert res.lower_bound > res.value


def test_item01_consistency_allows_rounding_only():
    assert check_consistent(1.0, 1.0 + 1e-15)
    with pytest.warns(CertificateWarning):
        assert not check_consistent(1.0, 1.0 + 1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_item01_hinge_on_rd_does_not_take_the_solvers_value_on_trust(seed):
    """The hinge on R^d: the bound comes from the LP's duals made feasible, not from HiGHS's reported
    value; on a badly scaled S the gap still bounds the error."""
    data = make_problem(seed=seed, noise=0.5)
    reference = exact(data, loss="hinge")
    res = quiet_solve(data, loss="hinge")
    assert res.converged and res.bound_kind == "feasible dual"
    assert_honest(res, reference)
    scales = np.ones(data.dim)
    scales[1] = 1e-7
    assert_honest(quiet_solve(rescaled(data, scales), loss="hinge"), reference)


# ------------------------------------------------------------------ the property (hypothesis)
@st.composite
def badly_conditioned(draw):
    """A problem, an equivalent badly conditioned one (column scales up to 1e±7: condition numbers
    to ~1e14; optionally near-duplicate rows; optionally d > N) and the Θ of each."""
    seed = draw(st.integers(0, 10_000))
    kind = draw(st.sampled_from(["none", "ball", "box"]))
    loss = draw(st.sampled_from(["ipo", "dpo"]))
    wide = draw(st.booleans()) and not (loss == "dpo" and kind == "none")   # separable DPO has no minimiser
    rng = np.random.default_rng(seed)
    if wide:
        n, d = draw(st.integers(12, 30)), draw(st.integers(35, 60))
        s = rng.normal(size=(n, d)) / np.sqrt(d)
        groups = np.arange(n) % 3
        base = lg.PreferenceData(s, groups, 0.3 * rng.normal(size=n))
    else:
        base = make_problem(sizes=(20, 50, 90), dim=draw(st.integers(2, 6)), seed=seed)
    s = np.asarray(base.diff).copy()
    if draw(st.booleans()):
        i, j = rng.choice(s.shape[0], 2, replace=False)
        s[j] = s[i] + 1e-6 * rng.normal(size=s.shape[1])
    base = lg.PreferenceData(s, base.groups, base.ref_margin)
    scales = np.ones(base.dim)
    if kind != "ball":                     # a ball is not invariant under column scaling
        cols = rng.choice(base.dim, size=min(2, base.dim), replace=False)
        scales[cols] = 10.0 ** np.array(draw(st.lists(st.integers(-7, 7), min_size=len(cols),
                                                      max_size=len(cols))), dtype=float)
    if kind == "none":
        theta_base, theta_scaled = {}, {}
    elif kind == "ball":
        theta_base = theta_scaled = dict(radius=draw(st.sampled_from([0.5, 2.0, 8.0])))
    else:
        lo, hi = -draw(st.sampled_from([0.5, 2.0])), draw(st.sampled_from([1.0, 3.0]))
        theta_base = dict(constraint=lg.Box(lo, hi))
        theta_scaled = dict(constraint=lg.Box(lo / scales, hi / scales))   # θ' = θ / scales
    return base, rescaled(base, scales), loss, theta_base, theta_scaled


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(badly_conditioned())
def test_item01_gap_bounds_the_true_suboptimality_on_badly_conditioned_problems(case):
    base, scaled, loss, theta_base, theta_scaled = case
    beta = 0.5
    try:
        reference = exact(base, loss=loss, beta=beta, **theta_base)
    except ValueError:                     # no minimiser (separable): nothing to compare with
        return
    res = quiet_solve(scaled, loss=loss, beta=beta, **theta_scaled)
    assert_honest(res, reference, slack=1e-6)
    if res.converged:
        assert res.gap <= 1e-6 * max(1.0, abs(res.value)) + 1e-15


def test_item01_warning_is_not_on_the_hot_path_of_a_converged_solve():
    """No CertificateWarning on an ordinary certified solve (the consistency test is not noisy)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CertificateWarning)
        res = lg.solve(make_problem(), loss="dpo")
    assert res.converged and res.bound_kind == "feasible dual"


def test_item01_result_fields_unchanged_for_bounded_sets():
    res = lg.solve(make_problem(), loss="dpo", radius=2.0)
    assert res.converged and res.bound_kind == "rigorous"
    assert solver_module.DEFAULT_TOL == 1e-6
