"""Overlapping groups (issue 23): a pair in several groups — a membership matrix, or the union of several
groupings — through the one place that computes group sums (:mod:`loglinear_grpo.groups`)."""
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings, strategies as st

import loglinear_grpo as lg
from loglinear_grpo.algorithm1 import init, update
from loglinear_grpo.groups import intersect_groupings


def _groupings(n, seed=0):
    rng = np.random.default_rng(seed)
    country = rng.choice(["Kenya", "Chile", "Japan"], n, p=[0.5, 0.3, 0.2])
    age = rng.choice(["18-34", "35+"], n, p=[0.7, 0.3])
    return {"country": country, "age": age}


def _problem(n=160, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return lg.PreferenceData(rng.normal(size=(n, d)), _groupings(n, seed), 0.3 * rng.normal(size=n))


SETS = {"ball": lambda: lg.L2Ball(1.0), "box": lambda: lg.Box(-0.3, 0.3), "rd": lambda: None}


def test_union_of_groupings_names_and_sizes():
    data = _problem()
    g = _groupings(160)
    assert data.overlapping and data.groups is None and data.n_groups == 5
    assert set(data.group_names) == {"country=Kenya", "country=Chile", "country=Japan", "age=18-34", "age=35+"}
    for name, size in zip(data.group_names, data.group_sizes):
        grouping, value = name.split("=")
        assert size == np.sum(g[grouping] == value)
    assert np.all(data.membership.per_pair_counts() == 2)         # one group of each grouping
    # L_g is the mean over the members of g
    theta = np.full(5, 0.1)
    ell = lg.pair_loss(lg.margins(theta, data), "dpo", 0.1)
    losses = lg.group_losses(theta, data)
    for name, value in zip(data.group_names, losses):
        grouping, v = name.split("=")
        assert value == pytest.approx(ell[g[grouping] == v].mean(), rel=1e-14)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge"])
@pytest.mark.parametrize("where", ["ball", "box", "rd"])
def test_overlapping_solves_equal_the_cvxpy_reference(loss, where):
    data = _problem(seed=1)
    kw = dict(loss=loss, beta=0.5, constraint=SETS[where]())
    exact = lg.solve_exact(data, **kw)
    estimators = ["newton"] + ([] if loss == "hinge" and where == "rd" else ["newton_cg"])
    for estimator in estimators:
        res = lg.solve(data, estimator=estimator, tol=1e-7, **kw)
        assert res.converged, (estimator, res.summary())
        scale = max(1.0, abs(exact.value))
        assert abs(res.value - exact.value) <= 2e-6 * scale, (estimator, res.value, exact.value)
        assert res.lower_bound <= exact.value + 1e-7 * scale        # cvxpy's own accuracy ~1e-8


@pytest.mark.parametrize("loss, estimator", [("dpo", "full"), ("ipo", "full"), ("ipo", "closed_form"),
                                             ("dpo", "stochastic")])
def test_first_order_estimators_reach_the_overlapping_optimum(loss, estimator):
    data = _problem(seed=6)
    exact = lg.solve_exact(data, loss=loss, beta=0.5, radius=1.0)
    kw = dict(steps=40_000, batch_size=16, seed=0, tol=None) if estimator == "stochastic" else dict(tol=1e-6)
    res = lg.solve(data, loss=loss, beta=0.5, radius=1.0, estimator=estimator, **kw)
    assert res.lower_bound <= exact.value + 1e-8
    if estimator == "stochastic":                  # Algorithm 1: near, not certified
        assert res.value - exact.value < 5e-3
    else:
        assert res.converged and abs(res.value - exact.value) <= 2e-6 * max(1.0, exact.value)


@pytest.mark.parametrize("estimator", ["newton", "newton_cg", "full"])
@pytest.mark.parametrize("where", ["ball", "box", "rd"])
def test_labels_and_the_one_hot_membership_give_identical_results(estimator, where):
    rng = np.random.default_rng(3)
    n, d = 150, 4
    s, r = rng.normal(size=(n, d)), 0.3 * rng.normal(size=n)
    labels = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    one_hot = sp.csr_matrix((np.ones(n), (np.arange(n), labels)), shape=(n, 3))
    a = lg.PreferenceData(s, labels, r)
    b = lg.PreferenceData(s, one_hot, r)
    assert not a.overlapping and b.overlapping
    kw = dict(loss="dpo", beta=0.5, constraint=SETS[where](), estimator=estimator)
    if estimator == "full":
        kw.update(steps=300, tol=None)             # the same 300 iterations (then the certificate)
    ra, rb = lg.solve(a, **kw), lg.solve(b, **kw)
    assert ra.converged == rb.converged and (ra.converged or estimator == "full")
    # the same path: group sums in the same order (bincount and Mᵀv), the same pair weights, the same steps
    np.testing.assert_array_equal(ra.theta, rb.theta)
    assert ra.value == rb.value and ra.lower_bound == rb.lower_bound and ra.n_iter == rb.n_iter
    # the exact reference and the certificate of a given point agree to rounding
    assert lg.solve_exact(a, loss="dpo", beta=0.5, constraint=SETS[where]()).value == pytest.approx(
        lg.solve_exact(b, loss="dpo", beta=0.5, constraint=SETS[where]()).value, rel=1e-9)
    ga = lg.duality_gap(ra.theta, ra.alpha, a, loss="dpo", beta=0.5, constraint=SETS[where]())
    gb = lg.duality_gap(ra.theta, ra.alpha, b, loss="dpo", beta=0.5, constraint=SETS[where]())
    assert ga == pytest.approx(gb, rel=1e-9, abs=1e-12)


def test_algorithm1_estimates_are_unbiased_by_exact_enumeration():
    """g ~ Cat(N_g/T), then a member of D_g: pair i is drawn with probability m_i/T; the α step's
    estimate L̂ and the θ step's gradient averaged over that law are L(θ) and Σ_g λ_g ∇L_g exactly."""
    rng = np.random.default_rng(5)
    n, d = 7, 3
    member = np.zeros((n, 3))
    member[np.arange(n), rng.integers(0, 3, n)] = 1.0
    member[[0, 2, 5], 1] = 1.0                    # some pairs in two groups
    member[3, :] = 1.0                            # one in all three
    data = lg.PreferenceData(rng.normal(size=(n, d)), sp.csr_matrix(member), 0.2 * rng.normal(size=n))
    m = member.sum(axis=1)
    total = member.sum()
    config = lg.make_config(data, loss="dpo", beta=0.7, estimator="stochastic", method="importance_sampling",
                            batch_size=1, steps=10, step_size=0.5, alpha_step_size=0.1, seed=0, tol=None,
                            adjustment=[0.0, 0.3, 0.1])
    # the sampler's law, exactly from its tables: Σ_g (N_g/T) · (occurrences of i in D_g)/N_g = m_i/T
    sizes = config.group_sizes
    offsets = np.r_[0, np.cumsum(sizes)[:-1]].astype(int)
    law = np.zeros(n)
    for g in range(3):
        members = config.members[offsets[g]:offsets[g] + int(sizes[g])]
        law += (sizes[g] / sizes.sum()) * np.bincount(members, minlength=n) / sizes[g]
    np.testing.assert_allclose(law, m / total, rtol=1e-14)
    # the estimates, averaged over the law
    theta0 = np.array([0.3, -0.2, 0.1])
    config = lg.make_config(data, loss="dpo", beta=0.7, estimator="stochastic", method="importance_sampling",
                            batch_size=1, steps=10, step_size=0.5, alpha_step_size=0.1, seed=0, tol=None,
                            theta0=theta0, adjustment=[0.0, 0.3, 0.1])
    state = init(data, config)
    mean_losses, mean_grad = np.zeros(3), np.zeros(d)
    for i in range(n):
        new, info = update(state, data, config, batch=np.array([i]))
        mean_losses += law[i] * info["losses"]
        mean_grad += law[i] * (theta0 - new.theta) / 0.5                 # R^d, constant step: θ⁺ = θ − η ĝ
    losses = lg.group_losses(theta0, data, "dpo", 0.7) + config.shift
    np.testing.assert_allclose(mean_losses, losses, rtol=1e-12)
    lam = config.alpha0
    np.testing.assert_allclose(mean_grad, lg.weighted_gradient(theta0, lam, data, "dpo", 0.7), rtol=1e-12)


def test_theory_constants_use_the_memberships():
    data = _problem(seed=2)
    c = lg.theory_constants(data, "dpo", 0.1, lg.L2Ball(1.0))
    assert c["M_theta"] > 0 and np.isfinite(c["M_alpha"])
    res = lg.solve(data, estimator="stochastic", radius=1.0, steps=300, seed=1, step_size="theory",
                   alpha_step_size="theory", tol=None)
    assert np.isfinite(res.value) and res.lower_bound <= res.value + 1e-12


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), steps=st.integers(1, 10), loss=st.sampled_from(["dpo", "ipo", "hinge"]),
       where=st.sampled_from(["ball", "box", "rd"]), estimator=st.sampled_from(["newton", "newton_cg"]))
