"""Which pairs belong to which group — the one place where group sums are computed.

A data set's groups are a membership matrix M (N × K, :math:`M_{ig} = 1` when pair i is in group g).
With plain labels (every pair in exactly one group; the fast path) M is never formed: the sums are
``bincount`` and the spreads a gather. With **overlapping groups** (a pair in any number of groups, at
least one — several groupings at once, e.g. country *and* age band) M is a sparse 0/1 matrix. Everything
the solvers need of the groups is one of

.. math::

    N_g = \\sum_i M_{ig},\\qquad
    \\mathrm{sums}(v)_g = \\sum_{i\\in D_g} v_i = (M^\\top v)_g,\\qquad
    \\mathrm{spread}(c)_i = \\sum_{g\\ni i} c_g = (Mc)_i,

so that with :math:`L_g = \\frac1{N_g}\\sum_{i\\in D_g}\\ell_i` the weighted objective is
:math:`\\sum_g\\lambda_gL_g = \\sum_i w_i\\ell_i` with pair weights :math:`w = M(\\lambda/N)`; the worst-group
objective :math:`\\max_g L_g` stays convex in θ, and every bound of :mod:`loglinear_grpo.certificate`
holds with these weights (its proofs never used that the groups are disjoint).

**Union** (:func:`union_memberships`): several groupings (label arrays) give the union of their groups,
named ``"grouping=value"`` (``country=Kenya``, ``age=18-24``): a pair is in one group of each grouping.
**Intersection** (:func:`intersect_groupings`): the cells of their cross product, plain labels again.
"""
from __future__ import annotations

import hashlib
import numbers

import numpy as np
import scipy.sparse as sp


# ---------------------------------------------------------------------- labels
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
        hint = (" (overlapping groups: a membership matrix as a numpy array or scipy sparse matrix of shape "
                "(N, K), or several groupings as a dict {name: labels} or a list of N-long label arrays)"
                if groups.ndim == 2 else "")
        raise ValueError(f"groups must have shape ({n},) to match diff, got {groups.shape}{hint}")
    if isinstance(names, str):
        raise ValueError("group_names must be a sequence of names, not one string")
    if groups.dtype.kind in "US" and getattr(raw, "dtype", None) is None:
        # numpy turns a plain sequence mixing numbers and strings into strings ([1, "1"] -> ["1", "1"]): read
        # its items
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


