"""Property tests: simplex invariants, projections, gradients, loss stability."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import loglinear_grpo as lg
from loglinear_grpo.losses import get_loss
from loglinear_grpo.solver import log_normalize

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@given(arrays(np.float64, st.integers(1, 50), elements=st.floats(-1e300, 1e300)),
       arrays(np.float64, 50, elements=st.floats(0, 1e4)), st.floats(1e-6, 1e3))
def test_alpha_step_stays_on_simplex(log_w, losses, eta):
    log_alpha, alpha = log_normalize(log_w)
    log_alpha, alpha = log_normalize(log_alpha + eta * losses[:log_w.size])
    assert np.all(np.isfinite(log_alpha))
    assert np.all(alpha >= 0)
    assert abs(alpha.sum() - 1.0) < 1e-12
    np.testing.assert_allclose(np.exp(log_alpha), alpha, atol=1e-15)


def test_thousand_groups_huge_losses_no_nan_and_recovery():
    """K = 1000 groups with losses 1e4: α stays finite; a starved group's weight can recover."""
    k = 1000
    rng = np.random.default_rng(0)
    log_alpha = np.full(k, -np.log(k))
    for _ in range(50):
        losses = rng.uniform(0, 1e4, k)
        losses[7] = 0.0                          # group 7 looks perfect for a while
        log_alpha, alpha = log_normalize(log_alpha + 1.0 * losses)
        assert np.all(np.isfinite(log_alpha)) and np.all(np.isfinite(alpha))
    assert alpha[7] == 0.0 and np.isfinite(log_alpha[7])
    for _ in range(200):                         # now group 7 is the worst off
        losses = np.zeros(k)
        losses[7] = 1e4
        log_alpha, alpha = log_normalize(log_alpha + 1.0 * losses)
    assert alpha[7] > 0.99


def test_solver_with_thousand_groups_and_large_losses():
    rng = np.random.default_rng(1)
    k, per = 1000, 3
    groups = np.repeat(np.arange(k), per)
    diff = rng.normal(size=(k * per, 4)) * 1e2
    data = lg.PreferenceData(diff, groups, ref_margin=np.full(k * per, 1e2))   # losses ≈ 1e4
    res = lg.solve(data, loss="dpo", estimator="stochastic", steps=300, step_size=1e-4,
                   alpha_step_size=1.0, batch_size=4, log_every=300)
    assert np.all(np.isfinite(res.state.log_alpha))
    assert abs(res.alpha.sum() - 1) < 1e-12 and np.all(np.isfinite(res.theta))
    assert res.history["worst_loss"].notna().all()


# ------------------------------------------------------------------ projections
vec4 = arrays(np.float64, 4, elements=finite)


@settings(max_examples=60, deadline=None)
@given(vec4, vec4, st.floats(0.1, 50), vec4)
def test_ball_projection_idempotent_nonexpansive(x, y, radius, center):
    ball = lg.L2Ball(radius, center)
    px, py = ball.project(x), ball.project(y)
    assert ball.contains(px)
    np.testing.assert_allclose(ball.project(px), px, rtol=1e-12, atol=1e-9)
    assert np.linalg.norm(px - py) <= np.linalg.norm(x - y) * (1 + 1e-12) + 1e-9


@settings(max_examples=60, deadline=None)
@given(vec4, vec4, arrays(np.float64, 4, elements=st.floats(-5, 0)),
       arrays(np.float64, 4, elements=st.floats(0, 5)))
def test_box_projection_idempotent_nonexpansive(x, y, lo, hi):
    box = lg.Box(lo, hi)
    px, py = box.project(x), box.project(y)
    assert box.contains(px)
    np.testing.assert_array_equal(box.project(px), px)
    assert np.linalg.norm(px - py) <= np.linalg.norm(x - y) + 1e-12


def _cvxpy_projection(x, constraints):
    import cvxpy as cp
    v = cp.Variable(x.size)
    cp.Problem(cp.Minimize(cp.sum_squares(v - x)), constraints(v)).solve()
    return v.value


