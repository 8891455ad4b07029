"""Statistics for comparing methods as a paired experiment over seeds.

Two questions come up whenever two methods (say group-robust DPO and vanilla DPO) are
compared on a handful of seeds, and on test groups of very different sizes:

1. *Is the difference real?* Each seed runs both methods on the same data split, so the
   natural unit is the per-seed **paired difference** ``d_s = treatment_s − baseline_s``.
   :func:`paired_interval` gives a confidence interval for the mean of the ``d_s``
   (Student t, or a percentile bootstrap over the seeds) and :func:`paired_comparison`
   does this for several metrics of a long-format results table at once.
2. *How precisely is a small group's accuracy known?* A test group with a few preference
   pairs has an accuracy that is a proportion out of a few trials;
   :func:`proportion_interval` is the Wilson (1927) score interval and
   :func:`small_group_note` turns it into a one-line warning for groups with fewer than
   :data:`MIN_GROUP_PAIRS` pairs.

Everything here is plain numpy / scipy / pandas and deterministic (the bootstrap takes an
explicit ``seed``).

References
----------
.. [1] Student (1908), "The probable error of a mean", *Biometrika* 6(1), 1–25.
.. [2] B. Efron and R. J. Tibshirani (1993), *An Introduction to the Bootstrap*,
       Chapman & Hall, ch. 13 (the percentile interval).
.. [3] E. B. Wilson (1927), "Probable inference, the law of succession, and statistical
       inference", *J. Amer. Statist. Assoc.* 22(158), 209–212.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "MIN_GROUP_PAIRS",
    "PairedInterval",
    "paired_comparison",
    "paired_interval",
    "proportion_interval",
    "small_group_note",
]

#: Test groups with fewer preference pairs than this get a :func:`small_group_note`.
#: At 30 pairs the 95% Wilson interval of an accuracy near 0.5 is still about ±0.17 wide.
MIN_GROUP_PAIRS = 30

_INTERVAL_METHODS = ("t", "bootstrap")
# Bootstrap resamples are drawn in blocks of at most this many indices (memory bound only:
# each block is one vectorised draw; the result does not depend on the block size's value
# beyond the rng stream, which is fixed for a given (n, n_boot, seed)).
_BOOT_BLOCK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------
def _check_level(level):
    if (isinstance(level, bool) or not isinstance(level, numbers.Real)
            or not np.isfinite(level) or not 0.0 < float(level) < 1.0):
        raise ValueError(f"level must be a number strictly between 0 and 1 (e.g. 0.95), got {level!r}")
    return float(level)


def _check_method(method):
    if not isinstance(method, str) or method not in _INTERVAL_METHODS:
        raise ValueError(f"method must be one of {list(_INTERVAL_METHODS)}, got {method!r}")
    return method


def _check_n_boot(n_boot):
    if isinstance(n_boot, bool) or not isinstance(n_boot, numbers.Integral) or n_boot < 100:
        raise ValueError(f"n_boot must be an integer >= 100, got {n_boot!r}")
    return int(n_boot)


def _signed(x, digits):
    """``+0.0123`` / ``−0.0050`` (typographic minus), fixed ``digits`` decimals."""
    text = f"{x:+.{digits}f}"
    return text.replace("-", "\u2212")


def _level_text(level):
    return f"{100.0 * level:g}%"


# ---------------------------------------------------------------------------------------
# paired interval
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairedInterval:
    """A confidence interval for the mean paired difference (treatment − baseline).

    Attributes
    ----------
    estimate : float
        The mean of the per-seed differences, ``d̄ = (1/n) Σ_s d_s``.
    low, high : float
        The interval's end points (``low <= high``).
    n : int
        Number of seeds (paired differences).
    level : float
        Nominal coverage, e.g. ``0.95``.
    method : str
        ``"t"`` (Student t) or ``"bootstrap"`` (percentile bootstrap over seeds).
    """

    estimate: float
    low: float
    high: float
    n: int
    level: float
    method: str

    @property
    def excludes_zero(self) -> bool:
        """True when 0 lies outside ``[low, high]`` (the difference is "significant" at
        ``1 − level``, two-sided, for the t interval)."""
        return bool(self.low > 0.0 or self.high < 0.0)

    def describe(self, digits: int = 4) -> str:
        """One line, e.g. ``"+0.0123 (95% CI −0.0050 to +0.0296, t over 5 seeds)"``.

        Parameters
        ----------
        digits : int, default 4
            Decimals shown for the estimate and both end points.
        """
        seeds = "seed" if self.n == 1 else "seeds"
        return (f"{_signed(self.estimate, digits)} ({_level_text(self.level)} CI "
                f"{_signed(self.low, digits)} to {_signed(self.high, digits)}, "
                f"{self.method} over {self.n} {seeds})")


def _bootstrap_means(d, n_boot, rng):
    """Means of ``n_boot`` resamples (with replacement) of the entries of ``d``, drawn in
    vectorised blocks; shape ``(n_boot,)``."""
    n = d.shape[0]
    rows_per_block = max(1, _BOOT_BLOCK_ELEMENTS // n)
    out = np.empty(n_boot)
    for start in range(0, n_boot, rows_per_block):  # blocks, not resamples (usually 1)
        stop = min(n_boot, start + rows_per_block)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = d[idx].mean(axis=1)
    return out


def paired_interval(differences, *, level=0.95, method="t", n_boot=10_000, seed=0) -> PairedInterval:
    r"""Confidence interval for the mean of per-seed paired differences.

    Parameters
    ----------
    differences : array_like, shape (n,)
        Per-seed paired differences ``d_s = treatment_s − baseline_s`` (finite, ``n >= 2``).
        Both methods must have been run on the same seed (same data split, same
        initialisation) for ``d_s`` to be a paired difference.
    level : float, default 0.95
        Nominal coverage, strictly between 0 and 1.
    method : {"t", "bootstrap"}, default "t"
        ``"t"``: the Student t interval [1]_

        .. math:: \bar d \pm t_{n-1,\,(1+\text{level})/2}\; s/\sqrt{n},
                  \qquad s^2 = \frac{1}{n-1}\sum_s (d_s - \bar d)^2 ,

        exact when the ``d_s`` are i.i.d. normal.

        ``"bootstrap"``: the percentile bootstrap of the mean (Efron & Tibshirani 1993,
        ch. 13 [2]_): draw ``n_boot`` resamples of the ``n`` seeds with replacement (each
        seed's difference stays one unit, so the pairing is kept), take each resample's
        mean ``d̄*_b`` and report the ``(1 − level)/2`` and ``(1 + level)/2`` quantiles of
        the ``d̄*_b``. It makes no normality assumption but is known to under-cover for
        small ``n`` (its intervals are too narrow by a factor of about
        ``sqrt((n − 1)/n)`` and ``z`` is used in place of ``t``); prefer ``"t"`` below
        about 20 seeds. The end points always lie within ``[min d, max d]``.

        For either method, when all differences are equal (``s = 0``) the interval is the
        single point ``low = high = estimate = d_1`` (no spread was observed; this is not
        a claim of certainty, only what the data show).
    n_boot : int, default 10_000
        Number of bootstrap resamples (``>= 100``); ignored for ``method="t"``.
    seed : int or numpy.random.Generator-compatible seed, default 0
        Passed to :func:`numpy.random.default_rng` for the bootstrap; the result is
        deterministic for a given seed.

    Returns
    -------
    PairedInterval
        ``estimate`` (= ``d̄``), ``low``, ``high``, ``n``, ``level``, ``method``.

    Raises
    ------
    ValueError
        If ``differences`` is not 1-D, has fewer than 2 entries or a non-finite entry;
        if ``level`` is not in (0, 1); if ``method`` is unknown; if ``n_boot < 100``.

    References
    ----------
    .. [1] Student (1908), "The probable error of a mean", *Biometrika* 6, 1–25.
    .. [2] B. Efron and R. J. Tibshirani (1993), *An Introduction to the Bootstrap*,
           Chapman & Hall, ch. 13.

    Examples
    --------
    >>> paired_interval([0.01, 0.02, 0.015, 0.03, -0.005]).describe()
    '+0.0140 (95% CI −0.0021 to +0.0301, t over 5 seeds)'
    """
    level = _check_level(level)
    method = _check_method(method)
    if method == "bootstrap":
        n_boot = _check_n_boot(n_boot)
    try:
        d = np.asarray(differences, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"differences must be a 1-D array of numbers: {exc}") from None
    if d.ndim != 1:
        raise ValueError(f"differences must be 1-D (one paired difference per seed), got shape {d.shape}")
    n = int(d.shape[0])
    if n < 2:
        raise ValueError(f"differences needs at least 2 paired differences (seeds) for an interval, got {n}")
    bad = ~np.isfinite(d)
    if bad.any():
        raise ValueError(f"differences must be finite; entries {np.flatnonzero(bad).tolist()} are not "
                         f"({d[bad].tolist()})")

    if np.all(d == d[0]):  # zero spread: the point (exactly, not up to the mean's rounding)
        estimate = float(d[0])
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            estimate = float(d.mean())
    if not np.isfinite(estimate):
        raise ValueError("differences are too large in magnitude: their mean overflows")

    if method == "t":
        if np.all(d == d[0]):
            half = 0.0
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                sd = float(d.std(ddof=1))
            half = float(stats.t.ppf(0.5 * (1.0 + level), n - 1)) * sd / np.sqrt(n)
            if not np.isfinite(half):
                raise ValueError("differences are too large in magnitude: their spread overflows")
        low, high = estimate - half, estimate + half
    else:
        if np.all(d == d[0]):
            low = high = estimate
        else:
            rng = np.random.default_rng(seed)
            with np.errstate(over="ignore", invalid="ignore"):
                means = _bootstrap_means(d, n_boot, rng)
            alpha = 1.0 - level
            low, high = np.quantile(means, [0.5 * alpha, 1.0 - 0.5 * alpha])
            # a resample's mean lies in [min d, max d]; keep it so despite rounding
            low, high = np.clip([low, high], d.min(), d.max())
    return PairedInterval(estimate=estimate, low=float(low), high=float(high), n=n, level=level,
                          method=method)


# ---------------------------------------------------------------------------------------
# paired comparison of a results table
# ---------------------------------------------------------------------------------------
def _sorted_seeds(values):
    try:
        return sorted(values)
    except TypeError:  # mixed types: a stable, readable order
        return sorted(values, key=repr)


def paired_comparison(table, *, metrics, treatment, baseline, method_column="method",
                      seed_column="seed", higher_is_better=None, level=0.95, interval="t",
                      seed=0) -> pd.DataFrame:
    """Paired treatment − baseline differences over seeds, one row per metric.

    Parameters
    ----------
    table : pandas.DataFrame
        Long format: one row per (seed, method), one column per metric (e.g.
        ``"worst-group loss"``, ``"min-group rewards/accuracies"``, ``"mean loss"``).
        Rows of other methods are ignored.
    metrics : str or sequence of str
        The metric columns to compare.
    treatment, baseline : object
        The values of ``method_column`` that identify the two methods.
    method_column, seed_column : str
        Column names of the method and of the seed.
    higher_is_better : dict[str, bool], optional
        For each metric, whether larger values are better; metrics absent from it (or all
        metrics when it is None) are taken as lower-is-better (losses). Only used for the
        ``treatment_better`` count; the sign of ``difference`` is always
        treatment − baseline.
    level : float, default 0.95
        Nominal coverage of the intervals.
    interval : {"t", "bootstrap"}, default "t"
        The interval of :func:`paired_interval`. For the bootstrap the same ``seed`` is
        used for every metric, so every metric is resampled over the same seed draws.
    seed : int, default 0
        Bootstrap rng seed.

    Returns
    -------
    pandas.DataFrame
        One row per metric (in the order given) with columns

        ``metric``
            the metric's name;
        ``difference``
            the mean over seeds of ``d_s = treatment_s − baseline_s``;
        ``low``, ``high``
            the interval of :func:`paired_interval`;
        ``n_seeds``
            the number of paired seeds;
        ``interval``, ``level``
            how the interval was computed;
        ``treatment_better``
            the number of seeds with ``d_s > 0`` (higher is better) or ``d_s < 0``
            (lower is better); ties count for neither;
        ``per_seed``
            the list of the ``d_s`` in increasing seed order.

    Raises
    ------
    ValueError
        If a required column is missing; if ``treatment`` or ``baseline`` has no rows or
        they are equal; if a (seed, method) pair has more than one row; if some seeds are
        present for only one of the two methods (the seeds are named); if a metric has a
        missing or non-finite value; and for the reasons of :func:`paired_interval`.
    """
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"table must be a pandas DataFrame (long format), got {type(table).__name__}")
    if isinstance(metrics, str):
        metrics = [metrics]
    metrics = list(metrics)
    if not metrics:
        raise ValueError("metrics must name at least one metric column")
    level = _check_level(level)
    interval = _check_method(interval)
    if higher_is_better is None:
        higher_is_better = {}
    if not isinstance(higher_is_better, dict):
        raise ValueError(f"higher_is_better must be a dict metric -> bool or None, got {higher_is_better!r}")
    missing = [c for c in [method_column, seed_column, *metrics] if c not in table.columns]
    if missing:
        raise ValueError(f"table has no column(s) {missing}; its columns are {list(table.columns)}")
    if treatment == baseline:
        raise ValueError(f"treatment and baseline must differ, both are {treatment!r}")

    rows = {}
    for role, name in (("treatment", treatment), ("baseline", baseline)):
        part = table[table[method_column] == name]
        if part.empty:
            known = _sorted_seeds(pd.unique(table[method_column]).tolist())
            raise ValueError(f"{role} {name!r} has no rows in column {method_column!r}; "
                             f"its methods are {known}")
        dup = part[seed_column][part[seed_column].duplicated()]
        if not dup.empty:
            raise ValueError(f"duplicate (seed, method) rows: {role} {name!r} has more than one row "
                             f"for seed(s) {_sorted_seeds(pd.unique(dup).tolist())}")
        rows[role] = part.set_index(seed_column)

    t_seeds, b_seeds = set(rows["treatment"].index), set(rows["baseline"].index)
    only_t, only_b = t_seeds - b_seeds, b_seeds - t_seeds
    if only_t or only_b:
        parts = []
        if only_t:
            parts.append(f"seed(s) {_sorted_seeds(only_t)} only for treatment {treatment!r}")
        if only_b:
            parts.append(f"seed(s) {_sorted_seeds(only_b)} only for baseline {baseline!r}")
        raise ValueError("treatment and baseline must be run on the same seeds to be paired: "
                         + "; ".join(parts))
    seeds = _sorted_seeds(t_seeds)

    records = []
    for metric in metrics:
        try:
            t_val = pd.to_numeric(rows["treatment"].loc[seeds, metric]).to_numpy(dtype=float)
            b_val = pd.to_numeric(rows["baseline"].loc[seeds, metric]).to_numpy(dtype=float)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metric {metric!r} must hold numbers: {exc}") from None
        diff = t_val - b_val
        bad = ~np.isfinite(diff)
        if bad.any():
            raise ValueError(f"metric {metric!r} has a missing or non-finite value at seed(s) "
                             f"{[seeds[i] for i in np.flatnonzero(bad)]}")
        ci = paired_interval(diff, level=level, method=interval, seed=seed)
        better = diff > 0 if bool(higher_is_better.get(metric, False)) else diff < 0
        records.append({
            "metric": metric,
            "difference": ci.estimate,
            "low": ci.low,
            "high": ci.high,
            "n_seeds": ci.n,
            "interval": ci.method,
            "level": ci.level,
            "treatment_better": int(better.sum()),
            "per_seed": [float(x) for x in diff],
        })
    return pd.DataFrame.from_records(
        records, columns=["metric", "difference", "low", "high", "n_seeds", "interval", "level",
                          "treatment_better", "per_seed"])


# ---------------------------------------------------------------------------------------
# proportions (small test groups)
# ---------------------------------------------------------------------------------------
def proportion_interval(successes, n, *, level=0.95):
    r"""Wilson (1927) score interval for a proportion, vectorised.

    With ``p̂ = successes / n`` and ``z = Φ⁻¹((1 + level)/2)``, the interval is the set of
    ``p`` with ``|p̂ − p| <= z sqrt(p(1 − p)/n)``, i.e.

    .. math:: \frac{\hat p + \frac{z^2}{2n}}{1 + \frac{z^2}{n}}
              \pm \frac{z}{1 + \frac{z^2}{n}}
                  \sqrt{\frac{\hat p(1-\hat p)}{n} + \frac{z^2}{4n^2}} .

    Unlike the Wald interval ``p̂ ± z sqrt(p̂(1 − p̂)/n)`` it stays inside [0, 1], is not
    empty at ``p̂ = 0`` or ``1`` and covers close to the nominal level already for small
    ``n`` [1]_.

    Parameters
    ----------
    successes : array_like
        Number of successes (e.g. pairs whose chosen answer gets the larger implicit
        reward), ``0 <= successes <= n``. Need not be integral (``accuracy * n`` for an
        accuracy that counts ties as half).
    n : array_like of int
        Number of trials, integers ``>= 1``; broadcast against ``successes``.
    level : float, default 0.95
        Nominal coverage, strictly between 0 and 1.

    Returns
    -------
    low, high : ndarray or float
        Arrays of the broadcast shape, or two floats when both inputs are scalars. Always
        ``0 <= low <= successes/n <= high <= 1``; ``low = 0`` exactly when
        ``successes = 0`` and ``high = 1`` exactly when ``successes = n``.

    Raises
    ------
    ValueError
        If ``n`` is not an integer ``>= 1``, ``successes`` is outside ``[0, n]`` or not
        finite, or ``level`` is not in (0, 1).

    References
    ----------
    .. [1] E. B. Wilson (1927), "Probable inference, the law of succession, and
           statistical inference", *J. Amer. Statist. Assoc.* 22, 209–212.

    Examples
    --------
    >>> low, high = proportion_interval(2, 4)
    >>> round(low, 3), round(high, 3)
    (0.15, 0.85)
    """
    level = _check_level(level)
    scalar = np.ndim(successes) == 0 and np.ndim(n) == 0
    try:
        k = np.asarray(successes, dtype=float)
        m = np.asarray(n, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"successes and n must be numbers: {exc}") from None
    if not np.all(np.isfinite(m)) or np.any(m < 1) or np.any(m != np.round(m)):
        raise ValueError(f"n must be integers >= 1, got {np.asarray(n).tolist()!r}")
    try:
        k, m = np.broadcast_arrays(k, m)
    except ValueError:
        raise ValueError(f"successes (shape {np.shape(successes)}) and n (shape {np.shape(n)}) "
                         "do not broadcast") from None
    if not np.all(np.isfinite(k)) or np.any(k < 0) or np.any(k > m):
        raise ValueError(f"successes must satisfy 0 <= successes <= n, got successes="
                         f"{np.asarray(successes).tolist()!r}, n={np.asarray(n).tolist()!r}")

    z = float(stats.norm.ppf(0.5 * (1.0 + level)))
    z2 = z * z
    p = k / m
    denom = 1.0 + z2 / m
    centre = (p + z2 / (2.0 * m)) / denom
    half = (z / denom) * np.sqrt(p * (1.0 - p) / m + z2 / (4.0 * m * m))
    low = np.clip(centre - half, 0.0, 1.0)
    high = np.clip(centre + half, 0.0, 1.0)
    # exact end points and containment of p̂, whatever the rounding
    low = np.where(k == 0, 0.0, np.minimum(low, p))
    high = np.where(k == m, 1.0, np.maximum(high, p))
    if scalar:
        return float(low), float(high)
    return low, high


def small_group_note(n_pairs, accuracy, *, minimum=MIN_GROUP_PAIRS, level=0.95):
    """A warning for a test group too small for its accuracy to mean much, else None.

    For a group with ``n_pairs < minimum`` preference pairs, the text gives the half-width
    ``(high − low)/2`` of the Wilson interval (:func:`proportion_interval`) of an accuracy
    of ``accuracy`` out of ``n_pairs`` trials, and the interval itself, e.g.::

        only 4 test pairs: a rewards/accuracies of 0.50 is known only to ±0.35 (95% Wilson 0.15 to 0.85)

    Parameters
    ----------
    n_pairs : int
        The group's number of test pairs (``>= 0``).
    accuracy : float
        The group's measured accuracy (rewards/accuracies), in [0, 1]; may be NaN when
        ``n_pairs == 0``.
    minimum : int, default :data:`MIN_GROUP_PAIRS` (30)
        Groups with at least this many pairs get no note.
    level : float, default 0.95
        Level of the Wilson interval.

    Returns
    -------
    str or None
        The note, or None when ``n_pairs >= minimum``.

    Raises
    ------
    ValueError
        If ``n_pairs`` is not an integer ``>= 0``, ``minimum`` not an integer ``>= 1``,
        ``accuracy`` not in [0, 1] (when ``n_pairs >= 1``) or ``level`` not in (0, 1).
    """
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, numbers.Integral) or n_pairs < 0:
        raise ValueError(f"n_pairs must be an integer >= 0, got {n_pairs!r}")
    if isinstance(minimum, bool) or not isinstance(minimum, numbers.Integral) or minimum < 1:
        raise ValueError(f"minimum must be an integer >= 1, got {minimum!r}")
    level = _check_level(level)
    n_pairs = int(n_pairs)
    if n_pairs >= minimum:
        return None
    if n_pairs == 0:
        return "no test pairs: its rewards/accuracies is undefined"
    if (isinstance(accuracy, bool) or not isinstance(accuracy, numbers.Real)
            or not np.isfinite(accuracy) or not 0.0 <= float(accuracy) <= 1.0):
        raise ValueError(f"accuracy must be a number in [0, 1], got {accuracy!r}")
    accuracy = float(accuracy)
    low, high = proportion_interval(accuracy * n_pairs, n_pairs, level=level)
    half = 0.5 * (high - low)
    pairs = "pair" if n_pairs == 1 else "pairs"
    return (f"only {n_pairs} test {pairs}: a rewards/accuracies of {accuracy:.2f} is known only to "
            f"\u00b1{half:.2f} ({_level_text(level)} Wilson {low:.2f} to {high:.2f})")
