"""An implicit S: the difference rows given by their products, never stored.

Every solver needs S only through a few operations: :math:`S\\theta` (the margins, Eq. (9)),
:math:`S^\\top u` and :math:`S^\\top U` (gradients, Eq. (10)), rows :math:`s_i` for a sampled
batch (Algorithm 1), the row norms (step sizes, Proposition 3) and, when d > N, the kernel
:math:`SS^\\top` (the row-space form of the Newton and closed-form solvers). A
:class:`PairOperator` supplies exactly these, so an S that is too large to store — e.g. the
last-layer features of an LLM with long answers, :math:`s_i = \\sum_t \\pm e_{y_t}\\otimes h_t`
(see ``llm_head.features.PairDifferenceOperator``) — can be passed as ``PreferenceData.diff``.

A :class:`scipy.sparse.linalg.LinearOperator` is accepted too (wrapped in
:class:`LinearOperatorRows`): it supplies the products, and the rest is derived from them (rows
from :math:`S^\\top e_i`, the kernel from :math:`S S^\\top E`), which is correct but costs one
product per row; write a :class:`PairOperator` when rows or the kernel have a cheaper form.

:class:`~loglinear_grpo.data.PreferenceData` checks either kind at construction with
:func:`check_adjoint` (two products: is ``rmatvec`` the adjoint of ``matvec``?); ``check_adjoint=False``
skips it.
"""
from __future__ import annotations

import abc
import hashlib

import numpy as np
import scipy.sparse as sp

#: rows per block when an operator's rows are formed explicitly (kernel, Hessian, row norms)
ROW_BLOCK = 256
#: the largest explicit copy of an implicit S that :meth:`PairOperator.explicit` builds
EXPLICIT_LIMIT_BYTES = 4 << 30
#: the adjoint check's relative tolerance for products computed in float64 (:func:`check_adjoint`)
ADJOINT_RTOL = 1e-6


class PairOperator(abc.ABC):
    """The difference matrix S (N × d) given by its products (the protocol the solvers use).

    Subclasses implement :meth:`matvec` and :meth:`rmatvec` and set ``shape``; every other
    method has a correct default derived from those two, which a subclass overrides when it has
    a cheaper form (:meth:`rows`, :meth:`row_norms`, :meth:`gram`, :meth:`fingerprint`).
    All results are float64.

    Attributes
    ----------
    shape : tuple (N, d)
    precision : numpy.dtype, default float64
        The floating-point type the products are computed in (results are float64 whatever it is):
        it sets the tolerance of :func:`check_adjoint`. A subclass that computes in float32 (e.g. on
        a GPU) sets ``precision = np.dtype(np.float32)``.
    """

    shape: tuple
    dtype = np.dtype(np.float64)
    precision = np.dtype(np.float64)
    ndim = 2

    # ---------------------------------------------------------------- required
    @abc.abstractmethod
    def matvec(self, x):
        """:math:`S x`, shape (N,), for x of shape (d,)."""

    @abc.abstractmethod
    def rmatvec(self, u):
        """:math:`S^\\top u`, shape (d,), for u of shape (N,)."""

    def approximate_products(self):
        """``(matvec, rmatvec)`` computed in a lower precision (results float64), for the products whose
        rounding only steers a solver and never enters a certificate: the Hessian products of the
        matrix-free Newton solver's model steps (:mod:`loglinear_grpo.newton_cg`). Default ``None``:
        the exact products serve."""
        return None

    # ---------------------------------------------------------------- derived
    def matmat(self, x):
        """:math:`S X`, shape (N, k), for X of shape (d, k)."""
        x = np.asarray(x, dtype=np.float64)
        return np.column_stack([self.matvec(x[:, j]) for j in range(x.shape[1])]) if x.shape[1] else \
            np.zeros((self.shape[0], 0))

    def rmatmat(self, u):
        """:math:`S^\\top U`, shape (d, k), for U of shape (N, k)."""
        u = np.asarray(u, dtype=np.float64)
        return np.column_stack([self.rmatvec(u[:, j]) for j in range(u.shape[1])]) if u.shape[1] else \
            np.zeros((self.shape[1], 0))

    def rows(self, index):
        """The rows :math:`s_i`, i ∈ ``index``: a dense (len(index), d) array or a CSR matrix.
        Default: :math:`s_i = S^\\top e_i`, one product per row (O(N) extra memory)."""
        index = np.asarray(index, dtype=np.intp).ravel()
        out = np.empty((index.size, self.shape[1]))
        unit = np.zeros(self.shape[0])
        for j, i in enumerate(index):
            unit[i] = 1.0
            out[j] = self.rmatvec(unit)
            unit[i] = 0.0
        return out

    def row_blocks(self, block_rows=ROW_BLOCK):
        """``(start, stop, rows)`` over all rows in order, ``block_rows`` at a time."""
        n = self.shape[0]
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
            yield start, stop, self.rows(np.arange(start, stop))

    def row_norms(self):
        """:math:`\\|s_i\\|` for every row (cached)."""
        cached = getattr(self, "_row_norms", None)
        if cached is None:
            cached = np.empty(self.shape[0])
            for start, stop, block in self.row_blocks():
                cached[start:stop] = _norms(block)
            self._row_norms = cached
        return cached

    def gram(self):
        """The kernel :math:`SS^\\top`, shape (N, N), dense."""
        n = self.shape[0]
        out = np.empty((n, n))
        for start, stop, block in self.row_blocks():
            dense = block.toarray() if sp.issparse(block) else np.asarray(block)
            out[:, start:stop] = self.matmat(dense.T)
        return 0.5 * (out + out.T)

    def subset(self, index):
        """The rows at ``index`` as an operator."""
        return RowSubset(self, index)

    def explicit(self, limit_bytes=EXPLICIT_LIMIT_BYTES):
        """All of S as a CSR matrix (for the cvxpy programs of :func:`~loglinear_grpo.solve_exact`);
        ``ValueError`` when its predicted size exceeds ``limit_bytes``."""
        predicted = self.explicit_nbytes()
        if predicted > limit_bytes:
            raise ValueError(f"this needs S explicitly, which would take {predicted / 2**30:.1f} GiB "
                             f"(> {limit_bytes / 2**30:.1f} GiB): use solve(), whose estimators work on the "
                             "implicit S")
        blocks = [sp.csr_matrix(b) for _, _, b in self.row_blocks()]
        return sp.vstack(blocks, format="csr")

    def explicit_nbytes(self):
        """Predicted bytes of :meth:`explicit` (default: a dense N × d float64 matrix)."""
        return 8 * self.shape[0] * self.shape[1]

    def fingerprint(self):
        """A SHA-256 that changes whenever S does (default: of S and Sᵀ applied to fixed pseudo-random
        probes, rounded to 12 significant digits; override with a hash of the defining arrays)."""
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            rng = np.random.default_rng(20240531)
            n, d = self.shape
            h = hashlib.sha256(repr((type(self).__name__, n, d)).encode())
            for values in (self.matvec(rng.standard_normal(d)), self.rmatvec(rng.standard_normal(n))):
                h.update(np.array([float(f"{v:.12g}") for v in values]).tobytes())
            cached = self._fingerprint = h.hexdigest()
        return cached

    def __repr__(self):
        return f"{type(self).__name__}(shape={self.shape})"


