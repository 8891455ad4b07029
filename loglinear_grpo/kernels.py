"""The full-batch pass: group losses and group gradients in one read of S.

One iteration of the full-batch estimators needs the group losses :math:`L_g(\\theta)` (for the α
step) and :math:`\\sum_g \\lambda_g\\nabla L_g(\\theta)` for weights λ chosen *after* the losses are
known. Since :math:`\\nabla L_g = G_g/N_g` with :math:`G_g = \\sum_{i\\in D_g}\\ell'(h_i)s_i` and the
K × d matrix G does not depend on λ, one pass over S suffices: block by block, h = Bθ, ℓ and ℓ' of
the block, then :math:`G \\mathrel{+}= W B` with W the K × rows matrix holding ℓ'_i in row g_i — B is
read from memory once, and a second time from cache.

Blocks are sized to stay in cache (about 1 MiB), the scratch arrays live in a :class:`Workspace`
reused across iterations (no per-iteration allocation of N-sized temporaries), and a float32 S is
multiplied in float32 (no float64 copy of S, ever), with the per-block results accumulated in
float64. When every group's pairs are stored contiguously (:meth:`PreferenceData.sorted_by_group`),
``G`` takes one product per group run instead of a K-row product: the second read of a block costs
one pass's worth of arithmetic whatever K.

A large dense S is cut into a fixed number of parts (by N alone, never by the machine), each part's
blocks are summed by one thread with BLAS held to one thread (``threadpoolctl``; process-wide while a
pass runs, so passes of concurrent solves take turns), and the parts' sums are added in order: the
loss terms and the second product are arithmetic, not memory traffic, and a second core shares them.
The result does not depend on how many cores run it, nor on the BLAS thread setting.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from .losses import get_loss

#: target size of one block of S, in bytes (L2/L3-resident between the two products)
BLOCK_BYTES = 1 << 20
#: above this many groups the block's K × rows weight matrix costs more than a sparse indicator
DENSE_GROUPS = 64
#: up to this many pairs S is one block, computed with the fewest NumPy calls
SMALL = 4096


#: at most this many rows in a block (bounds the K × rows weight matrix when d is small)
MAX_BLOCK_ROWS = 16384
#: a large S is cut into at most this many parts (a function of N only: results never depend on cores)
MAX_PARTS = 8
#: ... each of at least this many blocks
PART_BLOCKS = 4


class _Scratch:
    """Block-sized scratch arrays of one thread."""

    def __init__(self, rows, k, dtype, dense_groups):
        self.h = np.empty(rows, dtype=dtype)
        self.margin = np.empty(rows)
        self.z = np.empty(rows)
        self.e = np.empty(rows)
        self.value = np.empty(rows)
        self.deriv = np.empty(rows)
        self.weights = np.zeros((k, rows), dtype=dtype) if dense_groups else None
        self.columns = np.arange(rows)


class Workspace(_Scratch):
    """Scratch buffers of :func:`losses_and_group_gradients` for one data set (block-sized, reused;
    one set per part of S).

    They carry nothing from one iteration to the next: a pass computes the same numbers with a fresh
    workspace, so a workspace never changes the iterates (and is not part of a checkpoint)."""

    def __init__(self, data):
        self.data = data
        storage = data.storage
        self.dtype = np.float32 if storage.dtype == np.float32 else np.float64
        itemsize = np.dtype(self.dtype).itemsize
        n, k = data.n_samples, data.n_groups
        self.rows = int(min(n, MAX_BLOCK_ROWS, max(256, BLOCK_BYTES // max(1, data.dim * itemsize))))
        self.dense_groups = k <= DENSE_GROUPS
        super().__init__(self.rows, k, self.dtype, self.dense_groups)
        # groups stored contiguously (see PreferenceData.sorted_by_group): one product per run of a group
        labels = data.groups
        self.runs = None
        if labels is not None:                                         # (overlapping groups have no runs)
            starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
            self.runs = (np.r_[starts, labels.size], labels[starts]) if starts.size == k else None
        n_blocks = -(-n // self.rows)
        n_parts = max(1, min(MAX_PARTS, n_blocks // PART_BLOCKS)) if storage.parallel_parts else 1
        edges = [self.rows * (n_blocks * j // n_parts) for j in range(n_parts)] + [n]
        self.parts = list(zip(edges[:-1], edges[1:]))
        self.scratch = [self] + [_Scratch(self.rows, k, self.dtype, self.dense_groups)
                                 for _ in range(n_parts - 1)]
        # S as one block for the one-call pass of a small S in memory (a view, no copy)
        self.whole = storage.block(0, n) if storage.dense_rows and storage.in_memory and n <= SMALL else None
        self._memberships = {}

    def memberships(self, start, stop):
        """Overlapping groups: ``(groups, rows)`` of the memberships of the pairs start..stop−1 (one entry per
        (group, pair); rows relative to start), made once per block and kept (2 integers a membership)."""
        key = (start, stop)
        if key not in self._memberships:
            groups, rows = self.data.membership.entries(start, stop)
            # the flat positions of (group, row) in a (K, self.rows) weights buffer
            self._memberships[key] = (groups, rows, groups.astype(np.intp) * self.rows + rows)
        return self._memberships[key]


_POOL = {"pid": None, "executor": None, "blas": None}
_POOL_LOCK = threading.Lock()


def threads():
    """Threads a pass may use: the cores this process may run on (``os.sched_getaffinity``), at most
    :data:`MAX_PARTS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                 # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_PARTS, cores))


def _executor():
    """The process's worker pool, BLAS controller and pass lock (made again in a forked child, whose
    parent's threads do not exist)."""
    with _POOL_LOCK:
        if _POOL["pid"] != os.getpid():
            from threadpoolctl import ThreadpoolController
            _POOL.update(pid=os.getpid(), executor=ThreadPoolExecutor(threads(), thread_name_prefix="lg-pass"),
                         blas=ThreadpoolController(), lock=threading.Lock())
        return _POOL["executor"], _POOL["blas"], _POOL["lock"]


def _small_pass(theta, data, spec, beta, ws):
    """The same pass for a small S in one block, with the fewest calls (per-call overhead dominates
    there): h, then ℓ and ℓ', the loss sums and G = W S (S in memory, dense rows:
    ``ws.whole``)."""
    diff = ws.whole
    h = diff @ theta.astype(ws.dtype, copy=False) - data.ref_margin
    value, deriv = spec.value_and_grad(h, beta)          # n ≤ SMALL: the loss table's fewest-calls form
    weights = ws.weights
    weights.fill(0.0)
    if data.overlapping:                                  # one entry per membership (as the labels' one)
        groups, rows = data.membership.entries()
        weights[groups, rows] = deriv[rows]
        return np.bincount(groups, weights=value[rows], minlength=data.n_groups), weights @ diff
    weights[data.groups, ws.columns] = deriv
    return np.bincount(data.groups, weights=value, minlength=data.n_groups), weights @ diff


def losses_and_group_gradients(theta, data, loss, beta, workspace=None):
    """One pass over S: group loss sums (K,) and group gradient sums ``G`` (K, d).

    ``loss_sums[g] = Σ_{i∈D_g} ℓ(h_i)`` and ``G[g] = Σ_{i∈D_g} ℓ'(h_i) s_i`` (divide by N_g for the
    means). An S with dense rows (in memory or memory-mapped, float64 or float32) goes block by block;
    any other (sparse, implicit) in two products, :math:`S\\theta` and the group sums :math:`S^\\top U`
    (U: N × K; :meth:`~loglinear_grpo.storage.Rows.group_sums`; its blocks have no cache reuse to gain).
    """
    spec = get_loss(loss)
    storage = data.storage
    if not storage.dense_rows:
        h = storage.matvec(theta) - data.ref_margin
        value, deriv = spec.value_and_grad(h, beta)
        return data.membership.sums(value), data.membership.group_row_sums(storage, deriv)
    ws = workspace if workspace is not None and workspace.data is data else Workspace(data)
    if data.n_samples <= SMALL and ws.dense_groups and storage.in_memory:
        return _small_pass(theta, data, spec, beta, ws)
    theta_c = theta.astype(ws.dtype, copy=False)
    jobs = [(theta_c, data, spec, beta, ws, scratch, a, b) for (a, b), scratch in zip(ws.parts, ws.scratch)]
    executor, blas, lock = _executor()
    # BLAS on one thread, threaded parts or not: its results (a small gemm's bits) depend on its thread
    # count. The limit is process-wide, so passes from concurrent solves take turns (the lock).
    with lock, blas.limit(limits=1, user_api="blas"):
        if len(jobs) == 1 or threads() == 1:
            results = [_part_pass(*job) for job in jobs]
        else:
            futures = [executor.submit(_part_pass, *job) for job in jobs]
            try:
                results = [future.result() for future in futures]
            finally:                                      # an error or Ctrl-C: no part left writing
                for future in futures:
                    future.cancel()
                wait(futures)
    loss_sums, grads = results[0]
    for part_sums, part_grads in results[1:]:            # in part order: the same sums on any machine
        loss_sums += part_sums
        grads += part_grads
    return loss_sums, grads


def _part_pass(theta_c, data, spec, beta, ws, scratch, first, last):
    """Loss sums and group gradient sums of the pairs ``first:last``, block by block, in ``scratch``."""
    k, d = data.n_groups, data.dim
    loss_sums = np.zeros(k)
    grads = np.zeros((k, d))
    ref, groups = data.ref_margin, data.groups
    for start, stop, block in data.storage.blocks(first, last, ws.rows):
        n = stop - start
        h_c = np.dot(block, theta_c, out=scratch.h[:n])
        h = np.subtract(h_c, ref[start:stop], out=scratch.margin[:n])       # float64 margins
        value, deriv = spec.block_terms(h, beta, scratch.z[:n], scratch.e[:n], scratch.value[:n], scratch.deriv[:n])
        if ws.runs is not None:
            bounds, labels = ws.runs
            run = int(np.searchsorted(bounds, start, side="right")) - 1
            for j in range(run, labels.size):
                lo, hi = max(bounds[j], start) - start, min(bounds[j + 1], stop) - start
                if hi <= 0 or lo >= n:
                    break
                loss_sums[labels[j]] += value[lo:hi].sum()
                grads[labels[j]] += deriv[lo:hi].astype(ws.dtype, copy=False) @ block[lo:hi]
            continue
        if data.overlapping:                      # a pair in several groups: one entry per membership
            member_groups, rows, flat = ws.memberships(start, stop)
            loss_sums += np.bincount(member_groups, weights=value.take(rows), minlength=k)
            if ws.dense_groups:
                full = scratch.weights
                full.fill(0.0)
                full.put(flat, deriv.take(rows))
                grads += full[:, :n] @ block
            else:
                grads += np.asarray(data.membership.indicator(deriv, start, stop) @ np.asarray(block))
            continue
        g = groups[start:stop]
        loss_sums += np.bincount(g, weights=value, minlength=k)
        if ws.dense_groups:
            weights = scratch.weights[:, :n]
            weights.fill(0.0)
            weights[g, scratch.columns[:n]] = deriv
            grads += weights @ block
        else:
            indicator = sp.csr_matrix((deriv, (g, scratch.columns[:n])), shape=(k, n))
            grads += indicator @ np.asarray(block)
    return loss_sums, grads


class FullPass(NamedTuple):
    """One full pass at θ: the group loss sums and what the θ step needs for any group weights w.

    For a stored S (dense, memory-mapped, sparse) the pass already holds the K × d group gradient sums
    :math:`G_g = \\sum_{i\\in D_g}\\ell'_i s_i` (one read of S). For an implicit S it holds
    the pair derivatives :math:`\\ell'_i`, and :meth:`gradient` is one more product
    :math:`S^\\top u` — two passes, but never K of them.
    """

    loss_sums: np.ndarray
    group_gradients: np.ndarray | None
    pair_derivatives: np.ndarray | None

    def gradient(self, group_weights, data):
        """:math:`\\sum_g w_g G_g`, shape (d,)."""
        if self.group_gradients is not None:
            return group_weights @ self.group_gradients
        return data.rmatvec(data.membership.spread(group_weights) * self.pair_derivatives)


def full_pass(theta, data, loss, beta, workspace=None):
    """:class:`FullPass` at θ (see :func:`losses_and_group_gradients`)."""
    return make_pass(data, loss, beta, workspace)(theta)


def make_pass(data, loss, beta, workspace=None):
    """θ ↦ :func:`full_pass` (θ) with the choice of kernel made once, for loops over iterations
    (at the paper's size the per-call dispatch costs as much as the arithmetic)."""
    spec = get_loss(loss)
    storage = data.storage
    if not storage.cheap_rmatmat:             # G would take K products: keep ℓ', one Sᵀu per θ step
        membership, ref = data.membership, data.ref_margin

        def operator_pass(theta):
            value, deriv = spec.value_and_grad(data.matvec(theta) - ref, beta)
            return FullPass(membership.sums(value), None, deriv)
        return operator_pass
    if storage.dense_rows:
        ws = workspace if workspace is not None and workspace.data is data else Workspace(data)
        if data.n_samples <= SMALL and ws.dense_groups and storage.in_memory:
            return lambda theta: FullPass(*_small_pass(theta, data, spec, beta, ws), None)
        workspace = ws
    return lambda theta: FullPass(*losses_and_group_gradients(theta, data, spec, beta, workspace), None)
