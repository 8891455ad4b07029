"""The exact last-layer model of a causal LM as a log-linear policy over candidate answers (§3.1).

For a response :math:`y=(y_1..y_T)` to prompt :math:`x`, with final hidden states
:math:`h_t = h_t(x, y_{<t})` and output layer rows :math:`w_v`,

.. math::

    f_W(x, y) = \\sum_{t=1}^{T} w_{y_t}^\\top h_t = \\theta^\\top\\phi(x,y), \\qquad
    \\phi(x, y) = \\sum_t e_{y_t}\\otimes h_t,

so over a candidate set :math:`Y(x)` the policy :math:`\\pi_W(y|x)\\propto\\exp f_W(x,y)` is
log-linear in θ = the rows of W for the tokens V′ that occur in the candidates (flattened
token-major: θ[j·d:(j+1)·d] = w_{V′_j}). A head with a bias b_v gets the feature
:math:`h_t\\oplus 1` and the row :math:`w_v\\oplus b_v`.

Storage is compact: the distinct hidden states (one per prompt for the first answer token, one per
later position of multi-token answers) and, per occurrence of a token in a candidate, the pair
(token, hidden row). The difference rows :math:`s = \\phi(x,y_w)-\\phi(x,y_l)` are handed to the
solver in one of two forms:

* CSR (:meth:`LastLayerFeatures.pair_differences`): :math:`d` stored non-zeros per answer token —
  fastest for short answers, but for a 2048-wide model and 50-token answers a row holds ~200 000
  non-zeros, and 10⁴ pairs take ~25 GB;
* implicit (:class:`PairDifferenceOperator`): S given by its products, computed from the hidden
  states (which may stay memory-mapped, float16 or float32) and the token ids — memory is the
  hidden-state cache plus blocks of bounded size, whatever the answer length.

:func:`pair_rows` chooses by the predicted size of the CSR matrix.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from loglinear_grpo.operators import PairOperator

#: working-set target of one block of the implicit operator (hidden rows converted to float64)
BLOCK_BYTES = 32 << 20
#: :func:`pair_rows` ("auto") uses CSR while its predicted size is at most this
CSR_LIMIT_BYTES = 2 << 30


@dataclass
class LastLayerFeatures:
    """Hidden states and token occurrences of every candidate answer of every item.

    Attributes
    ----------
    hidden : ndarray (H, d), float32
        Final hidden states (post final norm; with a trailing 1 when the head has a bias).
    entry_candidate, entry_token, entry_hidden : ndarray (M,), int64
        Occurrence m: candidate ``entry_candidate[m]`` has token ``entry_token[m]`` scored
        against ``hidden[entry_hidden[m]]``.
    candidate_offsets : ndarray (n_items + 1,), int64
        The candidates of item i are ``candidate_offsets[i]:candidate_offsets[i+1]``.
    has_bias : bool
    """

    hidden: np.ndarray
    entry_candidate: np.ndarray
    entry_token: np.ndarray
    entry_hidden: np.ndarray
    candidate_offsets: np.ndarray
    has_bias: bool = False

    def __post_init__(self):
        self.vocab = np.unique(self.entry_token)                 # V′, sorted token ids
        self._phi = None

    @property
    def hidden_size(self):
        return self.hidden.shape[1]

    @property
    def dim(self):
        """|V′|·d: the length of θ."""
        return self.vocab.size * self.hidden_size

    @property
    def n_items(self):
        return self.candidate_offsets.size - 1

    @property
    def n_candidates(self):
        return int(self.candidate_offsets[-1])

    def candidate_index(self, items, options):
        """Global candidate index of option ``options[k]`` of item ``items[k]``."""
        items, options = np.asarray(items), np.asarray(options)
        n_opts = np.diff(self.candidate_offsets)[items]
        if np.any(options < 0) or np.any(options >= n_opts):
            raise ValueError("an option index is out of range for its item")
        return self.candidate_offsets[items] + options

    def phi(self):
        """φ(x, y) for every candidate: CSR of shape (n_candidates, |V′|·d)."""
        if self._phi is None:
            d = self.hidden_size
            col_block = np.searchsorted(self.vocab, self.entry_token)
            rows = np.repeat(self.entry_candidate, d)
            cols = (col_block[:, None] * d + np.arange(d)).ravel()
            vals = self.hidden[self.entry_hidden].astype(np.float64).ravel()
            phi = sp.coo_matrix((vals, (rows, cols)), shape=(self.n_candidates, self.dim)).tocsr()
            phi.sum_duplicates()                                  # a token repeated in y adds up
            self._phi = phi
        return self._phi

    def pair_differences(self, chosen, rejected):
        """Rows :math:`s_i = \\phi(x_i, y_w) - \\phi(x_i, y_l)` (CSR) for global candidate indices."""
        phi = self.phi()
        return (phi[np.asarray(chosen)] - phi[np.asarray(rejected)]).tocsr()

    def candidate_scores(self, theta):
        """:math:`f_\\theta(x, y) = \\theta^\\top\\phi(x, y) = \\sum_t w_{y_t}^\\top h_t` for every
        candidate (from the hidden states in blocks; φ is not formed)."""
        entries = TokenEntries(self.hidden, self.entry_candidate, np.searchsorted(self.vocab, self.entry_token),
                               self.entry_hidden)
        return entries.scores(self.rows_from_theta(theta), self.n_candidates)

    def candidate_log_probs(self, theta):
        """:math:`\\log\\pi_\\theta(y|x)`: the scores log-softmaxed within each item's candidate set."""
        scores = self.candidate_scores(theta)
        starts = self.candidate_offsets[:-1]
        top = np.maximum.reduceat(scores, starts)
        owner = np.repeat(np.arange(self.n_items), np.diff(self.candidate_offsets))
        shifted = scores - top[owner]
        log_norm = np.log(np.add.reduceat(np.exp(shifted), starts))
        return shifted - log_norm[owner]

    def theta_from_rows(self, rows):
        """θ (flat) from the head rows of V′ (shape (|V′|, d))."""
        rows = np.asarray(rows, dtype=np.float64)
        if rows.shape != (self.vocab.size, self.hidden_size):
            raise ValueError(f"rows must have shape {(self.vocab.size, self.hidden_size)}, got {rows.shape}")
        return rows.ravel()

    def rows_from_theta(self, theta):
        """The head rows of V′ (|V′|, d) from θ."""
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape != (self.dim,):
            raise ValueError(f"theta must have shape ({self.dim},), got {theta.shape}")
        return theta.reshape(self.vocab.size, self.hidden_size)

    def first_items(self, n):
        """The features of items ``0..n-1`` alone (entries and hidden rows are stored in item order)."""
        if not 0 <= n <= self.n_items:
            raise ValueError(f"n must be in [0, {self.n_items}], got {n}")
        m = int(np.searchsorted(self.entry_candidate, self.candidate_offsets[n]))
        h = int(self.entry_hidden[:m].max()) + 1 if m else 0
        return LastLayerFeatures(self.hidden[:h], self.entry_candidate[:m], self.entry_token[:m],
                                 self.entry_hidden[:m], self.candidate_offsets[:n + 1], self.has_bias)

    def arrays(self):
        return {"hidden": self.hidden, "entry_candidate": self.entry_candidate,
                "entry_token": self.entry_token, "entry_hidden": self.entry_hidden,
                "candidate_offsets": self.candidate_offsets,
                "has_bias": np.array([int(self.has_bias)], dtype=np.int64)}

    @classmethod
    def from_arrays(cls, arrays):
        return cls(hidden=arrays["hidden"], entry_candidate=arrays["entry_candidate"].astype(np.int64),
                   entry_token=arrays["entry_token"].astype(np.int64),
                   entry_hidden=arrays["entry_hidden"].astype(np.int64),
                   candidate_offsets=arrays["candidate_offsets"].astype(np.int64),
                   has_bias=bool(arrays["has_bias"][0]))


