"""Issue 18, "Honest certificates and nothing lost": group labels identified by value (item 2), the
adjoint check of an implicit S (item 8), an exclusive checkpoint lock (item 9), the hinge programs'
memory guard (item 13) and a convergence warning that says what stopped the solver (item 17)."""
import json
import multiprocessing
import os
import socket
import time
import tracemalloc
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, aslinearoperator

import loglinear_grpo as lg
from loglinear_grpo import operators
from loglinear_grpo.checkpoints import CheckpointFile


def features(n=12, d=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d))


# ============================================================================ item 2: group labels
def test_item02_equal_numeric_labels_are_one_group():
    x = features(6)
    for labels in (np.array([0, 1, 1.0, np.int64(1), 0, np.float32(0)], dtype=object),
                   pd.Series([0, 1, 1.0, np.int64(1), 0, 0.0], dtype=object),
                   [0, 1, 1.0, np.int64(1), 0, np.int32(0)],
                   np.array([False, True, 1, 1.0, 0, 0], dtype=object)):
        data = lg.PreferenceData(x, labels)
        assert data.n_groups == 2
        np.testing.assert_array_equal(data.groups, [0, 1, 1, 1, 0, 0])
        assert data.group_names == ("0", "1")


def test_item02_numbers_mixed_with_strings_are_refused():
    x = features(4)
    for labels in ([1, "1", 0, 0], np.array([1, "1", 0, 0], dtype=object), pd.Series(["a", 1, "a", 1]),
                   [0, 1.0, "a", "a"]):
        with pytest.raises(ValueError, match="groups mixes numeric labels .* with other labels"):
            lg.PreferenceData(x, labels)


@pytest.mark.parametrize("labels, count", [
    (["a", None, "b", None], 2),
    (np.array(["a", np.nan, "b", "a"], dtype=object), 1),
    (pd.Series(["a", pd.NA, "b", "b"], dtype="string"), 1),
    (pd.Series([0, 1, None, 1], dtype="Int64"), 1),
    (np.array([0.0, np.nan, 1.0, np.nan]), 2),
    (pd.Series([pd.NaT, pd.Timestamp(0), pd.NaT, pd.NaT]), 3),
    ([0, 1, None, 1], 1),
    (pd.Categorical(["x", np.nan, "y", "x"]), 1),
])
def test_item02_missing_labels_are_refused_with_their_count(labels, count):
    with pytest.raises(ValueError, match=rf"groups has {count} missing label\(s\)"):
        lg.PreferenceData(features(4), labels)


def test_item02_distinct_labels_that_print_alike_are_refused():
    with pytest.raises(ValueError, match="distinct labels .* both named"):
        lg.PreferenceData(features(4), np.array(["b'a'", b"a", "x", "x"], dtype=object))


def test_item02_ordinary_labels_keep_their_order_and_names():
    x = features(4)
    data = lg.PreferenceData(x, ["us", "fr", "us", "fr"])
    assert data.group_names == ("us", "fr")
    np.testing.assert_array_equal(data.groups, [0, 1, 0, 1])
    named = lg.PreferenceData(x, np.array(["us", "fr", "us", "fr"]), group_names=["fr", "us"])
    np.testing.assert_array_equal(named.groups, [1, 0, 1, 0])
    ints = lg.PreferenceData(x, [1, 0, 2, 0], group_names=["a", "b", "c"])
    np.testing.assert_array_equal(ints.groups, [1, 0, 2, 0])
    assert ints.group_names == ("a", "b", "c")
    categorical = lg.PreferenceData(x, pd.Categorical(["y", "x", "y", "x"]))
    assert categorical.group_names == ("y", "x")
    with pytest.raises(ValueError, match="does not list"):
        lg.PreferenceData(x, ["us", "fr", "us", "de"], group_names=["fr", "us"])


# ============================================================================ item 8: adjoint check
def inconsistent(a):
    """A LinearOperator whose rmatvec applies another matrix's transpose."""
    wrong = a[::-1]
    return LinearOperator(a.shape, dtype=np.float64, matvec=lambda x: a @ x, rmatvec=lambda u: wrong.T @ u)


def test_item08_inconsistent_linear_operator_is_refused():
    a = features(40, 5, seed=1)
    with pytest.raises(ValueError, match="rmatvec is not the adjoint of its matvec.*check_adjoint=False"):
        lg.PreferenceData(inconsistent(a), np.arange(40) % 2)
    # the opt-out
    data = lg.PreferenceData(inconsistent(a), np.arange(40) % 2, check_adjoint=False)
    assert data.is_operator


