"""Reliability: no silent wrong answer, no lost work. One regression test per item of the reliability
issue (each failed on the code before it), then a fuzz test that keeps it so."""
import os
import socket
import subprocess
import sys
import tracemalloc
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loglinear_grpo as lg
from conftest import make_problem

FIRST_ORDER = dict(loss="dpo", estimator="full", steps=60, step_size=0.1, alpha_step_size=0.2, tol=None)


def small(seed=0, **kw):
    return make_problem(sizes=(15, 25, 40), dim=4, seed=seed, **kw)


# ---------------------------------------------------------------- 1. checkpoints fingerprint everything
@pytest.mark.parametrize("first, second", [
    (dict(constraint=lg.Box(-1, 1)), dict(constraint=lg.Box(-0.01, 0.01))),
    (dict(radius=1.0, center=np.zeros(4)), dict(radius=1.0, center=np.full(4, 0.3))),
    (dict(radius=1.0), dict(radius=1.0, theta0=np.full(4, 0.1))),
])
def test_checkpoint_resume_checks_theta_set_and_start(tmp_path, first, second):
    data = small()
    path = tmp_path / "b.npz"
    lg.solve(data, **FIRST_ORDER, **first, checkpoint=path)
    with pytest.raises(ValueError, match="other data or settings"):
        lg.solve(data, **FIRST_ORDER, **second, checkpoint=path)


