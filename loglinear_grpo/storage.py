"""The one row interface: how the solvers read S, whatever stores it.

Every solver reads the difference matrix S (N × d, rows :math:`s_i`) through a :class:`Rows`
adapter, ``PreferenceData.storage``: products (:meth:`~Rows.matvec`, :meth:`~Rows.rmatvec`,
:meth:`~Rows.group_sums`), rows for a sampled batch, a blocked pass over all rows
(:meth:`~Rows.row_blocks`), the row norms, the largest |entry|, :math:`|S|^\\top v`, the kernel
:math:`SS^\\top`, an explicit copy for the cvxpy and LP programs, a subset of the rows and the
fingerprint of a checkpoint. What differs between ways of storing S is said by *capabilities*
(class attributes), never by naming the storage:

``in_memory``
    S is one in-memory ndarray or CSR matrix (``source``, i.e. ``PreferenceData.diff``): a whole-S
    product reads no storage, and the cvxpy and LP programs take ``source`` as it is (any other S is
    formed first by :meth:`~Rows.explicit`).
``out_of_core``
    S's entries live in a file and every full pass reads them block by block, never whole: forms
    computed from all of S in one call (the kernel :math:`SS^\\top` of the row-space solvers) are
    not used.
``dense_rows``
    S is one (N, d) array in its stored dtype (float32 stays float32; ``source`` is that array, in
    memory or memory-mapped): :meth:`~Rows.block` and :meth:`~Rows.row` (= ``source[i]``) are slices
    read at the cost of their rows, so a block can be multiplied twice from cache and the one-pair
    loop reads one row per step.
``parallel_parts``
    Disjoint row ranges can be read by several threads at once (the threaded full pass).
``cheap_rmatmat``
    :math:`S^\\top U` for an N × K matrix U costs about one pass whatever K (False when S is known
    only through products, where each column may be one product: a pass then keeps the pair
    derivatives and the θ step takes one :math:`S^\\top u`).

The adapters are :class:`DenseRows` (an in-memory ndarray), :class:`MemmapRows` (a
``numpy.memmap``), :class:`SparseRows` (a scipy.sparse matrix, stored as CSR) and
:class:`OperatorRows` (an implicit S: a :class:`~loglinear_grpo.operators.PairOperator`, or a scipy
``LinearOperator`` wrapped in :class:`~loglinear_grpo.operators.LinearOperatorRows`). :func:`as_rows`
picks the first class of :data:`ADAPTERS` that accepts an object; a new way of storing S (a torch
tensor, a sharded file) is one more adapter there, and no solver changes. This module, with
:mod:`loglinear_grpo.data` and :mod:`loglinear_grpo.operators`, is the only place that tests how S
is stored (``tests/test_structure.py`` checks that).

A block of rows, as :meth:`Rows.row_blocks` yields it, is a float64 ndarray or a CSR matrix; the
block helpers :func:`weighted_gram`, :func:`left_product` and :func:`abs_transpose_product` take
either.
"""
from __future__ import annotations

import abc
import mmap

import numpy as np
import scipy.sparse as sp

from .operators import as_pair_operator, check_adjoint as _check_adjoint

#: rows per block when streaming over a dense or memory-mapped S (about 4 MiB of float64 at d=64)
CHUNK_ROWS = 8192
#: bytes per block of a dense S hashed for a checkpoint's fingerprint (the digest does not depend on it)
FINGERPRINT_BLOCK_BYTES = 1 << 22

#: the range of feature and reference-margin magnitudes the solvers handle without under- or overflow
#: (margins s·θ and IPO's squares stay far inside float64 for any reasonable Θ)
MAX_SCALE = 1e100
MIN_SCALE = 1e-100


def check_scale(name, top):
    """``top`` is the largest |entry|: refuse magnitudes whose products would under- or overflow."""
    if top > MAX_SCALE or 0.0 < top < MIN_SCALE:
        raise ValueError(f"{name}: largest |entry| is {top:.1e}, outside [{MIN_SCALE:.0e}, {MAX_SCALE:.0e}]; "
                         "rescale it (the solvers' margins would under- or overflow)")


