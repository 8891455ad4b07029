"""Group losses, their gradients and per-group metrics (paper Eqs. (7)–(9)).

Every full pass costs O(N·d) and runs over ``diff`` in row blocks, so it never copies ``S``
and never loads a memory-mapped ``S`` whole. The hot path of the full-batch solver is
:func:`loglinear_grpo.kernels.losses_and_group_gradients` (one read of S per iteration).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ._validation import check_loss, check_positive_finite, check_vector
from .data import PreferenceData
from .losses import get_loss


def margins(theta, data):
    """:math:`h_i(\\theta) = s_i^\\top\\theta - r_i` for every pair (§3.1), shape (N,)."""
    return data.matvec(theta) - data.ref_margin


def group_means(values, data):
    """:math:`\\frac{1}{N_g}\\sum_{i\\in D_g} v_i` for every group, shape (K,)."""
    return data.membership.means(values)


def _group_losses(theta, data, loss, beta):
    return group_means(get_loss(loss).value(margins(theta, data), beta), data)


def group_losses(theta, data, loss="dpo", beta=0.1):
    """Per-group mean losses :math:`L_g(\\theta) = \\frac{1}{N_g}\\sum_{i\\in D_g}\\ell(h_i(\\theta))`.

    Eq. (7) for DPO; the same mean for IPO (§4.1) and the hinge. The GRPO objective is
    :math:`\\max_g L_g(\\theta)`.

    Parameters
    ----------
    theta : array_like, shape (d,)
    data : PreferenceData
    loss : {"dpo", "sigmoid", "ipo", "hinge"}
    beta : float > 0

    Returns
    -------
    ndarray, shape (K,)
    """
    theta, loss, beta = _checked(theta, data, loss, beta)
    return _group_losses(theta, data, loss, beta)


def worst_group_loss(theta, data, loss="dpo", beta=0.1):
    """:math:`\\mathcal{L}_{GR}(\\theta) = \\max_g L_g(\\theta)` (Eq. (7))."""
    return float(np.max(group_losses(theta, data, loss, beta)))


def weighted_gradient(theta, weights, data, loss, beta):
    """:math:`\\nabla_\\theta \\sum_g w_g L_g(\\theta) = S^\\top u`,
    :math:`u_i = \\frac{w_{g_i}}{N_{g_i}}\\,\\ell'(h_i)` (Eq. (11) summed over the data)."""
    h = margins(theta, data)
    pair_w = data.membership.spread(weights / data.group_sizes)
    return data.rmatvec(pair_w * get_loss(loss).derivative(h, beta))


def minimax_value(losses, chi=1.0, weights=None, shift=None):
    """The objective at θ from its group losses L_g(θ): Eq. (9)'s inner max,
    :math:`\\max_{\\alpha\\in\\Delta}\\sum_g((1-\\chi)/K + \\chi\\alpha_g)L_g = (1-\\chi)\\,\\mathrm{mean}_g L_g + \\chi\\max_g L_g`
    (χ = 1: the worst-group loss, Eq. (7); Appendix B.4 for χ), or :math:`\\sum_g w_g L_g` for fixed
    weights (importance sampling, vanilla). With a group adjustment (``shift`` = c, from
    :func:`group_adjustment`) every :math:`L_g` is replaced by the adjusted :math:`L_g + c_g`."""
    if shift is not None:
        losses = losses + shift
    if weights is not None:
        return float(weights @ losses)
    return float((1.0 - chi) * losses.mean() + chi * losses.max())


def objective_name(method="group_robust", chi=1.0, adjusted=False):
    """What the value of a method's objective is, in words: ``"worst-group loss"`` (group robust,
    χ = 1, Eq. (7)), the χ mixture of Appendix B.4, ``"mean loss over pairs"`` (vanilla),
    ``"mean loss over groups"`` (importance sampling); of the adjusted losses :math:`L_g + c_g` when
    ``adjusted``."""
    if method == "vanilla":
        name = "mean loss over pairs"
    elif method == "importance_sampling":
        name = "mean loss over groups"
    elif method == "group_robust":
        chi = float(chi)
        name = "worst-group loss" if chi == 1.0 else f"{1 - chi:g}·mean-over-groups + {chi:g}·worst-group loss"
    else:
        raise ValueError(f"unknown method {method!r}")
    return name.replace(" loss", " adjusted loss", 1) if adjusted else name


def trivial_bound(chi=1.0, weights=None, shift=None, n_groups=1):
    """The bound every loss gives for free: each :math:`\\ell \\ge 0`, so :math:`L_g + c_g \\ge c_g` and
    the optimum is at least the objective of the shifts alone, :func:`minimax_value` at L = 0 (0 without
    an adjustment)."""
    if shift is None:
        return 0.0
    return minimax_value(np.zeros(np.size(shift)), chi, weights, shift)


def group_adjustment(adjustment, group_sizes, group_names=None):
    """The group adjustment of Sagawa et al. (2020, "group adjustments"): the shifts
    :math:`c_g = C_g/\\sqrt{N_g}` that make the objective

    .. math:: \\min_{\\theta\\in\\Theta}\\max_g\\;\\big(L_g(\\theta) + C_g/\\sqrt{N_g}\\big),

    so that a small group, whose empirical loss underestimates its expected loss by more (the gap of
    a mean over N_g pairs shrinks as :math:`1/\\sqrt{N_g}`), is weighted as if its loss were higher.
    ``group_DRO``'s ``--generalization_adjustment`` and the GRPO authors' ``adj`` are the same shift.

    Parameters
    ----------
    adjustment : None, float ≥ 0, array_like (K,) of floats ≥ 0, or dict {group name: float ≥ 0}
        C: one value for every group, one per group (in the order of ``group_names``), or by name
        (groups not named get 0). ``None`` or 0: no adjustment.
    group_sizes : array_like (K,)
        N_g, the training pairs of each group.
    group_names : sequence of str, optional
        Needed for a dict.

    Returns
    -------
    ndarray (K,) or None
        c, or ``None`` when every C_g is 0 (the unadjusted objective, on the same code path).

    References
    ----------
    S. Sagawa, P. W. Koh, T. B. Hashimoto, P. Liang, "Distributionally robust neural networks for group
    shifts: on the importance of regularization for worst-case generalization", ICLR 2020.
    """
    sizes = np.asarray(group_sizes, dtype=np.float64)
    k = sizes.size
    if adjustment is None:
        return None
    if isinstance(adjustment, dict):
        names = [str(n) for n in (group_names if group_names is not None else range(k))]
        unknown = sorted(set(map(str, adjustment)) - set(names))
        if unknown:
            raise ValueError(f"adjustment names group(s) {unknown} that the data does not have (its groups: {names})")
        by_name = {str(n): v for n, v in adjustment.items()}
        values = np.array([float(by_name.get(n, 0.0)) for n in names])
    else:
        values = np.asarray(adjustment, dtype=np.float64)
        if values.ndim == 0:
            values = np.full(k, float(values))
        elif values.shape != (k,):
            raise ValueError(f"adjustment must be one number or one per group ({k}), got shape {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"adjustment C must be finite and >= 0 (a negative C would favour small groups), got "
                         f"{values.tolist()}")
    if not np.any(values):
        return None
    return values / np.sqrt(sizes)


def _checked(theta, data, loss, beta):
    """The public functions' arguments, validated: ``(theta, loss, beta)``."""
    loss, beta = check_loss(loss), check_positive_finite("beta", beta)
    _check_data(data)
    return check_vector("theta", theta, data.dim), loss, beta


