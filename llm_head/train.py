"""Last-layer group-robust fine-tuning: cached LLM features → the core solver → per-group evaluation.

The problem handed to :func:`loglinear_grpo.solve` is exactly the paper's log-linear one:
rows :math:`s_i=\\phi(x_i,y_w)-\\phi(x_i,y_l)` (sparse), reference log-ratios
:math:`r_i = s_i^\\top\\theta_{\\rm ref}` from the frozen layer W₀, Θ = the L2 ball of radius R
around θ_ref, and θ⁽⁰⁾ = θ_ref. There is no second solver here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import rel_entr

import loglinear_grpo as lg

from .features import LastLayerFeatures


@dataclass
class HeadProblem:
    """Features of every item, the preference pairs over them, and the reference θ.

    ``pairs`` columns: ``item``, ``group``, ``chosen``, ``rejected`` (option indices within the
    item) and ``split``. ``item_probs`` (optional): each item's target distribution over its
    candidates (the survey answers), for the Jensen–Shannon distance.
    """

    features: LastLayerFeatures
    pairs: pd.DataFrame
    theta_ref: np.ndarray
    group_names: list
    item_probs: list | None = None

    def __post_init__(self):
        missing = {"item", "group", "chosen", "rejected", "split"} - set(self.pairs.columns)
        if missing:
            raise ValueError(f"pairs is missing columns {sorted(missing)}")
        self.theta_ref = np.asarray(self.theta_ref, dtype=np.float64)
        if self.theta_ref.shape != (self.features.dim,):
            raise ValueError(f"theta_ref must have shape ({self.features.dim},), got {self.theta_ref.shape}")
        if np.any(self.pairs["chosen"].to_numpy() == self.pairs["rejected"].to_numpy()):
            raise ValueError("a pair has chosen == rejected")
        self._cache = {}
        self.candidate_targets = None
        if self.item_probs is not None:
            if len(self.item_probs) != self.features.n_items:
                raise ValueError(f"item_probs has {len(self.item_probs)} entries for {self.features.n_items} items")
            flat = np.concatenate([np.asarray(p, dtype=np.float64) for p in self.item_probs])
            if flat.shape != (self.features.n_candidates,):
                raise ValueError("item_probs must give one probability per candidate of every item")
            self.candidate_targets = flat

    def split_pairs(self, split):
        table = self.pairs[self.pairs["split"] == split]
        if table.empty:
            raise ValueError(f"no pairs in split {split!r}")
        return table

    def data(self, split="train"):
        """:class:`loglinear_grpo.PreferenceData` of one split (cached)."""
        if split not in self._cache:
            table = self.split_pairs(split)
            f = self.features
            chosen = f.candidate_index(table["item"], table["chosen"])
            rejected = f.candidate_index(table["item"], table["rejected"])
            diff = f.pair_differences(chosen, rejected)
            self._cache[split] = lg.PreferenceData(diff, table["group"].to_numpy(), ref_margin=diff @ self.theta_ref,
                                                   group_names=list(self.group_names),
                                                   n_groups=len(self.group_names))
        return self._cache[split]


def train(problem, loss="ipo", beta=0.1, method="group_robust", estimator="auto", radius=1.0, split="train",
          **solve_kwargs):
    """:func:`loglinear_grpo.solve` on the split's pairs, Θ = ball(θ_ref, ``radius``), θ⁽⁰⁾ = θ_ref; the
    result carries its certificate (``converged``, ``gap``)."""
    return lg.solve(problem.data(split), loss=loss, beta=beta, method=method, estimator=estimator,
                    radius=radius, center=problem.theta_ref, **solve_kwargs)


def evaluate(problem, theta, loss="ipo", beta=0.1, split="test"):
    """Per-group metrics of θ on a split, plus ``worst`` and ``mean`` rows.

    Columns: ``loss`` (the IPO/DPO group loss), ``reward_accuracy`` (share of pairs with
    :math:`h_i = s_i^\\top\\theta - r_i > 0`), ``logprob_accuracy`` (share with
    :math:`\\pi_\\theta(y_w|x) > \\pi_\\theta(y_l|x)`, i.e. :math:`s_i^\\top\\theta > 0`),
    ``reward_margin`` (mean β·h) and, when the items carry survey distributions, ``js_distance``:
    the Jensen–Shannon distance (base 2) between the policy's answer distribution over the
    candidates and the country's survey distribution. ``worst`` holds the max of the losses and
    distances and the min of the accuracies; ``mean`` the unweighted mean over groups.
    """
    data = problem.data(split)
    theta = np.asarray(theta, dtype=np.float64)
    table = lg.group_metrics(theta, data, loss, beta).drop(index="worst")
    table = table.rename(columns={"rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin"})
    policy_margin = np.asarray(data.diff @ theta).ravel()
    counts = data.group_sizes
    table["logprob_accuracy"] = np.bincount(data.groups, weights=(policy_margin > 0).astype(float),
                                            minlength=data.n_groups) / counts
    if problem.candidate_targets is not None:
        pairs = problem.split_pairs(split)
        js = js_distances(problem.features, theta, problem.candidate_targets)[pairs["item"].to_numpy()]
        table["js_distance"] = np.bincount(pairs["group"].to_numpy(), weights=js,
                                           minlength=data.n_groups) / counts
    worst = {c: (table[c].min() if "accuracy" in c or c == "reward_margin" else table[c].max())
             for c in table.columns}
    worst["n_pairs"] = int(counts.sum())
    mean = table.mean(numeric_only=True).to_dict()
    mean["n_pairs"] = int(counts.sum())
    table.loc["worst"] = pd.Series(worst)
    table.loc["mean"] = pd.Series(mean)
    table["n_pairs"] = table["n_pairs"].astype(int)
    return table


def js_distances(features, theta, targets):
    r"""Jensen–Shannon distance (base 2) between π_θ(·|x) over Y(x) and ``targets``, for every item:

    .. math:: \mathrm{JS}(p, q) = \sqrt{\tfrac{1}{2\ln 2}\,[\mathrm{KL}(p\|m) + \mathrm{KL}(q\|m)]},
              \quad m = (p+q)/2.
    """
    p = np.exp(features.candidate_log_probs(theta))
    m = 0.5 * (p + targets)
    terms = rel_entr(p, m) + rel_entr(targets, m)
    return np.sqrt(np.maximum(np.add.reduceat(terms, features.candidate_offsets[:-1]), 0.0) / (2.0 * np.log(2.0)))


def alpha_history(history):
    """Group weights α over training (rows: logged steps; columns: groups) from a ``SolveResult``
    or its ``history`` table."""
    hist = getattr(history, "history", history)
    cols = [c for c in hist.columns if c.startswith("alpha/")]
    return hist.set_index("step")[cols].rename(columns=lambda c: c[len("alpha/"):])
