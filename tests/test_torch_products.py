"""The implicit S on torch (``llm_head.features.PairDifferenceOperator(backend="torch")``): its float64
products equal the numpy ones to float64 rounding, its float32 ones to float32's, and a certified
matrix-free solve on it gives the numpy backend's value."""
import builtins
import sys
from pathlib import Path

import numpy as np
import pytest

import loglinear_grpo as lg
from llm_head import features as feat
from llm_head.features import LastLayerFeatures, PairDifferenceOperator, pair_rows

from test_implicit import all_pairs as item_pairs  # noqa: E402  (items of 2+ multi-token candidates)
from test_implicit import random_features as _random_features  # noqa: E402

torch = pytest.importorskip("torch")

#: float64 sums of the same terms in another order
RTOL = 1e-12
#: float32 products (about 1e-7 relative; the brief's bound)
RTOL32 = 1e-5
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a cuda device")


def random_features(rng, n_items=20, dtype=np.float32):
    return _random_features(rng, n_items=n_items, d=16, dtype=dtype)


def memmapped(features, folder):
    path = Path(folder) / "hidden.bin"
    mm = np.memmap(path, dtype=features.hidden.dtype, mode="w+", shape=features.hidden.shape)
    mm[:] = features.hidden
    mm.flush()
    del mm
    hidden = np.memmap(path, dtype=features.hidden.dtype, mode="r", shape=features.hidden.shape)
    return LastLayerFeatures(hidden, features.entry_candidate, features.entry_token, features.entry_hidden,
                             features.candidate_offsets)


def assert_close(a, b, rtol):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == np.float64 and a.shape == b.shape
    scale = float(np.abs(b).max())
    assert scale > 0                                   # a zero S would prove nothing
    assert np.abs(a - b).max() <= rtol * scale


@pytest.fixture(params=["float16", "float32", "float16-memmap"])
def pair(request, tmp_path):
    dtype = np.float16 if request.param.startswith("float16") else np.float32
    features = random_features(np.random.default_rng(4), dtype=dtype)
    if request.param.endswith("memmap"):
        features = memmapped(features, tmp_path)
    chosen, rejected = item_pairs(features)
    return (PairDifferenceOperator(features, chosen, rejected, backend="numpy"),
            PairDifferenceOperator(features, chosen, rejected, backend="torch"))