def test_checkpoint_resume_checks_every_row_of_the_data(tmp_path):
    data = small()
    path = tmp_path / "c.npz"
    lg.solve(data, **FIRST_ORDER, radius=1.0, checkpoint=path)
    diff = data.diff.copy()
    diff[data.n_samples // 2, 1] += 1e-9                       # a middle row, far from the first/last 64
    changed = lg.PreferenceData(diff, data.groups, data.ref_margin)
    with pytest.raises(ValueError, match="other data or settings"):
        lg.solve(changed, **FIRST_ORDER, radius=1.0, checkpoint=path)
    sparse = lg.PreferenceData(sp.csr_matrix(diff), data.groups, data.ref_margin)
    assert lg.checkpoints.data_fingerprint(sparse) != lg.checkpoints.data_fingerprint(data)


def test_convex_sets_are_fingerprinted_by_their_constants():
    a = lg.ConvexSet(3, lambda v: [v >= -1, v <= 1])
    b = lg.ConvexSet(3, lambda v: [v >= -1, v <= 1])
    c = lg.ConvexSet(3, lambda v: [v >= -1, v <= 0.5])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


# ---------------------------------------------------------------- 2. overflow and underflow
def test_huge_features_give_the_scaled_solution():
    data = small()
    big = lg.PreferenceData(data.diff * 1e78, data.groups, data.ref_margin)
    for estimator in ("newton", "full"):
        ref = lg.solve(data, loss="dpo", beta=1.0, estimator=estimator)
        res = lg.solve(big, loss="dpo", beta=1.0, estimator=estimator)
        assert np.all(np.isfinite(res.theta)) and res.converged
        assert res.value == pytest.approx(ref.value, rel=1e-5)


def test_ball_projection_is_scale_safe():
    np.testing.assert_allclose(lg.L2Ball(1.0).project(np.array([1e200, 0.0])), [1.0, 0.0])
    np.testing.assert_allclose(lg.L2Ball(1.0).project(np.array([3e-310, 0.0])), [3e-310, 0.0])
    with pytest.raises(ValueError, match="non-finite"):
        lg.L2Ball(1.0).project(np.array([np.inf, 0.0]))


@pytest.mark.parametrize("scale, what", [(1e154, "ref_margin"), (1e-300, "diff"), (1e120, "diff")])
def test_out_of_range_inputs_name_themselves(scale, what):
    data = small()
    with pytest.raises(ValueError, match=what):
        if what == "ref_margin":
            lg.PreferenceData(data.diff, data.groups, ref_margin=np.full(data.n_samples, scale))
        else:
            lg.PreferenceData(data.diff * scale, data.groups)


@pytest.mark.parametrize("eta", [1e308, 1e300, 1e200])
def test_alpha_step_overflow_is_an_error_or_finite_never_nan(eta):
    try:
        res = lg.solve(small(), loss="dpo", estimator="full", steps=50, step_size=0.1, alpha_step_size=eta, tol=None)
    except ValueError as exc:
        assert "alpha_step_size" in str(exc)
    else:
        assert np.all(np.isfinite(res.state.log_alpha)) and abs(res.alpha.sum() - 1) < 1e-12


# ---------------------------------------------------------------- 3. the gap of a point outside Θ
def test_duality_gap_refuses_theta_outside_theta_set():
    data = small()
    with pytest.raises(ValueError, match="outside"):
        lg.duality_gap(np.full(4, 5.0), np.ones(3) / 3, data, loss="dpo", radius=1.0)


# ---------------------------------------------------------------- 4. ill-posed Θ and problems
def test_ill_posed_convex_sets_are_refused():
    with pytest.raises(ValueError, match="max_norm"):
        lg.ConvexSet(3, lambda v: [v >= 0], max_norm=-1)
    with pytest.raises(ValueError, match="empty"):
        lg.ConvexSet(2, lambda v: [v >= 1, v <= 0])


def test_solve_exact_refuses_separable_dpo_without_a_bound():
    rng = np.random.default_rng(9)
    s = rng.normal(size=(60, 3))
    s[s @ np.array([1.0, -2.0, 0.5]) < 0] *= -1
    data = lg.PreferenceData(s, np.arange(60) % 2)
    with pytest.raises(ValueError, match="no minimiser"):
        lg.solve_exact(data, loss="dpo")
    assert lg.solve_exact(data, loss="dpo", radius=1.0).status.startswith("optimal")


# ---------------------------------------------------------------- 5. duplicate group names
def test_duplicate_group_names_are_refused():
    with pytest.raises(ValueError, match="duplicates"):
        lg.PreferenceData(np.ones((4, 2)), [0, 1, 0, 1], group_names=["a", "a"])


# ---------------------------------------------------------------- 6. huge labels
def test_huge_group_labels_fail_fast_and_briefly():
    groups = np.arange(1000) % 3
    tracemalloc.start()
    with pytest.raises(ValueError, match="labels must be 0..K-1") as info:
        lg.PreferenceData(np.ones((1000, 2)), groups * 10 ** 9)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50 * 2 ** 20 and len(str(info.value)) < 200


# ---------------------------------------------------------------- 7. the sampler's memory
def test_stochastic_sampler_memory_is_bounded_by_the_batch():
    data = make_problem(sizes=(300, 700), dim=3)
    tracemalloc.start()
    lg.solve(data, loss="dpo", estimator="stochastic", steps=3, batch_size=10 ** 5, step_size=0.01,
             alpha_step_size=0.01, radius=1.0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200 * 2 ** 20                                 # 1024 × 10⁵ indices would be 800 MiB each


# ---------------------------------------------------------------- 8. progress survives Ctrl-C
def test_keyboard_interrupt_saves_the_checkpoint(tmp_path):
    data = small()
    kw = dict(loss="dpo", estimator="stochastic", steps=400, step_size=0.05, alpha_step_size=0.1, radius=1.0)
    path = tmp_path / "k.npz"

    def interrupt(state, info):
        if state.step == 137:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lg.solve(data, **kw, checkpoint=path, callback=interrupt)      # default checkpoint_every = 40
    with np.load(path) as z:
        assert int(z["step"]) == 137
    assert not os.path.exists(str(path) + ".lock")
    resumed = lg.solve(data, **kw, checkpoint=path)
    np.testing.assert_array_equal(resumed.theta, lg.solve(data, **kw).theta)


@pytest.mark.parametrize("bad", ["", "folder", "a-file/run.npz"])
def test_checkpoint_path_is_checked_before_the_first_step(tmp_path, bad):
    if bad == "folder":
        path = tmp_path
    elif bad == "a-file/run.npz":
        (tmp_path / "a-file").write_text("a file where the folder should be")
        path = tmp_path / bad
    else:
        path = bad
    steps = []
    with pytest.raises(ValueError, match="checkpoint"):
        lg.solve(small(), **FIRST_ORDER, checkpoint=path, callback=lambda s, i: steps.append(s.step))
    assert steps == []


# ---------------------------------------------------------------- 9. one run per checkpoint
def test_a_checkpoint_in_use_is_refused(tmp_path):
    path = tmp_path / "l.npz"
    lock = tmp_path / "l.npz.lock"
    lock.write_text(f'{{"pid": {os.getpid()}, "host": "{socket.gethostname()}", "since": 0}}')
    with pytest.raises(ValueError, match=f"in use by process {os.getpid()}"):
        lg.solve(small(), **FIRST_ORDER, checkpoint=path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f'{{"pid": {int(dead.stdout)}, "host": "{socket.gethostname()}", "since": 0}}')
    with pytest.warns(UserWarning, match="stale lock"):
        lg.solve(small(), **FIRST_ORDER, checkpoint=path)
    assert not lock.exists()


# ---------------------------------------------------------------- 10. extending a run
def test_a_finished_run_can_be_extended_exactly(tmp_path):
    data = small()
    kw = dict(loss="dpo", estimator="stochastic", step_size=0.05, alpha_step_size=0.1, radius=1.0, batch_size=3,
              log_every=10)
    path = tmp_path / "e.npz"
    lg.solve(data, **kw, steps=150, checkpoint=path)
    longer = lg.solve(data, **kw, steps=300, checkpoint=path)
    straight = lg.solve(data, **kw, steps=300)
    np.testing.assert_array_equal(longer.theta, straight.theta)
    np.testing.assert_array_equal(longer.state.log_alpha, straight.state.log_alpha)
    pd.testing.assert_frame_equal(longer.history, straight.history)
    theory = tmp_path / "t.npz"                            # the theory step depends on T: refused
    lg.solve(data, loss="dpo", estimator="stochastic", radius=1.0, steps=100, checkpoint=theory)
    with pytest.raises(ValueError, match="step sizes"):
        lg.solve(data, loss="dpo", estimator="stochastic", radius=1.0, steps=200, checkpoint=theory)
    with pytest.raises(ValueError, match="past steps"):
        lg.solve(data, **kw, steps=100, checkpoint=path)


# ---------------------------------------------------------------- 11. damaged checkpoint files
@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "keys", "text"])
def test_damaged_checkpoints_give_one_clear_error(tmp_path, damage):
    data = small()
    path = tmp_path / "d.npz"
    lg.solve(data, **FIRST_ORDER, radius=1.0, checkpoint=path)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[:len(raw) // 2])
    elif damage == "flip":
        path.write_bytes(raw[:200] + bytes(b ^ 0xFF for b in raw[200:260]) + raw[260:])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "keys":
        np.savez(open(path, "wb"), theta=np.zeros(4))
    else:
        path.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=r"d\.npz is damaged or not a checkpoint"):
        lg.solve(data, **FIRST_ORDER, radius=1.0, checkpoint=path)


