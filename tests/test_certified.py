"""The certified solve: defaults that reach the optimum, a gap that bounds the error, a warning when the
budget runs out — held against the cvxpy (Clarabel) exact optimum."""
import re
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import loglinear_grpo as lg
from conftest import ROOT, make_problem
from loglinear_grpo.synthetic import disagreeing_groups


def bt_problem(seed, sizes=(400, 120, 40), dim=6, scale=4.0):
    """The issue's problem: unequal groups, ‖s_i‖ ≤ 1, Bradley–Terry labels from disagreeing θ_g."""
    return disagreeing_groups(sizes, dim, seed=seed, scale=scale, ref_scale=0.3)


def exact_value(data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                   # Clarabel's "optimal_inaccurate" notes
        return lg.solve_exact(data, **kw).value


THETA_SETS = {"ball": dict(radius=4.0), "box": dict(constraint=lg.Box(-1.0, 1.5)), "none": {}}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge"])
@pytest.mark.parametrize("theta_set", ["ball", "box", "none"])
def test_default_solve_reaches_the_exact_optimum(seed, loss, theta_set):
    data = bt_problem(seed)
    beta = 1.0 if seed else 0.1
    kw = dict(loss=loss, beta=beta, **THETA_SETS[theta_set])
    res = lg.solve(data, **kw)
    reference = exact_value(data, **kw)
    assert res.converged
    assert res.gap <= 1e-6 * max(1.0, abs(res.value))
    assert abs(res.value - reference) <= 1e-5 * max(1.0, abs(reference))
    assert res.value - reference <= res.gap + 1e-7 * max(1.0, abs(reference))   # the gap bounds the error
    assert np.isclose(res.alpha.sum(), 1.0) and np.all(res.alpha >= 0)
    assert res.value == pytest.approx(lg.worst_group_loss(res.theta, data, loss, beta), rel=1e-12)


@pytest.mark.parametrize("method", ["importance_sampling", "vanilla"])
@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge"])
def test_fixed_weight_methods_are_certified_best_responses(method, loss):
    import cvxpy as cp
    data = make_problem(seed=4)
    res = lg.solve(data, loss=loss, beta=0.5, method=method, radius=2.0)
    weights = np.full(3, 1 / 3) if method == "importance_sampling" else data.group_sizes / data.n_samples
    theta = cp.Variable(data.dim)
    pair = lg.losses.get_loss(loss).cvxpy(cp, data.diff @ theta - data.ref_margin, 0.5)
    objective = cp.sum(cp.multiply((weights / data.group_sizes)[data.groups], pair))
    reference = cp.Problem(cp.Minimize(objective), [cp.norm(theta) <= 2.0]).solve(solver="CLARABEL")
    assert res.converged and res.value == pytest.approx(reference, rel=1e-6)
    np.testing.assert_allclose(res.alpha, weights)


def test_chi_tradeoff_is_certified():
    data = make_problem(seed=5)
    res = lg.solve(data, loss="dpo", beta=1.0, chi=0.4, radius=2.0)
    import cvxpy as cp
    theta = cp.Variable(data.dim)
    pair = cp.logistic(-(data.diff @ theta - data.ref_margin))
    group = [cp.sum(pair[data.groups == g]) / n for g, n in enumerate(data.group_sizes)]
    objective = 0.6 * sum(group) / 3 + 0.4 * cp.maximum(*group)
    reference = cp.Problem(cp.Minimize(objective), [cp.norm(theta) <= 2.0]).solve(solver="CLARABEL")
    assert res.converged and res.value == pytest.approx(reference, rel=1e-6)


def test_first_order_estimators_stop_on_the_certificate():
    data = bt_problem(3)
    newton = lg.solve(data, loss="dpo", beta=1.0, radius=4.0)
    for estimator, loss in (("full", "dpo"), ("full", "ipo"), ("closed_form", "ipo")):
        reference = newton if loss == "dpo" else lg.solve(data, loss="ipo", beta=1.0, radius=4.0)
        res = lg.solve(data, loss=loss, beta=1.0, radius=4.0, estimator=estimator)
        assert res.converged and res.n_iter < res.config.steps
        assert res.value - reference.value <= res.gap + 1e-12          # L* ≤ Newton's value
        assert res.value == pytest.approx(reference.value, rel=2e-6)
        assert res.history["gap"].notna().any()


@pytest.mark.parametrize("estimator", ["newton", "full", "closed_form"])
def test_budget_exhausted_warns_and_reports_unconverged(estimator):
    data = bt_problem(0)
    with pytest.warns(lg.ConvergenceWarning, match="relative gap"):
        res = lg.solve(data, loss="ipo", radius=4.0, estimator=estimator, steps=3, tol=1e-10)
    assert not res.converged and res.n_iter == 3
    assert res.gap > 1e-10 * max(1.0, abs(res.value))


def test_stochastic_runs_all_steps_and_reports_its_gap():
    data = bt_problem(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lg.ConvergenceWarning)      # tol=None: no warning
        res = lg.solve(data, loss="dpo", radius=4.0, estimator="stochastic", steps=2000, step_size=0.05,
                       alpha_step_size=0.05)
    assert res.n_iter == 2000 and res.config.tol is None
    np.testing.assert_array_equal(res.theta, res.theta_avg)           # θ̄_T, what Proposition 3 bounds
    assert res.value - exact_value(data, loss="dpo", radius=4.0) <= res.gap + 1e-9
    assert res.converged == (res.gap <= 1e-6 * max(1.0, abs(res.value)))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), loss=st.sampled_from(["dpo", "ipo", "hinge"]),
       beta=st.sampled_from([0.1, 1.0, 3.0]), theta_set=st.sampled_from(["ball", "box"]),
       t=st.floats(0.0, 1.0), sizes=st.sampled_from([(30, 10, 5), (12, 40), (8, 8, 8, 30)]))
