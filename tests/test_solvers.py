"""Cross-solver consistency: iterative vs closed form vs the cvxpy exact optimum."""
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

import loglinear_grpo as lg
from conftest import make_problem

RADIUS = 2.0
STOCHASTIC_STEPS = {"dpo": "1/sqrt(t)", "ipo": "0.1/sqrt(t)", "hinge": "1/sqrt(t)"}


@pytest.fixture(scope="module")
def exact(problem):
    return {loss: lg.solve_exact(problem, loss=loss, beta=1.0, radius=RADIUS) for loss in ("dpo", "ipo", "hinge")}


def test_exact_solution_is_a_saddle_point(problem, exact):
    for loss, ex in exact.items():
        losses = lg.group_losses(ex.theta, problem, loss, 1.0)
        assert ex.value == pytest.approx(losses.max())
        assert abs(ex.alpha.sum() - 1) < 1e-9 and np.all(ex.alpha >= 0)
        # the groups the dual weighs are the active (worst) ones
        assert np.all(losses[ex.alpha > 1e-3] >= ex.value - 1e-5)
        gap = lg.duality_gap(ex.theta, ex.alpha, problem, loss=loss, beta=1.0, radius=RADIUS)
        assert -1e-6 <= gap < 1e-5
        assert np.linalg.norm(ex.theta) <= RADIUS + 1e-6


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge"])
def test_full_batch_reaches_exact_optimum(problem, exact, loss):
    kwargs = {"hinge": dict(step_size="1/sqrt(t)")}.get(loss, {})
    res = lg.solve(problem, loss=loss, beta=1.0, estimator="full", steps=4000, radius=RADIUS,
                   alpha_step_size=0.5, tol=None, **kwargs)
    worst = res.worst_group_loss(problem)
    assert worst >= exact[loss].value - 1e-6            # never below the true minimum
    assert worst <= exact[loss].value * 1.01
    np.testing.assert_allclose(res.alpha_avg, exact[loss].alpha, atol=0.05)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge"])
def test_stochastic_algorithm1_reaches_exact_optimum(problem, exact, loss):
    res = lg.solve(problem, loss=loss, beta=1.0, estimator="stochastic", steps=20000, radius=RADIUS,
                   step_size=STOCHASTIC_STEPS[loss], alpha_step_size=STOCHASTIC_STEPS[loss],
                   seed=1, log_every=20000)
    worst = res.worst_group_loss(problem)
    assert exact[loss].value - 1e-6 <= worst <= exact[loss].value * 1.05


def test_closed_form_gr_ipo_reaches_exact_optimum(problem, exact):
    res = lg.solve(problem, loss="ipo", beta=1.0, estimator="closed_form", steps=2000, radius=RADIUS,
                   alpha_step_size=0.5, log_every=2000, tol=None)
    assert res.worst_group_loss(problem) <= exact["ipo"].value * 1.01


@pytest.mark.parametrize("theta_set", ["none", "ball_inactive", "ball_active", "ball_centred", "box"])
def test_closed_form_equals_cvxpy(problem, theta_set):
    import cvxpy as cp
    sets = {"none": None, "ball_inactive": lg.L2Ball(100.0), "ball_active": lg.L2Ball(0.3),
            "ball_centred": lg.L2Ball(0.5, np.linspace(-1, 1, 5)), "box": lg.Box(-0.2, 0.25)}
    beta = 0.7
    w = np.array([0.5, 0.2, 0.3])
    theta = lg.weighted_least_squares(problem, w, 0.5 / beta, sets[theta_set])
    v = cp.Variable(problem.dim)
    pw = (w / problem.group_sizes)[problem.groups]
    obj = cp.sum(cp.multiply(pw, cp.square(problem.diff @ v - problem.ref_margin - 0.5 / beta)))
    cons = [] if sets[theta_set] is None else sets[theta_set].cvxpy_constraints(v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)      # "may be inaccurate" at this tolerance
        cp.Problem(cp.Minimize(obj), cons).solve(solver="CLARABEL", tol_gap_abs=1e-10,
                                                 tol_gap_rel=1e-10, tol_feas=1e-10)
    np.testing.assert_allclose(theta, v.value, atol=1e-6)

    def value(t):
        return np.sum(pw * (problem.diff @ t - problem.ref_margin - 0.5 / beta) ** 2)

    assert value(theta) <= value(v.value) + 1e-12             # ours is at least as optimal