def test_temp_files_of_a_killed_run_are_removed(tmp_path):
    path = tmp_path / "t.npz"
    leftover = tmp_path / ".t.npz.tmp-abc.npz"
    leftover.write_bytes(b"partial")
    other = tmp_path / ".other.npz.tmp-xyz.npz"                # another checkpoint's: left alone
    other.write_bytes(b"partial")
    lg.solve(small(), **FIRST_ORDER, radius=1.0, checkpoint=path)
    assert not leftover.exists() and other.exists()


# ---------------------------------------------------------------- 12. GlobalOpinionQA's bad rows
def test_global_opinions_bad_entries_are_skipped_and_countries_flexible():
    lh = pytest.importorskip("llm_head")
    frame = pd.DataFrame({"question": ["q1", "q2", "q3"],
                          "selections": ["{'Japan': 0.5}", "{'Japan': None}", "{'Japan': [0.6, 0.4]}"],
                          "options": ["['a', 'b']"] * 3, "source": ["GAS"] * 3})
    with pytest.warns(UserWarning, match="skipped 2"):
        items = lh.load_global_opinions(frame=frame, countries="Japan")
    assert items.table["question"].tolist() == ["q3"] and items.countries == ("Japan",)
    with pytest.raises(ValueError, match="not found"):
        lh.load_global_opinions(frame=frame, countries=None)         # the paper's five: absent here
    with pytest.raises(ValueError, match="missing columns"):
        lh.load_global_opinions(frame=frame.drop(columns="options"))