def test_reported_gap_bounds_the_true_suboptimality(seed, loss, beta, theta_set, t, sizes):
    """For any θ ∈ Θ and α on the simplex, duality_gap(θ, α) ≥ max_g L_g(θ) − L*."""
    rng = np.random.default_rng(seed)
    data = bt_problem(seed, sizes=sizes, dim=4)
    kw = dict(loss=loss, beta=beta, **THETA_SETS[theta_set])
    theta_set_obj = lg.L2Ball(4.0) if theta_set == "ball" else lg.Box(-1.0, 1.5)
    optimum = exact_value(data, **kw)
    exact = lg.solve(data, **kw)
    theta = theta_set_obj.project(t * exact.theta + (1 - t) * rng.normal(size=4) * 3)
    alpha = rng.dirichlet(np.ones(data.n_groups))
    gap = lg.duality_gap(theta, alpha, data, **kw)
    assert lg.worst_group_loss(theta, data, loss, beta) - optimum <= gap + 1e-7 * max(1.0, abs(optimum))
    assert exact.value - optimum <= exact.gap + 1e-7 * max(1.0, abs(optimum))


def test_best_response_agrees_across_loss_aliases():
    data = make_problem(seed=6)
    alpha = np.array([0.5, 0.3, 0.2])
    theta_dpo, value_dpo = lg.best_response(alpha, data, loss="dpo", beta=1.0, theta_set=lg.L2Ball(2.0))
    theta_sig, value_sig = lg.best_response(alpha, data, loss="sigmoid", beta=1.0, theta_set=lg.L2Ball(2.0))
    theta_hinge, value_hinge = lg.best_response(alpha, data, loss="hinge", beta=1.0, theta_set=lg.L2Ball(2.0))
    np.testing.assert_array_equal(theta_dpo, theta_sig)
    assert value_dpo == value_sig
    assert value_dpo == pytest.approx(alpha @ lg.group_losses(theta_dpo, data, "dpo", 1.0))
    assert not np.allclose(theta_dpo, theta_hinge)                 # "sigmoid" is not the hinge
    with pytest.raises(ValueError, match="loss"):
        lg.best_response(alpha, data, loss="kto")


def test_newton_on_wide_features_uses_the_row_space():
    """d > N (an LLM head): the N-dimensional reduction gives the exact optimum, dense or sparse."""
    rng = np.random.default_rng(7)
    n, d = 40, 150
    diff = rng.normal(size=(n, d)) * (rng.random((n, d)) < 0.2)
    center = rng.normal(size=d) * 0.1
    dense = lg.PreferenceData(diff, np.arange(n) % 3, ref_margin=diff @ center)
    sparse = lg.PreferenceData(sp.csr_matrix(diff), np.arange(n) % 3, ref_margin=diff @ center)
    for loss in ("dpo", "ipo"):
        kw = dict(loss=loss, beta=0.5, radius=0.3, center=center)
        reference = exact_value(dense, **kw)
        for data in (dense, sparse):
            res = lg.solve(data, **kw)
            # certified to tol (absolute 1e-6 below |value| = 1): the true error is within the gap
            assert res.converged and abs(res.value - reference) <= res.gap + 1e-8
            assert np.linalg.norm(res.theta - center) <= 0.3 * (1 + 1e-9)


def test_convex_set_theta():
    data = make_problem(seed=8, dim=3, sizes=(20, 30, 50))
    simplex = lg.ConvexSet(3, lambda v: [v >= 0, cp_sum(v) == 1], max_norm=1.0)
    res = lg.solve(data, loss="dpo", beta=1.0, constraint=simplex)
    reference = exact_value(data, loss="dpo", beta=1.0, constraint=simplex)
    assert res.converged and res.value == pytest.approx(reference, rel=1e-5)
    assert abs(res.theta.sum() - 1) < 1e-6 and res.theta.min() > -1e-6


def cp_sum(v):
    import cvxpy as cp
    return cp.sum(v)


def test_unconstrained_separable_dpo_certifies_a_small_loss():
    """No minimiser exists (the infimum 0 is not attained): the solver returns a θ whose certified
    worst-group loss is within tol of it, instead of running off to infinity."""
    rng = np.random.default_rng(9)
    s = rng.normal(size=(60, 3))
    s[s @ np.array([1.0, -2.0, 0.5]) < 0] *= -1                   # every pair agrees with one θ
    data = lg.PreferenceData(s, np.arange(60) % 2)
    res = lg.solve(data, loss="dpo", beta=1.0)
    assert res.converged and res.value <= 1e-6 and np.all(np.isfinite(res.theta))


def test_quick_start_runs_as_printed():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n.*?```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(compile(block, "README quick start", "exec"), namespace)      # noqa: S102 - our own README
    res = namespace["res"]
    assert res.converged and res.gap <= 1e-6 * max(1.0, abs(res.value))