def test_closed_form_rank_deficient_uses_least_squares():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 2))
    diff = np.hstack([base, base[:, :1]])                   # third column = first: singular H
    data = lg.PreferenceData(diff, np.arange(40) % 2)
    theta = lg.weighted_least_squares(data, np.array([0.5, 0.5]), 0.5)
    assert np.all(np.isfinite(theta))
    assert theta[0] == pytest.approx(theta[2])              # the minimum-norm solution
    ref = np.linalg.lstsq(diff * np.sqrt(1 / 20)[None], np.full(40, 0.5) * np.sqrt(1 / 20), rcond=None)[0]
    np.testing.assert_allclose(theta, ref, atol=1e-9)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("theta_set", ["none", "ball_inactive", "ball_active", "ball_centred"])
def test_closed_form_row_space_when_wider_than_tall(theta_set, sparse):
    """d > N (an LLM's last layer): the N × N row-space form equals the d × d primal solve."""
    import scipy.sparse as sp
    from loglinear_grpo.closed_form import RowSpaceForm, _ball_least_squares, _normal_equations, _solve_psd
    rng = np.random.default_rng(5)
    n, d = 30, 80
    diff = rng.normal(size=(n, d)) * (rng.random((n, d)) < 0.3)
    data = lg.PreferenceData(sp.csr_matrix(diff) if sparse else diff, np.arange(n) % 3,
                             ref_margin=rng.normal(size=n) * 0.1)
    center = np.linspace(-0.2, 0.2, d)
    sets = {"none": None, "ball_inactive": lg.L2Ball(1e3), "ball_active": lg.L2Ball(0.05),
            "ball_centred": lg.L2Ball(0.05, center)}
    w = np.array([0.6, 0.1, 0.3])
    form = lg.exact.group_normal_equations(data, 0.5, sets[theta_set])
    assert isinstance(form, RowSpaceForm) and form.gram.shape == (n, n)
    theta = lg.weighted_least_squares(data, w, 0.5, sets[theta_set], form)
    c = center if theta_set == "ball_centred" else np.zeros(d)
    pw = (w / data.group_sizes)[data.groups]
    hess, q = _normal_equations(data, pw, data.ref_margin + 0.5 - diff @ c)
    primal = _solve_psd(hess, q) if theta_set == "none" else c + _ball_least_squares(hess, q, sets[theta_set].radius)
    np.testing.assert_allclose(theta, primal, atol=1e-8)
    if theta_set in ("none", "ball_inactive"):                # singular H: the minimum-norm solution
        root = np.sqrt(pw)
        ref = np.linalg.lstsq(diff * root[:, None], root * (data.ref_margin + 0.5), rcond=None)[0]
        np.testing.assert_allclose(theta, ref, atol=1e-8)
    else:
        assert np.linalg.norm(theta - c) == pytest.approx(0.05, rel=1e-9)


def test_closed_form_gr_ipo_row_space_reaches_exact_optimum():
    data = make_problem(sizes=(10, 15, 20), dim=60, seed=2)
    # R = 0.1 keeps L* ≈ 0.14 (a ball large enough to interpolate all 45 pairs would make L* ≈ 0,
    # where a relative tolerance means little and Hedge's progress ∝ η_α·loss stalls)
    exact = lg.solve_exact(data, loss="ipo", beta=1.0, radius=0.1)
    res = lg.solve(data, loss="ipo", beta=1.0, estimator="closed_form", steps=2000, radius=0.1, alpha_step_size=0.5,
                   log_every=2000, tol=None)
    assert isinstance(res.config.normal_equations, lg.exact.RowSpaceForm)
    assert exact.value - 1e-6 <= res.worst_group_loss(data) <= exact.value * 1.01