# ============================================================================ blocks of rows
def weighted_gram(block, weights):
    """:math:`B^\\top\\mathrm{diag}(w)B` (dense d × d) of one block of rows (ndarray or CSR), w ≥ 0."""
    root = np.sqrt(weights)
    if sp.issparse(block):
        scaled = block.multiply(root[:, None]).tocsr()
        return (scaled.T @ scaled).toarray()
    scaled = block * root[:, None]
    return scaled.T @ scaled


def left_product(matrix, block):
    """``matrix @ block`` as a dense ndarray, for a block of rows (ndarray or CSR) and a dense or
    sparse ``matrix`` (e.g. the K × rows indicator of the groups)."""
    return np.asarray((matrix @ block).todense() if sp.issparse(block) else matrix @ block)


def abs_transpose_product(block, v):
    """:math:`|B|^\\top v`, shape (d,), for a block of rows (ndarray or CSR) and v ≥ 0."""
    if sp.issparse(block):
        return np.asarray(abs(block).T @ v).ravel()
    return np.abs(block).T @ v


# ============================================================================ the protocol
class Rows(abc.ABC):
    """S (N × d) as every solver reads it.

    Attributes
    ----------
    source : object
        What ``PreferenceData.diff`` holds: the checked array, CSR matrix or operator.
    shape : tuple (N, d)
    dtype : numpy.dtype
        The stored floating-point type (float32 stays float32 in the blocked passes).
    in_memory, out_of_core, dense_rows, parallel_parts, cheap_rmatmat : bool
        The capabilities (see the module docstring).
    kind : str
        One word for ``repr`` ("dense", "memmap", "sparse", "implicit").
    description : str
        How S is stored, for messages ("in-memory", "memory-mapped", "sparse", "implicit").

    Every product and pass returns float64, whatever the stored dtype.
    """

    in_memory = False
    out_of_core = False
    dense_rows = False
    parallel_parts = False
    cheap_rmatmat = True
    kind = "rows"
    description = "stored"

    source: object
    shape: tuple
    dtype: np.dtype

    def __init__(self, source, dtype=None):
        self.source = source
        self.shape = tuple(source.shape)
        self.dtype = np.dtype(source.dtype if dtype is None else dtype)

    @classmethod
    @abc.abstractmethod
    def accepts(cls, diff):
        """True if this adapter reads ``diff`` (:func:`as_rows` asks each class of :data:`ADAPTERS`)."""

    @classmethod
    @abc.abstractmethod
    def checked(cls, diff, check_finite=True, check_adjoint=True):
        """The adapter of ``diff`` after its checks (shape, real dtype; NaN/inf and scale when
        ``check_finite``), or ``ValueError`` naming ``diff``."""

    # ---------------------------------------------------------------- products
    @abc.abstractmethod
    def matvec(self, x):
        """:math:`S x`, shape (N,), float64."""

    @abc.abstractmethod
    def rmatvec(self, u):
        """:math:`S^\\top u`, shape (d,), float64."""

    @abc.abstractmethod
    def rmatmat(self, u):
        """:math:`S^\\top U`, shape (d, k), float64, for U of shape (N, k)."""

    def group_sums(self, deriv, groups, k):
        """:math:`G_g = \\sum_{i: g_i = g} \\mathrm{deriv}_i\\,s_i`, shape (K, d), dense float64: one
        :math:`S^\\top U` with U holding ``deriv_i`` in column ``g_i``."""
        n = self.shape[0]
        weights = np.zeros((n, k))
        weights[np.arange(n), groups] = deriv
        return np.ascontiguousarray(self.rmatmat(weights).T)

    def approximate_products(self):
        """``(matvec, rmatvec)`` in a lower precision for products that only steer a solver (the matrix-free
        Newton solver's Hessian products), or ``None``: the exact ones serve (a stored S is already
        multiplied in its own precision)."""
        return None

    def abs_rmatvec(self, v):
        """:math:`|S|^\\top v` for v ≥ 0, shape (d,) (one pass, block by block): the size of the terms
        of every coordinate of :math:`S^\\top v`, for the certificate's rounding test."""
        out = np.zeros(self.shape[1])
        for start, stop, block in self.row_blocks():
            out += abs_transpose_product(block, v[start:stop])
        return out

    @staticmethod
    def left_product(matrix, block):
        """``matrix @ block`` as a dense ndarray, for one block of :meth:`row_blocks` (ndarray or CSR;
        :func:`left_product`)."""
        return left_product(matrix, block)

    # ---------------------------------------------------------------- rows
    @abc.abstractmethod
    def rows(self, index):
        """The rows :math:`s_i`, i ∈ ``index``: an ndarray in the stored dtype, or CSR."""

    @abc.abstractmethod
    def row_blocks(self, block_rows=CHUNK_ROWS):
        """``(start, stop, block)`` over all rows in order; each block a float64 ndarray or CSR, with
        bounded temporaries (a file-backed S is never loaded whole)."""

    @abc.abstractmethod
    def row_norms(self):
        """:math:`\\|s_i\\|` of every row, shape (N,), float64."""

    @abc.abstractmethod
    def max_abs(self):
        """The largest |entry| of S (an upper bound where only products are known: the largest row norm)."""

    def row(self, i):
        """Row ``i`` as a 1-D array in the stored dtype (``dense_rows`` adapters)."""
        raise NotImplementedError(f"{type(self).__name__} has no dense rows")

    def block(self, start, stop):
        """Rows ``start:stop`` as a 2-D array in the stored dtype, no copy where S is in memory
        (``dense_rows`` adapters)."""
        raise NotImplementedError(f"{type(self).__name__} has no dense rows")

    def blocks(self, first, last, block_rows):
        """``(start, stop, block(start, stop))`` over rows ``first:last``, ``block_rows`` at a time
        (``dense_rows`` adapters): the blocks of the threaded full pass."""
        for start in range(first, last, block_rows):
            stop = min(start + block_rows, last)
            yield start, stop, self.block(start, stop)

    # ---------------------------------------------------------------- whole-S forms
    @abc.abstractmethod
    def gram(self):
        """The kernel :math:`SS^\\top`, shape (N, N), dense float64 (the row-space solvers, d > N)."""

    @abc.abstractmethod
    def explicit(self):
        """S in memory, as an ndarray or CSR (for the cvxpy and LP programs); ``ValueError`` when an
        implicit S is too large to form."""

    @abc.abstractmethod
    def explicit_entries(self):
        """Entries :meth:`explicit` stores (N·d dense, the nonzeros of CSR), from the shapes alone."""

    # ---------------------------------------------------------------- bookkeeping
    @abc.abstractmethod
    def take(self, index):
        """The rows at ``index`` (an integer array) in this storage's own form, for a new
        ``PreferenceData`` (a copy for an ndarray, an operator for an implicit S)."""

    def subset(self, index):
        """The adapter of the rows at ``index`` (unchecked: they are this S's rows)."""
        return as_rows(self.take(np.asarray(index)), check_finite=False, check_adjoint=False)

    @abc.abstractmethod
    def update_fingerprint(self, hasher):
        """Feed every number that defines S into ``hasher`` (a ``hashlib`` object), streamed: the
        S-part of a checkpoint's data fingerprint."""

    def __repr__(self):
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