@settings(max_examples=15, deadline=None)
@given(arrays(np.float64, 4, elements=st.floats(-20, 20)), st.floats(0.5, 5))
def test_closed_form_projections_equal_cvxpy(x, radius):
    ball = lg.L2Ball(radius, np.array([1.0, -1.0, 0.5, 0.0]))
    np.testing.assert_allclose(ball.project(x), _cvxpy_projection(x, ball.cvxpy_constraints), atol=1e-5)
    box = lg.Box(-radius, radius / 2)
    np.testing.assert_allclose(box.project(x), _cvxpy_projection(x, box.cvxpy_constraints), atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(arrays(np.float64, 3, elements=st.floats(-10, 10)), arrays(np.float64, 3, elements=st.floats(-10, 10)))
def test_convex_set_projection(x, y):
    """Θ = probability simplex, through the generic cvxpy (DPP) projection (accurate to ~1e-6)."""
    simplex = lg.ConvexSet(3, lambda v: [v >= 0, v.sum() == 1], max_norm=1.0)
    px, py = simplex.project(x), simplex.project(y)
    assert abs(px.sum() - 1) < 1e-6 and np.all(px > -1e-6)
    np.testing.assert_allclose(simplex.project(px), px, atol=1e-5)
    assert np.linalg.norm(px - py) <= np.linalg.norm(x - y) + 1e-5
    # the known sort-based answer
    u = np.sort(x)[::-1]
    css = np.cumsum(u) - 1
    rho = np.nonzero(u - css / np.arange(1, 4) > 0)[0][-1]
    np.testing.assert_allclose(px, np.maximum(x - css[rho] / (rho + 1), 0), atol=1e-5)


@pytest.mark.parametrize("y", [[0.0625, 0.0, -9.0], [0.25, 0.0, -10.0]])
def test_convex_set_projection_far_from_the_set(y):
    """Points hypothesis found: Clarabel 0.11 fails (user_limit, or a wrong point) on the cone form of
    ‖x − p‖²; the projection is posed as the plain QP ‖x‖² − 2pᵀx and matches the sort-based answer."""
    simplex = lg.ConvexSet(3, lambda v: [v >= 0, v.sum() == 1], max_norm=1.0)
    x = np.asarray(y)
    u = np.sort(x)[::-1]
    css = np.cumsum(u) - 1
    rho = np.nonzero(u - css / np.arange(1, 4) > 0)[0][-1]
    np.testing.assert_allclose(simplex.project(x), np.maximum(x - css[rho] / (rho + 1), 0), atol=1e-6)


# ------------------------------------------------------------------ losses and gradients
@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge"])
@settings(max_examples=25, deadline=None)
@given(theta=arrays(np.float64, 5, elements=st.floats(-2, 2)),
       alpha=arrays(np.float64, 3, elements=st.floats(0.01, 1)), beta=st.floats(0.1, 3))
def test_gradient_equals_finite_differences(problem, loss, theta, alpha, beta):
    alpha = alpha / alpha.sum()
    grad = lg.weighted_gradient(theta, alpha, problem, loss, beta)
    h = lg.margins(theta, problem)
    if loss == "hinge" and np.min(np.abs(beta * h - 1)) < 1e-4:
        return                                   # a kink lies within the difference step
    eps = 1e-6
    fd = np.empty(5)
    for j in range(5):
        e = np.zeros(5)
        e[j] = eps
        fd[j] = (alpha @ lg.group_losses(theta + e, problem, loss, beta)
                 - alpha @ lg.group_losses(theta - e, problem, loss, beta)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge"])
@given(h=arrays(np.float64, st.integers(1, 6000), elements=st.floats(-1e6, 1e6)), beta=st.floats(1e-3, 10))
@settings(deadline=None, max_examples=30)
def test_losses_finite_and_derivative_consistent(loss, h, beta):
    spec = get_loss(loss)
    value, deriv = spec.value_and_grad(h, beta)
    assert np.all(np.isfinite(value)) and np.all(value >= 0) and np.all(np.isfinite(deriv))
    np.testing.assert_allclose(value, spec.value(h, beta), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(deriv, spec.derivative(h, beta), rtol=1e-12, atol=1e-300)


def test_dpo_loss_extremes_exact():
    h = np.array([-1e6, -50.0, 0.0, 50.0, 1e6])
    v = lg.pair_loss(h, "sigmoid", beta=1.0)            # TRL's name for DPO
    np.testing.assert_allclose(v[[0, 1]], [1e6, 50.0], rtol=1e-15)
    assert v[2] == pytest.approx(np.log(2))
    assert v[3] == pytest.approx(np.exp(-50.0), rel=1e-12) and v[4] == 0.0
    np.testing.assert_allclose(lg.pair_loss_derivative(h, "dpo", 2.0)[[0, 4]], [-2.0, 0.0])
    assert lg.pair_loss(np.array([2.0]), "ipo", 0.5)[0] == pytest.approx(1.0)
    assert lg.pair_loss(np.array([0.5]), "hinge", 1.0)[0] == pytest.approx(0.5)