def test_one_group_all_methods_coincide():
    data = make_problem(sizes=(120,), seed=3)
    results = [lg.solve(data, loss="dpo", method=m, estimator="stochastic", steps=500, step_size=0.1,
                        alpha_step_size=0.3, log_every=500) for m in
               ("group_robust", "importance_sampling", "vanilla")]
    for r in results[1:]:
        np.testing.assert_array_equal(r.theta, results[0].theta)
    full = [lg.solve(data, loss="ipo", method=m, estimator="full", steps=200, log_every=200, tol=None).theta_last
            for m in ("group_robust", "importance_sampling", "vanilla")]
    np.testing.assert_array_equal(full[0], full[1])
    np.testing.assert_allclose(full[0], full[2], rtol=1e-12)


def test_chi_zero_is_the_group_average(problem):
    """χ = 0: the θ step weighs every group 1/K, exactly importance sampling."""
    kw = dict(loss="dpo", beta=1.0, estimator="full", steps=300, step_size=0.5, alpha_step_size=0.5, log_every=300,
              tol=None)
    gr = lg.solve(problem, method="group_robust", chi=0.0, **kw)
    imp = lg.solve(problem, method="importance_sampling", **kw)
    np.testing.assert_array_equal(gr.theta_avg, imp.theta_avg)
    half = lg.solve(problem, method="group_robust", chi=0.5, **kw)
    assert lg.worst_group_loss(half.theta_avg, problem, "dpo", 1.0) <= \
        lg.worst_group_loss(imp.theta_avg, problem, "dpo", 1.0) + 1e-12


def test_methods_differ_as_the_paper_says(problem, exact):
    """On unequal groups GR beats IS and vanilla on the worst group; vanilla wins on average."""
    kw = dict(loss="dpo", beta=1.0, radius=RADIUS)
    res = {m: lg.solve(problem, method=m, **kw) for m in ("group_robust", "importance_sampling", "vanilla")}
    worst = {m: r.worst_group_loss(problem) for m, r in res.items()}
    assert worst["group_robust"] < worst["importance_sampling"] and worst["group_robust"] < worst["vanilla"]
    np.testing.assert_allclose(res["vanilla"].alpha, problem.group_sizes / problem.n_samples)
    avg = {m: np.mean(lg.pair_loss(lg.margins(r.theta, problem), "dpo", 1.0)) for m, r in res.items()}
    assert avg["vanilla"] <= avg["group_robust"]


def test_sampler_draws_groups_in_proportion(problem):
    cfg = lg.make_config(problem, estimator="stochastic", steps=10, batch_size=50, radius=1.0)
    cache = {}
    idx = np.concatenate([lg.sample_batch(cfg, t, cache) for t in range(4000)])
    freq = np.bincount(problem.groups[idx], minlength=3) / idx.size
    np.testing.assert_allclose(freq, problem.group_sizes / problem.n_samples, atol=0.005)
    counts = np.bincount(idx, minlength=problem.n_samples)
    assert counts.min() > 0                                  # every pair can be drawn
    np.testing.assert_array_equal(lg.sample_batch(cfg, 1234), lg.sample_batch(cfg, 1234))


def test_duality_gap_bounds_suboptimality(problem, exact):
    res = lg.solve(problem, loss="dpo", beta=1.0, estimator="full", steps=200, radius=RADIUS, alpha_step_size=0.5,
                   duality_gap=True, log_every=50, tol=None)
    sub = lg.worst_group_loss(res.theta_avg, problem, "dpo", 1.0) - exact["dpo"].value
    gap = lg.duality_gap(res.theta_avg, res.alpha_avg, problem, loss="dpo", beta=1.0, radius=RADIUS)
    assert 0 <= sub <= gap + 1e-9
    assert res.history["gap"].iloc[-1] == pytest.approx(gap, rel=1e-6)
    assert (res.history["gap"] >= -1e-7).all()
    assert res.history["gap"].iloc[-1] < res.history["gap"].iloc[1]


