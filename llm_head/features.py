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
(token, hidden row). φ and the difference rows :math:`s = \\phi(x,y_w)-\\phi(x,y_l)` are built
on demand as ``scipy.sparse`` CSR matrices with :math:`d` non-zeros per answer token.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


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
        """:math:`f_\\theta(x, y) = \\theta^\\top\\phi(x, y)` for every candidate."""
        return self.phi() @ np.asarray(theta, dtype=np.float64)

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
