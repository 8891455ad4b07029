"""An implicit S (issue 14): the operator of an LLM's last-layer features equals the explicit CSR
matrix, every solver and the certificate give the same answers on it, and a memory-mapped
hidden-state cache is never loaded whole."""
import tracemalloc
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import aslinearoperator

import loglinear_grpo as lg
from loglinear_grpo import operators
from loglinear_grpo.checkpoints import data_fingerprint
from llm_head import features as feat
from llm_head.features import LastLayerFeatures, PairDifferenceOperator, pair_rows

#: the operator's products are float64 sums of the same terms as the CSR's, in another order
RTOL = 1e-12


def random_features(rng, n_items=25, max_candidates=4, max_len=6, vocab=30, d=8, dtype=np.float32):
    """Items whose candidates are multi-token answers: the first token is scored against the prompt's
    hidden state (shared by the item's candidates), later tokens against their own; tokens repeat
    within and across answers."""
    rows, cand, tok, hid, offsets = [], [], [], [], [0]
    for _ in range(n_items):
        prompt_row = len(rows)
        rows.append(rng.standard_normal(d))
        first, count = offsets[-1], int(rng.integers(2, max_candidates + 1))
        for c in range(first, first + count):
            for t, token in enumerate(rng.integers(0, vocab, rng.integers(1, max_len + 1))):
                if t:
                    rows.append(rng.standard_normal(d))
                cand.append(c)
                tok.append(7 * int(token) + 3)
                hid.append(prompt_row if t == 0 else len(rows) - 1)
        offsets.append(first + count)              # the item's candidates: first .. first + count − 1
    return LastLayerFeatures(np.asarray(rows, dtype=dtype), np.asarray(cand), np.asarray(tok), np.asarray(hid),
                             np.asarray(offsets))


def all_pairs(features):
    """Per item: its first candidate against each other one, and the last against the first."""
    chosen, rejected = [], []
    offsets = features.candidate_offsets
    for a, b in zip(offsets[:-1], offsets[1:]):
        chosen += [a] * (b - a - 1) + [b - 1]
        rejected += list(range(a + 1, b)) + [a]
    return np.asarray(chosen), np.asarray(rejected)


@pytest.fixture(scope="module", params=[np.float32, np.float16])
def problem(request):
    rng = np.random.default_rng(3)
    features = random_features(rng, dtype=request.param)
    chosen, rejected = all_pairs(features)
    op = PairDifferenceOperator(features, chosen, rejected)
    csr = features.pair_differences(chosen, rejected)
    assert csr.nnz > 0 and abs(csr).sum(axis=1).min() > 0     # every pair has a non-zero row (none against itself)
    groups = rng.integers(0, 3, chosen.size)
    ref = 0.1 * rng.standard_normal(chosen.size)
    return features, op, csr, lg.PreferenceData(op, groups, ref), lg.PreferenceData(csr, groups, ref)


def close(a, b):
    a, b = (x.toarray() if sp.issparse(x) else np.asarray(x) for x in (a, b))
    scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * scale)


# ============================================================================ the operator itself
def test_products_rows_norms_and_kernel_equal_the_csr(problem):
    features, op, csr, _, _ = problem
    rng = np.random.default_rng(0)
    theta, u = rng.standard_normal(op.shape[1]), rng.standard_normal(op.shape[0])
    many = rng.standard_normal((op.shape[0], 3))
    close(op.matvec(theta), csr @ theta)
    close(op.rmatvec(u), csr.T @ u)
    close(op.rmatmat(many), csr.T @ many)
    index = rng.integers(0, op.shape[0], 9)                        # repeats allowed, any order
    close(op.rows(index), csr[index])
    close(op.row_norms(), np.sqrt(csr.multiply(csr).sum(axis=1)).A1)
    close(op.gram(), (csr @ csr.T).toarray())
    close(op.explicit(), csr)
    close(sp.vstack([b for _, _, b in op.row_blocks()]), csr)
    close(op.subset(index).matvec(theta), csr[index] @ theta)
    close(features.candidate_scores(theta), features.phi() @ theta)
    assert op.explicit_nbytes() >= 12 * csr.nnz                      # the prediction bounds the real size


def test_blocks_smaller_than_a_row_give_the_same_products(problem, monkeypatch):
    features, op, csr, _, _ = problem
    monkeypatch.setattr(feat, "BLOCK_BYTES", 8 * features.hidden_size * 3)     # 3 hidden rows per block
    rng = np.random.default_rng(1)
    theta, u = rng.standard_normal(op.shape[1]), rng.standard_normal(op.shape[0])
    small = PairDifferenceOperator(features, op.chosen, op.rejected)
    close(small.matvec(theta), csr @ theta)
    close(small.rmatvec(u), csr.T @ u)
    close(small.gram(), (csr @ csr.T).toarray())
    close(small.row_norms(), np.sqrt(csr.multiply(csr).sum(axis=1)).A1)
    assert len(list(small.row_blocks())) > 1