def test_sparse_and_dense_agree(problem):
    sparse = lg.PreferenceData(sp.csr_matrix(problem.diff), problem.groups, problem.ref_margin)
    for est in ("full", "stochastic"):
        kw = dict(loss="dpo", estimator=est, steps=300, step_size=0.1, alpha_step_size=0.2, log_every=300, tol=None)
        np.testing.assert_allclose(lg.solve(sparse, **kw).theta_avg, lg.solve(problem, **kw).theta_avg, rtol=1e-10)
    np.testing.assert_allclose(lg.weighted_least_squares(sparse, np.ones(3) / 3, 0.5),
                               lg.weighted_least_squares(problem, np.ones(3) / 3, 0.5), rtol=1e-10)


def test_memmap_data_is_streamed(tmp_path, problem):
    path = tmp_path / "S.f64"
    mm = np.memmap(path, dtype=np.float64, mode="w+", shape=problem.diff.shape)
    mm[:] = problem.diff
    mm.flush()
    ro = np.memmap(path, dtype=np.float64, mode="r", shape=problem.diff.shape)
    data = lg.PreferenceData(ro, problem.groups, problem.ref_margin)
    assert data.streamed and isinstance(data.diff, np.memmap)
    for est in ("full", "stochastic"):
        kw = dict(loss="dpo", estimator=est, steps=200, step_size=0.1, alpha_step_size=0.2, log_every=200, tol=None)
        np.testing.assert_allclose(lg.solve(data, **kw).theta_avg, lg.solve(problem, **kw).theta_avg, rtol=1e-10)
    np.testing.assert_allclose(lg.group_losses(np.ones(5), data), lg.group_losses(np.ones(5), problem))


def test_theory_step_sizes_follow_the_formula(problem):
    """Nemirovski et al. (2009) §3.1 with Algorithm 1's second moments (not sup bounds)."""
    cfg = lg.make_config(problem, loss="dpo", beta=1.0, estimator="stochastic", steps=10000, radius=2.0,
                         step_size="theory", alpha_step_size="theory")
    c = cfg.theory
    norms = problem.row_norms()
    ratio = problem.n_samples / problem.group_sizes
    group_norm = np.array([norms[problem.groups == g].max() for g in range(3)])
    group_h = 2.0 * group_norm                                   # centre 0, r = 0: h_g = ρ max‖s_i‖
    assert c["D"] == 4.0 and c["h_max"] == pytest.approx(group_h.max())
    # β = 1: |ℓ'| ≤ 1, so B_∇,g = max_{i∈g}‖s_i‖; M_θ² = max_g (N/N_g) B_∇,g²
    assert c["M_theta"] == pytest.approx(np.sqrt(np.max(ratio * group_norm ** 2)))
    b_loss = np.logaddexp(0.0, group_h)                          # DPO loss at margin −h_g
    assert c["M_alpha"] == pytest.approx(np.sqrt(np.sum(ratio * b_loss ** 2)))
    m_star = np.sqrt(4.0 * c["M_theta"] ** 2 + 2 * np.log(3) * c["M_alpha"] ** 2)
    gamma = 2.0 / (m_star * np.sqrt(5 * 10000))
    assert cfg.theta_step.scale == pytest.approx(gamma * 4.0)
    assert cfg.alpha_step.scale == pytest.approx(2 * gamma * np.log(3))
    assert c["gap_bound"] == pytest.approx(2 * m_star * np.sqrt(5 / 10000))
    full = lg.make_config(problem, loss="dpo", beta=1.0, estimator="full", steps=10000, radius=2.0,
                          step_size="theory", alpha_step_size="theory")
    assert full.theory["M_theta"] == pytest.approx(group_norm.max())
    assert full.theta_step.scale == pytest.approx(4.0 / (group_norm.max() * 100))
    with pytest.raises(ValueError, match="bounded"):
        lg.make_config(problem, loss="dpo", estimator="stochastic", step_size="theory")