def test_item08_inconsistent_pair_operator_is_refused():
    a = features(30, 4, seed=2)

    class Scaled(lg.PairOperator):                  # rmatvec off by a factor 1.001: still caught
        shape = a.shape

        def matvec(self, x):
            return a @ x

        def rmatvec(self, u):
            return 1.001 * (a.T @ u)

    with pytest.raises(ValueError, match="not the adjoint"):
        lg.PreferenceData(Scaled(), np.arange(30) % 3)
    with pytest.raises(ValueError, match="not the adjoint"):
        operators.check_adjoint(Scaled())


def test_item08_consistent_operators_pass_float64_and_float32():
    rng = np.random.default_rng(3)
    n, d = 2000, 40
    a = rng.standard_normal((n, d))
    lg.PreferenceData(aslinearoperator(a), np.arange(n) % 2)
    # float32 products of rows that are differences of large, nearly equal features (heavy cancellation)
    big = (1e3 + rng.standard_normal((n, d))).astype(np.float32)
    small = (1e3 + rng.standard_normal((n, d))).astype(np.float32)
    op32 = LinearOperator((n, d), dtype=np.float32,
                          matvec=lambda x: big @ x.astype(np.float32) - small @ x.astype(np.float32),
                          rmatvec=lambda u: big.T @ u.astype(np.float32) - small.T @ u.astype(np.float32))
    data = lg.PreferenceData(op32, np.arange(n) % 2)
    assert data.diff.precision == np.float32
    assert operators.check_adjoint(data.diff) <= operators.adjoint_rtol(np.float32)
    # a subset or sorted copy of checked data is not checked again (no products)
    calls = []
    counted = LinearOperator((n, d), dtype=np.float64, matvec=lambda x: calls.append(1) or a @ x,
                             rmatvec=lambda u: calls.append(1) or a.T @ u)
    checked = lg.PreferenceData(counted, np.arange(n) % 2, check_finite=False)     # no row norms
    assert len(calls) == 2
    checked.subset(np.arange(10))
    checked.sorted_by_group()
    assert len(calls) == 2


def test_item08_llm_head_pair_difference_operator_still_constructs():
    from llm_head.features import LastLayerFeatures, PairDifferenceOperator
    rng = np.random.default_rng(4)
    hidden = rng.standard_normal((12, 5)).astype(np.float32)
    # 6 one- or two-token candidates; entries (candidate, token, hidden row)
    cand = np.array([0, 1, 1, 2, 3, 3, 4, 5])
    tok = np.array([3, 5, 3, 7, 5, 9, 3, 7])
    hid = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    feats = LastLayerFeatures(hidden, cand, tok, hid, np.array([0, 3, 6]))
    op = PairDifferenceOperator(feats, [0, 0, 3, 3], [1, 2, 4, 5])
    data = lg.PreferenceData(op, [0, 1, 0, 1])
    assert operators.check_adjoint(data.diff) < 1e-12


# ============================================================================ item 9: checkpoint lock
def _lock_worker(path, start, holders, peak, entries, seconds):
    """Race for the lock for ``seconds``: each time it is held, count the simultaneous holders."""
    warnings.simplefilter("ignore")
    ckpt = CheckpointFile(path)
    start.wait()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            ckpt.acquire()
        except ValueError:                     # held by another process: try again
            continue
        with holders.get_lock():
            holders.value += 1
            peak.value = max(peak.value, holders.value)
            entries.value += 1
        time.sleep(0.002)
        with holders.get_lock():
            holders.value -= 1
        ckpt.release()


def _dead_pid():
    import subprocess
    import sys
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


@pytest.mark.parametrize("start_with", ["no lock", "a stale lock"])
def test_item09_lock_has_one_holder_among_racing_processes(tmp_path, start_with):
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    path = str(tmp_path / "race.npz")
    if start_with == "a stale lock":           # all of them race to take it over first
        with open(path + ".lock", "w") as fh:
            json.dump({"pid": _dead_pid(), "host": socket.gethostname(), "since": 0}, fh)
    start = ctx.Event()
    holders, peak, entries = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Value("i", 0)
    workers = [ctx.Process(target=_lock_worker, args=(path, start, holders, peak, entries, 2.0))
               for _ in range(12)]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(60)
    assert all(w.exitcode == 0 for w in workers)
    assert entries.value > 10                  # the lock changed hands many times
    assert peak.value == 1, f"{peak.value} processes held the lock at once"
    assert not os.path.exists(path + ".lock") and not os.path.exists(path + ".lock.takeover")
    assert not [f for f in os.listdir(tmp_path) if "lock-tmp" in f]     # no temporary file left