def _norms(block):
    if sp.issparse(block):
        return np.sqrt(np.asarray(block.multiply(block).sum(axis=1)).ravel())
    block = np.asarray(block, dtype=np.float64)
    return np.sqrt(np.einsum("ij,ij->i", block, block))


class RowSubset(PairOperator):
    """Rows ``index`` of another operator (no copy): :math:`S_I x = (Sx)_I`,
    :math:`S_I^\\top u = S^\\top(\\text{u scattered to } I)`."""

    def __init__(self, parent, index):
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        self.parent, self.index = parent, index.astype(np.intp)
        self.shape = (self.index.size, parent.shape[1])

    def _scatter(self, u):
        full = np.zeros((self.parent.shape[0],) + u.shape[1:])
        np.add.at(full, self.index, u)
        return full

    def matvec(self, x):
        return self.parent.matvec(x)[self.index]

    def rmatvec(self, u):
        return self.parent.rmatvec(self._scatter(np.asarray(u, dtype=np.float64)))

    def matmat(self, x):
        return self.parent.matmat(x)[self.index]

    def rmatmat(self, u):
        return self.parent.rmatmat(self._scatter(np.asarray(u, dtype=np.float64)))

    def rows(self, index):
        return self.parent.rows(self.index[np.asarray(index, dtype=np.intp)])

    def row_norms(self):
        return self.parent.row_norms()[self.index]

    def subset(self, index):
        return self.parent.subset(self.index[np.asarray(index)])

    def explicit_nbytes(self):
        return self.parent.explicit_nbytes() * self.shape[0] // max(1, self.parent.shape[0])

    def fingerprint(self):
        h = hashlib.sha256(self.parent.fingerprint().encode())
        h.update(np.ascontiguousarray(self.index, dtype=np.int64).tobytes())
        return h.hexdigest()


