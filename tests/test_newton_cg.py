"""The matrix-free certified solver (issue 21): ``estimator="newton_cg"`` reaches the dense solver's
optimum, its gap is a valid bound, it allocates nothing of order N² or d², its budgets warn, and
``estimator="auto"`` picks it when the dense matrices would not fit."""
import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import loglinear_grpo as lg
import loglinear_grpo.newton as newton
from loglinear_grpo._krylov import box_quadratic_min, conjugate_gradient, lanczos_trust_region
from loglinear_grpo._linalg import ball_quadratic_min
from loglinear_grpo.newton_cg import choose_solver


def _problem(n, d, seed=0, k=3, scale=1.0):
    """Random pairs in K unequal groups (60/30/10%), reference margins of both signs."""
    rng = np.random.default_rng(seed)
    shares = np.array([0.6, 0.3, 0.1])[:k] if k == 3 else np.full(k, 1.0 / k)
    groups = rng.choice(k, n, p=shares / shares.sum())
    groups[:k] = np.arange(k)                          # every group present
    return lg.PreferenceData(scale * rng.normal(size=(n, d)), groups, 0.5 * rng.normal(size=n))


SETS = {"ball": lambda d: lg.L2Ball(1.0), "box": lambda d: lg.Box(-0.2, 0.2), "rd": lambda d: None}


CASES = [(loss, where, shape) for loss in ("dpo", "ipo") for where in SETS for shape in ((300, 20), (120, 400))
         if not (loss == "dpo" and where == "rd" and shape[1] > shape[0])]   # separable: DPO on R^d has no minimiser


@pytest.mark.parametrize("loss, where, shape", CASES)
def test_matrix_free_reaches_the_dense_optimum(loss, where, shape):
    n, d = shape
    data = _problem(n, d, seed=n + d)
    kw = dict(loss=loss, beta=0.5, constraint=SETS[where](d), tol=1e-8)
    dense = lg.solve(data, estimator="newton", **kw)
    free = lg.solve(data, estimator="newton_cg", **kw)
    assert dense.converged and free.converged and free.solver == "newton_cg"
    scale = max(1.0, abs(dense.value))
    assert abs(free.value - dense.value) <= 2e-8 * scale           # both certified to 1e-8
    assert free.lower_bound <= dense.value + 1e-12 * scale         # each bound is below the other's value
    assert dense.lower_bound <= free.value + 1e-12 * scale
    assert free.cg_iterations > 0 and free.passes > 0


@pytest.mark.parametrize("case", ["vanilla", "chi", "adjustment", "importance_sampling"])
def test_matrix_free_other_methods_and_options(case):
    data = _problem(250, 15, seed=3)
    kw = {"vanilla": dict(method="vanilla"), "chi": dict(chi=0.4), "adjustment": dict(adjustment=[0.0, 0.5, 2.0]),
          "importance_sampling": dict(method="importance_sampling")}[case]
    dense = lg.solve(data, estimator="newton", radius=1.0, tol=1e-8, **kw)
    free = lg.solve(data, estimator="newton_cg", radius=1.0, tol=1e-8, **kw)
    assert dense.converged and free.converged
    assert abs(free.value - dense.value) <= 2e-8 * max(1.0, abs(dense.value))


def test_matrix_free_on_memory_mapped_and_implicit_S(tmp_path):
    """Out-of-core S (memory-mapped float32) and an S given by its products only (a LinearOperator)."""
    import scipy.sparse.linalg as spla
    data = _problem(400, 30, seed=5)
    diff = data.explicit_diff().astype(np.float32)
    path = tmp_path / "S.f32"
    mapped = np.memmap(path, dtype=np.float32, mode="w+", shape=diff.shape)
    mapped[:] = diff
    mapped.flush()
    on_disk = lg.PreferenceData(np.memmap(path, dtype=np.float32, mode="r", shape=diff.shape), data.groups,
                                data.ref_margin)
    exact = diff.astype(np.float64)
    operator = lg.PreferenceData(spla.aslinearoperator(exact), data.groups, data.ref_margin)
    reference = lg.solve(lg.PreferenceData(exact, data.groups, data.ref_margin), estimator="newton", radius=2.0,
                         tol=1e-9)
    for source in (on_disk, operator):
        res = lg.solve(source, estimator="newton_cg", radius=2.0, tol=1e-9)
        assert res.converged
        assert abs(res.value - reference.value) <= 1e-6 * max(1.0, reference.value)   # float32 storage


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), steps=st.integers(1, 12), loss=st.sampled_from(["dpo", "ipo", "hinge"]),
       where=st.sampled_from(["ball", "box", "rd"]), max_cg=st.sampled_from([1, 3, 250]))