def test_fingerprint_follows_the_hidden_states_and_the_pairs(problem):
    features, op, _, _, _ = problem
    same = PairDifferenceOperator(features, op.chosen, op.rejected)
    assert same.fingerprint() == op.fingerprint()
    changed = LastLayerFeatures(features.hidden.copy(), features.entry_candidate, features.entry_token,
                                features.entry_hidden, features.candidate_offsets)
    changed.hidden[5, 2] += 1
    assert PairDifferenceOperator(changed, op.chosen, op.rejected).fingerprint() != op.fingerprint()
    assert PairDifferenceOperator(features, op.chosen[::-1], op.rejected[::-1]).fingerprint() != op.fingerprint()
    assert PairDifferenceOperator(features, op.chosen, op.rejected, source_fingerprint="a").fingerprint() != \
        PairDifferenceOperator(features, op.chosen, op.rejected, source_fingerprint="b").fingerprint()


def test_bad_pairs_and_non_finite_hidden_states_are_refused(problem):
    features, op, _, _, _ = problem
    with pytest.raises(ValueError, match="chosen holds candidate indices"):
        PairDifferenceOperator(features, op.chosen + 10_000, op.rejected)
    with pytest.raises(ValueError, match="differ in shape"):
        PairDifferenceOperator(features, op.chosen[:-1], op.rejected)
    bad = LastLayerFeatures(features.hidden.astype(np.float32), features.entry_candidate, features.entry_token,
                            features.entry_hidden, features.candidate_offsets)
    bad.hidden[features.entry_hidden[0], 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        lg.PreferenceData(PairDifferenceOperator(bad, op.chosen, op.rejected), np.zeros(op.shape[0], int))
    with pytest.raises(ValueError, match="storage"):
        pair_rows(features, op.chosen, op.rejected, storage="dense")


def test_pair_rows_chooses_by_the_predicted_csr_size(problem, monkeypatch):
    features, op, _, _, _ = problem
    assert sp.issparse(pair_rows(features, op.chosen, op.rejected))
    assert isinstance(pair_rows(features, op.chosen, op.rejected, "implicit"), PairDifferenceOperator)
    monkeypatch.setattr(feat, "CSR_LIMIT_BYTES", op.explicit_nbytes() - 1)
    assert isinstance(pair_rows(features, op.chosen, op.rejected), PairDifferenceOperator)
    assert sp.issparse(pair_rows(features, op.chosen, op.rejected, "csr"))


# ============================================================================ solvers on it
CASES = [("dpo", "auto"), ("ipo", "auto"), ("hinge", "auto"), ("dpo", "full"), ("ipo", "closed_form"),
         ("dpo", "stochastic"), ("ipo", "stochastic")]


@pytest.mark.parametrize("loss, estimator", CASES)
def test_every_estimator_gives_the_csr_answer(problem, loss, estimator):
    _, _, _, implicit, explicit = problem
    kw = dict(loss=loss, estimator=estimator, radius=2.0)
    if estimator == "stochastic":
        kw.update(steps=200, seed=4, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lg.ConvergenceWarning)
        a, b = lg.solve(implicit, **kw), lg.solve(explicit, **kw)
    assert a.converged == b.converged
    if estimator != "stochastic":
        assert a.converged, a.summary()
    np.testing.assert_allclose(a.theta, b.theta, rtol=1e-9, atol=1e-9)
    assert a.value == pytest.approx(b.value, rel=1e-10)
    # (the gap is a difference of two O(value) numbers: S's rounding moves it by ~1e-10 of the value)
    assert a.gap == pytest.approx(b.gap, rel=1e-6, abs=1e-9 * max(1.0, abs(b.value)))


def test_certificate_exact_solver_and_metrics_match(problem):
    _, _, _, implicit, explicit = problem
    result = lg.solve(explicit, loss="dpo", radius=2.0)
    theta = result.theta
    for loss in ("dpo", "ipo", "hinge"):
        gap_a = lg.duality_gap(theta, result.alpha, implicit, loss=loss, radius=2.0)
        gap_b = lg.duality_gap(theta, result.alpha, explicit, loss=loss, radius=2.0)
        assert gap_a == pytest.approx(gap_b, rel=1e-6, abs=1e-10)
    exact_a = lg.solve_exact(implicit, loss="dpo", radius=2.0)
    exact_b = lg.solve_exact(explicit, loss="dpo", radius=2.0)
    assert exact_a.value == pytest.approx(exact_b.value, rel=1e-8)
    a, b = lg.group_metrics(theta, implicit, "dpo", 0.1), lg.group_metrics(theta, explicit, "dpo", 0.1)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-10)      # numbers, NA and the worst group's name