class Membership:
    """The groups of N pairs: labels (``labels``, each pair in one group) or an N × K 0/1 matrix
    (``matrix``, CSR; a pair in one or more groups). Built by :class:`~loglinear_grpo.PreferenceData`,
    which checks it (:func:`membership_from`); the methods take an optional range of pairs
    ``start:stop`` for the solvers' blocked passes.

    Attributes
    ----------
    n_pairs, n_groups : int
    sizes : ndarray of int64, shape (K,)
        :math:`N_g`, every one ≥ 1.
    labels : ndarray of intp, shape (N,), or None
    matrix : scipy.sparse.csr_matrix (N, K) of float64 0/1, or None
    overlapping : bool
        ``matrix`` is set (even if every row happens to hold one 1: it is not converted to labels, so
        that a given membership is used as given).
    per_pair : int or None
        m when every pair is in exactly m ≥ 1 groups (a union of m groupings; CSR matrix only), else None:
        then sums and spreads read m label arrays instead of the matrix's entries.
    """

    def __init__(self, n_groups, labels=None, matrix=None):
        if (labels is None) == (matrix is None):
            raise ValueError("a Membership holds labels or a matrix, one of the two")
        self.n_groups = int(n_groups)
        self.labels = labels
        self.matrix = matrix
        self.overlapping = matrix is not None
        self.per_pair = None
        if labels is not None:
            self.n_pairs = labels.shape[0]
            self.sizes = np.bincount(labels, minlength=self.n_groups).astype(np.int64)
        else:
            self.n_pairs = matrix.shape[0]
            self.sizes = np.asarray(matrix.sum(axis=0)).ravel().round().astype(np.int64)
            if getattr(matrix, "format", None) == "csr":        # the solvers' memberships are CSR, checked
                counts = np.diff(matrix.indptr)
                if counts.size and counts[0] > 0 and np.all(counts == counts[0]):
                    self.per_pair = int(counts[0])

    # ------------------------------------------------------------------ sums and spreads
    def sums(self, values, start=0, stop=None):
        """:math:`\\sum_{i\\in D_g,\\ start\\le i<stop} v_i` for every group, shape (K,) (``values`` holds the
        pairs start..stop−1)."""
        stop = self.n_pairs if stop is None else stop
        if self.labels is not None:
            return np.bincount(self.labels[start:stop], weights=values, minlength=self.n_groups)
        if self.per_pair is not None:           # m label arrays: m bincounts, no gather
            values = np.asarray(values, dtype=np.float64)
            out = None
            for labels in self._label_columns():
                part = np.bincount(labels[start:stop], weights=values, minlength=self.n_groups)
                out = part if out is None else out + part
            return out
        groups, rows = self.entries(start, stop)
        return np.bincount(groups, weights=np.asarray(values, dtype=np.float64)[rows], minlength=self.n_groups)

    def _label_columns(self):
        """Every pair in exactly m groups (:attr:`per_pair`): its j-th group for j < m, as m contiguous label
        arrays of N (made on first use: the matrix's indices once more, laid out by j)."""
        if getattr(self, "_columns", None) is None:
            by_pair = self.matrix.indices.reshape(self.n_pairs, self.per_pair)
            self._columns = np.ascontiguousarray(by_pair.T, dtype=np.intp)
        return self._columns

    def entries(self, start=0, stop=None):
        """Overlapping groups: ``(groups, rows)``, one entry per membership (g, i) of the pairs start..stop−1,
        in pair order (rows relative to start). Views into the matrix and into one array of T pair indices
        made on first use: no slice of the matrix is copied in the solvers' blocked loops."""
        stop = self.n_pairs if stop is None else stop
        m = self.matrix
        if getattr(self, "_entry_pairs", None) is None:
            self._entry_pairs = np.repeat(np.arange(self.n_pairs), np.diff(m.indptr))
        lo, hi = m.indptr[start], m.indptr[stop]
        rows = self._entry_pairs[lo:hi]
        return m.indices[lo:hi], (rows - start if start else rows)

    def means(self, values):
        """:math:`L_g = \\frac1{N_g}\\sum_{i\\in D_g} v_i`, shape (K,)."""
        return self.sums(values) / self.sizes

    def spread(self, group_values, start=0, stop=None):
        """:math:`\\sum_{g\\ni i} c_g` for the pairs start..stop−1 (with labels: ``c[label_i]``)."""
        stop = self.n_pairs if stop is None else stop
        group_values = np.asarray(group_values, dtype=np.float64)
        if self.labels is not None:
            return group_values[self.labels[start:stop]]
        if self.per_pair is not None:           # m label arrays: m gathers
            columns = self._label_columns()
            out = group_values[columns[0][start:stop]]
            for labels in columns[1:]:
                out += group_values[labels[start:stop]]
            return out
        groups, rows = self.entries(start, stop)
        return np.bincount(rows, weights=group_values[groups], minlength=stop - start)

    def indicator(self, values, start=0, stop=None, scale=None):
        """The K × (stop − start) sparse matrix with entry ``values_i · scale_g`` at (g, i) for every
        membership of pair i (``scale`` default 1): ``indicator @ S_block`` sums rows by group."""
        stop = self.n_pairs if stop is None else stop
        n = stop - start
        values = np.asarray(values, dtype=np.float64)
        if self.labels is not None:
            g = self.labels[start:stop]
            entries = values if scale is None else values * np.asarray(scale)[g]
            return sp.csr_matrix((entries, (g, np.arange(n))), shape=(self.n_groups, n))
        if self.per_pair is not None:           # column i holds pair i's m entries: CSC as it is, no sort
            m = self.matrix
            groups = m.indices[m.indptr[start]:m.indptr[stop]].copy()      # its own: the membership stays
            entries = np.repeat(values, self.per_pair)
            if scale is not None:
                entries *= np.asarray(scale, dtype=np.float64)[groups]
            indptr = np.arange(0, n * self.per_pair + 1, self.per_pair)
            return sp.csc_matrix((entries, groups, indptr), shape=(self.n_groups, n))
        groups, rows = self.entries(start, stop)
        entries = values[rows] if scale is None else values[rows] * np.asarray(scale, dtype=np.float64)[groups]
        return sp.csr_matrix((entries, (groups, rows)), shape=(self.n_groups, n))

    def _csc(self):
        if getattr(self, "_by_group", None) is None:
            self._by_group = self.matrix.tocsc()
            self._by_group.sort_indices()
        return self._by_group

    def members(self, g):
        """The indices of the pairs of group g, sorted."""
        if self.labels is not None:
            return np.flatnonzero(self.labels == g)
        csc = self._csc()
        return csc.indices[csc.indptr[g]:csc.indptr[g + 1]].astype(np.intp)

    def column(self, g):
        """:math:`M_{\\cdot g}`: 1.0 for the pairs of group g, else 0, shape (N,)."""
        if self.labels is not None:
            return (self.labels == g).astype(np.float64)
        out = np.zeros(self.n_pairs)
        out[self.members(g)] = 1.0
        return out

    def group_row_sums(self, storage, deriv):
        """:math:`G_g = \\sum_{i\\in D_g}\\mathrm{deriv}_i\\,s_i`, shape (K, d), through the storage's one
        product with an N × K matrix (:meth:`~loglinear_grpo.storage.Rows.group_sums` for labels)."""
        if self.labels is not None:
            return storage.group_sums(deriv, self.labels, self.n_groups)
        deriv = np.asarray(deriv, dtype=np.float64)
        out = None
        for start, stop, block in storage.row_blocks():        # K × block sparse indicators, never N × K dense
            part = storage.left_product(self.indicator(deriv[start:stop], start, stop), block)
            out = part if out is None else out + part
        return np.ascontiguousarray(out)

    def take(self, index):
        """The membership of the pairs at ``index`` (integer array); groups left empty are kept (the
        caller checks them)."""
        if self.labels is not None:
            return Membership(self.n_groups, labels=self.labels[index])
        return Membership(self.n_groups, matrix=self.matrix[index])

    def fingerprint_bytes(self):
        """Bytes that identify the membership (labels: their int64 bytes, as before memberships existed;
        a matrix: its CSR structure), for checkpoints and run fingerprints."""
        if self.labels is not None:
            return np.ascontiguousarray(self.labels, dtype=np.int64).tobytes()
        m = self.matrix
        h = hashlib.sha256(b"membership")
        for part in (m.indptr, m.indices):
            h.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
        h.update(np.asarray(m.shape, dtype=np.int64).tobytes())
        return h.digest()

    def member_list(self):
        """The pairs of group 0, then of group 1, ... (each in increasing order), shape (Σ_g N_g,) (labels:
        the stable argsort of the labels)."""
        if self.labels is not None:
            return np.argsort(self.labels, kind="stable")
        return self._csc().indices.astype(np.intp)

    def group_max(self, values):
        """:math:`\\max_{i\\in D_g} v_i` for every group, shape (K,) (0 for none below 0: v ≥ 0 here)."""
        out = np.zeros(self.n_groups)
        if self.labels is not None:
            np.maximum.at(out, self.labels, values)
            return out
        members, starts = self.member_list(), np.r_[0, np.cumsum(self.sizes)[:-1]]
        return np.maximum(np.maximum.reduceat(np.asarray(values)[members], starts), 0.0)

    def per_pair_counts(self):
        """How many groups each pair is in (all 1 for labels), shape (N,)."""
        if self.labels is not None:
            return np.ones(self.n_pairs, dtype=np.int64)
        return np.diff(self.matrix.indptr).astype(np.int64)


