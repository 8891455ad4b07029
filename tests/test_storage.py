"""The row interface (loglinear_grpo.storage, issue 19): every adapter reads the same S, checkpoints
keep their digests, and a new way of storing S is one more adapter."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import aslinearoperator

import loglinear_grpo as lg
from loglinear_grpo import storage
from loglinear_grpo.checkpoints import data_fingerprint
from loglinear_grpo.operators import PairOperator

N, D = 300, 7
#: exact binary fractions: the digests below do not depend on the platform's arithmetic
DIFF = ((np.arange(N * D) % 7) - 3).reshape(N, D) / 4.0
GROUPS = np.arange(N) % 3
REF = (np.arange(N) % 5) / 8.0


class FixedFingerprint(PairOperator):
    def __init__(self, a):
        self.a, self.shape = a, a.shape

    def matvec(self, x):
        return self.a @ x

    def rmatvec(self, u):
        return self.a.T @ u

    def fingerprint(self):
        return "fixed-operator"


def _memmap(tmp_path, a):
    mapped = np.memmap(tmp_path / "s.bin", dtype=a.dtype, mode="w+", shape=a.shape)
    mapped[:] = a
    mapped.flush()
    del mapped
    return np.memmap(tmp_path / "s.bin", dtype=a.dtype, mode="r", shape=a.shape)


def _kinds(tmp_path):
    return {"dense": DIFF, "dense32": DIFF.astype(np.float32), "memmap32": _memmap(tmp_path, DIFF.astype(np.float32)),
            "sparse": sp.csr_matrix(DIFF), "sparse32": sp.csr_matrix(DIFF.astype(np.float32)),
            "operator": FixedFingerprint(DIFF), "linear operator": aslinearoperator(DIFF)}


#: data_fingerprint of each kind, as written by the code before the row interface (commit 17d0058):
#: checkpoints written then are still accepted
EARLIER_DIGESTS = {
    "dense": "a631f09dc69bfe92d85e6903b779f75139decdb3835c8f36f4aac9ccaf1edd79",
    "dense32": "ccc2909c5c72a5df7afe96d9474bce6f6c42ed1aa970741abb5de87a4bf2bfe3",
    "memmap32": "ccc2909c5c72a5df7afe96d9474bce6f6c42ed1aa970741abb5de87a4bf2bfe3",
    "sparse": "08135a00ea986e77a72e43b3c4f29419080e478ce38693314743b310187b1fe5",
    "sparse32": "7030f62269c8914932d101e2d989064f210d036f50afdfa2c4715bab3d160573",
    "operator": "f035434c4c4db2a112097d25fb704cd594befa14b35ab60233c04a9c5e17c2a4",
}
EARLIER_SUBSET_DIGESTS = {          # of data.subset(np.arange(0, N, 2))
    "dense": "de30de6c0138fc1139161fe8b4240cdd239e4d63803d4210efecb3563365a4ee",
    "memmap32": "7e58b46c68ce7107979ceaf46fc640ce009223668bb03d2921ca7810eae1af83",
    "sparse": "4f6ad3965168d0eabf6ea13386a1c276bca360c22f54c67918b2855b31cf2df8",
    "operator": "17609408a77adfbbbf9b822b5d02e74225fe68107cbadc39aa5f9e160b733ff0",
}


def test_checkpoint_fingerprints_are_those_of_earlier_versions(tmp_path):
    kinds = _kinds(tmp_path)
    for kind, digest in EARLIER_DIGESTS.items():
        data = lg.PreferenceData(kinds[kind], GROUPS, REF)
        assert data_fingerprint(data) == digest, kind
    for kind, digest in EARLIER_SUBSET_DIGESTS.items():
        data = lg.PreferenceData(kinds[kind], GROUPS, REF)
        assert data_fingerprint(data.subset(np.arange(0, N, 2))) == digest, kind


CAPABILITIES = ("in_memory", "out_of_core", "dense_rows", "parallel_parts", "cheap_rmatmat")
EXPECTED = {                       # kind: (adapter, capabilities, repr word, description)
    "dense": (storage.DenseRows, (True, False, True, True, True), "dense", "in-memory"),
    "dense32": (storage.DenseRows, (True, False, True, True, True), "dense", "in-memory"),
    "memmap32": (storage.MemmapRows, (False, True, True, True, True), "memmap", "memory-mapped"),
    "sparse": (storage.SparseRows, (True, False, False, False, True), "sparse", "sparse"),
    "sparse32": (storage.SparseRows, (True, False, False, False, True), "sparse", "sparse"),
    "operator": (storage.OperatorRows, (False, False, False, False, False), "implicit", "implicit"),
    "linear operator": (storage.OperatorRows, (False, False, False, False, False), "implicit", "implicit"),
}


def test_each_kind_gets_its_adapter_and_capabilities(tmp_path):
    for kind, diff in _kinds(tmp_path).items():
        data = lg.PreferenceData(diff, GROUPS, REF)
        adapter, flags, word, description = EXPECTED[kind]
        rows = data.storage
        assert type(rows) is adapter, kind
        assert tuple(getattr(rows, c) for c in CAPABILITIES) == flags, kind
        assert rows.kind == word and rows.description == description and word in repr(data)
        assert rows.source is data.diff and rows.shape == (N, D)
        assert data.streamed == rows.out_of_core and data.is_dense == rows.dense_rows   # the conveniences agree
        assert rows.dtype == (np.float32 if "32" in kind else np.float64)


def test_every_adapter_reads_the_same_s(tmp_path):
    rng = np.random.default_rng(0)
    x, u, v = rng.standard_normal(D), rng.standard_normal(N), rng.random(N)
    many = rng.standard_normal((N, 3))
    index = np.array([5, 0, 299, 5])

    def dense(a):
        return a.toarray() if sp.issparse(a) else np.asarray(a, dtype=np.float64)

    for kind, diff in _kinds(tmp_path).items():
        rows = lg.PreferenceData(diff, GROUPS, REF).storage
        np.testing.assert_allclose(rows.matvec(x), DIFF @ x, rtol=1e-6, err_msg=kind)
        np.testing.assert_allclose(rows.rmatvec(u), DIFF.T @ u, rtol=1e-6, err_msg=kind)
        np.testing.assert_allclose(rows.rmatmat(many), DIFF.T @ many, rtol=1e-6, err_msg=kind)
        sums = rows.group_sums(u, GROUPS, 3)
        np.testing.assert_allclose(sums, np.stack([u[GROUPS == g] @ DIFF[GROUPS == g] for g in range(3)]),
                                   rtol=1e-6, err_msg=kind)
        np.testing.assert_allclose(rows.abs_rmatvec(v), np.abs(DIFF).T @ v, rtol=1e-6, err_msg=kind)
        np.testing.assert_allclose(rows.row_norms(), np.linalg.norm(DIFF, axis=1), rtol=1e-6, err_msg=kind)
        np.testing.assert_allclose(dense(rows.rows(index)), DIFF[index], err_msg=kind)
        np.testing.assert_allclose(np.vstack([dense(b) for _, _, b in rows.row_blocks()]), DIFF, err_msg=kind)
        np.testing.assert_allclose(rows.gram(), DIFF @ DIFF.T, rtol=1e-6, err_msg=kind)
        np.testing.assert_allclose(dense(rows.explicit()), DIFF, err_msg=kind)
        np.testing.assert_allclose(rows.subset(index).matvec(x), DIFF[index] @ x, rtol=1e-6, err_msg=kind)
        top = rows.max_abs()
        assert top == 0.75 if rows.in_memory or rows.out_of_core else top >= 0.75   # implicit: a row norm
        entries = {True: np.count_nonzero(DIFF), False: N * D}[rows.kind == "sparse"]
        assert rows.explicit_entries() == (8 * N * D // 12 if rows.kind == "implicit" else entries)
        if rows.dense_rows:
            np.testing.assert_array_equal(rows.row(7), DIFF[7])
            np.testing.assert_array_equal(np.vstack([b for _, _, b in rows.blocks(10, 200, 64)]), DIFF[10:200])


# ============================================================================ a new way of storing S
class Shards:
    """S as a list of row blocks (a sharded S): not an ndarray, a CSR matrix or an operator."""

    def __init__(self, parts):
        self.parts = [np.asarray(p, dtype=np.float64) for p in parts]
        self.shape = (sum(p.shape[0] for p in self.parts), self.parts[0].shape[1])


class ShardRows(storage.Rows):
    """The adapter of :class:`Shards`, written against the protocol alone (in a test, so that no
    module of the package knows it)."""

    kind = "shards"
    description = "sharded"

    def __init__(self, shards):
        self.source, self.parts = shards, shards.parts
        self.shape, self.dtype = shards.shape, np.dtype(np.float64)
        self.offsets = np.cumsum([0] + [p.shape[0] for p in self.parts])

    @classmethod
    def accepts(cls, diff):
        return isinstance(diff, Shards)

    @classmethod
    def checked(cls, diff, check_finite=True, check_adjoint=True):
        if check_finite and not all(np.all(np.isfinite(p)) for p in diff.parts):
            raise ValueError("diff contains NaN or inf")
        return cls(diff)

    def matvec(self, x):
        return np.concatenate([p @ x for p in self.parts])

    def rmatvec(self, u):
        return sum(p.T @ u[a:b] for p, a, b in zip(self.parts, self.offsets, self.offsets[1:]))

    def rmatmat(self, u):
        return sum(p.T @ u[a:b] for p, a, b in zip(self.parts, self.offsets, self.offsets[1:]))

    def rows(self, index):
        index = np.asarray(index, dtype=np.intp).ravel()
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        return np.stack([self.parts[s][i - self.offsets[s]] for s, i in zip(shard, index)])

    def row_blocks(self, block_rows=storage.CHUNK_ROWS):
        for p, a, b in zip(self.parts, self.offsets, self.offsets[1:]):
            yield int(a), int(b), p

    def row_norms(self):
        return np.concatenate([np.linalg.norm(p, axis=1) for p in self.parts])

    def max_abs(self):
        return max(float(np.abs(p).max()) for p in self.parts)

    def gram(self):
        whole = self.explicit()
        return whole @ whole.T

    def explicit(self):
        return np.vstack(self.parts)

    def explicit_entries(self):
        return self.shape[0] * self.shape[1]

    def take(self, index):
        return Shards([self.rows(index)])

    def update_fingerprint(self, hasher):
        for p in self.parts:
            hasher.update(p.tobytes())


def test_a_new_storage_is_one_more_adapter(monkeypatch):
    monkeypatch.setattr(storage, "ADAPTERS", [ShardRows, *storage.ADAPTERS])
    rng = np.random.default_rng(4)
    diff = rng.standard_normal((240, 5))
    groups, ref = rng.integers(0, 3, 240), 0.1 * rng.standard_normal(240)
    sharded = lg.PreferenceData(Shards([diff[:100], diff[100:170], diff[170:]]), groups, ref)
    dense = lg.PreferenceData(diff, groups, ref)
    assert isinstance(sharded.storage, ShardRows) and "shards" in repr(sharded)
    runs = [dict(loss="dpo"), dict(loss="ipo", estimator="closed_form"), dict(loss="hinge"),
            dict(loss="dpo", estimator="full", steps=50, tol=None),
            dict(loss="dpo", estimator="stochastic", steps=200, seed=3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lg.ConvergenceWarning)
        for kw in runs:
            a, b = lg.solve(sharded, radius=1.5, **kw), lg.solve(dense, radius=1.5, **kw)
            np.testing.assert_allclose(a.theta, b.theta, rtol=1e-7, atol=1e-9, err_msg=str(kw))
            assert a.gap == pytest.approx(b.gap, rel=1e-5, abs=1e-9)
    exact = lg.solve_exact(sharded, loss="dpo", radius=1.5)          # cvxpy: S formed by explicit()
    assert exact.value == pytest.approx(lg.solve(dense, loss="dpo", radius=1.5).value, rel=1e-6)
    assert data_fingerprint(sharded) != data_fingerprint(dense)
    assert data_fingerprint(sharded.subset([0, 5, 200])) != data_fingerprint(sharded)