def test_the_certificate_is_a_valid_bound_with_overlaps(seed, steps, loss, where, estimator):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(15, 60)), int(rng.integers(2, 6))
    member = (rng.random((n, 4)) < 0.4).astype(float)
    member[np.arange(n), rng.integers(0, 4, n)] = 1.0             # every pair in a group
    member[:4, :] = np.eye(4)                                       # every group non-empty
    data = lg.PreferenceData(rng.normal(size=(n, d)), member, 0.5 * rng.normal(size=n))
    if loss == "hinge":
        estimator = "newton" if where == "rd" else estimator
        if estimator == "newton":
            steps = None                                            # the hinge program solves once
    constraint = SETS[where]()
    if loss == "dpo" and where == "rd":
        constraint = lg.L2Ball(3.0)                                 # (random small sets may be separable)
    exact = lg.solve_exact(data, loss=loss, beta=0.5, constraint=constraint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lg.ConvergenceWarning)
        res = lg.solve(data, loss=loss, beta=0.5, constraint=constraint, estimator=estimator, steps=steps)
    assert res.lower_bound <= exact.value + 1e-7 * max(1.0, abs(exact.value))


def test_membership_errors_each_say_what_is_wrong():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(6, 2))
    member = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    with pytest.raises(ValueError, match=r"group\(s\) \['2'\] hold no pairs"):
        lg.PreferenceData(s, member)
    member[:, 2] = [0, 0, 1, 0, 0, 0]
    bad = member.copy()
    bad[3] = 0
    with pytest.raises(ValueError, match=r"1 pair\(s\) belong to no group \(e.g. pair 3\)"):
        lg.PreferenceData(s, bad)
    with pytest.raises(ValueError, match=r"shape \(N, K\) = \(6, K\)"):
        lg.PreferenceData(s, member[:5])
    with pytest.raises(ValueError, match="only 0 and 1"):
        lg.PreferenceData(s, 2 * member)
    with pytest.raises(ValueError, match="grouping 'age' must have shape"):
        lg.PreferenceData(s, {"country": list("aabbab"), "age": [1, 2, 3]})
    with pytest.raises(ValueError, match="group_names lists 2 names"):
        lg.PreferenceData(s, member, group_names=["a", "b"])
    ok = lg.PreferenceData(s, member, group_names=["a", "b", "c"])
    assert ok.overlapping and list(ok.group_sizes) == [4, 4, 1]
    with pytest.raises(ValueError, match=r"group\(s\) \['c'\] hold no pairs"):      # a subset that empties one
        ok.subset([0, 1, 3])