def test_matrix_free_gap_is_a_valid_bound(seed, steps, loss, where, max_cg):
    """Stopped at any budget, with any Krylov budget: the certified lower bound never exceeds the true
    optimum (the dense solver's certified value at 1e-11, plus its gap)."""
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(20, 80)), int(rng.integers(2, 12))
    data = _problem(n, d, seed=seed, scale=float(rng.uniform(0.3, 3.0)))
    if loss == "hinge" and where == "rd":
        where = "ball"                                            # (refused on R^d)
    constraint = SETS[where](d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lg.ConvergenceWarning)     # the truth's bounds hold either way
        truth = lg.solve(data, loss=loss, estimator="newton", constraint=constraint, tol=1e-11, steps=400)
        res = lg.solve(data, loss=loss, estimator="newton_cg", constraint=constraint, steps=steps, max_cg=max_cg)
    scale = max(1.0, abs(truth.value))
    assert res.lower_bound <= truth.value + 1e-9 * scale          # L* ≤ truth.value
    assert res.value >= truth.lower_bound - 1e-9 * scale          # L* ≥ truth.lower_bound


# ---------------------------------------------------------------- the smoothed hinge
HINGE_CASES = [(where, shape) for where in ("ball", "box") for shape in ((300, 20), (120, 400))]


@pytest.mark.parametrize("where, shape", HINGE_CASES)
def test_smoothed_hinge_reaches_the_linear_program(where, shape):
    """The hinge, matrix-free: softplus on the path μ → 0, certified with the hinge's own conjugate, equals
    the linear/conic program's certified optimum."""
    n, d = shape
    data = _problem(n, d, seed=n + d)
    kw = dict(loss="hinge", beta=0.5, constraint=SETS[where](d), tol=1e-6)
    exact = lg.solve(data, estimator="newton", **kw)
    free = lg.solve(data, estimator="newton_cg", **kw)
    assert exact.converged and free.converged and free.solver == "newton_cg"
    scale = max(1.0, abs(exact.value))
    assert free.value - exact.value <= 1e-6 * scale + exact.gap      # certified to 1e-6 against the exact program
    assert free.lower_bound <= exact.value + 1e-12 * scale and exact.lower_bound <= free.value + 1e-12 * scale
    # the value is the hinge's own (not the smoothed loss's)
    assert free.value == pytest.approx(lg.worst_group_loss(free.theta, data, loss="hinge", beta=0.5), rel=1e-13)


@pytest.mark.parametrize("case", ["vanilla", "chi", "adjustment"])
def test_smoothed_hinge_other_methods(case):
    data = _problem(200, 10, seed=11)
    kw = {"vanilla": dict(method="vanilla"), "chi": dict(chi=0.4), "adjustment": dict(adjustment=[0.0, 0.5, 2.0])}[case]
    exact = lg.solve(data, loss="hinge", estimator="newton", radius=1.0, tol=1e-6, **kw)
    free = lg.solve(data, loss="hinge", estimator="newton_cg", radius=1.0, tol=1e-6, **kw)
    assert exact.converged and free.converged
    assert abs(free.value - exact.value) <= 1e-6 * max(1.0, abs(exact.value)) + exact.gap