# ---------------------------------------------------------------------- building and checking
def matrix_membership(raw, n, names=None):
    """A :class:`Membership` from an N × K 0/1 matrix (scipy sparse, or a 2-D array of 0/1 or bool), with
    one clear error each for a wrong shape, entries other than 0/1, pairs in no group and empty groups."""
    if _is_matrix(raw):
        matrix = sp.csr_matrix(raw, dtype=np.float64, copy=True)      # the caller's matrix is left as it is
        matrix.sum_duplicates()                     # a pair listed twice in a group is an entry 2: refused below
    else:
        try:
            dense = np.asarray(raw)
        except (TypeError, ValueError):
            raise ValueError("groups: a membership matrix must be an N x K array of 0/1") from None
        if dense.dtype.kind not in "biuf":
            raise ValueError(f"groups: a membership matrix must hold 0/1 (or bool), got dtype {dense.dtype}")
        matrix = sp.csr_matrix(dense.astype(np.float64))
    if matrix.ndim != 2 or matrix.shape[0] != n:
        raise ValueError(f"groups: a membership matrix must have shape (N, K) = ({n}, K) to match diff, got "
                         f"{matrix.shape}")
    matrix.eliminate_zeros()
    if matrix.nnz and not np.all(matrix.data == 1.0):
        bad = matrix.data[matrix.data != 1.0][:3]
        raise ValueError(f"groups: a membership matrix holds only 0 and 1, got entries {bad.tolist()}")
    k = matrix.shape[1]
    if names is not None and len(names) != k:
        raise ValueError(f"group_names lists {len(names)} names but the membership matrix has K={k} columns")
    counts = np.diff(matrix.indptr)
    if np.any(counts == 0):
        none = np.flatnonzero(counts == 0)
        raise ValueError(f"groups: {none.size} pair(s) belong to no group (e.g. pair {int(none[0])}): every pair "
                         "needs at least one group")
    matrix.sort_indices()
    membership = Membership(k, matrix=matrix)
    empty = np.flatnonzero(membership.sizes == 0)
    if empty.size:
        label = [str(names[g]) if names is not None else str(g) for g in empty[:5]]
        raise ValueError(f"groups: group(s) {label} hold no pairs (an empty column of the membership matrix)")
    return membership