@pytest.mark.parametrize("theta_kw", [dict(radius=0.5), dict(radius=0.5, center=np.full(5, 0.1)),
                                      dict(constraint=lg.Box(-0.2, 0.3)), dict()])
@pytest.mark.parametrize("method, chi", [("group_robust", 1.0), ("group_robust", 0.4), ("vanilla", 1.0)])
@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge"])
@pytest.mark.parametrize("estimator", ["stochastic", "full"])
def test_fast_loops_are_bit_identical_to_update(problem, theta_kw, method, chi, loss, estimator):
    """solve's in-place loops (one pair per step; full batches) compute exactly what update() computes."""
    cfg = lg.make_config(problem, loss=loss, beta=0.7, method=method, chi=chi, estimator=estimator, steps=300,
                         step_size=0.05, alpha_step_size="0.3/sqrt(t)", seed=2, tol=None, **theta_kw)
    state = lg.init(problem, cfg)
    for t in range(300):
        state, _ = lg.update(state, problem, cfg, lg.sample_batch(cfg, t))
    res = lg.solve(problem, cfg, log_every=70)
    np.testing.assert_array_equal(res.state.theta, state.theta)
    np.testing.assert_array_equal(res.state.theta_sum, state.theta_sum)
    np.testing.assert_array_equal(res.state.log_alpha, state.log_alpha)
    np.testing.assert_array_equal(res.state.alpha_sum, state.alpha_sum)


def test_float32_storage_is_read_as_float32_and_matches_float64():
    """A float32 S is used in place (no float64 copy of S, in a pass or a solve); the per-pair terms
    and all sums are float64, so the float32 pass equals the float64 pass on the same numbers to
    float32 rounding of the margins, and the certified solution from float32 storage is, certified
    on the float64 data, within 10⁻⁵ of the optimum."""
    import tracemalloc
    from loglinear_grpo import kernels

    rng = np.random.default_rng(3)
    n, d = 3 * kernels.SMALL, 16                      # several blocks: the blocked path
    s32 = (rng.standard_normal((n, d)) / 4).astype(np.float32)
    groups = rng.integers(0, 4, n)
    data32 = lg.PreferenceData(s32, groups)
    data64 = lg.PreferenceData(s32.astype(np.float64), groups)
    assert data32.diff.dtype == np.float32 and np.shares_memory(data32.diff, s32)
    theta = rng.standard_normal(d) * 0.3
    workspace = kernels.Workspace(data32)
    kernels.losses_and_group_gradients(theta, data32, "dpo", 0.1, workspace)   # one-off set-up (thread pool)
    tracemalloc.start()
    sums32, grads32 = kernels.losses_and_group_gradients(theta, data32, "dpo", 0.1, workspace)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.1 * n * d * 8, f"a float32 pass allocated {peak} bytes (a float64 copy of S is {n * d * 8})"
    sums64, grads64 = kernels.losses_and_group_gradients(theta, data64, "dpo", 0.1)
    assert sums32.dtype == np.float64 and grads32.dtype == np.float64
    np.testing.assert_allclose(sums32, sums64, rtol=1e-6)
    np.testing.assert_allclose(grads32, grads64, rtol=1e-5, atol=1e-6 * np.abs(grads64).max())
    for loss, estimator in (("dpo", "auto"), ("ipo", "auto"), ("dpo", "full")):
        res = lg.solve(data32, loss=loss, beta=0.1, radius=2.0, estimator=estimator)
        assert res.converged, res.summary()
        gap64 = lg.duality_gap(res.theta, res.alpha, data64, loss=loss, beta=0.1, radius=2.0)
        exact64 = lg.solve(data64, loss=loss, beta=0.1, radius=2.0, estimator=estimator)
        assert abs(res.value - exact64.value) <= 1e-5 * max(1.0, abs(exact64.value))
        assert gap64 <= 1e-5 * max(1.0, abs(exact64.value)), gap64