def test_smoothed_hinge_terms():
    """0 ≤ ℓ_ν − ℓ ≤ ν log 2; ℓ'_ν in (−β, 0] (the conjugate's domain) and the derivative of ℓ_ν;
    ℓ''_ν ≥ 0 the derivative of ℓ'_ν."""
    from loglinear_grpo.losses import get_loss
    spec, beta = get_loss("hinge"), 0.7
    h = np.r_[np.linspace(-30, 30, 2001), 1.0 / beta + np.linspace(-1e-5, 1e-5, 101)]     # and at the kink
    for nu in (1.0, 1e-2, 1e-6):
        value, d1, d2 = spec.smoothed(h, beta, nu)
        gap = value - spec.value(h, beta)
        assert np.all(gap >= -4 * np.finfo(float).eps * np.maximum(1.0, value)) and np.all(gap <= nu * np.log(2) * (1 + 1e-12))
        assert np.all((d1 >= -beta) & (d1 <= 0)) and np.all(d2 >= 0)
    step, h0 = 1e-6, np.array([-1.0, 0.3, 1.0 / beta, 2.0])
    v_hi, d_hi, _ = spec.smoothed(h0 + step, beta, 0.5)
    v_lo, d_lo, _ = spec.smoothed(h0 - step, beta, 0.5)
    _, d1, d2 = spec.smoothed(h0, beta, 0.5)
    np.testing.assert_allclose((v_hi - v_lo) / (2 * step), d1, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose((d_hi - d_lo) / (2 * step), d2, rtol=1e-5, atol=1e-9)


def test_auto_takes_the_smoothed_hinge_when_its_program_would_not_fit(monkeypatch):
    import loglinear_grpo.hinge as hinge
    data = _problem(150, 30, seed=6)
    need = hinge.hinge_program_nbytes(data, lg.L2Ball(1.0))
    monkeypatch.setattr(hinge, "HINGE_MEMORY_BUDGET", need - 1)
    estimator, plan = choose_solver(data, "hinge", lg.L2Ball(1.0))
    assert estimator == "newton_cg" and plan["dense_bytes"] == need
    res = lg.solve(data, loss="hinge", radius=1.0)
    assert res.solver == "newton_cg" and res.converged
    # on R^d the smoothed hinge cannot certify: auto keeps the program, which refuses with its prediction
    assert choose_solver(data, "hinge", lg.Unconstrained())[0] == "newton"
    with pytest.raises(MemoryError, match="hinge"):
        lg.solve(data, loss="hinge")
    # a first-order estimator's certificate takes the same route
    first = lg.solve(data, loss="hinge", estimator="full", radius=1.0, steps=50, tol=None)
    assert np.isfinite(first.lower_bound) and first.lower_bound <= res.value + 1e-9


def test_matrix_free_allocates_nothing_of_order_n2_or_d2():
    """d > N on a ball (where the dense solver takes the N × N row space) and N > d on a box (d × d):
    the matrix-free solve's peak Python allocation stays below one such matrix."""
    import cvxpy  # noqa: F401  (imported before tracing: its import is not the solve's memory)
    for n, d, constraint in ((600, 2000, lg.L2Ball(1.0)), (4000, 700, lg.Box(-0.1, 0.1))):
        data = _problem(n, d, seed=7)
        lg.solve(data.subset(np.arange(30)), estimator="newton_cg", constraint=constraint, steps=2)  # warm imports
        tracemalloc.start()
        try:
            res = lg.solve(data, estimator="newton_cg", constraint=constraint)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert res.converged
        smallest_matrix = 8 * min(n, d) ** 2
        assert peak < smallest_matrix / 2, (n, d, peak, smallest_matrix)      # the dense solver holds 5 to 8


@pytest.mark.parametrize("estimator", ["newton", "newton_cg"])
def test_the_heap_stays_far_below_a_memory_mapped_S(tmp_path, estimator):
    """Per-pair terms are made block by block (issue 21): both second-order solvers hold a few float64
    N-vectors at their peak (the margins, ℓ', the Hessian's pair weights, a product), not the ~16 they held
    before — far below a memory-mapped S of 16 float32 columns (8 N-vectors' worth)."""
    import cvxpy  # noqa: F401  (imported before tracing)
    n, d = 300_000, 16
    rng = np.random.default_rng(8)
    path = tmp_path / "S.f32"
    mapped = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, d))
    mapped[:] = rng.standard_normal((n, d), dtype=np.float32)
    mapped.flush()
    del mapped
    data = lg.PreferenceData(np.memmap(path, dtype=np.float32, mode="r", shape=(n, d)),
                             rng.choice(3, n, p=[0.6, 0.3, 0.1]), 0.3 * rng.standard_normal(n))
    for constraint in (lg.L2Ball(1.0), lg.Box(-0.1, 0.1)):
        lg.solve(data.subset(np.arange(500)), estimator=estimator, constraint=constraint)      # warm imports
        tracemalloc.start()
        try:
            res = lg.solve(data, estimator=estimator, constraint=constraint)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert res.converged
        assert peak < 9.5 * 8 * n, (constraint, peak / (8 * n))      # in float64 N-vectors (16-18 before)