# ------------------------------------------------------------------------------ the implicit S
def _as_float64(block):
    return np.asarray(block, dtype=np.float64)


def _as_float32(block):
    """A block of hidden states as float32: float16 through torch where it is installed (its conversion
    is vectorised, about 5× numpy's on a CPU), else numpy."""
    block = np.asarray(block)
    if block.dtype == np.float16:
        try:
            import torch
        except ImportError:                                  # pragma: no cover - torch is in the llm extra
            return block.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(block)).to(torch.float32).numpy()
    return block.astype(np.float32, copy=False)


def _entry_block_size(hidden_size):
    return max(1, BLOCK_BYTES // (8 * hidden_size))


def _gather(hidden, rows):
    """``hidden[rows]`` as float64, ``rows`` sorted: one contiguous read when the rows are dense in their
    range (a memory-mapped cache is read only there)."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo <= 2 * rows.size:
        block = _as_float64(hidden[lo:hi])
        consecutive = hi - lo == rows.size and bool(np.all(rows[1:] > rows[:-1]))
        return block if consecutive else block[rows - lo]
    return _as_float64(hidden[rows])


class TokenEntries:
    """Token occurrences m = (owner, token column, hidden row), ordered by column (then hidden row), with
    the two products every use of them needs, computed column by column with BLAS:

    * :meth:`scores`: :math:`\\sum_{m: o_m = o} h_m^\\top w_{c_m}` per owner o — for each token v,
      ``H_v @ w_v`` (no gather of θ rows);
    * :meth:`scatter`: :math:`W_j[v] = \\sum_{m: c_m = v} a_{mj} h_m` — for each token v, ``A_vᵀ H_v``
      written straight into row v (no scatter-add).

    The hidden rows are read once per product in blocks of about ``BLOCK_BYTES`` (as float64).
    """

    def __init__(self, hidden, owner, col, hid):
        order = np.lexsort((hid, col))
        self.hidden, self.owner, self.col, self.hid = hidden, owner[order], col[order], hid[order]

    def _blocks(self, dtype=np.float64):
        """``(a, b, rows, segments)``: entries a..b−1, their hidden rows (as ``dtype``: float64, or float32
        for the approximate products) and the runs of equal column within them as (column, lo, hi)
        relative to a."""
        step = _entry_block_size(self.hidden.shape[1])
        convert = _as_float64 if dtype == np.float64 else _as_float32
        m = self.col.size
        for a in range(0, m, step):
            b = min(a + step, m)
            col = self.col[a:b]
            edges = np.flatnonzero(np.r_[True, col[1:] != col[:-1], True])
            rows = convert(self.hidden[self.hid[a:b]])
            yield a, b, rows, zip(col[edges[:-1]], edges[:-1], edges[1:])

    def scores(self, theta_rows, n_owners, dtype=np.float64):
        values = np.empty(self.col.size)
        theta_rows = theta_rows.astype(dtype, copy=False)
        for a, _, rows, segments in self._blocks(dtype):
            for v, lo, hi in segments:
                values[a + lo:a + hi] = rows[lo:hi] @ theta_rows[v]
        return np.bincount(self.owner, weights=values, minlength=n_owners)

    def scatter(self, owner_weights, n_columns, dtype=np.float64):
        """``owner_weights`` (n_owners, k) → array (k, n_columns, d) (float64; accumulated in ``dtype``)."""
        k = owner_weights.shape[1]
        out = np.zeros((k, n_columns, self.hidden.shape[1]), dtype=dtype)
        weights = owner_weights.astype(dtype, copy=False)
        for a, b, rows, segments in self._blocks(dtype):
            coef = weights[self.owner[a:b]]
            for v, lo, hi in segments:
                out[:, v] += coef[lo:hi].T @ rows[lo:hi]
        return out.astype(np.float64, copy=False)



# ------------------------------------------------------------------------------ products on torch
#: the backends of :class:`PairDifferenceOperator` (``"auto"``: see :func:`resolve_backend`)
BACKENDS = ("auto", "numpy", "torch")
#: a cuda operator keeps the whole hidden-state cache on the GPU while it takes at most this share
#: of the free GPU memory (else it moves one block at a time)
RESIDENT_SHARE = 0.5


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        raise ImportError("backend='torch' needs PyTorch, which is not importable here: install the 'llm' "
                          "extra (pip install 'loglinear-grpo[llm]') or use backend='numpy'") from exc
    return torch


def torch_available():
    """Whether PyTorch can be imported (the ``llm`` extra)."""
    try:
        _import_torch()
    except ImportError:
        return False
    return True


def resolve_backend(backend="auto", device="cpu"):
    """The backend the products of a :class:`PairDifferenceOperator` run on: ``"numpy"`` or ``"torch"``.

    ``"auto"`` picks torch on a cuda device, else numpy: on a CPU the numpy products (BLAS per token
    column) are faster than torch's gather / ``index_add_`` (``benchmarks/torch_products.py``,
    ``docs/llm_head.md`` § Products on torch). ``"torch"`` without PyTorch raises ``ImportError``; a
    cuda device needs torch (``backend="numpy"`` with it raises ``ValueError``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    kind = str(device).split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' (optionally 'cuda:i'), got {device!r}")
    if backend == "auto":
        backend = "torch" if kind == "cuda" else "numpy"
    if backend == "numpy":
        if kind != "cpu":
            raise ValueError(f"backend='numpy' computes on the CPU only, got device={device!r}: use backend='torch'")
        return "numpy"
    torch = _import_torch()
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but torch.cuda.is_available() is False")
    return "torch"


class TorchEntries:
    """Token occurrences m = (owner, token column, hidden row), ordered by hidden row, with the same two
    products as :class:`TokenEntries`, computed with torch on ``device`` by gather and ``index_add_``:

    * :meth:`scores`: per occurrence block, the rows ``θ[c_m]`` are gathered, dotted row-wise with the
      hidden block and summed per owner (``index_add_``);
    * :meth:`scatter`: ``W.index_add_(0, c, a[:, None] * H)`` per block.

    The hidden rows are read in file order, one block of at most ``BLOCK_BYTES / (8 d)`` occurrences at a
    time (rows read contiguously where they are dense in their range, so a memory-mapped cache is read
    once, sequentially), moved to ``device`` in their stored dtype and converted there to the compute
    dtype (float64 or float32). Temporaries: two work blocks of the compute dtype allocated once per
    product (the converted hidden rows; the gathered θ rows or the weighted hidden rows), 2 ·
    ``BLOCK_BYTES`` (64 MiB) in float64, half in float32, plus the stored block (a block reads up to
    twice its rows: ≤ ``BLOCK_BYTES`` / 2 for float16; where hidden rows repeat or leave gaps within a
    block, also its converted copy, ≤ 2 · ``BLOCK_BYTES``) — at most about ``4 · BLOCK_BYTES`` (128 MiB),
    whatever N — plus θ in the compute dtype (a copy unless float64 on the CPU) and the
    outputs: n_owners scores, or the k · |V′| · d gradient in the compute dtype (then float64). On cuda the whole cache is copied to the GPU once
    (in its stored dtype) when it takes at most ``RESIDENT_SHARE`` of the free GPU memory.
    """

    def __init__(self, hidden, owner, col, hid, device="cpu", resident=None):
        torch = _import_torch()
        self.torch = torch
        self.device = torch.device(device)
        self.hidden = hidden
        order = np.lexsort((col, hid))
        owner, col, hid = owner[order], col[order], hid[order]
        self.size = hid.size
        step = _entry_block_size(hidden.shape[1])
        self._blocks = []
        for a in range(0, hid.size, step):
            b = min(a + step, hid.size)
            rows = hid[a:b]
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            if hi - lo <= 2 * rows.size:                      # contiguous read of lo..hi
                consecutive = hi - lo == rows.size and bool(np.all(rows[1:] > rows[:-1]))
                local = None if consecutive else torch.from_numpy(rows - lo).to(self.device)
                read = (lo, hi)
            else:                                             # sparse rows: read only them
                unique, inverse = np.unique(rows, return_inverse=True)
                local, read = torch.from_numpy(inverse.astype(np.int64)).to(self.device), unique
            self._blocks.append((read, local, torch.from_numpy(owner[a:b]).to(self.device),
                                 torch.from_numpy(col[a:b]).to(self.device)))
        self._resident = resident                     # a resident cache shared with another operator (subset)
        if self.device.type == "cuda" and resident is None:
            self._resident = self._upload()

    def _upload(self):
        """The whole cache on the GPU (stored dtype) when its bytes are at most RESIDENT_SHARE of the free
        GPU memory, else None (blocks are moved one at a time)."""
        torch = self.torch
        nbytes = int(np.prod(self.hidden.shape)) * self.hidden.dtype.itemsize
        free, _ = torch.cuda.mem_get_info(self.device)
        if nbytes > RESIDENT_SHARE * free:
            return None
        out = torch.empty(tuple(self.hidden.shape), dtype=_torch_dtype(torch, self.hidden.dtype), device=self.device)
        step = max(1, BLOCK_BYTES // max(1, self.hidden.shape[1] * self.hidden.dtype.itemsize))
        for start in range(0, self.hidden.shape[0], step):
            out[start:start + step] = _to_tensor(torch, self.hidden[start:start + step]).to(self.device)
        return out

    def _buffers(self, tdtype):
        """Two (block, d) work tensors of the compute dtype, allocated once per product (torch's CPU
        allocator returns big blocks to the system, and fresh pages cost as much as the arithmetic)."""
        rows = max((b.shape[0] for _, _, _, b in self._blocks), default=0)
        shape = (rows, self.hidden.shape[1])
        return (self.torch.empty(shape, dtype=tdtype, device=self.device),
                self.torch.empty(shape, dtype=tdtype, device=self.device))

    def _hidden_block(self, read, local, into):
        """The block's hidden rows (one per occurrence) converted to ``into``'s dtype, in ``into``."""
        torch = self.torch
        if self._resident is not None:
            stored = self._resident[read[0]:read[1]] if isinstance(read, tuple) else \
                self._resident.index_select(0, torch.from_numpy(read).to(self.device))
        else:
            stored = self.hidden[read[0]:read[1]] if isinstance(read, tuple) else self.hidden[read]
            stored = _to_tensor(torch, stored).to(self.device)
        if local is None:
            return into[:stored.shape[0]].copy_(stored)
        return torch.index_select(stored.to(into.dtype), 0, local, out=into[:local.shape[0]])

    def _dtype(self, dtype):
        return self.torch.float64 if np.dtype(dtype) == np.float64 else self.torch.float32

    def scores(self, theta_rows, n_owners, dtype=np.float64):
        """Per owner, :math:`\\sum_{m: o_m = o} h_m^\\top w_{c_m}` (float64 array; summed in ``dtype``)."""
        torch, tdtype = self.torch, self._dtype(dtype)
        theta = torch.from_numpy(np.ascontiguousarray(theta_rows, dtype=np.float64)).to(self.device, tdtype)
        out = torch.zeros(n_owners, dtype=tdtype, device=self.device)
        hidden_buf, work = self._buffers(tdtype)
        for read, local, owner, col in self._blocks:
            block = self._hidden_block(read, local, hidden_buf)
            gathered = torch.index_select(theta, 0, col, out=work[:col.shape[0]])
            out.index_add_(0, owner, gathered.mul_(block).sum(dim=1))
        return out.to(torch.float64).cpu().numpy()

    def scatter(self, owner_weights, n_columns, dtype=np.float64):
        """``owner_weights`` (n_owners, k) → array (k, n_columns, d), float64 (accumulated in ``dtype``)."""
        torch, tdtype = self.torch, self._dtype(dtype)
        weights = torch.from_numpy(np.ascontiguousarray(owner_weights, dtype=np.float64)).to(self.device, tdtype)
        k = weights.shape[1]
        out = torch.zeros((k, n_columns, self.hidden.shape[1]), dtype=tdtype, device=self.device)
        hidden_buf, work = self._buffers(tdtype)
        for read, local, owner, col in self._blocks:
            block = self._hidden_block(read, local, hidden_buf)
            coef = weights.index_select(0, owner)
            for j in range(k):
                out[j].index_add_(0, col, torch.mul(block, coef[:, j:j + 1], out=work[:col.shape[0]]))
        return out.to(torch.float64).cpu().numpy()


def _torch_dtype(torch, dtype):
    return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
            np.dtype(np.float64): torch.float64}[np.dtype(dtype)]


def _to_tensor(torch, block):
    """A numpy block (a memmap slice too, read-only or not) as a CPU tensor in its dtype, without a copy
    where numpy gives a contiguous one."""
    block = np.ascontiguousarray(block)
    if block.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"hidden states of dtype {block.dtype} are not supported (float16, float32 or float64)")
    if not block.flags.writeable:       # torch warns about read-only memory; the tensor is never written to
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(block)
    return torch.from_numpy(block)


