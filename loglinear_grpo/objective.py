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
    return np.bincount(data.groups, weights=values, minlength=data.n_groups) / data.group_sizes


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
    loss = check_loss(loss)
    beta = check_positive_finite("beta", beta)
    _check_data(data)
    theta = check_vector("theta", theta, data.dim)
    return _group_losses(theta, data, loss, beta)


def worst_group_loss(theta, data, loss="dpo", beta=0.1):
    """:math:`\\mathcal{L}_{GR}(\\theta) = \\max_g L_g(\\theta)` (Eq. (7))."""
    return float(np.max(group_losses(theta, data, loss, beta)))


def weighted_gradient(theta, weights, data, loss, beta):
    """:math:`\\nabla_\\theta \\sum_g w_g L_g(\\theta) = S^\\top u`,
    :math:`u_i = \\frac{w_{g_i}}{N_{g_i}}\\,\\ell'(h_i)` (Eq. (11) summed over the data)."""
    h = margins(theta, data)
    pair_w = (weights / data.group_sizes)[data.groups]
    return data.rmatvec(pair_w * get_loss(loss).derivative(h, beta))


def _check_data(data):
    if not isinstance(data, PreferenceData):
        raise ValueError(f"data must be a PreferenceData, got {type(data).__name__}")


def group_metrics(theta, data, loss="dpo", beta=0.1, alpha=None):
    """Per-group metrics with TRL's names, plus a ``worst`` row.

    Columns: ``loss`` (:math:`L_g`), ``rewards/accuracies`` (share of pairs with
    :math:`h_i > 0`), ``rewards/margins`` (mean of :math:`\\beta h_i`, TRL's implicit reward
    margin), ``n_pairs`` and, when ``alpha`` is given, ``weight``. The ``worst`` row holds the
    max loss, min accuracy, min margin and max weight over groups.
    """
    loss = check_loss(loss)
    beta = check_positive_finite("beta", beta)
    _check_data(data)
    theta = check_vector("theta", theta, data.dim)
    h = margins(theta, data)
    table = pd.DataFrame({
        "loss": group_means(get_loss(loss).value(h, beta), data),
        "rewards/accuracies": group_means((h > 0).astype(np.float64), data),
        "rewards/margins": group_means(beta * h, data),
        "n_pairs": data.group_sizes,
    }, index=pd.Index(data.group_names, name="group"))
    if alpha is not None:
        table["weight"] = check_vector("alpha", alpha, data.n_groups)
    worst = {"loss": table["loss"].max(), "rewards/accuracies": table["rewards/accuracies"].min(),
             "rewards/margins": table["rewards/margins"].min(), "n_pairs": int(data.n_samples)}
    if alpha is not None:
        worst["weight"] = table["weight"].max()
    table.loc["worst"] = pd.Series(worst)
    table["n_pairs"] = table["n_pairs"].astype(int)
    return table