def test_krylov_budget_runs_out_with_a_convergence_warning():
    data = _problem(300, 20, seed=1)
    with pytest.warns(lg.ConvergenceWarning, match=r"reached a certified relative gap of .*max_cg.*1"):
        res = lg.solve(data, estimator="newton_cg", radius=1.0, steps=8, max_cg=1)
    assert not res.converged and res.cg_exhausted > 0 and np.isfinite(res.gap)


def test_auto_picks_the_matrix_free_solver_when_the_dense_one_would_not_fit(monkeypatch):
    data = _problem(300, 900, seed=2)                  # d > N on a ball: the row space, 8 N² floats
    need, _ = newton.newton_memory_nbytes(data, lg.L2Ball(1.0))
    monkeypatch.setattr(newton, "NEWTON_MEMORY_BUDGET", need - 1)
    estimator, plan = choose_solver(data, "dpo", lg.L2Ball(1.0))
    assert estimator == "newton_cg" and plan["dense_bytes"] == need and plan["budget_bytes"] == need - 1
    res = lg.solve(data, radius=1.0)
    assert res.solver == "newton_cg" and res.converged
    assert res.memory["estimator"] == "newton_cg" and "more than the budget" in res.memory["reason"]
    assert res.memory["peak_rss_bytes"] > 0
    with pytest.raises(MemoryError, match="newton_cg"):         # asked for explicitly, the dense one refuses
        lg.solve(data, radius=1.0, estimator="newton")
    monkeypatch.setattr(newton, "NEWTON_MEMORY_BUDGET", need)
    assert lg.solve(data, radius=1.0).solver == "newton"
    # the hinge has its linear/conic program while that fits (its own budget), a general convex set no
    # matrix-free step: auto stays dense there
    assert choose_solver(data, "hinge", lg.L2Ball(1.0))[0] == "newton"


def test_first_order_certificates_use_the_matrix_free_solver_when_needed(monkeypatch):
    data = _problem(200, 12, seed=4)
    dense = lg.solve(data, estimator="full", radius=1.0, steps=300, tol=None)
    monkeypatch.setattr(newton, "NEWTON_MEMORY_BUDGET", 1)
    free = lg.solve(data, estimator="full", radius=1.0, steps=300, tol=None)
    np.testing.assert_array_equal(free.theta, dense.theta)              # same iterates
    assert free.lower_bound <= dense.value + 1e-12
    assert abs(free.lower_bound - dense.lower_bound) <= 1e-8


def test_settings_refuse_what_the_matrix_free_solver_cannot_do():
    data = _problem(50, 4)
    with pytest.raises(ValueError, match="only on a bounded"):      # the smoothed hinge: bounded Θ only
        lg.solve(data, loss="hinge", estimator="newton_cg")
    with pytest.raises(ValueError, match="only on a bounded"):
        lg.solve(data, loss="hinge", estimator="newton_cg", constraint=lg.Box(-1.0, np.inf))
    with pytest.raises(ValueError, match="max_cg"):
        lg.solve(data, estimator="full", max_cg=10, radius=1.0)
    with pytest.raises(ValueError, match="max_cg"):
        lg.solve(data, estimator="newton_cg", max_cg=0, radius=1.0)
    convex = lg.ConvexSet(4, lambda x: [x >= -1, x <= 1])
    with pytest.raises(ValueError, match="no matrix-free model step"):
        lg.solve(data, estimator="newton_cg", constraint=convex)