def test_checkpoints_refuse_a_changed_membership(tmp_path):
    data = _problem(n=60, seed=4)
    path = tmp_path / "run.ckpt"
    kw = dict(estimator="stochastic", radius=1.0, seed=0, tol=None, step_size=0.05, alpha_step_size=0.05,
              checkpoint=path)
    lg.solve(data, steps=20, **kw)
    member = data.membership.matrix.toarray()
    member[0, :] = 1.0                                              # one pair joins every group
    changed = lg.PreferenceData(data.diff, member, data.ref_margin, group_names=data.group_names)
    with pytest.raises(ValueError, match=r"other data or settings \(the data \(S, r or the groups\)"):
        lg.solve(changed, steps=40, **kw)
    resumed = lg.solve(data, steps=40, **kw)
    assert resumed.n_iter == 40


def test_intersections_report_and_merge_or_drop_small_cells():
    n = 200
    g = _groupings(n, seed=7)
    labels, names, keep, report = intersect_groupings(g, n)
    assert len(names) == 6 and keep.all() and report == {}
    for k, name in enumerate(names):
        c, a = name.split(" & ")
        assert np.all((labels == k) == ((g["country"] == c.split("=")[1]) & (g["age"] == a.split("=")[1])))
    sizes = np.bincount(labels)
    cut = int(np.sort(sizes)[1]) + 1                                  # the two smallest cells are small
    labels_m, names_m, keep_m, report_m = intersect_groupings(g, n, min_size=cut, small="merge")
    assert len(report_m) == 2 and names_m[-1] == f"other (cells < {cut})" and keep_m.all()
    assert np.bincount(labels_m)[-1] == sum(report_m.values())
    labels_d, names_d, keep_d, _ = intersect_groupings(g, n, min_size=cut, small="drop")
    assert len(names_d) == 4 and keep_d.sum() == n - sum(report_m.values()) and np.all(labels_d[~keep_d] == -1)
    data = lg.PreferenceData(np.random.default_rng(0).normal(size=(keep_d.sum(), 3)), labels_d[keep_d],
                             group_names=names_d)
    assert not data.overlapping and data.n_groups == 4


