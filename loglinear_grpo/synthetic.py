"""Synthetic group linear bandits of the paper's §5.1 (and Appendix D.2's feature maps).

States :math:`x\\in[0,1]^m` (uniform), actions :math:`y\\in\\{0..A-1\\}`, groups
:math:`g\\in\\{0..K-1\\}`; true reward :math:`r^*(x,y,g) = \\langle\\phi(x,y,g),\\theta^*_g\\rangle`.
With :math:`u = y/A + 1` and feature dimension 2m, the paper's map (``"swapped"``) is

.. math::

    \\phi_i(x,y,g) = \\begin{cases} u\\cos(\\pi x_{\\lfloor i/2\\rfloor}) & i \\bmod 2 = g \\bmod 2\\\\
                     \\sin(\\pi x_{\\lfloor i/2\\rfloor})/u & \\text{otherwise,}\\end{cases}

``"same"`` gives every group group 0's map, and ``"flipped"`` gives odd groups
:math:`\\phi_{2i} = u\\sin(\\pi x_i)`, :math:`\\phi_{2i+1} = \\cos(\\pi x_i)/u`. The policy is
log-linear in the same features with a uniform reference, so each labelled pair becomes a row
:math:`s = \\phi(x,y_w,g) - \\phi(x,y_l,g)` of :class:`~loglinear_grpo.PreferenceData`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import PreferenceData

FEATURE_MAPS = ("swapped", "same", "flipped")
RESPONSES = ("uniform", "near", "far")

#: the paper's three scenarios (§5.1): group weights and response distributions
SCENARIOS = {
    "imbalanced_sizes": {"weights": (0.2, 0.8), "responses": ("uniform", "uniform")},
    "imbalanced_difficulty": {"weights": (0.5, 0.5), "responses": ("near", "far")},
    "imbalanced_both": {"weights": (0.2, 0.8), "responses": ("near", "far")},
}

#: the paper's names for them (§5.1 (i)–(iii); Figures 2, 3 and 4)
SCENARIO_LABELS = {
    "imbalanced_sizes": "(i) imbalanced sizes, same responses",
    "imbalanced_difficulty": "(ii) equal sizes, different responses",
    "imbalanced_both": "(iii) imbalanced sizes and responses",
}
SCENARIO_FIGURES = {"imbalanced_sizes": "Figure 2", "imbalanced_difficulty": "Figure 3",
                    "imbalanced_both": "Figure 4"}


@dataclass(frozen=True)
class GroupLinearBandit:
    """A group linear bandit (paper §5.1). Defaults are the paper's instance.

    Parameters
    ----------
    state_dim : int
        m (paper: 2); features have dimension 2m.
    n_actions : int
        A (paper: 8, actions 0..7).
    n_groups : int
        K (paper: 2).
    feature_map : {"swapped", "same", "flipped"}
    theta_star : array (K, 2m), optional
        True reward parameters; default θ*_g = (1,3,1,3,…) for even g and (3,1,3,1,…) for odd g.
    """

    state_dim: int = 2
    n_actions: int = 8
    n_groups: int = 2
    feature_map: str = "swapped"
    theta_star: np.ndarray | None = None

    def __post_init__(self):
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}")
        for name in ("state_dim", "n_actions", "n_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.n_actions < 2:
            raise ValueError("n_actions must be >= 2 (a pair needs two actions)")
        if self.theta_star is None:
            even = np.tile([1.0, 3.0], self.state_dim)
            star = np.stack([even if g % 2 == 0 else even[::-1].copy() for g in range(self.n_groups)])
        else:
            star = np.asarray(self.theta_star, dtype=np.float64)
            if star.shape != (self.n_groups, 2 * self.state_dim):
                raise ValueError(f"theta_star must have shape ({self.n_groups}, {2 * self.state_dim})")
        object.__setattr__(self, "theta_star", star)

    @property
    def dim(self):
        return 2 * self.state_dim

    def features(self, x, y, g):
        """φ(x, y, g) for arrays x (n, m), y (n,) and g (n,): shape (n, 2m)."""
        x = np.atleast_2d(x)
        u = (np.asarray(y, dtype=np.float64) / self.n_actions + 1.0)[:, None]
        cos, sin = np.cos(np.pi * x), np.sin(np.pi * x)
        odd = (np.asarray(g) % 2 == 1)[:, None]
        if self.feature_map == "same":
            odd = np.zeros_like(odd)
        phi = np.empty((x.shape[0], self.dim))
        if self.feature_map == "flipped":
            phi[:, 0::2] = np.where(odd, u * sin, u * cos)
            phi[:, 1::2] = np.where(odd, cos / u, sin / u)
        else:
            phi[:, 0::2] = np.where(odd, sin / u, u * cos)
            phi[:, 1::2] = np.where(odd, u * cos, sin / u)
        return phi

    def reward(self, x, y, g):
        """r*(x, y, g) = ⟨φ(x, y, g), θ*_g⟩, shape (n,)."""
        return np.einsum("ij,ij->i", self.features(x, y, g), self.theta_star[np.asarray(g)])

    def all_action_features(self, x, g):
        """φ(x, y, g) for every action: shape (n, A, 2m)."""
        n = x.shape[0]
        ys = np.tile(np.arange(self.n_actions), n)
        return self.features(np.repeat(x, self.n_actions, axis=0), ys, np.repeat(g, self.n_actions)) \
            .reshape(n, self.n_actions, self.dim)

    # ------------------------------------------------------------------ data
    def sample(self, n, weights, responses, deterministic_ratio=1.0, seed=0):
        """Draw ``n`` labelled pairs.

        Parameters
        ----------
        n : int
        weights : sequence of K floats
            Group shares of ``n`` (rounded to integers that sum to ``n``; order shuffled).
        responses : sequence of K of {"uniform", "near", "far"}
            How each group's two actions are drawn: two distinct actions uniformly; y₁ uniform
            and y₂ = y₁ ± 1 (reflected at the ends: hard to tell apart); or y₂ = (y₁ + A/2) mod A
            (easy).
        deterministic_ratio : float or sequence of K floats
            Chance that a pair is labelled by its argmax reward rather than by Bradley–Terry,
            P(y₂ ≻ y₁) = σ(r₂ − r₁) (paper runs: 1).
        seed : int

        Returns
        -------
        BanditSample
        """
        k = self.n_groups
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (k,) or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"weights must be {k} non-negative numbers")
        if len(responses) != k or any(r not in RESPONSES for r in responses):
            raise ValueError(f"responses must be {k} of {RESPONSES}, got {responses!r}")
        det = np.broadcast_to(np.asarray(deterministic_ratio, dtype=np.float64), (k,))
        rng = np.random.default_rng(seed)
        share = weights / weights.sum() * n
        sizes = np.floor(share).astype(int)
        sizes[np.argsort(share - sizes)[::-1][: n - sizes.sum()]] += 1
        groups = rng.permutation(np.repeat(np.arange(k), sizes))
        x = rng.random((n, self.state_dim))
        a = self.n_actions
        y1 = rng.integers(0, a, n)
        kinds = np.asarray(responses)[groups]
        other = (y1 + rng.integers(1, a, n)) % a                       # uniform over the others
        step = np.where(rng.random(n) < 0.5, -1, 1)
        near = y1 + step
        near = np.where(near < 0, 1, np.where(near >= a, a - 2, near))  # reflect at the ends
        far = (y1 + a // 2) % a
        y2 = np.select([kinds == "uniform", kinds == "near"], [other, near], far)
        r1, r2 = self.reward(x, y1, groups), self.reward(x, y2, groups)
        bt = rng.random(n) < 1.0 / (1.0 + np.exp(-(r2 - r1)))
        two_wins = np.where(rng.random(n) < det[groups], r2 > r1, bt)
        chosen = np.where(two_wins, y2, y1)
        rejected = np.where(two_wins, y1, y2)
        data = PreferenceData.from_features(self.features(x, chosen, groups),
                                            self.features(x, rejected, groups), groups,
                                            group_names=[f"group {g}" for g in range(k)])
        return BanditSample(data=data, states=x, groups=groups, chosen=chosen, rejected=rejected)

    def reward_errors(self, theta, states, groups):
        """Per-group reward error (paper §5.1, "Max Reward Error"):

        .. math::

            E_{x\\sim D_g}\\big[\\max_y r^*(x,y,g) - r^*(x, \\arg\\max_y\\langle\\phi(x,y,g),\\hat\\theta\\rangle, g)\\big],

        shape (K,). The max over groups is the paper's metric.
        """
        phi = self.all_action_features(states, groups)                 # (n, A, d)
        true = np.einsum("nad,nd->na", phi, self.theta_star[groups])
        pick = np.argmax(phi @ theta, axis=1)
        regret = true.max(axis=1) - true[np.arange(len(states)), pick]
        return np.bincount(groups, weights=regret, minlength=self.n_groups) / \
            np.maximum(np.bincount(groups, minlength=self.n_groups), 1)


@dataclass(frozen=True)
class BanditSample:
    """Labelled pairs: the solver's ``data`` plus the raw states, groups and actions."""

    data: PreferenceData
    states: np.ndarray
    groups: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray


def scenario_data(scenario, n=300, n_val=None, seed=0, feature_map="swapped", deterministic_ratio=1.0,
                  bandit=None):
    """Train and validation samples for one of :data:`SCENARIOS` (validation drawn the same way)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {sorted(SCENARIOS)}, got {scenario!r}")
    spec = SCENARIOS[scenario]
    bandit = bandit or GroupLinearBandit(feature_map=feature_map)
    n_val = n if n_val is None else n_val
    train = bandit.sample(n, spec["weights"], spec["responses"], deterministic_ratio, seed=2 * seed)
    val = bandit.sample(n_val, spec["weights"], spec["responses"], deterministic_ratio, seed=2 * seed + 1)
    return bandit, train, val


def disagreeing_groups(sizes, dim, *, seed=0, scale=4.0, feature_scale=1.0, row_norm=1.0, ref_scale=0.0):
    """A random problem whose groups disagree: group g's pairs are labelled by Bradley–Terry with its
    own reward weights :math:`w_g = \\text{scale}\\cdot(b + 1.5 z_g)/\\lVert b + 1.5 z_g\\rVert` (a shared
    b and a group term z_g, both standard normal).

    Rows are ``feature_scale`` × standard normal, shrunk to norm ≤ ``row_norm``; the winner is the first
    answer with probability σ(sᵀw_g) (else the row is negated); ``ref_margin`` is ``ref_scale`` ×
    standard normal (0: none). Returns a :class:`PreferenceData` with the groups stored in order.
    """
    rng = np.random.default_rng(seed)
    base = rng.normal(size=dim)
    rows, groups = [], []
    for g, n in enumerate(sizes):
        w = base + 1.5 * rng.normal(size=dim)
        w *= scale / np.linalg.norm(w)
        s = rng.normal(size=(n, dim)) * feature_scale
        s *= row_norm / np.maximum(row_norm, np.linalg.norm(s, axis=1))[:, None]
        s[rng.random(n) >= 1.0 / (1.0 + np.exp(-(s @ w)))] *= -1.0
        rows.append(s)
        groups.append(np.full(n, g))
    ref = rng.normal(size=sum(sizes)) * ref_scale if ref_scale else None
    return PreferenceData(np.vstack(rows), np.concatenate(groups), ref_margin=ref)