def vectors(op, seed=0, k=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(op.shape[1]), rng.standard_normal(op.shape[0]), rng.standard_normal((op.shape[0], k))


# ============================================================================ products
def test_float64_products_equal_numpy(pair):
    ref, op = pair
    assert (ref.backend, op.backend) == ("numpy", "torch")
    x, u, many = vectors(op)
    assert_close(op.matvec(x), ref.matvec(x), RTOL)
    assert_close(op.rmatvec(u), ref.rmatvec(u), RTOL)
    assert_close(op.rmatmat(many), ref.rmatmat(many), RTOL)
    assert_close(op.matmat(many[:2].T.repeat(op.shape[1] // 2 + 1, axis=0)[:op.shape[1]]),
                 ref.matmat(many[:2].T.repeat(op.shape[1] // 2 + 1, axis=0)[:op.shape[1]]), RTOL)


def test_adjoint_identity(pair):
    _, op = pair
    x, u, _ = vectors(op, seed=1)
    lhs, rhs = op.matvec(x) @ u, x @ op.rmatvec(u)
    assert abs(lhs - rhs) <= 1e-12 * np.linalg.norm(op.matvec(x)) * np.linalg.norm(u) * 10


def test_float32_approximate_products(pair):
    ref, op = pair
    x, u, _ = vectors(op, seed=2)
    fast_mv, fast_rmv = op.approximate_products()
    assert_close(fast_mv(x), ref.matvec(x), RTOL32)
    assert_close(fast_rmv(u), ref.rmatvec(u), RTOL32)
    assert np.abs(fast_mv(x) - ref.matvec(x)).max() > 0      # float32 really ran


def test_small_blocks_give_the_same_products(monkeypatch):
    """Many blocks (and sparse reads of the hidden rows) change only the order of the float64 sums."""
    features = random_features(np.random.default_rng(5), dtype=np.float16)
    chosen, rejected = item_pairs(features)
    ref = PairDifferenceOperator(features, chosen, rejected, backend="numpy")
    monkeypatch.setattr(feat, "BLOCK_BYTES", 8 * features.hidden_size * 7)      # 7 occurrences a block
    for idx in (np.arange(chosen.size), np.arange(0, chosen.size, 5)):          # all pairs, a sparse subset
        op = PairDifferenceOperator(features, chosen[idx], rejected[idx], backend="torch")
        assert len(op._entries._blocks) > 3
        x, u, many = vectors(op, seed=3)
        sub = ref.subset(idx)
        assert_close(op.matvec(x), sub.matvec(x), RTOL)
        assert_close(op.rmatmat(many), sub.rmatmat(many), RTOL)


# ============================================================================ the rest of the operator
def test_rows_norms_kernel_fingerprint_subset_do_not_depend_on_the_backend(pair):
    ref, op = pair
    index = np.array([3, 0, 7])
    assert abs(op.rows(index) - ref.rows(index)).max() == 0
    np.testing.assert_array_equal(op.row_norms(), ref.row_norms())
    np.testing.assert_array_equal(op.gram(), ref.gram())
    assert abs(op.explicit() - ref.explicit()).max() == 0
    assert op.fingerprint() == ref.fingerprint()
    sub = op.subset(np.arange(op.shape[0]) % 2 == 0)
    assert sub.backend == "torch" and sub.device == "cpu"
    x, _, _ = vectors(sub)
    assert_close(sub.matvec(x), ref.subset(np.arange(0, ref.shape[0], 2)).matvec(x), RTOL)


def test_backend_choice_and_errors(monkeypatch):
    features = random_features(np.random.default_rng(6), n_items=4)
    chosen, rejected = item_pairs(features)
    assert PairDifferenceOperator(features, chosen, rejected).backend == feat.resolve_backend("auto", "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        PairDifferenceOperator(features, chosen, rejected, backend="jax")
    with pytest.raises(ValueError, match="device must be"):
        PairDifferenceOperator(features, chosen, rejected, backend="torch", device="tpu")
    with pytest.raises(ValueError, match="CPU only"):
        PairDifferenceOperator(features, chosen, rejected, backend="numpy", device="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        pair_rows(features, chosen, rejected, storage="implicit", backend="jax")
    assert pair_rows(features, chosen, rejected, storage="implicit", backend="torch").backend == "torch"

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch' (test)")
        return real_import(name, *args, **kwargs)
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(builtins, "__import__", no_torch)
    assert not feat.torch_available()
    with pytest.raises(ImportError, match="backend='torch' needs PyTorch"):
        PairDifferenceOperator(features, chosen, rejected, backend="torch")
    assert PairDifferenceOperator(features, chosen, rejected, backend="auto").backend == "numpy"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a cuda device is there")
def test_cuda_without_a_gpu_is_a_clear_error():
    features = random_features(np.random.default_rng(6), n_items=4)
    chosen, rejected = item_pairs(features)
    with pytest.raises(ValueError, match="cuda.is_available"):
        PairDifferenceOperator(features, chosen, rejected, device="cuda")


@cuda
@pytest.mark.parametrize("resident", [True, False])
def test_cuda_products_equal_numpy(pair, monkeypatch, resident):
    ref, _ = pair
    monkeypatch.setattr(feat, "RESIDENT_SHARE", 0.5 if resident else 0.0)
    op = PairDifferenceOperator(ref.features, ref.chosen, ref.rejected, device="cuda")
    assert op.backend == "torch" and (op._entries._resident is not None) == resident
    x, u, many = vectors(op)
    assert_close(op.matvec(x), ref.matvec(x), RTOL)
    assert_close(op.rmatmat(many), ref.rmatmat(many), RTOL)
    fast_mv, fast_rmv = op.approximate_products()
    assert_close(fast_mv(x), ref.matvec(x), RTOL32)
    assert_close(fast_rmv(u), ref.rmatvec(u), RTOL32)
    assert op.fingerprint() == ref.fingerprint() and op.subset([0, 1]).device == "cuda"


# ============================================================================ end to end
def _implicit_head(tmp_path, backend, device="cpu", n=200, length=4, hidden=16, vocab=40, seed=0):
    """tests/test_newton_cg.py's LLM-head problem: a random float16 memory-mapped cache in
    benchmarks/implicit_features.py's layout, d = vocab · hidden > N."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from implicit_features import load_features, make_cache
    if not (tmp_path / "tokens.npy").exists():
        make_cache(str(tmp_path), n, length, hidden, vocab, seed=seed)
    features, chosen, rejected = load_features(str(tmp_path), n, length, hidden)
    op = PairDifferenceOperator(features, chosen, rejected, backend=backend, device=device)
    rng = np.random.default_rng(seed)
    groups = rng.choice(3, n, p=[0.6, 0.3, 0.1])
    groups[:3] = np.arange(3)
    return lg.PreferenceData(op, groups, rng.normal(size=n))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_certified_newton_cg_solve_is_the_same_on_torch(tmp_path, device):
    reference = lg.solve(_implicit_head(tmp_path, "numpy"), radius=1.0, estimator="newton_cg", tol=1e-8)
    data = _implicit_head(tmp_path, "torch", device)
    assert data.storage.op.backend == "torch"
    res = lg.solve(data, radius=1.0, estimator="newton_cg", tol=1e-8)
    assert reference.converged and res.converged and res.relative_gap <= 1e-8
    assert abs(res.value - reference.value) <= 2e-8 * max(1.0, abs(reference.value))