def _check_data(data):
    if not isinstance(data, PreferenceData):
        raise ValueError(f"data must be a PreferenceData, got {type(data).__name__}")


#: the aggregate rows of every metrics table (:func:`group_metrics`, ``llm_head.evaluate``), in order
AGGREGATES = {
    "worst": "the worst group (largest loss): its whole row, named in worst_group",
    "extreme": "each column's worst over groups (max loss/distance, min accuracies/margins): mixes groups",
    "mean over groups": "unweighted mean of the group rows (every group counts once)",
    "mean over pairs": "pair-weighted mean (every pair counts once): the whole split",
}

#: how the ``extreme`` row takes each core metric's worst over groups
EXTREMES = {"loss": "max", "rewards/accuracies": "min", "rewards/margins": "min"}


def group_aggregates(groups, extremes):
    """The aggregate rows of :data:`AGGREGATES` from a table of group rows.

    Parameters
    ----------
    groups : DataFrame
        One row per group, with ``loss``, ``n_pairs`` and the columns of ``extremes``; a group without
        pairs (``n_pairs`` missing or 0) is left out of every aggregate.
    extremes : dict
        {column: "max" or "min"}: the ``extreme`` row's worst of each column. Columns in neither
        ``extremes`` nor ``n_pairs`` (e.g. a weight) appear in the ``worst`` row only.

    Returns
    -------
    DataFrame
        Rows ``worst`` (the group with the largest loss — ties: the first —, its whole row, and its
        name in ``worst_group``), ``extreme``, ``mean over groups`` (unweighted; no ``n_pairs``) and
        ``mean over pairs`` (weighted by ``n_pairs``; all the pairs), with the columns of ``groups``
        and ``worst_group``.
    """
    columns = [c for c in extremes if c in groups.columns]
    counts = pd.to_numeric(groups["n_pairs"], errors="coerce")
    present = groups[counts.fillna(0).to_numpy() > 0]
    weights = pd.to_numeric(present["n_pairs"]).to_numpy(dtype=np.float64)
    worst_name = present["loss"].astype(np.float64).idxmax()
    worst = groups.loc[worst_name].to_dict() | {"worst_group": str(worst_name)}
    extreme = {c: getattr(present[c].astype(np.float64), extremes[c])() for c in columns} | {"n_pairs": pd.NA}
    by_group = present[columns].astype(np.float64).mean().to_dict() | {"n_pairs": pd.NA}
    by_pair = {c: float(weights @ present[c].to_numpy(dtype=np.float64) / weights.sum()) for c in columns}
    by_pair["n_pairs"] = int(weights.sum())
    out = pd.DataFrame([worst, extreme, by_group, by_pair], index=pd.Index(list(AGGREGATES), name="group"),
                       columns=list(groups.columns) + ["worst_group"])
    out["worst_group"] = out["worst_group"].astype(object).where(out["worst_group"].notna(), pd.NA)
    return out