@pytest.mark.parametrize("order", ["random", "sorted"])
def test_a_pass_gives_the_same_sums_on_any_number_of_cores(order, monkeypatch, tmp_path):
    """A large S is cut into parts by N alone and summed by threads in part order: the sums are the
    same bit for bit whatever the number of threads (checkpoints resume exactly on another machine),
    and equal a plain float64 evaluation; a memory-mapped S gives the same sums."""
    from scipy.special import expit, log_expit
    from loglinear_grpo import kernels

    rng = np.random.default_rng(5)
    n, d, k = 40_000, 64, 3
    s = rng.standard_normal((n, d))
    groups = rng.integers(0, k, n)
    ref = rng.standard_normal(n) * 0.1
    data = lg.PreferenceData(s, groups, ref, check_finite=False)
    if order == "sorted":
        data, _ = data.sorted_by_group()
    path = tmp_path / "s.f64"
    mapped = np.memmap(path, dtype=np.float64, mode="w+", shape=(n, d))
    mapped[:] = data.diff
    mapped.flush()
    on_disk = lg.PreferenceData(np.memmap(path, dtype=np.float64, mode="r", shape=(n, d)), data.groups,
                                data.ref_margin)
    theta = rng.standard_normal(d) * 0.2
    workspace = kernels.Workspace(data)
    assert len(workspace.parts) > 1
    many = kernels.losses_and_group_gradients(theta, data, "dpo", 0.1, workspace)
    monkeypatch.setattr(kernels, "threads", lambda: 1)
    one = kernels.losses_and_group_gradients(theta, data, "dpo", 0.1, workspace)
    monkeypatch.setattr(kernels, "threads", lambda: 2)
    mapped_sums = kernels.losses_and_group_gradients(theta, on_disk, "dpo", 0.1)
    for a, b, c in zip(many, one, mapped_sums):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    z = 0.1 * (data.diff @ theta - data.ref_margin)
    value, deriv = -log_expit(z), -0.1 * expit(-z)
    np.testing.assert_allclose(many[0], np.bincount(data.groups, weights=value, minlength=k), rtol=1e-12)
    expected = np.stack([deriv[data.groups == g] @ data.diff[data.groups == g] for g in range(k)])
    np.testing.assert_allclose(many[1], expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())


def test_concurrent_passes_and_blas_settings_do_not_change_the_sums(monkeypatch):
    """Passes from solves in two user threads give a lone pass's sums bit for bit and leave the BLAS
    thread setting as they found it; the sums do not depend on that setting either (review findings)."""
    import threading
    from threadpoolctl import threadpool_info, threadpool_limits
    from loglinear_grpo import kernels

    rng = np.random.default_rng(8)
    n, d, k = 70_001, 64, 5
    data = lg.PreferenceData(rng.standard_normal((n, d)), rng.integers(0, k, n), check_finite=False)
    theta = rng.standard_normal(d) * 0.1
    alone = kernels.losses_and_group_gradients(theta, data, "dpo", 0.1)
    before = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    results, errors = [], []

    def worker():
        try:
            workspace = kernels.Workspace(data)
            for _ in range(5):
                results.append(kernels.losses_and_group_gradients(theta, data, "dpo", 0.1, workspace))
        except Exception as exc:          # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=worker) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors and len(results) == 10
    for sums, grads in results:
        assert np.array_equal(sums, alone[0]) and np.array_equal(grads, alone[1])
    assert [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"] == before
    monkeypatch.setattr(kernels, "threads", lambda: 1)
    with threadpool_limits(limits=2, user_api="blas"):
        serial = kernels.losses_and_group_gradients(theta, data, "dpo", 0.1)
    assert np.array_equal(serial[0], alone[0]) and np.array_equal(serial[1], alone[1])