# ---------------------------------------------------------------- the Krylov solvers
def _psd(d, seed, rank=None):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(rank or d + 3, d))
    return a.T @ a, rng.normal(size=d)


@pytest.mark.parametrize("radius", [0.05, 1.0, 100.0, np.inf])
@pytest.mark.parametrize("keep", [True, False])
def test_lanczos_trust_region_matches_the_dense_subproblem(radius, keep):
    hess, b = _psd(30, 1)
    z, info = lanczos_trust_region(lambda v: hess @ v, b, radius, 1e-12 * np.linalg.norm(b), 400,
                                   keep_bytes=1 << 30 if keep else 0)
    exact = ball_quadratic_min(hess, -b, radius)
    assert info["converged"]
    np.testing.assert_allclose(z, exact, rtol=0, atol=1e-9 * max(1.0, np.linalg.norm(exact)))
    if np.isfinite(radius):
        assert np.linalg.norm(z) <= radius * (1 + 1e-12)


def test_lanczos_second_pass_rebuilds_the_same_point():
    hess, b = _psd(40, 2)
    kept, info_k = lanczos_trust_region(lambda v: hess @ v, b, 0.5, 1e-10, 200, keep_bytes=1 << 30)
    again, info_r = lanczos_trust_region(lambda v: hess @ v, b, 0.5, 1e-10, 200, keep_bytes=0)
    np.testing.assert_allclose(again, kept, rtol=1e-12, atol=1e-14)
    assert info_r["iterations"] == 2 * info_k["iterations"] - 1        # the recurrence ran twice