class LinearOperatorRows(PairOperator):
    """A :class:`scipy.sparse.linalg.LinearOperator` as a :class:`PairOperator` (products in float64)."""

    def __init__(self, op):
        self.op = op
        self.shape = tuple(int(s) for s in op.shape)
        kind = getattr(op, "dtype", None)
        self.precision = np.dtype(kind) if kind is not None and np.dtype(kind).kind == "f" else np.dtype(np.float64)

    def matvec(self, x):
        return np.asarray(self.op.matvec(np.asarray(x, dtype=np.float64)), dtype=np.float64).ravel()

    def rmatvec(self, u):
        return np.asarray(self.op.rmatvec(np.asarray(u, dtype=np.float64)), dtype=np.float64).ravel()

    def matmat(self, x):
        return np.asarray(self.op.matmat(np.asarray(x, dtype=np.float64)), dtype=np.float64)

    def rmatmat(self, u):
        return np.asarray(self.op.rmatmat(np.asarray(u, dtype=np.float64)), dtype=np.float64)


def adjoint_rtol(precision):
    """The relative tolerance of :func:`check_adjoint` for products computed in ``precision``:
    ``ADJOINT_RTOL`` (10⁻⁶) for float64, 10⁴ machine epsilons for a coarser type (1.2·10⁻³ for float32),
    at most 0.1."""
    eps = float(np.finfo(np.dtype(precision)).eps)
    return max(ADJOINT_RTOL, min(0.1, 1e4 * eps))


def check_adjoint(op, *, rtol=None, seed=20240607):
    """Check that ``op.rmatvec`` is the adjoint of ``op.matvec`` (two products), else ``ValueError``.

    With a pseudo-random x (fixed ``seed``) and :math:`u = Sx/\\|Sx\\| + g/\\|g\\|` (g pseudo-random too,
    so that both a wrong :math:`S^\\top` of the same rows and one of unrelated rows show), a consistent
    operator has :math:`u^\\top(Sx) = (S^\\top u)^\\top x` up to rounding; the check refuses

    .. math::

        |u^\\top(Sx) - (S^\\top u)^\\top x| > \\mathrm{rtol}\\,(\\|u\\|\\,\\|Sx\\| + \\|S^\\top u\\|\\,\\|x\\|),

    which bounds the rounding of both products. An inconsistent operator would make Newton spend its
    budget and the certificates (which use both products) wrong.

    Parameters
    ----------
    op : PairOperator
    rtol : float, optional
        Default :func:`adjoint_rtol` of ``op.precision`` (10⁻⁶ for float64, 1.2·10⁻³ for float32).
    seed : int
        Seed of the probes (the check is reproducible).

    Returns
    -------
    float
        The relative difference found (≤ rtol).
    """
    n, d = op.shape
    precision = np.dtype(getattr(op, "precision", np.float64))
    rtol = adjoint_rtol(precision) if rtol is None else float(rtol)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(d)
    sx = np.asarray(op.matvec(x), dtype=np.float64)
    if sx.shape != (n,):
        raise ValueError(f"diff: the operator's matvec returned shape {sx.shape} for x of shape ({d},); "
                         f"it must return S x of shape ({n},)")
    g = rng.standard_normal(n)
    norm_sx = float(np.linalg.norm(sx))
    if not np.isfinite(norm_sx):
        raise ValueError("diff: the operator's matvec returned NaN or inf for a random x (is S finite?)")
    u = g / max(float(np.linalg.norm(g)), np.finfo(float).tiny)
    if norm_sx > 0:
        u = u + sx / norm_sx
    stu = np.asarray(op.rmatvec(u), dtype=np.float64)
    if stu.shape != (d,):
        raise ValueError(f"diff: the operator's rmatvec returned shape {stu.shape} for u of shape ({n},); "
                         f"it must return S^T u of shape ({d},)")
    if not np.all(np.isfinite(stu)):
        raise ValueError("diff: the operator's rmatvec returned NaN or inf for a random u (is S finite?)")
    forward, backward = float(u @ sx), float(stu @ x)
    scale = float(np.linalg.norm(u)) * norm_sx + float(np.linalg.norm(stu)) * float(np.linalg.norm(x))
    rel = abs(forward - backward) / scale if scale > 0 else 0.0
    if not rel <= rtol:
        raise ValueError(
            f"diff: the operator's rmatvec is not the adjoint of its matvec (shape ({n}, {d})): for random x and u, "
            f"u^T(S x) = {forward:.6g} but (S^T u)^T x = {backward:.6g}, a relative difference of {rel:.1e} > "
            f"{rtol:.1e} (products in {precision}); the solvers and their certificates need rmatvec(u) = S^T u. "
            "Fix rmatvec; if it is right but computed in lower precision, declare that precision (a "
            "LinearOperator's dtype, a PairOperator's `precision`); check_adjoint=False skips this check")
    return rel


def as_pair_operator(diff):
    """``diff`` as a :class:`PairOperator` when it is one or a scipy ``LinearOperator``, else ``None``."""
    if isinstance(diff, PairOperator):
        return diff
    from scipy.sparse.linalg import LinearOperator
    if isinstance(diff, LinearOperator):
        return LinearOperatorRows(diff)
    return None