def test_a_membership_matrix_is_checked_on_a_copy_and_duplicates_are_refused():
    s = np.ones((2, 2))
    doubled = sp.csr_matrix((np.ones(4), np.array([0, 0, 0, 1]), np.array([0, 2, 4])), shape=(2, 2))
    with pytest.raises(ValueError, match="only 0 and 1"):           # pair 0 listed twice in group 0
        lg.PreferenceData(s, doubled)
    unsorted = sp.csr_matrix((np.array([1.0, 1.0, 0.0, 1.0]), np.array([1, 0, 1, 0]), np.array([0, 2, 4])),
                             shape=(2, 2))
    before = (unsorted.indices.copy(), unsorted.data.copy())
    data = lg.PreferenceData(s, unsorted)
    assert list(data.group_sizes) == [2, 1]
    np.testing.assert_array_equal(unsorted.indices, before[0])     # the caller's matrix is not reordered
    np.testing.assert_array_equal(unsorted.data, before[1])        # nor its explicit zero removed
    m = data.membership
    assert m.per_pair is None                                        # pair 0 in two groups, pair 1 in one
    union = lg.PreferenceData(np.ones((4, 2)), {"a": [0, 0, 1, 1], "b": list("xyxy")}).membership
    assert union.per_pair == 2
    indices = union.matrix.indices.copy()
    block = union.indicator(np.array([1.0, 2.0]), 1, 3)              # pairs 1 (a=0, b=y) and 2 (a=1, b=x)
    np.testing.assert_array_equal(block.toarray(), [[1, 0], [0, 2], [0, 2], [1, 0]])
    block.indices[:] = 0                                              # the indicator is its own matrix
    np.testing.assert_array_equal(union.matrix.indices, indices)


def test_preference_data_intersect_gives_the_cells_as_labels():
    n = 150
    g = _groupings(n, seed=3)
    s = np.random.default_rng(3).normal(size=(n, 4))
    labels, names, _, _ = intersect_groupings(g, n)
    cells = lg.PreferenceData(s, g, intersect=True)
    assert not cells.overlapping and cells.group_names == tuple(names)
    np.testing.assert_array_equal(cells.groups, labels)
    plain = lg.PreferenceData(s, labels, group_names=names)
    kw = dict(loss="dpo", radius=1.0, tol=1e-8)
    assert lg.solve(cells, **kw).value == lg.solve(plain, **kw).value            # the same problem, same path
    assert lg.PreferenceData(s, (g["country"], g["age"])).overlapping         # a tuple of groupings: the union
    with pytest.raises(ValueError, match="needs several groupings"):
        lg.PreferenceData(s, g["country"], intersect=True)
    with pytest.raises(ValueError, match="give no group_names"):
        lg.PreferenceData(s, g, group_names=names, intersect=True)


def test_review_fixes_metrics_membership_objects_and_sparse_rows():
    """The mean over pairs counts each pair once; a Membership given directly is checked; the group sums
    of a sparse S with overlapping groups need no N × K dense array and equal the dense S's."""
    rng = np.random.default_rng(9)
    n, d = 60, 3
    member = (rng.random((n, 4)) < 0.5).astype(float)
    member[np.arange(n), rng.integers(0, 4, n)] = 1.0
    s = rng.normal(size=(n, d))
    data = lg.PreferenceData(s, member)
    theta = np.array([0.2, -0.1, 0.3])
    table = lg.group_metrics(theta, data, "dpo", 0.5)
    row = table.loc[("aggregate", "mean over pairs")]
    assert row["n_pairs"] == n
    assert row["loss"] == pytest.approx(lg.pair_loss(lg.margins(theta, data), "dpo", 0.5).mean(), rel=1e-14)
    with pytest.raises(ValueError, match="only 0 and 1"):
        lg.PreferenceData(np.eye(2), lg.Membership(2, matrix=sp.coo_matrix(np.array([[2.0, 0.0], [0.0, 1.0]]))))
    with pytest.raises(ValueError, match=r"declared group\(s\) \['2'\] hold no pairs"):     # K kept from the object
        lg.PreferenceData(np.eye(2), lg.Membership(3, labels=np.array([0, 1])))
    with pytest.raises(ValueError, match="a membership matrix as a numpy array"):
        lg.PreferenceData(s[:6], [[0, 1, 0]] * 6)
    sparse = lg.PreferenceData(sp.csr_matrix(s), member)
    from loglinear_grpo.kernels import losses_and_group_gradients
    a = losses_and_group_gradients(theta, data, "dpo", 0.5)
    b = losses_and_group_gradients(theta, sparse, "dpo", 0.5)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-13)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="every one of the"):
        intersect_groupings({"a": [1, 1, 2], "b": list("xyx")}, min_size=5, small="drop")
    with pytest.raises(ValueError, match="at least one grouping"):
        intersect_groupings({})