def test_conjugate_gradient_min_norm_on_a_singular_system():
    hess, _ = _psd(20, 3, rank=8)
    b = hess @ np.random.default_rng(0).normal(size=20)                # consistent
    x, info = conjugate_gradient(lambda v: hess @ v, b, 1e-12, 200)
    assert info["converged"]
    np.testing.assert_allclose(x, np.linalg.pinv(hess) @ b, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_step_matches_the_exact_bounded_least_squares(seed):
    hess, g = _psd(25, seed)
    theta = np.zeros(25)
    box = lg.Box(-0.05, 0.08)
    p, info = box_quadratic_min(lambda v: hess @ v, g, np.full(25, -0.05), np.full(25, 0.08), 1e-10, 5000)
    exact = box.minimize_quadratic(theta, g, hess)
    model = lambda x: g @ x + 0.5 * x @ hess @ x                        # noqa: E731
    assert info["converged"] and np.all(p >= -0.05) and np.all(p <= 0.08)
    assert model(p) <= model(exact) + 1e-10 * abs(model(exact))


def _implicit_head(tmp_path, n=300, length=4, hidden=32, vocab=60, seed=0):
    """An implicit S of an LLM head (``llm_head.features.PairDifferenceOperator``) over a random float16
    cache in benchmarks/implicit_features.py's layout, d = vocab · hidden > N."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from implicit_features import load_features, make_cache
    from llm_head.features import PairDifferenceOperator
    make_cache(str(tmp_path), n, length, hidden, vocab, seed=seed)
    features, chosen, rejected = load_features(str(tmp_path), n, length, hidden)
    op = PairDifferenceOperator(features, chosen, rejected)
    rng = np.random.default_rng(seed)
    groups = rng.choice(3, n, p=[0.6, 0.3, 0.1])
    groups[:3] = np.arange(3)
    return op, lg.PreferenceData(op, groups, rng.normal(size=n))


def test_implicit_head_float32_hessian_products_and_the_row_space_optimum(tmp_path):
    """On an LLM head's implicit S the Hessian products run in float32 (about 1e-7 relative); the
    certified optimum is the row-space solver's, for DPO and IPO."""
    op, data = _implicit_head(tmp_path)
    fast_mv, fast_rmv = data.storage.approximate_products()
    rng = np.random.default_rng(1)
    x, u = rng.normal(size=data.dim), rng.normal(size=data.n_samples)
    exact_mv, exact_rmv = op.matvec(x), op.rmatvec(u)
    assert 0 < np.abs(fast_mv(x) - exact_mv).max() <= 1e-5 * np.abs(exact_mv).max()
    assert 0 < np.abs(fast_rmv(u) - exact_rmv).max() <= 1e-5 * np.abs(exact_rmv).max()
    for loss in ("dpo", "ipo"):
        row_space = lg.solve(data, loss=loss, radius=1.0, estimator="newton", tol=1e-8)
        free = lg.solve(data, loss=loss, radius=1.0, estimator="newton_cg", tol=1e-8)
        assert row_space.converged and free.converged
        assert abs(free.value - row_space.value) <= 2e-8 * max(1.0, row_space.value)


def test_a_failed_float32_step_switches_to_exact_products(monkeypatch):
    """Approximate products far less precise than float32 (relative noise 1e-3) cannot stop a solve:
    once a step fails with them it is taken again with the exact products, which serve to the end."""
    import loglinear_grpo.newton_cg as newton_cg
    import loglinear_grpo.storage as storage
    data = _problem(200, 10, seed=8)
    rng = np.random.default_rng(0)

    def noisy(self):
        def matvec(x):
            exact = self.matvec(x)
            return exact + 1e-3 * np.abs(exact).max() * rng.standard_normal(exact.shape)

        def rmatvec(u):
            exact = self.rmatvec(u)
            return exact + 1e-3 * np.abs(exact).max() * rng.standard_normal(exact.shape)
        return matvec, rmatvec
    monkeypatch.setattr(storage.DenseRows, "approximate_products", noisy)
    switched = []
    solve_step = newton_cg.MatrixFreeNewton.model_step

    def watched(self):
        out = solve_step(self)
        switched.append(self.exact_hessian)
        return out
    monkeypatch.setattr(newton_cg.MatrixFreeNewton, "model_step", watched)
    res = lg.solve(data, estimator="newton_cg", radius=1.0)
    assert not switched[0] and switched[-1]                         # noisy first, exact at the end
    reference = lg.solve(data, estimator="newton", radius=1.0)
    assert res.converged and abs(res.value - reference.value) <= 2e-6 * max(1.0, reference.value)


def test_ball_step_inside_the_ball_uses_the_gradient_as_its_residual():
    """Review finding: inside the ball the KKT multiplier is 0, so the residual at θ is ‖g‖. The old code
    took min over ν ≥ 0 of ‖g + νδ‖, which is 0 when g is anti-parallel to δ: the step returned θ itself,
    marked converged, and a d = 1 solve stalled unconverged on every seed."""
    ball = lg.L2Ball(5.0)
    x, info = ball.minimize_quadratic_operator(np.array([1.0]), np.array([-3.0]), lambda v: 2.0 * v, 0.1, 50)
    np.testing.assert_allclose(x, [2.5])                 # the model's minimiser, inside the ball
    assert info["iterations"] > 0
    for seed in range(4):
        data = _problem(200, 1, seed=seed)
        dense = lg.solve(data, radius=5.0, estimator="newton", tol=1e-8)
        free = lg.solve(data, radius=5.0, estimator="newton_cg", tol=1e-8)
        assert dense.converged and free.converged
        assert abs(free.value - dense.value) <= 2e-8 * max(1.0, dense.value)


def test_axpy_refuses_a_read_only_vector():
    from loglinear_grpo._krylov import _axpy
    y = np.ones(4)
    y.setflags(write=False)
    with pytest.raises(ValueError):
        _axpy(2.0, np.ones(4), y)


def test_unknown_peak_memory_is_none_not_nan(monkeypatch):
    """Strict JSON (llm_head's settings.json) has no NaN: an unknown peak is None, printed as unknown."""
    import loglinear_grpo.solver as solver
    monkeypatch.setattr(solver, "peak_rss_bytes", lambda: None)
    res = lg.solve(_problem(60, 3), radius=1.0)
    assert res.memory["peak_rss_bytes"] is None and "process peak unknown" in res.solver_summary()