def test_item09_unparsable_lock_is_kept_and_named(tmp_path):
    path = tmp_path / "u.npz"
    lock = tmp_path / "u.npz.lock"
    for text in ("", "{not json", "[1, 2]"):
        lock.write_text(text)
        with warnings.catch_warnings():
            warnings.simplefilter("error")     # no "removing the stale lock"
            with pytest.raises(ValueError, match=rf"locked by {lock}.*delete {lock}"):
                CheckpointFile(path).acquire()
        assert lock.read_text() == text        # left alone
    with pytest.raises(ValueError, match="delete"):             # a solve refuses it too, before any step
        lg.solve(lg.PreferenceData(features(), np.arange(12) % 2), loss="dpo", estimator="stochastic", steps=10,
                 step_size=0.05, alpha_step_size=0.1, radius=1.0, checkpoint=path)
    assert lock.exists()


def test_item09_stale_lock_is_taken_over_and_released(tmp_path):
    path = tmp_path / "s.npz"
    lock = tmp_path / "s.npz.lock"
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "since": 0}))
    with pytest.warns(UserWarning, match="stale lock"):
        ckpt = CheckpointFile(path).acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    with pytest.raises(ValueError, match=f"in use by process {os.getpid()}"):
        CheckpointFile(path).acquire()
    ckpt.release()
    assert not lock.exists() and not (tmp_path / "s.npz.lock.takeover").exists()