def group_metrics(theta, data, loss="dpo", beta=0.1, alpha=None):
    """Per-group metrics with TRL's names, and the aggregates kept apart from the groups.

    Parameters
    ----------
    theta, data, loss, beta
        As in :func:`group_losses`.
    alpha : array_like, shape (K,), optional
        Group weights, reported in a ``weight`` column.

    Returns
    -------
    DataFrame
        Indexed by the two levels ``(kind, group)``: one row ``("group", name)`` per group, in the
        order of ``data.group_names``, then the rows ``("aggregate", key)`` of :data:`AGGREGATES`
        (:func:`group_aggregates`): ``worst`` — the worst group's own row, named in ``worst_group``
        —, ``extreme`` — each column's worst over groups (max loss, min accuracy, min margin, max
        weight) —, ``mean over groups`` and ``mean over pairs``. A group may therefore be called
        ``"worst"`` without losing its row: ``table.loc["group"]`` is the per-group table,
        ``table.loc[("aggregate", "worst"), "loss"]`` the worst group's loss. Columns: ``loss``
        (:math:`L_g`), ``rewards/accuracies`` (share of pairs with :math:`h_i > 0`),
        ``rewards/margins`` (mean of :math:`\\beta h_i`, TRL's implicit reward margin), ``n_pairs``,
        ``worst_group`` and, when ``alpha`` is given, ``weight``.
    """
    theta, loss, beta = _checked(theta, data, loss, beta)
    h = margins(theta, data)
    pair_values = get_loss(loss).value(h, beta)
    groups = pd.DataFrame({
        "loss": group_means(pair_values, data),
        "rewards/accuracies": group_means((h > 0).astype(np.float64), data),
        "rewards/margins": group_means(beta * h, data),
        "n_pairs": data.group_sizes.astype(int),
    }, index=pd.Index(data.group_names, name="group"))
    extremes = dict(EXTREMES)
    if alpha is not None:
        groups["weight"] = check_vector("alpha", alpha, data.n_groups)
        extremes["weight"] = "max"
    aggregates = group_aggregates(groups, extremes)
    if data.overlapping:          # each pair once (the N_g-weighted mean would count a pair once per group)
        for column, value in (("loss", pair_values.mean()), ("rewards/accuracies", float(np.mean(h > 0))),
                              ("rewards/margins", float(np.mean(beta * h))), ("n_pairs", data.n_samples)):
            aggregates.loc["mean over pairs", column] = value
    aggregates.loc[["mean over groups", "mean over pairs"], [c for c in ("weight",) if c in groups]] = np.nan
    groups["worst_group"] = pd.Series(pd.NA, index=groups.index, dtype=object)
    table = with_aggregates(groups, aggregates)
    table["n_pairs"] = table["n_pairs"].astype("Int64")
    return table


def with_aggregates(groups, aggregates):
    """One table of per-group rows and aggregate rows, indexed by ``(kind, group)``.

    Parameters
    ----------
    groups : DataFrame
        One row per group (index: the group names).
    aggregates : DataFrame
        Rows over all groups (index: ``"worst"``, ``"mean"``, ...), with the columns of ``groups``.

    Returns
    -------
    DataFrame
        ``groups`` under ``kind = "group"`` followed by ``aggregates`` under ``kind = "aggregate"``,
        so that no group name can collide with an aggregate's.
    """
    return pd.concat({"group": groups, "aggregate": aggregates.reindex(columns=groups.columns)},
                     names=["kind", "group"])