def _ranges(starts, counts):
    """Concatenation of ``arange(s, s + c)`` for each (s, c), vectorised."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(counts)
    shift = np.repeat(starts - (ends - counts), counts)
    return np.arange(total, dtype=np.int64) + shift


class PairDifferenceOperator(PairOperator):
    """The rows :math:`s_i = \\phi(x_i, y_{w,i}) - \\phi(x_i, y_{l,i})` of chosen/rejected candidate pairs,
    given by their products (:class:`loglinear_grpo.operators.PairOperator`), never stored.

    With θ viewed as the |V′| × d matrix of head rows :math:`w_v`:

    * :math:`(S\\theta)_i = f(y_w) - f(y_l)` with :math:`f(y) = \\sum_t h_t^\\top w_{y_t}` (gather rows of θ);
    * :math:`S^\\top u = \\sum_i u_i(\\phi(y_{w,i}) - \\phi(y_{l,i}))`: the scatter-add of :math:`c_m h_m`
      into row :math:`y_m` over token occurrences m, with :math:`c_m` the net weight of m's candidate;
    * rows (for a sampled batch) as CSR, row norms, and the kernel :math:`SS^\\top = \\sum_v A_vA_v^\\top`
      (:math:`A_v`: per pair, the signed sum of the hidden states scored against token v).

    Every product reads the hidden states once, in blocks of about ``BLOCK_BYTES`` (a memory-mapped
    cache is never loaded whole), token by token (:class:`TokenEntries`); the stored values
    (float16, float32 or float64) are converted to float64 block by block, and all products and sums
    are float64: the results equal those of the explicit CSR S up to float64 rounding.

    Parameters
    ----------
    features : LastLayerFeatures
        ``hidden`` may be a ``numpy.memmap`` (see ``llm_head.workdir.load_workdir(mmap=True)``).
    chosen, rejected : array_like of int, shape (N,)
        Global candidate indices of each pair.
    source_fingerprint : str, optional
        A checksum of the features (e.g. the work folder's SHA-256); :meth:`fingerprint` then hashes it
        with the pair structure instead of streaming the hidden states.
    backend : {"auto", "numpy", "torch"}, default "auto"
        What computes :meth:`matvec`, :meth:`rmatvec`, :meth:`rmatmat` and :meth:`approximate_products`:
        numpy (BLAS per token column, :class:`TokenEntries`) or torch (gather / ``index_add_``,
        :class:`TorchEntries`); ``"auto"``: :func:`resolve_backend` (torch on cuda, numpy on a CPU,
        where it is the faster). Either way the exact products are float64 sums (results equal to
        float64 rounding, ~1e-12 relative) and the approximate ones float32 sums (~1e-7 relative,
        results float64 arrays); every margin, gradient and certificate bound uses the float64 ones.
        Rows, row norms, the kernel and the fingerprint are computed by numpy for both backends (the
        fingerprint describes the data, not the backend).
    device : str, default "cpu"
        ``"cpu"`` or ``"cuda"`` (``"cuda:i"``), for the torch backend: the hidden blocks are moved there
        one at a time, or the whole cache once where it fits (:class:`TorchEntries`); results come back
        as numpy float64.
    """

    def __init__(self, features, chosen, rejected, source_fingerprint=None, backend="auto", device="cpu",
                 _resident=None):
        self.features = features
        self.chosen = np.asarray(chosen, dtype=np.int64).ravel()
        self.rejected = np.asarray(rejected, dtype=np.int64).ravel()
        if self.chosen.shape != self.rejected.shape:
            raise ValueError(f"chosen {self.chosen.shape} and rejected {self.rejected.shape} differ in shape")
        n_c = features.n_candidates
        for name, idx in (("chosen", self.chosen), ("rejected", self.rejected)):
            if idx.size and (idx.min() < 0 or idx.max() >= n_c):
                raise ValueError(f"{name} holds candidate indices outside 0..{n_c - 1}")
        self.source_fingerprint = source_fingerprint
        self.backend = resolve_backend(backend, device)
        self.device = str(device)
        self.hidden = features.hidden
        self.hidden_size = features.hidden_size
        self.vocab_size = features.vocab.size
        self.shape = (self.chosen.size, features.dim)
        col = np.searchsorted(features.vocab, features.entry_token)
        # candidate entries of the candidates in use, by hidden row (for S θ and Sᵀ u)
        used = np.zeros(n_c, dtype=bool)
        used[self.chosen] = used[self.rejected] = True
        keep = np.flatnonzero(used[features.entry_candidate])
        if self.backend == "torch":
            # (a subset shares its parent's GPU-resident cache: the per-group subsets are not K uploads)
            self._entries = TorchEntries(self.hidden, features.entry_candidate[keep], col[keep],
                                         features.entry_hidden[keep], device=self.device, resident=_resident)
        else:
            self._entries = TokenEntries(self.hidden, features.entry_candidate[keep], col[keep],
                                         features.entry_hidden[keep])
        # pair entries (pair, token column, hidden row, ±1), by pair then column (rows, norms, kernel)
        by_cand = np.argsort(features.entry_candidate, kind="stable")
        counts = np.bincount(features.entry_candidate, minlength=n_c)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        n = self.chosen.size
        parts = []
        for cands, sign in ((self.chosen, 1.0), (self.rejected, -1.0)):
            pos = by_cand[_ranges(starts[cands], counts[cands])]
            parts.append((np.repeat(np.arange(n), counts[cands]), pos, sign))
        pair = np.concatenate([p for p, _, _ in parts])
        pos = np.concatenate([q for _, q, _ in parts])
        sign = np.concatenate([np.full(q.size, s) for _, q, s in parts])
        order = np.lexsort((col[pos], pair))
        self._p_pair, self._p_col = pair[order], col[pos][order]
        self._p_hid, self._p_sign = features.entry_hidden[pos][order], sign[order]
        self._p_offsets = np.searchsorted(self._p_pair, np.arange(n + 1))
        new = np.r_[True, (self._p_pair[1:] != self._p_pair[:-1]) | (self._p_col[1:] != self._p_col[:-1])]
        self._n_blocks = int(new.sum())                 # stored (pair, token) blocks of the CSR S

    # ---------------------------------------------------------------- products
    def _candidate_weights(self, u):
        n_c = self.features.n_candidates
        return np.bincount(self.chosen, weights=u, minlength=n_c) - np.bincount(self.rejected, weights=u, minlength=n_c)

    def matvec(self, x):
        theta_rows = np.asarray(x, dtype=np.float64).reshape(self.vocab_size, self.hidden_size)
        scores = self._entries.scores(theta_rows, self.features.n_candidates)
        return scores[self.chosen] - scores[self.rejected]

    def rmatmat(self, u):
        u = np.asarray(u, dtype=np.float64)
        weights = np.column_stack([self._candidate_weights(u[:, j]) for j in range(u.shape[1])])
        return self._entries.scatter(weights, self.vocab_size).reshape(u.shape[1], -1).T

    def rmatvec(self, u):
        return self.rmatmat(np.asarray(u, dtype=np.float64)[:, None])[:, 0]

    def approximate_products(self):
        """Sx and Sᵀu with the hidden states and θ in float32 (sums per token run in float32, results
        float64): about twice as fast as the float64 products, relative error about 1e-7. The
        matrix-free solver uses them for its Hessian products only; every margin, gradient and bound
        uses the float64 ones. Both backends (numpy, torch on cpu or cuda) give them the same way."""
        def matvec(x):
            rows = np.asarray(x, dtype=np.float64).reshape(self.vocab_size, self.hidden_size)
            scores = self._entries.scores(rows, self.features.n_candidates, dtype=np.float32)
            return scores[self.chosen] - scores[self.rejected]

        def rmatvec(u):
            weights = self._candidate_weights(np.asarray(u, dtype=np.float64))[:, None]
            return self._entries.scatter(weights, self.vocab_size, dtype=np.float32).reshape(-1)
        return matvec, rmatvec

    # ---------------------------------------------------------------- rows
    def _aggregate(self, positions, local_pair):
        """The non-zero (pair, token) blocks of the rows whose pair entries are ``positions`` (consecutive
        equal (pair, column) form one block): ``(pair, column, vectors)``, vectors of shape (blocks, d)."""
        col = self._p_col[positions]
        if positions.size == 0:
            return local_pair, col, np.zeros((0, self.hidden_size))
        first = np.flatnonzero(np.r_[True, (local_pair[1:] != local_pair[:-1]) | (col[1:] != col[:-1])])
        hid = self._p_hid[positions]
        order = np.argsort(hid, kind="stable")          # read the hidden states in file order
        where = np.empty_like(order)
        where[order] = np.arange(order.size)            # entry m sits in row where[m] of the gathered block
        rows = _gather(self.hidden, hid[order])
        signs = sp.csr_matrix((self._p_sign[positions], where, np.r_[first, positions.size]),
                              shape=(first.size, positions.size))
        return local_pair[first], col[first], signs @ rows

    def _pair_positions(self, index):
        index = np.asarray(index, dtype=np.int64).ravel()
        counts = self._p_offsets[index + 1] - self._p_offsets[index]
        return _ranges(self._p_offsets[index], counts), np.repeat(np.arange(index.size), counts)

    def rows(self, index):
        index = np.asarray(index, dtype=np.int64).ravel()
        positions, local = self._pair_positions(index)
        pair, col, vectors = self._aggregate(positions, local)
        d = self.hidden_size
        indptr = np.r_[0, np.cumsum(np.bincount(pair, minlength=index.size) * d)]
        indices = (col[:, None] * d + np.arange(d)).ravel()
        return sp.csr_matrix((vectors.ravel(), indices, indptr), shape=(index.size, self.shape[1]))

    def _pair_slices(self):
        """Contiguous ranges of pairs whose entries fit one block."""
        budget = _entry_block_size(self.hidden_size)
        n, start = self.shape[0], 0
        while start < n:
            stop = int(np.searchsorted(self._p_offsets, self._p_offsets[start] + budget, side="right")) - 1
            stop = min(n, max(stop, start + 1))
            yield start, stop
            start = stop

    def row_blocks(self, block_rows=None):
        for start, stop in self._pair_slices():
            yield start, stop, self.rows(np.arange(start, stop))

    def row_norms(self):
        cached = getattr(self, "_row_norms", None)
        if cached is None:
            cached = np.zeros(self.shape[0])
            for start, stop in self._pair_slices():
                positions = np.arange(self._p_offsets[start], self._p_offsets[stop])
                pair, _, vectors = self._aggregate(positions, self._p_pair[positions] - start)
                cached[start:stop] = np.sqrt(np.bincount(pair, weights=np.einsum("ij,ij->i", vectors, vectors),
                                                         minlength=stop - start))
            self._row_norms = cached
        return cached

    def gram(self):
        """:math:`SS^\\top = \\sum_v A_v A_v^\\top` over the tokens v of V′, columns of tokens at a time."""
        n = self.shape[0]
        out = np.zeros((n, n))
        by_col = np.lexsort((self._p_pair, self._p_col))
        col_sorted = self._p_col[by_col]
        bounds = np.searchsorted(col_sorted, np.arange(self.vocab_size + 1))
        budget = _entry_block_size(self.hidden_size)
        v = 0
        while v < self.vocab_size:
            w = int(np.searchsorted(bounds, bounds[v] + budget, side="right")) - 1
            w = min(self.vocab_size, max(w, v + 1))
            positions = by_col[bounds[v]:bounds[w]]          # by column, then pair
            block_pair, block_col, vectors = self._aggregate(positions, self._p_pair[positions])
            edges = np.flatnonzero(np.r_[True, block_col[1:] != block_col[:-1], True])
            for a, b in zip(edges[:-1], edges[1:]):
                members = block_pair[a:b]
                out[np.ix_(members, members)] += vectors[a:b] @ vectors[a:b].T
            v = w
        return out

    # ---------------------------------------------------------------- bookkeeping
    def subset(self, index):
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return PairDifferenceOperator(self.features, self.chosen[index], self.rejected[index],
                                      source_fingerprint=self.source_fingerprint, backend=self.backend,
                                      device=self.device, _resident=getattr(self._entries, "_resident", None))

    def explicit_nbytes(self):
        """Bytes of the CSR S: float64 values and int32 column indices of every stored (pair, token) block."""
        return 12 * self._n_blocks * self.hidden_size + 8 * (self.shape[0] + 1)

    def explicit(self, limit_bytes=None):
        from loglinear_grpo.operators import EXPLICIT_LIMIT_BYTES
        limit = EXPLICIT_LIMIT_BYTES if limit_bytes is None else limit_bytes
        if self.explicit_nbytes() > limit:
            return super().explicit(limit)
        return self.rows(np.arange(self.shape[0]))

    def fingerprint(self):
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            h = hashlib.sha256(repr(("PairDifferenceOperator", self.shape, self.hidden_size)).encode())
            for arr in (self.features.vocab, self._p_pair, self._p_col, self._p_hid, self._p_sign):
                h.update(np.ascontiguousarray(arr).tobytes())
            if self.source_fingerprint is not None:
                h.update(str(self.source_fingerprint).encode())
            else:
                hidden = self.hidden
                h.update(str(hidden.dtype).encode())
                step = max(1, (1 << 24) // max(1, hidden.shape[1] * hidden.dtype.itemsize))
                for start in range(0, hidden.shape[0], step):
                    h.update(np.ascontiguousarray(hidden[start:start + step]).tobytes())
            cached = self._fingerprint = h.hexdigest()
        return cached


def pair_rows(features, chosen, rejected, storage="auto", source_fingerprint=None, backend="auto", device="cpu"):
    """S of the pairs as CSR or as a :class:`PairDifferenceOperator`.

    ``storage``: ``"csr"``, ``"implicit"``, or ``"auto"`` — CSR while its predicted size is at most
    ``CSR_LIMIT_BYTES`` (faster for short answers), implicit beyond (memory = the hidden states).
    ``backend`` and ``device``: the implicit operator's (:class:`PairDifferenceOperator`); they are
    checked, and ignored when CSR is returned.
    """
    if storage not in ("auto", "csr", "implicit"):
        raise ValueError(f"storage must be 'auto', 'csr' or 'implicit', got {storage!r}")
    op = PairDifferenceOperator(features, chosen, rejected, source_fingerprint=source_fingerprint,
                                backend=backend, device=device)
    if storage == "implicit" or (storage == "auto" and op.explicit_nbytes() > CSR_LIMIT_BYTES):
        return op
    return features.pair_differences(chosen, rejected)