def test_solve_exact_refuses_an_implicit_s_too_large_to_form(problem, monkeypatch):
    _, _, _, implicit, _ = problem
    monkeypatch.setattr(operators, "EXPLICIT_LIMIT_BYTES", 1000)
    with pytest.raises(ValueError, match="needs S explicitly"):
        lg.solve_exact(implicit, loss="dpo", radius=2.0)


def test_checkpoints_fingerprint_the_operator_and_resume(problem, tmp_path):
    _, op, _, implicit, _ = problem
    assert data_fingerprint(implicit) == data_fingerprint(lg.PreferenceData(
        PairDifferenceOperator(op.features, op.chosen, op.rejected), implicit.groups, implicit.ref_margin))
    path = tmp_path / "ckpt.npz"
    kw = dict(loss="dpo", estimator="full", radius=2.0, tol=None, checkpoint=path, checkpoint_every=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lg.ConvergenceWarning)
        lg.solve(implicit, steps=40, **kw)
        resumed = lg.solve(implicit, steps=80, **kw)
        straight = lg.solve(implicit, loss="dpo", estimator="full", radius=2.0, tol=None, steps=80)
    np.testing.assert_array_equal(resumed.theta, straight.theta)


def test_a_scipy_linear_operator_is_accepted():
    rng = np.random.default_rng(5)
    diff = rng.standard_normal((60, 5))
    groups = np.repeat([0, 1, 2], 20)
    dense = lg.PreferenceData(diff, groups)
    implicit = lg.PreferenceData(aslinearoperator(diff), groups)
    assert implicit.is_operator and "implicit" in repr(implicit)
    for loss in ("dpo", "ipo", "hinge"):
        a, b = lg.solve(implicit, loss=loss, radius=1.0), lg.solve(dense, loss=loss, radius=1.0)
        assert a.converged and b.converged
        assert a.value == pytest.approx(b.value, rel=1e-9, abs=1e-12)
    close(implicit.rows([3, 1]), diff[[3, 1]])
    close(implicit.gram(), diff @ diff.T)


# ============================================================================ memory
def test_a_memory_mapped_cache_is_never_loaded_whole(tmp_path, monkeypatch):
    """Hidden states of 40 000 tokens × 256 in float16 (20 MB on disk): every product, the row norms
    and the kernel allocate a small fraction of that (blocks of 256 KiB here)."""
    rng = np.random.default_rng(7)
    n_pairs, length, d, vocab = 2000, 10, 256, 500
    rows = n_pairs * 2 * length
    path = tmp_path / "hidden.f16"
    hidden = np.memmap(path, dtype=np.float16, mode="w+", shape=(rows, d))
    for start in range(0, rows, 4096):
        hidden[start:start + 4096] = rng.standard_normal((min(4096, rows - start), d))
    hidden.flush()
    del hidden
    cache = np.memmap(path, dtype=np.float16, mode="r", shape=(rows, d))
    candidates = np.repeat(np.arange(2 * n_pairs), length)
    features = LastLayerFeatures(cache, candidates, rng.integers(0, vocab, rows), np.arange(rows),
                                 np.arange(0, 2 * n_pairs + 1))
    monkeypatch.setattr(feat, "BLOCK_BYTES", 256 << 10)
    op = PairDifferenceOperator(features, np.arange(0, 2 * n_pairs, 2), np.arange(1, 2 * n_pairs, 2))
    theta = rng.standard_normal(op.shape[1])
    u = rng.standard_normal(n_pairs)
    file_bytes = rows * d * 2
    fixed = op.shape[1] * 8 * 2 + n_pairs * n_pairs * 8      # θ-sized output (and its reshape), the N×N kernel
    tracemalloc.start()
    try:
        for run in (lambda: op.matvec(theta), lambda: op.rmatvec(u), op.row_norms, op.gram):
            tracemalloc.reset_peak()
            run()
            extra = tracemalloc.get_traced_memory()[1] - fixed
            assert extra < 0.25 * file_bytes, (run, extra, file_bytes)
    finally:
        tracemalloc.stop()
    assert isinstance(op.hidden, np.memmap)