# ---------------------------------------------------------------- 13. errors that name the argument
@pytest.mark.parametrize("kwargs, match", [
    (dict(radius=1.0, center=0.5), "center"),
    (dict(radius="1"), "radius"),
    (dict(estimator="full", step_size="e/sqrt(t)"), "step_size"),
    (dict(constraint=lg.Box(np.zeros(3), np.ones(3))), "Box lower"),
    (dict(steps=2 ** 64), "steps"),
    (dict(tol=-1.0), "tol"),
    (dict(estimator="full", step_size=0.1, tol=None, alpha_step_size=float("nan")), "alpha_step_size"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lg.solve(small(), **{"loss": "dpo", **kwargs})


def test_bad_data_arguments_name_themselves():
    data = small()
    with pytest.raises(ValueError, match="ConvexSet has dim"):
        lg.solve(data, constraint=lg.ConvexSet(3, lambda v: [v >= 0]))
    with pytest.raises(ValueError, match="ref_margin"):
        lg.PreferenceData(data.diff, data.groups, ref_margin=["a"] * data.n_samples)
    with pytest.raises(ValueError, match="ref_margin"):
        lg.PreferenceData(data.diff, data.groups, ref_margin=np.ones(data.n_samples) * 1j)
    with pytest.raises(ValueError, match="real-valued"):
        lg.PreferenceData(sp.csr_matrix(data.diff * 1j), data.groups)
    sparse = lg.PreferenceData.from_features(sp.csr_matrix(data.diff), sp.csr_matrix(data.diff * 0),
                                             data.groups)
    assert sparse.is_sparse and np.allclose(sparse.diff.toarray(), data.diff)


# ---------------------------------------------------------------- the fuzz test
def _named(exc, names):
    text = str(exc)
    return any(n in text for n in names)


ARGUMENT_NAMES = ("diff", "groups", "ref_margin", "group_names", "n_groups", "theta", "alpha", "radius", "center",
                  "constraint", "Box", "step_size", "alpha_step_size", "steps", "beta", "loss", "batch_size",
                  "tol", "no minimiser", "estimator")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 40), d=st.integers(1, 5), k=st.sampled_from([1, 2, 3, 6, 2000]),
       log_scale=st.sampled_from([-300, -120, -8, 0, 3, 60, 120, 300]),
       ref_scale=st.sampled_from([0.0, 1.0, 1e6, 1e200]), seed=st.integers(0, 2 ** 16),
       loss=st.sampled_from(["dpo", "sigmoid", "ipo", "hinge"]), beta=st.sampled_from([1e-3, 0.1, 10.0]),
       theta=st.sampled_from(["none", "ball", "box", "tiny_ball"]),
       estimator=st.sampled_from(["auto", "full", "stochastic", "closed_form"]),
       step=st.sampled_from([None, 1e-3, 1.0, 1e300]), dtype=st.sampled_from(["float64", "float32", "int"]),
       call=st.sampled_from(["solve", "solve", "solve", "solve_exact", "duality_gap"]))
def test_fuzz_every_call_is_finite_or_a_named_error(n, d, k, log_scale, ref_scale, seed, loss, beta, theta, estimator,
                                                    step, dtype, call):
    rng = np.random.default_rng(seed)
    if k == 2000:
        n = 2 * k                                   # many groups: two pairs each
    diff = rng.normal(size=(n, d)) * 10.0 ** log_scale
    diff = diff.astype(np.float32) if dtype == "float32" else (np.round(diff) if dtype == "int" else diff)
    groups = rng.integers(0, k, n)
    ref = rng.normal(size=n) * ref_scale
    theta_kw = {"none": {}, "ball": {"radius": 2.0}, "box": {"constraint": lg.Box(-1.0, 1.0)},
                "tiny_ball": {"radius": 1e-8, "center": np.full(d, 0.5)}}[theta]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            data = lg.PreferenceData(diff, groups, ref_margin=ref)
        except ValueError as exc:
            assert _named(exc, ARGUMENT_NAMES), exc
            return
        theta_set = lg.constraints.make_constraint(theta_kw.get("radius"), theta_kw.get("center"),
                                                   theta_kw.get("constraint"))
        if call != "solve":
            try:
                if call == "solve_exact":
                    exact = lg.solve_exact(data, loss=loss, beta=beta, **theta_kw)
                    assert np.all(np.isfinite(exact.theta)) and np.isfinite(exact.value)
                    assert abs(exact.alpha.sum() - 1) < 1e-9 and np.all(exact.alpha >= 0)
                else:
                    point = theta_set.project(rng.normal(size=d))
                    gap = lg.duality_gap(point, rng.dirichlet(np.ones(data.n_groups)), data, loss=loss, beta=beta,
                                         **theta_kw)
                    assert np.isfinite(gap) and gap >= -1e-9 * max(1.0, abs(gap))
            except ValueError as exc:
                assert _named(exc, ARGUMENT_NAMES + ("cvxpy could not solve",)), exc
            return
        kw = dict(loss=loss, beta=beta, estimator=estimator, steps=30, **theta_kw)
        if estimator in ("full", "stochastic"):
            kw.update(step_size=step if step is not None else (None if theta != "none" else 0.01), alpha_step_size=step)
        try:
            res = lg.solve(data, **kw)
        except ValueError as exc:
            assert _named(exc, ARGUMENT_NAMES), exc
            return
        assert np.all(np.isfinite(res.theta)) and theta_set.contains(res.theta, tol=1e-6)
        assert np.all(np.isfinite(res.alpha)) and np.all(res.alpha >= 0) and abs(res.alpha.sum() - 1) < 1e-9
        assert np.isfinite(res.value) and np.isfinite(res.gap) and res.gap >= 0
        assert np.all(np.isfinite(lg.group_losses(res.theta, data, loss, beta)))


def test_a_step_whose_norm_overflows_names_the_step_size():
    """Found by the fuzz test above: finite entries whose norm overflows made the ball's projection raise
    'cannot project a non-finite θ', naming nothing the user set."""
    rng = np.random.default_rng(36)
    diff = rng.normal(size=(36, 3)) * 1e3
    data = lg.PreferenceData(diff, rng.integers(0, 6, 36))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="step_size"):
            lg.solve(data, loss="ipo", beta=0.001, estimator="stochastic", steps=30, radius=2.0, step_size=1e300,
                     alpha_step_size=1e300)