def _codes(labels, n, what):
    codes, names = _parse_groups(labels, n, None)
    if names is None:
        names = [str(g) for g in range(int(codes.max()) + 1)]
        present = np.bincount(codes, minlength=len(names))
        if np.any(present == 0):
            names = [names[g] for g in np.flatnonzero(present)]
            codes = np.searchsorted(np.flatnonzero(present), codes)
    return np.asarray(codes, dtype=np.intp), [str(x) for x in names]


def _groupings(columns, n):
    """``[(name, labels)]`` from a dict (or DataFrame) of groupings, or a list of label arrays."""
    if hasattr(columns, "items"):
        items = [(str(name), col) for name, col in columns.items()]
    else:
        items = [(f"grouping{j}", col) for j, col in enumerate(columns)]
    if len(items) < 1:
        raise ValueError("groups: give at least one grouping")
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"groups: grouping names repeat: {names}")
    if any("=" in name for name in names):        # "a" = "b=c" and "a=b" = "c" would both be named "a=b=c"
        raise ValueError(f"groups: a grouping's name may not hold '=' (groups are named 'grouping=value'): {names}")
    for name, col in items:
        if np.shape(col) != (n,):
            raise ValueError(f"groups: grouping {name!r} must have shape ({n},) to match diff, got {np.shape(col)}")
    return items


def union_memberships(columns, n):
    """The union of several groupings: ``(Membership, names)``, every value of every grouping a group named
    ``"grouping=value"``, a pair in one group of each grouping (so in exactly as many groups as there are
    groupings). ``columns``: a dict (or pandas DataFrame) ``{grouping name: labels}`` or a list of label
    arrays (named ``grouping0``, ``grouping1``, ...); labels as :class:`~loglinear_grpo.PreferenceData`
    takes them."""
    rows, cols, names = [], [], []
    for name, col in _groupings(columns, n):
        codes, values = _codes(col, n, name)
        rows.append(np.arange(n))
        cols.append(codes + len(names))
        names += [f"{name}={v}" for v in values]
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    matrix = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n, len(names)))
    return matrix_membership(matrix, n, names), names


