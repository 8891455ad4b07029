"""Group preference data for a log-linear policy.

For a log-linear policy :math:`\\pi_\\theta(y|x) \\propto \\exp(\\theta^\\top\\phi(x, y))` the
implicit-reward margin of a pair is (paper Eq. (9), §3.1)

.. math::

    h_i(\\theta) = \\log\\frac{\\pi_\\theta(y_w|x)}{\\pi_\\mathrm{ref}(y_w|x)}
                 - \\log\\frac{\\pi_\\theta(y_l|x)}{\\pi_\\mathrm{ref}(y_l|x)}
               = s_i^\\top\\theta - r_i ,

with :math:`s_i = \\phi(x, y_w) - \\phi(x, y_l)` and
:math:`r_i = \\log\\pi_\\mathrm{ref}(y_w|x) - \\log\\pi_\\mathrm{ref}(y_l|x)`: the partition function
cancels, so a data set is just the rows ``s_i``, the offsets ``r_i`` and the group labels.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .groups import (Membership, _parse_groups, intersect_groupings, is_groupings,  # noqa: F401 (_parse_groups:
                     membership_from)                                            # the labels' rule)
from .operators import PairOperator
from .storage import (CHUNK_ROWS, MAX_SCALE, MIN_SCALE, Rows, as_rows, check_scale as _check_scale,  # noqa: F401
                      weighted_gram)


def _is_sparse(a):
    return sp.issparse(a)


@dataclass(frozen=True, eq=False)
class PreferenceData:
    """Pairs ``(x_g, y_w, y_l)`` of ``K`` groups, reduced to what a log-linear policy needs.

    Parameters
    ----------
    diff : array_like, numpy.memmap, scipy.sparse matrix or operator, shape (N, d)
        Row ``i`` is :math:`s_i = \\phi(x_i, y_{w,i}) - \\phi(x_i, y_{l,i})`. A ``numpy.memmap``
        is never loaded whole: full passes stream it in blocks of ``CHUNK_ROWS`` rows and the
        stochastic estimator reads only the rows it samples. (The exceptions are the programs that
        need S's entries in memory — the hinge's linear program, which refuses one over
        ``hinge.HINGE_MEMORY_BUDGET`` before reading it, and :func:`~loglinear_grpo.solve_exact`.) Sparse rows (e.g. the
        ``e_y ⊗ h(x)`` features of an LLM's last layer) stay sparse. An implicit S — a
        :class:`~loglinear_grpo.operators.PairOperator` or a ``scipy.sparse.linalg.LinearOperator``
        — is used through its products only (:mod:`loglinear_grpo.operators`).
    groups : array_like, shape (N,)
        Group label of each pair: integers in ``0..K-1``, or names (strings; then ``group_names``
        defaults to the names in order of first appearance). Labels are identified by value:

        * numbers (of any type: ``1``, ``1.0``, ``np.int64(1)`` and ``True`` are equal, hence one
          group) are group indices and must be integers in ``0..K-1``;
        * anything else (strings; any hashable value, named by ``str()``) is a group name, and
          ``group_names``, when given, are matched against those names. Two distinct labels with the
          same name (e.g. ``"b'a'"`` and ``b"a"``) are refused.

        Refused with a ``ValueError``: missing labels (``None``, NaN, ``pandas.NA``, NaT; the message
        gives their count) and a mix of numbers and other labels (``[1, "1"]`` would be ambiguous).

        **Overlapping groups** (a pair in one or more groups; :mod:`loglinear_grpo.groups`):

        * several groupings, ``{"country": labels, "age": labels}`` (a dict, a pandas DataFrame, or a
          list of label arrays): their union, every value of every grouping a group named
          ``"country=Kenya"``, ``"age=18-24"``, each pair in one group of each grouping;
        * an N × K 0/1 membership matrix (scipy sparse, or a 2-D array; ``group_names`` optional).

        Then ``groups`` is ``None``, ``membership`` holds the matrix and ``overlapping`` is True. A pair
        in no group, an empty group, a matrix of the wrong shape or with other entries than 0/1 are
        refused, one clear error each. With ``intersect=True`` several groupings give the cells of their
        cross product instead (plain labels).
    ref_margin : array_like, shape (N,), optional
        :math:`r_i = \\log\\pi_\\mathrm{ref}(y_w|x) - \\log\\pi_\\mathrm{ref}(y_l|x)`;
        zeros (a uniform reference policy) when omitted.
    group_names : sequence of str, optional
        One name per group; its length declares ``K``. Every declared group must hold at
        least one pair.
    n_groups : int, optional
        Declares ``K`` without names (names default to ``"0" .. "K-1"``).
    check_finite : bool, default True
        Reject NaN/inf in ``diff`` and ``ref_margin`` (one streamed pass over a memmap).
    check_adjoint : bool, default True
        For an implicit S (operator): check with two products that ``rmatvec`` is the adjoint of
        ``matvec`` (:func:`~loglinear_grpo.operators.check_adjoint`; relative tolerance 10⁻⁶ for
        float64 products, 1.2·10⁻³ for float32), and refuse it otherwise; ``False`` skips the check.
        Ignored for an explicit S.
    intersect : bool, default False
        With several groupings in ``groups``: one group per non-empty cell of their cross product,
        named ``"country=Kenya & age=18-24"`` (plain labels, not overlapping), instead of their union.
        Every cell is kept; to report, merge or drop the small ones use
        :func:`~loglinear_grpo.intersect_groupings` (and :meth:`subset`) first.

    Raises
    ------
    ValueError
        On a shape mismatch, NaN/inf, group labels that are missing, mixed, negative, non-integer or
        ``>= K``, or an empty declared group; the message names the argument.

    Attributes
    ----------
    storage : loglinear_grpo.storage.Rows
        The adapter through which every solver reads ``diff`` (:mod:`loglinear_grpo.storage`): its
        products, blocked passes, capabilities and fingerprint. ``diff`` is what it reads.
    """

    diff: object
    groups: np.ndarray
    ref_margin: np.ndarray | None = None
    group_names: tuple | None = None
    n_groups: int | None = None
    check_finite: bool = True
    check_adjoint: bool = True
    intersect: bool = False
    group_sizes: np.ndarray = field(init=False, repr=False)
    storage: Rows = field(init=False, repr=False)
    membership: Membership = field(init=False, repr=False)

    def __post_init__(self):
        storage = as_rows(self.diff, self.check_finite, self.check_adjoint)
        diff = storage.source
        n = diff.shape[0]
        if n == 0:
            raise ValueError("diff must hold at least one pair (N >= 1)")

        raw = self.groups
        if self.intersect:
            if not is_groupings(raw):
                raise ValueError("intersect=True needs several groupings in groups (a dict or DataFrame of label "
                                 "columns, or a list of label arrays)")
            if self.group_names is not None:
                raise ValueError("intersect=True names the cells itself ('country=Kenya & age=18-24'): give no "
                                 "group_names")
            raw, cells, _, _ = intersect_groupings(raw, n)
            object.__setattr__(self, "group_names", tuple(cells))
        if isinstance(raw, Membership) and not raw.overlapping:
            if self.n_groups is None:                 # keep its K (an empty declared group is then refused)
                object.__setattr__(self, "n_groups", raw.n_groups)
            raw = raw.labels
        membership, names = membership_from(raw, n, self.group_names)
        if membership is not None:
            return self._init_membership(storage, membership, names)
        groups, names = _parse_groups(raw, n, self.group_names)

        k = self.n_groups
        if names is not None:
            if isinstance(names, str):
                raise ValueError("group_names must be a sequence of names, not one string")
            names = tuple(str(g) for g in names)
            if len(set(names)) != len(names):
                dupes = sorted({g for g in names if names.count(g) > 1})[:5]
                raise ValueError(f"group_names has duplicates {dupes}: each group needs its own name")
            if k is not None and k != len(names):
                raise ValueError(f"n_groups={k} disagrees with len(group_names)={len(names)}")
            k = len(names)
        if k is None:
            k = int(groups.max()) + 1
        elif isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"n_groups must be an integer >= 1, got {k!r}")
        if groups.max() >= k:
            declared = f"group_names lists only {k}" if names is not None else f"n_groups={k} declares only {k}"
            raise ValueError(f"groups has label {int(groups.max())} but {declared} group(s) (labels are 0..K-1)")
        sizes = np.bincount(groups, minlength=k)
        if np.any(sizes == 0):
            empty = [names[g] if names else str(g) for g in np.flatnonzero(sizes == 0)]
            raise ValueError(f"groups: declared group(s) {empty} hold no pairs")
        if names is None:
            names = tuple(str(g) for g in range(k))

        self._set(storage, groups, names, k, sizes, Membership(k, labels=groups))

    def _init_membership(self, storage, membership, names):
        """Overlapping groups (an N × K membership; :mod:`loglinear_grpo.groups`): checked there, named here."""
        k = membership.n_groups
        if self.n_groups is not None and self.n_groups != k:
            raise ValueError(f"n_groups={self.n_groups} disagrees with the membership's K={k} groups")
        if names is None:
            names = tuple(str(g) for g in range(k))
        names = tuple(str(g) for g in names)
        if len(names) != k:
            raise ValueError(f"group_names lists {len(names)} names but the membership has K={k} groups")
        if len(set(names)) != len(names):
            dupes = sorted({g for g in names if names.count(g) > 1})[:5]
            raise ValueError(f"group_names has duplicates {dupes}: each group needs its own name")
        if np.any(membership.sizes == 0):
            empty = [names[g] for g in np.flatnonzero(membership.sizes == 0)][:5]
            raise ValueError(f"groups: group(s) {empty} hold no pairs")
        if np.any(membership.per_pair_counts() == 0):
            raise ValueError("groups: some pairs belong to no group: every pair needs at least one group")
        self._set(storage, None, names, k, membership.sizes, membership)

    def _set(self, storage, groups, names, k, sizes, membership):
        diff = storage.source
        n = diff.shape[0]
        if self.ref_margin is None:
            ref = np.zeros(n)
        else:
            try:
                ref = np.asarray(self.ref_margin)
                if ref.dtype.kind not in "fiub":
                    raise TypeError
                ref = ref.astype(np.float64)
            except (TypeError, ValueError):
                raise ValueError("ref_margin must be a real-valued numeric array of shape (N,)") from None
            if ref.shape != (n,):
                raise ValueError(f"ref_margin must have shape ({n},) to match diff, got {ref.shape}")
            if self.check_finite and not np.all(np.isfinite(ref)):
                raise ValueError("ref_margin contains NaN or inf")
            if self.check_finite:
                top = float(np.max(np.abs(ref), initial=0.0))
                if top > MAX_SCALE:
                    _check_scale("ref_margin", top)

        object.__setattr__(self, "diff", diff)
        object.__setattr__(self, "storage", storage)
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "ref_margin", ref)
        object.__setattr__(self, "group_names", names)
        object.__setattr__(self, "n_groups", int(k))
        object.__setattr__(self, "group_sizes", sizes.astype(np.int64))
        object.__setattr__(self, "membership", membership)

    @property
    def group_input(self):
        """What rebuilds these groups in another :class:`PreferenceData` of the same pairs: the labels, or the
        membership when groups overlap."""
        return self.membership if self.overlapping else self.groups

    @property
    def overlapping(self):
        """True when a pair may belong to several groups (a membership matrix or a union of groupings):
        ``groups`` is then ``None`` and ``membership`` holds the N × K matrix."""
        return self.membership.overlapping

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_features(cls, phi_chosen, phi_rejected, groups, ref_logp_chosen=None,
                      ref_logp_rejected=None, **kwargs):
        """Build the data from features of the chosen and rejected responses.

        ``diff = phi_chosen - phi_rejected`` and, when reference log-probabilities are
        given, ``ref_margin = ref_logp_chosen - ref_logp_rejected``.
        """
        if _is_sparse(phi_chosen) or _is_sparse(phi_rejected):
            phi_w, phi_l = sp.csr_matrix(phi_chosen), sp.csr_matrix(phi_rejected)
        else:
            try:
                phi_w = np.asarray(phi_chosen, dtype=np.float64)
                phi_l = np.asarray(phi_rejected, dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError("phi_chosen and phi_rejected must be numeric arrays (N x d)") from None
        if phi_w.shape != phi_l.shape:
            raise ValueError(f"phi_chosen {phi_w.shape} and phi_rejected {phi_l.shape} differ in shape")
        if (ref_logp_chosen is None) != (ref_logp_rejected is None):
            raise ValueError("give both ref_logp_chosen and ref_logp_rejected, or neither")
        ref = None
        if ref_logp_chosen is not None:
            try:
                ref = np.asarray(ref_logp_chosen, dtype=np.float64) - np.asarray(ref_logp_rejected, dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError("ref_logp_chosen and ref_logp_rejected must be numeric arrays of shape (N,)") from None
        return cls(phi_w - phi_l, groups, ref_margin=ref, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def n_samples(self):
        return self.diff.shape[0]

    @property
    def dim(self):
        return self.diff.shape[1]

    # The four storage tests below are read-only conveniences for users; the package's own modules
    # ask self.storage for capabilities instead (tests/test_structure.py).
    @property
    def is_sparse(self):
        """True for a ``scipy.sparse`` S (stored as CSR)."""
        return _is_sparse(self.diff)

    @property
    def is_operator(self):
        """True for an implicit S (a :class:`~loglinear_grpo.operators.PairOperator`)."""
        return isinstance(self.diff, PairOperator)

    @property
    def is_dense(self):
        """True for an in-memory or memory-mapped ndarray S."""
        return isinstance(self.diff, np.ndarray)

    @property
    def streamed(self):
        """True when full passes go block by block: a memory-mapped ``diff``, never loaded whole."""
        return isinstance(self.diff, np.memmap)

    # ------------------------------------------------------------------ products with S
    # S is read through its adapter, self.storage (loglinear_grpo.storage): the one place that knows
    # how each kind of S (dense, memory-mapped, sparse, implicit) is read.
    def matvec(self, x):
        """:math:`S x`, shape (N,), float64 (streamed for a memmap)."""
        return self.storage.matvec(x)

    def rmatvec(self, u):
        """:math:`S^\\top u`, shape (d,), float64 (streamed for a memmap)."""
        return self.storage.rmatvec(u)

    def rows(self, index):
        """The rows :math:`s_i`, i ∈ ``index``: an ndarray in S's dtype, or CSR (sparse or implicit S)."""
        return self.storage.rows(index)

    def row_blocks(self, block_rows=CHUNK_ROWS):
        """``(start, stop, block)`` over all rows in order: float64 ndarrays ``block_rows`` at a time
        (bounded temporaries; a memmap is never loaded whole) or CSR (a sparse S whole, an implicit S
        in the operator's blocks)."""
        return self.storage.row_blocks(block_rows)

    def gram(self):
        """The kernel :math:`SS^\\top`, shape (N, N), dense float64 (the row-space solvers, d > N)."""
        return self.storage.gram()

    def explicit_diff(self):
        """S as an in-memory ndarray or CSR (for the cvxpy and LP programs); an implicit S is formed
        (``ValueError`` when too large, see :meth:`PairOperator.explicit`)."""
        return self.storage.explicit()

    def subset(self, index):
        """The pairs at ``index`` (an integer or boolean array), same groups and names."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        groups = self.membership.take(index) if self.overlapping else self.groups[index]
        return PreferenceData(self.storage.take(index), groups, self.ref_margin[index],
                              group_names=self.group_names, check_finite=False, check_adjoint=False)

    def sorted_by_group(self):
        """``(data, order)``: the same pairs stored group by group (``data.diff = self.diff[order]``, a copy
        for a dense S), which makes each full-batch iteration one pass over S whatever K
        (:mod:`loglinear_grpo.kernels`). The solution does not depend on the order of the pairs."""
        if self.overlapping:
            raise ValueError("sorted_by_group: overlapping groups have no order by group")
        order = np.argsort(self.groups, kind="stable")
        return PreferenceData(self.storage.take(order), self.groups[order], self.ref_margin[order],
                              group_names=self.group_names, check_finite=False, check_adjoint=False), order

    def row_norms(self):
        """Euclidean norm of every row of ``diff`` (streamed)."""
        return self.storage.row_norms()

    def __repr__(self):
        kind = self.storage.kind
        sizes = ", ".join(f"{n}={s}" for n, s in zip(self.group_names, self.group_sizes))
        return f"PreferenceData(N={self.n_samples}, d={self.dim}, {kind}, groups: {sizes})"
