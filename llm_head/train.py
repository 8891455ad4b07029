"""Last-layer group-robust fine-tuning: cached LLM features → the core solver → per-group evaluation.

The problem handed to :func:`loglinear_grpo.solve` is exactly the paper's log-linear one:
rows :math:`s_i=\\phi(x_i,y_w)-\\phi(x_i,y_l)` (CSR, or implicit for long answers), reference log-ratios
:math:`r_i = s_i^\\top\\theta_{\\rm ref}` from the frozen layer W₀, Θ = the L2 ball of radius R
around θ_ref, and θ⁽⁰⁾ = θ_ref. There is no second solver here.

Metric names follow TRL's DPO trainer (``rewards/accuracies``, ``rewards/margins``), with
``logps/accuracies`` for the share of pairs whose chosen answer the policy itself prefers.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.special import rel_entr

import loglinear_grpo as lg
from loglinear_grpo.objective import with_aggregates

from .features import LastLayerFeatures, PairDifferenceOperator, pair_rows

#: per-group metrics, and how the ``("aggregate", "extreme")`` row takes each one's worst over groups
METRICS = {"loss": "max", "rewards/accuracies": "min", "rewards/margins": "min", "logps/accuracies": "min",
           "js_distance": "max"}

#: the aggregate rows of :func:`evaluate` (the core's, :data:`loglinear_grpo.objective.AGGREGATES`)
AGGREGATES = lg.objective.AGGREGATES


@dataclass
class HeadProblem:
    """Features of every item, the preference pairs over them, and the reference θ.

    ``pairs`` columns: ``item``, ``group`` (0..K−1), ``chosen``, ``rejected`` (candidate indices within
    the item) and ``split``. Overlapping groups (the union of several groupings,
    :func:`llm_head.data.pair_indices` with ``union=``): no ``group`` column but one ``group/<grouping>``
    per grouping, each pair's group in that grouping (an index into ``group_names``, whose names are
    ``"<grouping>=<value>"``); :attr:`union` lists the groupings. ``item_probs`` (optional): each item's target distribution over its
    candidates (the survey answers), for the Jensen–Shannon distance. ``features_sha256``: the
    checksum of the work folder's features (recorded by every run trained on them). ``storage``: S as
    CSR or implicit (:func:`llm_head.features.pair_rows`; ``"auto"`` chooses by the CSR's predicted size).
    """

    features: LastLayerFeatures
    pairs: pd.DataFrame
    theta_ref: np.ndarray
    group_names: list
    item_probs: list | None = None
    features_sha256: str | None = None
    storage: str = "auto"

    def __post_init__(self):
        self.union = tuple(str(c)[len("group/"):] for c in self.pairs.columns if str(c).startswith("group/"))
        missing = {"item", "chosen", "rejected", "split"} - set(self.pairs.columns)
        if not self.union and "group" not in self.pairs.columns:
            missing.add("group")
        if missing:
            raise ValueError(f"pairs is missing columns {sorted(missing)}")
        if self.union and "group" in self.pairs.columns:
            raise ValueError("pairs has both a group column and group/<grouping> columns: give labels or the union "
                             "of groupings, not both")
        for grouping in self.union:          # each grouping's groups are named "<grouping>=<value>"
            codes = np.unique(self.pairs[f"group/{grouping}"].to_numpy())
            if codes.min() < 0 or codes.max() >= len(self.group_names):
                raise ValueError(f"pairs: group/{grouping} holds indices outside 0..{len(self.group_names) - 1}")
            wrong = [str(self.group_names[c]) for c in codes if not str(self.group_names[c]).startswith(grouping + "=")]
            if wrong:
                raise ValueError(f"pairs: group/{grouping} points at groups {wrong[:3]}, whose names are not "
                                 f"'{grouping}=<value>' (llm_head.data.pair_indices with union= makes them)")
        self.theta_ref = np.asarray(self.theta_ref, dtype=np.float64)
        if self.theta_ref.shape != (self.features.dim,):
            raise ValueError(f"theta_ref must have shape ({self.features.dim},), got {self.theta_ref.shape}")
        if np.any(self.pairs["chosen"].to_numpy() == self.pairs["rejected"].to_numpy()):
            raise ValueError("a pair has chosen == rejected")
        if self.storage not in ("auto", "csr", "implicit"):
            raise ValueError(f"storage must be 'auto', 'csr' or 'implicit', got {self.storage!r}")
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

    def _group_codes(self, table):
        """Each pair's group (labels, shape (n,)) or groups (the union: shape (n, J), one per grouping)."""
        if self.union:
            return table[[f"group/{g}" for g in self.union]].to_numpy(dtype=np.int64)
        return table["group"].to_numpy()

    def groups_in(self, split):
        """The groups that have pairs in ``split`` (indices into ``group_names``)."""
        return np.unique(self._group_codes(self.split_pairs(split)))

    def groupings(self):
        """{grouping: its group names} for the union of several groupings (``{}`` for plain labels)."""
        return {g: [n for n in self.group_names if str(n).startswith(g + "=")] for g in self.union}

    def data(self, split="train"):
        """:class:`loglinear_grpo.PreferenceData` of one split (cached). A group with no pair in the
        split is left out of it (with a warning): a group-robust objective over an empty group is
        undefined."""
        if split not in self._cache:
            table = self.split_pairs(split)
            present = self.groups_in(split)
            if present.size < len(self.group_names):
                absent = [self.group_names[g] for g in range(len(self.group_names)) if g not in set(present)]
                warnings.warn(f"split {split!r} has no pairs of group(s) {absent}: left out of it", stacklevel=2)
            relabel = np.full(len(self.group_names), -1)
            relabel[present] = np.arange(present.size)
            f = self.features
            chosen = f.candidate_index(table["item"], table["chosen"])
            rejected = f.candidate_index(table["item"], table["rejected"])
            diff = pair_rows(f, chosen, rejected, self.storage, source_fingerprint=self.features_sha256)
            ref = diff.matvec(self.theta_ref) if isinstance(diff, PairDifferenceOperator) else diff @ self.theta_ref
            codes = relabel[self._group_codes(table)]
            if self.union:                   # the N × K membership: a pair in one group of each grouping
                n, j = codes.shape
                codes = sp.csr_matrix((np.ones(n * j), (np.repeat(np.arange(n), j), codes.ravel())),
                                      shape=(n, present.size))
            self._cache[split] = lg.PreferenceData(diff, codes, ref_margin=ref,
                                                   group_names=[self.group_names[g] for g in present])
        return self._cache[split]


def solver_config(problem, loss="dpo", beta=0.1, method="group_robust", estimator="auto", radius=1.0,
                  split="train", **config_kwargs):
    """:func:`loglinear_grpo.make_config` of :func:`train`: every setting validated (and the step sizes
    resolved) before anything is solved or written. Extra keywords (``steps``, ``tol``, ``chi``,
    ``seed``, ``step_size``, ...) as :func:`loglinear_grpo.make_config`."""
    return lg.make_config(problem.data(split), loss=loss, beta=beta, method=method, estimator=estimator,
                          radius=radius, center=problem.theta_ref, **config_kwargs)


def train(problem, loss="dpo", beta=0.1, method="group_robust", estimator="auto", radius=1.0, split="train",
          config=None, **solve_kwargs):
    """:func:`loglinear_grpo.solve` on the split's pairs, Θ = ball(θ_ref, ``radius``), θ⁽⁰⁾ = θ_ref; the
    result carries its certificate (``converged``, ``gap``). ``config`` (from :func:`solver_config`):
    the settings validated beforehand — then ``loss`` … ``radius`` are its, and ``solve_kwargs`` only
    the run-time options of :func:`loglinear_grpo.solve` (``progress``, ``callback``, ...)."""
    if config is not None:
        return lg.solve(problem.data(split), config, **solve_kwargs)
    return lg.solve(problem.data(split), loss=loss, beta=beta, method=method, estimator=estimator,
                    radius=radius, center=problem.theta_ref, **solve_kwargs)


def evaluate(problem, theta, loss="dpo", beta=0.1, split="test"):
    """Per-group metrics of θ on a split, and four aggregates over the groups.

    Columns (TRL's names): ``loss`` (the IPO/DPO/hinge group loss), ``rewards/accuracies`` (share of
    pairs with :math:`h_i = s_i^\\top\\theta - r_i > 0`), ``rewards/margins`` (mean β·h),
    ``logps/accuracies`` (share with :math:`\\pi_\\theta(y_w|x) > \\pi_\\theta(y_l|x)`, i.e.
    :math:`s_i^\\top\\theta > 0`) and, when the items carry target distributions, ``js_distance``:
    the Jensen–Shannon distance (base 2) between the policy's distribution over the candidates and
    the target; then ``n_pairs`` and ``worst_group`` (a string, set in the ``worst`` row only).

    Returns
    -------
    DataFrame
        Indexed by ``(kind, group)`` as :func:`loglinear_grpo.group_metrics`: one row ``("group",
        name)`` per group of ``problem.group_names`` (a group without pairs in the split gets a row of
        NaN), then the rows ``("aggregate", key)`` of :data:`AGGREGATES`:

        * ``"worst"`` — the worst group, the one with the largest loss: *its* row (every column, its
          ``n_pairs`` included, is that one group's), and its name in ``worst_group``;
        * ``"extreme"`` — each column's worst over the groups (max ``loss`` and ``js_distance``, min
          of the others), so it mixes groups; ``n_pairs`` empty;
        * ``"mean over groups"`` — the unweighted mean of the group rows; ``n_pairs`` empty;
        * ``"mean over pairs"`` — the pair-weighted mean (Σ_g n_g·m_g / Σ_g n_g, i.e. the metric over
          all the split's pairs at once); ``n_pairs`` = all the split's pairs.

        A group named like an aggregate keeps its own row; ``table.loc["group"]`` is the per-group
        table, ``table.loc["aggregate"]`` the aggregates.

        Overlapping groups (the union of several groupings, :meth:`HeadProblem.groupings`): the group
        rows are named ``"<grouping>=<value>"``, ``mean over pairs`` counts every pair once, and one more
        row per grouping, ``("aggregate", "worst <grouping>")``, is that grouping's worst group (its
        row, named in ``worst_group``): the worst country and the worst age band side by side.
    """
    data = problem.data(split)
    theta = np.asarray(theta, dtype=np.float64)
    full = lg.group_metrics(theta, data, loss, beta)
    table = full.loc["group"]
    pair_values = {"logps/accuracies": (data.matvec(theta) > 0).astype(np.float64)}
    if problem.candidate_targets is not None:
        pairs = problem.split_pairs(split)
        js = js_distances(problem.features, theta, problem.candidate_targets)[pairs["item"].to_numpy()]
        pair_values["js_distance"] = js
    for column, values in pair_values.items():
        table[column] = data.membership.means(values)
    table = table.reindex(pd.Index(list(problem.group_names), name="group"))
    columns = [c for c in METRICS if c in table.columns]
    groups = table[columns + ["n_pairs"]].astype({c: "float64" for c in columns} | {"n_pairs": "Int64"})
    aggregates = lg.objective.group_aggregates(groups, METRICS)
    if data.overlapping:         # every pair once (the n_g-weighted mean would count a pair once per group)
        for column in columns:
            aggregates.loc["mean over pairs", column] = (float(np.mean(pair_values[column])) if column in pair_values
                                                         else full.loc[("aggregate", "mean over pairs"), column])
        aggregates.loc["mean over pairs", "n_pairs"] = data.n_samples
    for grouping, names in problem.groupings().items():
        part = groups.loc[names]
        part = part[part["n_pairs"].fillna(0).to_numpy() > 0]
        if len(part):
            worst = part["loss"].astype(np.float64).idxmax()
            aggregates.loc[f"worst {grouping}"] = part.loc[worst].to_dict() | {"worst_group": str(worst)}
    aggregates = aggregates.astype({c: "float64" for c in columns} | {"n_pairs": "Int64"})
    groups["worst_group"] = pd.Series(pd.NA, index=groups.index, dtype=object)
    table = with_aggregates(groups, aggregates)
    if problem.union:            # every group row marked with its grouping (and each grouping's worst row)
        of = {name: g for g, names in problem.groupings().items() for name in names}
        of_row = {f"worst {g}": g for g in problem.union}
        table.insert(0, "grouping", [of[key] if kind == "group" else of_row.get(key, "") for kind, key in table.index])
    return table


def worst_group_name(table, grouping=None):
    """The worst group of an :func:`evaluate` table (of one grouping's groups: its ``worst <grouping>``
    row), or ``"tie: k groups"`` when k > 1 groups share the largest loss (within a relative 10⁻¹²) — the
    frozen model gives every group the loss at margin 0 (log 2 for DPO), and then no group is the worst."""
    row = "worst" if grouping is None else f"worst {grouping}"
    groups = table.loc["group"]
    if grouping is not None:
        groups = groups[groups["grouping"] == grouping]
    losses = groups["loss"].dropna().to_numpy(dtype=float)
    worst = float(table.loc[("aggregate", row), "loss"])
    tied = int(np.sum(np.isclose(losses, worst, rtol=1e-12, atol=0.0)))
    return f"tie: {tied} groups" if tied > 1 else str(table.loc[("aggregate", row), "worst_group"])


def objective_meaning(method, chi=1.0, adjustment=0.0):
    """What :attr:`loglinear_grpo.SolveResult.value` of a ``train`` run is, in words (the words of
    :attr:`loglinear_grpo.SolverConfig.objective_name`, on the train split): ``"worst-group loss
    (train)"`` (group robust, χ = 1), the χ mixture ``"(1−χ)·mean-over-groups + χ·worst-group loss"``,
    ``"mean loss over pairs (train)"`` (vanilla), ``"mean loss over groups (train)"`` (importance
    sampling: unweighted over groups); each of them of the adjusted losses L_g + C/√N_g when
    ``adjustment`` C > 0."""
    name = lg.objective.objective_name(method, chi, bool(adjustment))
    return f"{name} (train)"


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