def intersect_groupings(columns, n=None, min_size=1, small="keep"):
    """The cross product of several groupings: ``(labels, names, keep, report)``, one group per non-empty
    cell, named ``"country=Kenya & age=18-24"``.

    Cells with fewer than ``min_size`` pairs are listed in ``report`` (name → size) and, by ``small``:
    ``"keep"`` (as they are), ``"merge"`` (all into one cell named ``"other (cells < min_size)"``) or
    ``"drop"`` (their pairs get ``keep = False``: take ``data.subset(keep)``-style slices of your arrays).
    The labels of dropped pairs are −1. ``n``: the number of pairs (default: the first grouping's length).
    """
    if n is None:
        if len(columns) == 0:
            raise ValueError("intersect_groupings: give at least one grouping")
        first = next(iter(columns.values())) if hasattr(columns, "values") else columns[0]
        n = len(first)
    if small not in ("keep", "merge", "drop"):
        raise ValueError(f"small must be 'keep', 'merge' or 'drop', got {small!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise ValueError(f"min_size must be an integer >= 1, got {min_size!r}")
    items = _groupings(columns, n)
    codes, parts = [], []
    for name, col in items:
        c, values = _codes(col, n, name)
        codes.append(c)
        parts.append([f"{name}={v}" for v in values])
    # the non-empty cells: distinct rows of the code matrix (no product of the sizes is formed: no overflow)
    unique, labels = np.unique(np.column_stack(codes), axis=0, return_inverse=True)
    labels = np.asarray(labels).ravel()
    sizes = np.bincount(labels)
    names = [" & ".join(values[j] for values, j in zip(parts, row)) for row in unique]
    small_cells = np.flatnonzero(sizes < min_size)
    if small != "keep" and small_cells.size == len(names):
        raise ValueError(f"intersect_groupings: every one of the {len(names)} cells has fewer than min_size="
                         f"{min_size} pairs (the largest has {int(sizes.max())}): lower min_size, or intersect "
                         "fewer groupings")
    report = {names[g]: int(sizes[g]) for g in small_cells}
    keep = np.ones(n, dtype=bool)
    if small_cells.size and small != "keep":
        is_small = np.zeros(len(names), dtype=bool)
        is_small[small_cells] = True
        big = np.flatnonzero(~is_small)
        remap = np.full(len(names), -1, dtype=np.int64)
        remap[big] = np.arange(big.size)
        new_names = [names[g] for g in big]
        if small == "merge":
            remap[small_cells] = big.size
            new_names.append(f"other (cells < {min_size})")
        labels = remap[labels]
        keep = labels >= 0
        names = new_names
    return np.asarray(labels, dtype=np.intp), names, keep, report


def _is_matrix(a):
    """A scipy sparse matrix (duck-typed: it converts itself to CSR)."""
    return hasattr(a, "tocsr") and hasattr(a, "nnz")


def is_groupings(groups, n=None):
    """Whether ``groups`` is several groupings: a dict or DataFrame of label columns, or a list of label
    arrays (each of length ``n`` when given)."""
    if isinstance(groups, dict) or (hasattr(groups, "columns") and hasattr(groups, "items")):   # dict, DataFrame
        return True
    return isinstance(groups, (list, tuple)) and len(groups) > 0 and all(
        not isinstance(g, (str, bytes)) and np.ndim(g) == 1 and (n is None or np.shape(g)[0] == n) for g in groups)


def membership_from(groups, n, names):
    """``(Membership, names)`` from what :class:`~loglinear_grpo.PreferenceData` was given as ``groups``: a
    Membership, an N × K membership matrix (scipy sparse or 2-D), or several groupings (a dict/DataFrame
    of label arrays, or a list of them) for their union; ``None`` for plain labels (parsed by the caller)."""
    if isinstance(groups, Membership):
        if groups.n_pairs != n:
            raise ValueError(f"groups: the membership has {groups.n_pairs} pairs, diff {n}")
        return matrix_membership(groups.matrix, n, names), names      # (checked like any other matrix)
    if _is_matrix(groups):
        return matrix_membership(groups, n, names), names
    if is_groupings(groups, n):
        if names is not None:
            raise ValueError("group_names: the union of groupings names its groups 'grouping=value' itself")
        return union_memberships(groups if not isinstance(groups, tuple) else list(groups), n)
    if not isinstance(groups, (list, tuple)) and np.ndim(groups) == 2:          # a 2-D array of 0/1
        return matrix_membership(groups, n, names), names
    return None, names