# ============================================================================ item 17: ConvergenceWarning
def warning_of(data, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = lg.solve(data, **{"loss": "dpo", "radius": 4.0, **kw})
    messages = [str(w.message) for w in caught if issubclass(w.category, lg.ConvergenceWarning)]
    assert len(messages) == 1, messages
    return res, messages[0]


def stall_problem():
    rng = np.random.default_rng(0)
    return lg.PreferenceData(rng.normal(size=(300, 6)), np.arange(300) % 3)


def test_item17_newton_stalled_early_says_so_and_not_raise_steps():
    # a tolerance below what float64 can certify: Newton stops well inside its budget of 200
    res, message = warning_of(stall_problem(), tol=1e-14)
    assert res.n_iter < res.config.steps == 200
    assert f"after {res.n_iter} of at most 200 Newton iterations, before its budget ran out" in message
    assert "representable decrease" in message and "raising steps will not help" in message
    assert "default estimator" not in message and "raise steps" not in message


def test_item17_newton_budget_used_up_says_so_without_suggesting_newton():
    res, message = warning_of(stall_problem(), tol=1e-10, steps=3)
    assert res.n_iter == 3
    assert "used its whole budget, steps=3 Newton iterations" in message and "raise steps" in message
    assert "relative gap" in message and "default estimator" not in message


def test_item17_other_estimator_budget_used_up_suggests_newton():
    res, message = warning_of(stall_problem(), tol=1e-10, steps=3, estimator="full")
    assert "used its whole budget, steps=3 iterations" in message
    assert "use the default estimator ('newton')" in message


def test_item17_unconverged_hinge_program_is_not_told_to_raise_steps(monkeypatch):
    from loglinear_grpo import solver
    real = solver.hinge_program

    def short(*args, **kwargs):                 # a certificate that falls short of tol
        res = real(*args, **kwargs)
        res.lower_bound = res.value - 1e-3
        res.converged = False
        return res

    monkeypatch.setattr(solver, "hinge_program", short)
    res, message = warning_of(stall_problem(), loss="hinge", radius=None, constraint=lg.Box(-1.0, 1.0))
    assert not res.converged and res.n_iter == 1
    assert "solved the hinge program" in message and "raising steps will not help" in message
    assert "raise steps" not in message and "default estimator" not in message


# ============================================================================ item 13: hinge memory guard
class ProgramReached(Exception):
    """Raised in place of the LP/conic solver: the program was built (S densified) before the refusal."""


def memmap_data(tmp_path, n, d, seed=5):
    path = tmp_path / f"s-{n}x{d}.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, d))
    mm[:] = np.random.default_rng(seed).standard_normal((n, d))
    mm.flush()
    del mm
    return lg.PreferenceData(np.memmap(path, dtype=np.float32, mode="r", shape=(n, d)), np.arange(n) % 2)


@pytest.mark.parametrize("theta_set", [lg.Box(-1.0, 1.0), lg.L2Ball(1.0)], ids=["linear", "conic"])
def test_item13_hinge_on_a_memmap_is_refused_before_any_big_allocation(tmp_path, monkeypatch, theta_set):
    from loglinear_grpo import exact, hinge

    def reached(*args, **kwargs):
        raise ProgramReached

    monkeypatch.setattr(hinge.scipy.optimize, "linprog", reached)
    monkeypatch.setattr(hinge, "_solve_cvxpy", reached)
    n, d = 40_000, 20
    data = memmap_data(tmp_path, n, d)
    dense_bytes = 8 * n * d                    # S read whole as float64: 6.4 MB (the file is 3.2 MB)
    monkeypatch.setattr(hinge, "HINGE_MEMORY_BUDGET", 4 << 20, raising=False)
    import loglinear_grpo.newton  # noqa: F401 - imported here, not counted below
    tracemalloc.start()
    try:
        with pytest.raises(MemoryError, match=r"N=40000 pairs, d=20, K=2 \(memory-mapped S\).*about 3\d\d\.\d MiB.*"
                                              r"budget of 4.0 MiB.*HINGE_MEMORY_BUDGET.*loss='dpo' or 'ipo'.*subset"):
            exact.hinge_program(data, 0.1, theta_set)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < dense_bytes / 8, f"{peak} bytes allocated before the refusal"
    assert exact.hinge_program_nbytes(data) > 10 * dense_bytes      # the prediction covers the solver too
    with pytest.raises(MemoryError, match="HINGE_MEMORY_BUDGET"):  # and solve(estimator="newton") passes it on
        lg.solve(data, loss="hinge", radius=None, constraint=theta_set, estimator="newton")
    # the default, on this bounded Θ, takes the matrix-free smoothed hinge instead (no program)
    assert lg.make_config(data, loss="hinge", radius=None, constraint=theta_set).estimator == "newton_cg"
    with pytest.raises(MemoryError, match="HINGE_MEMORY_BUDGET"):  # on R^d there is none: refused as before
        lg.solve(data, loss="hinge", radius=None)


def test_item13_small_hinge_problems_still_solve_under_the_budget(tmp_path, monkeypatch):
    from loglinear_grpo import exact, hinge
    monkeypatch.setattr(hinge, "HINGE_MEMORY_BUDGET", 8 << 20, raising=False)
    data = memmap_data(tmp_path, 300, 4)
    assert exact.hinge_program_nbytes(data) < 8 << 20
    res = lg.solve(data, loss="hinge", radius=2.0)
    reference = lg.solve(lg.PreferenceData(np.asarray(data.diff, dtype=np.float64), data.groups), loss="hinge",
                         radius=2.0)
    assert res.value == pytest.approx(reference.value, rel=1e-9, abs=1e-12)
    # sparse and implicit S are predicted from their stored entries, not N·d
    sparse = lg.PreferenceData(sp.random(300, 1000, density=0.01, random_state=0, format="csr"), np.arange(300) % 2)
    assert exact.hinge_program_nbytes(sparse) < exact.HINGE_BYTES_PER_ENTRY * 300 * 1000 / 10
    assert 0 < exact.hinge_memory_budget() == 8 << 20
    monkeypatch.setattr(hinge, "HINGE_MEMORY_BUDGET", None)
    assert exact.hinge_memory_budget() >= 1 << 28                 # half the physical memory


def test_newton_predicts_its_matrices_and_refuses_before_allocating(monkeypatch):
    """Issue 21's measured defect: at 4·10⁴ pairs the row-space kernel failed after 13 s with a raw
    `_ArrayMemoryError` from inside the Gram. The Newton solver now predicts its N × N (or d × d) matrices
    from the shapes and refuses, naming N, d, the prediction and the budget, before allocating any."""
    import tracemalloc

    import loglinear_grpo.newton as newton
    rng = np.random.default_rng(0)
    n, d = 300, 900                                     # d > N on a ball: the row space, 8 · N² floats
    data = lg.PreferenceData(rng.normal(size=(n, d)), rng.integers(0, 3, n))
    need, where = newton.newton_memory_nbytes(data, lg.L2Ball(1.0))
    assert need == 8 * newton.ROW_SPACE_MATRICES * n * n and "N × N" in where
    assert newton.newton_memory_nbytes(data, lg.Box(-1, 1))[0] == 8 * newton.PRIMAL_MATRICES * d * d
    monkeypatch.setattr(newton, "NEWTON_MEMORY_BUDGET", 1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(MemoryError, match=r"N=300 pairs, d=900.*row space.*budget of 1.0 MiB.*NEWTON_MEMORY_BUDGET"):
            lg.solve(data, radius=1.0, estimator="newton")    # asked for; "auto" takes newton_cg instead
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * n * n                             # refused before one N × N matrix existed
    monkeypatch.setattr(newton, "NEWTON_MEMORY_BUDGET", None)
    assert lg.solve(data, radius=1.0).converged         # the default budget: half the physical memory