# ============================================================================ adapters
class DenseRows(Rows):
    """An in-memory ndarray S, float32 or float64 (integer and boolean arrays become float64).

    Guarantees: whole-S products are single NumPy calls; :meth:`row`, :meth:`block` and :meth:`rows`
    are views or gathers in the stored dtype (no float64 copy of S, ever); :meth:`row_blocks`
    yields float64 copies of ``block_rows`` rows; rows can be read by several threads at once.
    """

    in_memory = True
    dense_rows = True
    parallel_parts = True
    kind = "dense"
    description = "in-memory"

    def __init__(self, array):
        super().__init__(array)
        self.array = array

    @classmethod
    def accepts(cls, diff):
        return True                                  # the fallback: anything np.asarray reads

    @classmethod
    def checked(cls, diff, check_finite=True, check_adjoint=True):
        try:
            arr = np.asarray(diff)
        except (TypeError, ValueError):
            raise ValueError("diff must be a numeric array (N x d)") from None
        if arr.dtype.kind not in "fiub":
            raise ValueError(f"diff must be real-valued and numeric, got dtype {arr.dtype}")
        if arr.dtype.kind != "f":
            arr = arr.astype(np.float64)
        if arr.ndim != 2:
            raise ValueError(f"diff must be 2-D (N x d), got shape {arr.shape}")
        if check_finite and not np.all(np.isfinite(arr)):
            raise ValueError("diff contains NaN or inf")
        if check_finite and arr.size:
            check_scale("diff", float(np.max(np.abs(arr))))
        return cls(arr)

    def matvec(self, x):
        return np.asarray(self.array @ x, dtype=np.float64).ravel()

    def rmatvec(self, u):
        return np.asarray(self.array.T @ u, dtype=np.float64).ravel()

    def rmatmat(self, u):
        return np.asarray(self.array.T @ u, dtype=np.float64)

    def rows(self, index):
        return self.array[index]

    def row(self, i):
        return self.array[i]

    def block(self, start, stop):
        return self.array[start:stop]

    def row_blocks(self, block_rows=CHUNK_ROWS):
        for start, stop, block in self.blocks(0, self.shape[0], block_rows):
            yield start, stop, np.asarray(block, dtype=np.float64)

    def row_norms(self):
        out = np.empty(self.shape[0])
        for start, stop, block in self.row_blocks():
            out[start:stop] = np.sqrt(np.einsum("ij,ij->i", block, block))
        return out

    def max_abs(self):
        top = 0.0
        for _, _, block in self.blocks(0, self.shape[0], CHUNK_ROWS):
            top = max(top, float(np.max(np.abs(block), initial=0.0)))
        return top

    def gram(self):
        return np.asarray(self.array @ self.array.T, dtype=np.float64)

    def explicit(self):
        return self.array

    def explicit_entries(self):
        return self.shape[0] * self.shape[1]

    def take(self, index):
        return self.array[index]

    def update_fingerprint(self, hasher):
        """The dtype's name, then the entries row by row (C order), about 4 MiB at a time."""
        hasher.update(str(self.dtype).encode())
        step = max(1, FINGERPRINT_BLOCK_BYTES // max(1, self.shape[1] * self.dtype.itemsize))
        for _, _, block in self.blocks(0, self.shape[0], step):
            hasher.update(np.ascontiguousarray(block).tobytes())


class MemmapRows(DenseRows):
    """A ``numpy.memmap`` S (float32 or float64), never loaded whole.

    Guarantees, beyond :class:`DenseRows`: every full pass (products, norms, |S|ᵀv, the largest
    entry, the fingerprint) reads ``CHUNK_ROWS`` rows at a time; :meth:`rows` reads only the rows
    asked for; the construction check streams the file through short-lived maps, so that its pages do
    not stay resident. :meth:`explicit` and :meth:`gram` do read all of S (only the programs that need
    S's entries in memory call them: the hinge's, under its memory budget, and ``solve_exact``).
    """

    in_memory = False
    out_of_core = True
    kind = "memmap"
    description = "memory-mapped"

    @classmethod
    def accepts(cls, diff):
        return isinstance(diff, np.memmap)

    @classmethod
    def checked(cls, diff, check_finite=True, check_adjoint=True):
        if diff.ndim != 2:
            raise ValueError(f"diff must be 2-D (N x d), got shape {diff.shape}")
        if diff.dtype.kind != "f":
            raise ValueError(f"a memory-mapped diff must be float32 or float64, got {diff.dtype}")
        if check_finite:
            # stream the file once through short-lived maps, so its pages do not stay resident
            top = 0.0
            row_bytes = diff.shape[1] * diff.dtype.itemsize
            for start in range(0, diff.shape[0], CHUNK_ROWS):
                rows = min(CHUNK_ROWS, diff.shape[0] - start)
                if diff.filename is not None and isinstance(diff.base, mmap.mmap) and diff.flags.c_contiguous:
                    block = np.memmap(diff.filename, dtype=diff.dtype, mode="r", shape=(rows, diff.shape[1]),
                                      offset=diff.offset + start * row_bytes)
                else:
                    block = diff[start:start + rows]
                finite = np.all(np.isfinite(block))
                top = max(top, float(np.max(np.abs(block), initial=0.0))) if finite else top
                del block
                if not finite:
                    raise ValueError("diff contains NaN or inf")
            check_scale("diff", top)
        return cls(diff)

    def matvec(self, x):
        out = np.empty(self.shape[0])
        for start, stop, block in self.row_blocks():
            out[start:stop] = block @ x
        return out

    def rmatvec(self, u):
        out = np.zeros(self.shape[1])
        for start, stop, block in self.row_blocks():
            out += block.T @ u[start:stop]
        return out

    def rmatmat(self, u):
        out = np.zeros((self.shape[1], u.shape[1]))
        for start, stop, block in self.row_blocks():
            out += block.T @ u[start:stop]
        return out

    def explicit(self):
        return np.asarray(self.array, dtype=np.float64)

    def take(self, index):
        return np.asarray(self.array)[index]       # a copy of those rows only, an in-memory ndarray


class SparseRows(Rows):
    """A ``scipy.sparse`` S, stored as CSR (float32 or float64; other real types become float64).

    Guarantees: products and passes keep S sparse (:meth:`row_blocks` yields the whole CSR as one
    block: its blocks have no cache reuse to gain); :meth:`rows` are CSR.
    """

    in_memory = True
    kind = "sparse"
    description = "sparse"

    def __init__(self, csr):
        super().__init__(csr)
        self.csr = csr

    @classmethod
    def accepts(cls, diff):
        return sp.issparse(diff)

    @classmethod
    def checked(cls, diff, check_finite=True, check_adjoint=True):
        if diff.ndim != 2:
            raise ValueError(f"diff must be 2-D (N x d), got ndim={diff.ndim}")
        if diff.dtype.kind not in "fiub":
            raise ValueError(f"diff must be real-valued, got dtype {diff.dtype}")
        diff = sp.csr_matrix(diff) if not isinstance(diff, (sp.csr_matrix, sp.csr_array)) else diff
        if diff.dtype.kind != "f":
            diff = diff.astype(np.float64)
        if check_finite and not np.all(np.isfinite(diff.data)):
            raise ValueError("diff contains NaN or inf")
        if check_finite:
            check_scale("diff", float(np.max(np.abs(diff.data), initial=0.0)))
        return cls(diff)

    def matvec(self, x):
        return np.asarray(self.csr @ x, dtype=np.float64).ravel()

    def rmatvec(self, u):
        return np.asarray(self.csr.T @ u, dtype=np.float64).ravel()

    def rmatmat(self, u):
        return np.asarray(self.csr.T @ u, dtype=np.float64)

    def group_sums(self, deriv, groups, k):
        n = self.shape[0]
        indicator = sp.csr_matrix((deriv, (groups, np.arange(n))), shape=(k, n))
        return np.asarray((indicator @ self.csr).todense())

    def rows(self, index):
        return self.csr[index]

    def row_blocks(self, block_rows=CHUNK_ROWS):
        yield 0, self.shape[0], self.csr

    def row_norms(self):
        return np.sqrt(np.asarray(self.csr.multiply(self.csr).sum(axis=1)).ravel())

    def max_abs(self):
        return float(np.max(np.abs(self.csr.data), initial=0.0))

    def gram(self):
        return (self.csr @ self.csr.T).toarray()

    def explicit(self):
        return self.csr

    def explicit_entries(self):
        return int(self.csr.nnz)

    def take(self, index):
        return self.csr[index]

    def update_fingerprint(self, hasher):
        """The CSR arrays (indices sorted, in place), each with its dtype's name."""
        csr = self.csr.tocsr()
        csr.sort_indices()
        for part in (csr.indptr, csr.indices, csr.data):
            hasher.update(str(part.dtype).encode())
            hasher.update(np.ascontiguousarray(part).tobytes())


class OperatorRows(Rows):
    """An implicit S: a :class:`~loglinear_grpo.operators.PairOperator` (a scipy ``LinearOperator``
    is wrapped in :class:`~loglinear_grpo.operators.LinearOperatorRows`), used through its methods only.

    Guarantees: S is never formed except by :meth:`explicit` (which the operator refuses beyond its
    limit); a full pass is the operator's products, or its own :meth:`row_blocks`; the fingerprint is
    the operator's :meth:`~loglinear_grpo.operators.PairOperator.fingerprint`; its rows are whatever
    the operator's :meth:`rows` returns (ndarray or CSR).
    """

    cheap_rmatmat = False
    kind = "implicit"
    description = "implicit"

    def __init__(self, op):
        kind = getattr(op, "dtype", None)
        try:
            dtype = np.dtype(np.float64 if kind is None else kind)
        except TypeError:
            dtype = np.dtype(np.float64)
        super().__init__(op, dtype)
        self.op = op

    @classmethod
    def accepts(cls, diff):
        return as_pair_operator(diff) is not None

    @classmethod
    def checked(cls, diff, check_finite=True, check_adjoint=True):
        op = as_pair_operator(diff)
        shape = getattr(op, "shape", None)
        if shape is None or len(shape) != 2:
            raise ValueError(f"diff: an operator must have a 2-D shape (N, d), got {shape!r}")
        if check_adjoint and shape[0] > 0:     # two products: a wrong rmatvec would void every certificate
            _check_adjoint(op)
        if check_finite:       # one pass over the rows: NaN/inf in any entry shows in its row's norm
            norms = op.row_norms()
            if norms.shape != (shape[0],) or not np.all(np.isfinite(norms)):
                raise ValueError("diff contains NaN or inf (a row of the operator has a non-finite norm)")
            check_scale("diff (largest row norm)", float(norms.max(initial=0.0)))
        return cls(op)

    def matvec(self, x):
        return self.op.matvec(x)

    def rmatvec(self, u):
        return self.op.rmatvec(u)

    def rmatmat(self, u):
        return self.op.rmatmat(u)

    def approximate_products(self):
        """The operator's lower-precision products, if it has them
        (:meth:`~loglinear_grpo.operators.PairOperator.approximate_products`)."""
        method = getattr(self.op, "approximate_products", None)
        return None if method is None else method()

    def rows(self, index):
        return self.op.rows(index)

    def row_blocks(self, block_rows=CHUNK_ROWS):
        """The operator's own blocks (its ``row_blocks``, in its block size)."""
        yield from self.op.row_blocks()

    def row_norms(self):
        return self.op.row_norms()

    def max_abs(self):
        return float(np.max(self.op.row_norms(), initial=0.0))

    def gram(self):
        return self.op.gram()

    def explicit(self):
        return self.op.explicit()

    def explicit_entries(self):
        return int(self.op.explicit_nbytes()) // 12         # float64 value + int32 index per entry

    def take(self, index):
        return self.op.subset(index)

    def update_fingerprint(self, hasher):
        hasher.update(b"operator:" + self.op.fingerprint().encode())


#: the adapters :func:`as_rows` tries, in order (the first that accepts an object reads it)
ADAPTERS = [OperatorRows, SparseRows, MemmapRows, DenseRows]


def as_rows(diff, check_finite=True, check_adjoint=True):
    """The :class:`Rows` adapter of ``diff`` (an adapter is returned as it is), checked as
    :meth:`Rows.checked` says; ``ValueError`` naming ``diff`` otherwise."""
    if isinstance(diff, Rows):
        return diff
    for adapter in ADAPTERS:
        if adapter.accepts(diff):
            return adapter.checked(diff, check_finite, check_adjoint)
    raise ValueError(f"diff: no storage reads an object of type {type(diff).__name__}")  # pragma: no cover
