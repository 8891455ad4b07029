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

import numbers
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .operators import PairOperator
from .storage import (CHUNK_ROWS, MAX_SCALE, MIN_SCALE, Rows, as_rows, check_scale as _check_scale,  # noqa: F401
                      weighted_gram)


def _is_sparse(a):
    return sp.issparse(a)


def _missing_labels_error(count, n):
    return ValueError(f"groups has {count} missing label(s) (None, NaN, pandas.NA or NaT) among {n} pairs: every "
                      "pair needs a group; drop those pairs, or give them a group of their own (e.g. "
                      "groups.fillna('unknown'))")


def _is_number_type(t):
    return issubclass(t, (numbers.Real, np.bool_))


def _parse_groups(raw, n, names):
    """``(labels, names)``: the group labels of :class:`PreferenceData` as an integer or float array of
    indices (checked later against ``0..K-1``) and the group names (``None`` unless known), by the rule
    of its docstring: numbers are indices compared by value, other labels are names; missing labels and
    labels mixing the two are refused."""
    try:
        groups = np.asarray(raw)
    except (TypeError, ValueError):
        raise ValueError("groups must be a 1-D array of group labels (integers 0..K-1, or names)") from None
    if groups.ndim != 1 or groups.shape[0] != n:
        raise ValueError(f"groups must have shape ({n},) to match diff, got {groups.shape}")
    if isinstance(names, str):
        raise ValueError("group_names must be a sequence of names, not one string")
    if groups.dtype.kind in "US" and not isinstance(raw, np.ndarray):
        # numpy turns a sequence mixing numbers and strings into strings ([1, "1"] -> ["1", "1"]): read its items
        try:
            items = np.asarray(raw, dtype=object)
        except (TypeError, ValueError):          # pragma: no cover - asarray succeeded above
            items = groups
        if items.shape == groups.shape:
            groups = items
    if groups.dtype.kind == "O":
        import pandas as pd
        missing = int(np.count_nonzero(np.asarray(pd.isna(groups), dtype=bool)))
        if missing:
            raise _missing_labels_error(missing, n)
        kinds = {type(g) for g in groups.tolist()}
        numeric = {t for t in kinds if _is_number_type(t)}
        if numeric and numeric != kinds:
            example = {}
            for g in groups.tolist():
                example.setdefault(_is_number_type(type(g)), g)
                if len(example) == 2:
                    break
            raise ValueError(
                f"groups mixes numeric labels (e.g. {example[True]!r}) with other labels (e.g. {example[False]!r}): "
                "numbers are group indices 0..K-1 and other labels are group names, so a mix is ambiguous "
                "(is 1 the group '1'?); convert all labels to one kind, e.g. all to str or all to int")
        if numeric:                              # equal numbers are one group: 1, 1.0, np.int64(1), True
            integral = all(issubclass(t, (numbers.Integral, np.bool_)) for t in kinds)
            try:
                groups = groups.astype(np.int64 if integral else np.float64)
            except (OverflowError, TypeError, ValueError):
                raise ValueError("groups has numeric labels that are not 64-bit numbers; labels must be "
                                 "integers 0..K-1") from None
    if groups.dtype.kind in "USO":               # names, in order of first appearance, identified by value
        values = groups.tolist()
        try:
            codes = {}
            index = np.fromiter((codes.setdefault(g, len(codes)) for g in values), dtype=np.intp, count=n)
        except TypeError:
            raise ValueError("groups holds an unhashable label (e.g. a list): labels must be numbers or names "
                             "(str)") from None
        label_names = [str(g) for g in codes]
        if len(set(label_names)) != len(label_names):
            seen = {}
            for g, name in zip(codes, label_names):
                if name in seen:
                    raise ValueError(f"groups has distinct labels {seen[name]!r} and {g!r} that are both named "
                                     f"{name!r}: convert the labels so that distinct groups print differently")
                seen[name] = g
        if names is None:
            names = label_names
            groups = index
        else:
            position = {str(g): k for k, g in enumerate(names)}
            unknown = sorted(name for name in label_names if name not in position)[:5]
            if unknown:
                raise ValueError(f"groups has label(s) {unknown} that group_names does not list")
            groups = np.array([position[name] for name in label_names], dtype=np.intp)[index]
    if groups.dtype.kind == "f":
        missing = int(np.count_nonzero(np.isnan(groups)))
        if missing:
            raise _missing_labels_error(missing, n)
        if not np.all(np.isfinite(groups)) or not np.all(groups == np.round(groups)):
            raise ValueError("groups must hold integer labels 0..K-1")
    elif groups.dtype.kind in "mM":
        missing = int(np.count_nonzero(np.isnat(groups)))
        if missing:
            raise _missing_labels_error(missing, n)
        raise ValueError(f"groups must hold integer labels 0..K-1 or names, got dtype {groups.dtype}")
    elif groups.dtype.kind not in "iub":
        raise ValueError(f"groups must hold integer labels, got dtype {groups.dtype}")
    if groups.min() < 0:
        raise ValueError("groups must be non-negative (labels 0..K-1)")
    top = groups.max()
    if top >= n:       # before any allocation of size max label: K groups need K non-empty groups
        raise ValueError(f"groups has label {float(top):.6g} but only {n} pairs: labels must be 0..K-1 "
                         "with every group holding a pair")
    return groups.astype(np.intp), names


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
    group_sizes: np.ndarray = field(init=False, repr=False)
    storage: Rows = field(init=False, repr=False)

    def __post_init__(self):
        storage = as_rows(self.diff, self.check_finite, self.check_adjoint)
        diff = storage.source
        n = diff.shape[0]
        if n == 0:
            raise ValueError("diff must hold at least one pair (N >= 1)")

        groups, names = _parse_groups(self.groups, n, self.group_names)

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
        return PreferenceData(self.storage.take(index), self.groups[index], self.ref_margin[index],
                              group_names=self.group_names, check_finite=False, check_adjoint=False)

    def sorted_by_group(self):
        """``(data, order)``: the same pairs stored group by group (``data.diff = self.diff[order]``, a copy
        for a dense S), which makes each full-batch iteration one pass over S whatever K
        (:mod:`loglinear_grpo.kernels`). The solution does not depend on the order of the pairs."""
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
