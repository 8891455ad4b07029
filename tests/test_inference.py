"""Tests of loglinear_grpo.inference: paired intervals over seeds and the Wilson interval."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from loglinear_grpo.inference import (
    MIN_GROUP_PAIRS,
    PairedInterval,
    paired_comparison,
    paired_interval,
    proportion_interval,
    small_group_note,
)


# ---------------------------------------------------------------------------------------
# coverage on simulated paired experiments
# ---------------------------------------------------------------------------------------
def _coverage(draw, n, reps, true_mean, rng_seed, **kwargs):
    rng = np.random.default_rng(rng_seed)
    hits = 0
    for r in range(reps):
        ci = paired_interval(draw(rng, n), seed=r, **kwargs)
        hits += ci.low <= true_mean <= ci.high
    return hits / reps


def test_t_interval_covers_at_nominal_level_for_normal_differences():
    # 2 000 experiments of 8 seeds: the t interval is exact for normal data, so the
    # empirical coverage is 0.95 up to Monte-Carlo error (sd ≈ 0.005).
    cover = _coverage(lambda rng, n: rng.normal(0.3, 1.0, n), 8, 2000, 0.3, rng_seed=12345)
    assert 0.93 <= cover <= 0.97, cover


def test_t_interval_coverage_for_skewed_differences_at_30_seeds():
    # exponential − 1 + shift (skewness 2): at 30 seeds the t interval is close to nominal
    # but slightly low (≈ 0.93 here); at 8 seeds it is clearly low (≈ 0.89), not tested.
    cover = _coverage(lambda rng, n: rng.exponential(1.0, n) - 1.0 + 0.3, 30, 2000, 0.3,
                      rng_seed=12345)
    assert 0.91 <= cover <= 0.97, cover


@pytest.mark.parametrize("kind", ["normal", "skewed"])
def test_bootstrap_interval_coverage_at_30_seeds(kind):
    # The percentile bootstrap under-covers a little at small n: its spread is the
    # plug-in sd (ddof=0) and it uses normal rather than t quantiles; ≈ 0.93 at n = 30.
    if kind == "normal":
        def draw(rng, n):
            return rng.normal(0.3, 1.0, n)
    else:
        def draw(rng, n):
            return rng.exponential(1.0, n) - 1.0 + 0.3
    cover = _coverage(draw, 30, 1000, 0.3, rng_seed=12345, method="bootstrap", n_boot=2000)
    assert 0.91 <= cover <= 0.97, cover


# ---------------------------------------------------------------------------------------
# paired_interval: values, determinism, the PairedInterval object
# ---------------------------------------------------------------------------------------
def test_t_interval_matches_scipy():
    d = np.array([0.01, 0.02, 0.015, 0.03, -0.005])
    ci = paired_interval(d, level=0.9)
    low, high = stats.t.interval(0.9, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert ci.estimate == pytest.approx(d.mean(), rel=1e-14)
    assert ci.low == pytest.approx(low, rel=1e-12)
    assert ci.high == pytest.approx(high, rel=1e-12)
    assert (ci.n, ci.level, ci.method) == (5, 0.9, "t")


def test_zero_spread_gives_the_point():
    ci = paired_interval([0.1, 0.1, 0.1])
    assert ci.low == ci.high == ci.estimate == 0.1
    ci = paired_interval([0.1, 0.1, 0.1], method="bootstrap", n_boot=200)
    assert ci.low == ci.high == ci.estimate == 0.1


def test_bootstrap_is_deterministic_and_keeps_pairs():
    d = np.random.default_rng(0).normal(size=12)
    a = paired_interval(d, method="bootstrap", seed=3)
    b = paired_interval(d, method="bootstrap", seed=3)
    c = paired_interval(d, method="bootstrap", seed=4)
    assert a == b
    assert (a.low, a.high) != (c.low, c.high)
    assert a.low <= a.estimate <= a.high
    # wider at a higher level, same seed
    wide = paired_interval(d, method="bootstrap", seed=3, level=0.99)
    assert wide.low <= a.low and wide.high >= a.high


def test_bootstrap_large_n_boot_is_drawn_in_blocks():
    d = np.random.default_rng(1).normal(size=50)
    ci = paired_interval(d, method="bootstrap", n_boot=100_000, seed=0)
    t = paired_interval(d)
    # the bootstrap interval is ≈ the normal-theory one at n = 50
    assert ci.low == pytest.approx(t.low, abs=0.06)
    assert ci.high == pytest.approx(t.high, abs=0.06)


def test_describe_and_excludes_zero():
    ci = PairedInterval(estimate=0.0123, low=-0.005, high=0.0296, n=5, level=0.95, method="t")
    assert ci.describe() == "+0.0123 (95% CI \u22120.0050 to +0.0296, t over 5 seeds)"
    assert ci.describe(digits=2) == "+0.01 (95% CI \u22120.01 to +0.03, t over 5 seeds)"
    assert not ci.excludes_zero
    assert PairedInterval(0.2, 0.1, 0.3, 5, 0.9, "bootstrap").excludes_zero
    assert PairedInterval(-0.2, -0.3, -0.1, 5, 0.9, "t").excludes_zero
    assert PairedInterval(-0.2, -0.3, -0.1, 5, 0.9, "bootstrap").describe() == (
        "\u22120.2000 (90% CI \u22120.3000 to \u22120.1000, bootstrap over 5 seeds)")
    with pytest.raises(Exception):  # frozen
        ci.low = 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(differences=[0.1]), "at least 2"),
    (dict(differences=[]), "at least 2"),
    (dict(differences=[0.1, np.nan, 0.2]), "finite"),
    (dict(differences=[0.1, np.inf]), "finite"),
    (dict(differences=[[0.1, 0.2]]), "1-D"),
    (dict(differences=["a", "b"]), "differences"),
    (dict(differences=[0.1, 0.2], level=0.0), "level"),
    (dict(differences=[0.1, 0.2], level=1.0), "level"),
    (dict(differences=[0.1, 0.2], level=95), "level"),
    (dict(differences=[0.1, 0.2], method="bca"), "method"),
    (dict(differences=[0.1, 0.2], method="bootstrap", n_boot=99), "n_boot"),
    (dict(differences=[0.1, 0.2], method="bootstrap", n_boot=1000.0), "n_boot"),
])
def test_paired_interval_errors(kwargs, match):
    d = kwargs.pop("differences")
    with pytest.raises(ValueError, match=match):
        paired_interval(d, **kwargs)


@pytest.mark.parametrize("values, match", [
    ([1e308, 1e308, -1e308], "mean overflows"),
    ([1.7e308, -1.7e308], "spread overflows"),
])
def test_paired_interval_overflow_is_a_clear_error(values, match):
    with pytest.raises(ValueError, match=match):
        paired_interval(values)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=2, max_size=40),
       st.floats(min_value=0.5, max_value=0.999))
def test_interval_contains_estimate(values, level):
    ci = paired_interval(values, level=level)
    assert ci.low <= ci.estimate <= ci.high
    assert math.isfinite(ci.low) and math.isfinite(ci.high)
    boot = paired_interval(values, level=level, method="bootstrap", n_boot=200)
    assert min(values) <= boot.low <= boot.high <= max(values)


# ---------------------------------------------------------------------------------------
# paired_comparison
# ---------------------------------------------------------------------------------------
def _table():
    # treatment − baseline: worst-group loss −0.1, −0.2, +0.05, −0.15 on seeds 0..3;
    # accuracy +0.1, 0.0, +0.2, −0.1; an unrelated method that must be ignored.
    base_loss = np.array([0.70, 0.65, 0.60, 0.72])
    base_acc = np.array([0.50, 0.55, 0.60, 0.52])
    d_loss = np.array([-0.1, -0.2, 0.05, -0.15])
    d_acc = np.array([0.1, 0.0, 0.2, -0.1])
    rows = []
    for s in [3, 1, 0, 2]:  # deliberately unsorted
        rows.append({"seed": s, "method": "vanilla", "worst-group loss": base_loss[s],
                     "min-group rewards/accuracies": base_acc[s]})
        rows.append({"seed": s, "method": "grpo", "worst-group loss": base_loss[s] + d_loss[s],
                     "min-group rewards/accuracies": base_acc[s] + d_acc[s]})
        rows.append({"seed": s, "method": "other", "worst-group loss": 9.0,
                     "min-group rewards/accuracies": 9.0})
    return pd.DataFrame(rows), d_loss, d_acc


def test_paired_comparison_exact_values():
    table, d_loss, d_acc = _table()
    out = paired_comparison(table, metrics=["worst-group loss", "min-group rewards/accuracies"],
                            treatment="grpo", baseline="vanilla",
                            higher_is_better={"min-group rewards/accuracies": True})
    assert list(out.columns) == ["metric", "difference", "low", "high", "n_seeds", "interval",
                                 "level", "treatment_better", "per_seed"]
    assert list(out["metric"]) == ["worst-group loss", "min-group rewards/accuracies"]
    for (_, row), d in zip(out.iterrows(), [d_loss, d_acc]):
        low, high = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
        assert row["difference"] == pytest.approx(d.mean(), abs=1e-12)
        assert row["low"] == pytest.approx(low, abs=1e-12)
        assert row["high"] == pytest.approx(high, abs=1e-12)
        assert row["per_seed"] == pytest.approx(list(d), abs=1e-12)  # seed order 0..3
        assert row["n_seeds"] == 4 and row["interval"] == "t" and row["level"] == 0.95
    # loss: lower is better → 3 seeds with d < 0; accuracy: higher is better → 2 with d > 0
    # (the tie at seed 1 counts for neither)
    assert list(out["treatment_better"]) == [3, 2]


def test_paired_comparison_default_lower_is_better_and_bootstrap():
    table, d_loss, d_acc = _table()
    out = paired_comparison(table, metrics="min-group rewards/accuracies", treatment="grpo",
                            baseline="vanilla", interval="bootstrap", level=0.9, seed=1)
    assert out.shape[0] == 1
    row = out.iloc[0]
    assert row["treatment_better"] == 1  # default: lower is better → only seed 3
    ci = paired_interval(d_acc, method="bootstrap", level=0.9, seed=1)
    assert (row["low"], row["high"]) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert row["interval"] == "bootstrap" and row["level"] == 0.9
    # the CSV of the result is readable on its own
    assert "per_seed" in out.to_csv(index=False)


def test_paired_comparison_mismatched_seeds_named():
    table, _, _ = _table()
    table = table[~((table["method"] == "vanilla") & (table["seed"] == 2))]
    extra = pd.DataFrame([{"seed": 7, "method": "vanilla", "worst-group loss": 0.5,
                           "min-group rewards/accuracies": 0.5}])
    table = pd.concat([table, extra], ignore_index=True)
    with pytest.raises(ValueError, match=r"\[2\] only for treatment 'grpo'.*\[7\] only for baseline"):
        paired_comparison(table, metrics=["worst-group loss"], treatment="grpo", baseline="vanilla")


def test_paired_comparison_duplicates_raise():
    table, _, _ = _table()
    table = pd.concat([table, table.iloc[[1]]], ignore_index=True)
    with pytest.raises(ValueError, match="duplicate"):
        paired_comparison(table, metrics=["worst-group loss"], treatment="grpo", baseline="vanilla")


@pytest.mark.parametrize("kwargs, match", [
    (dict(metrics=["no such metric"]), "no column"),
    (dict(metrics=[]), "at least one"),
    (dict(treatment="absent"), "no rows"),
    (dict(baseline="grpo"), "must differ"),
    (dict(seed_column="run"), "no column"),
    (dict(level=1.5), "level"),
    (dict(interval="normal"), "method"),
    (dict(higher_is_better=True), "higher_is_better"),
    (dict(table=[1, 2]), "DataFrame"),
])
def test_paired_comparison_errors(kwargs, match):
    table, _, _ = _table()
    args = dict(table=table, metrics=["worst-group loss"], treatment="grpo", baseline="vanilla")
    args.update(kwargs)
    table = args.pop("table")
    with pytest.raises(ValueError, match=match):
        paired_comparison(table, **args)


def test_paired_comparison_non_finite_metric_raises():
    table, _, _ = _table()
    table.loc[(table["method"] == "grpo") & (table["seed"] == 1), "worst-group loss"] = np.nan
    with pytest.raises(ValueError, match=r"'worst-group loss'.*seed\(s\) \[1\]"):
        paired_comparison(table, metrics=["worst-group loss"], treatment="grpo", baseline="vanilla")


def test_paired_comparison_one_seed_raises():
    table, _, _ = _table()
    table = table[table["seed"] == 0]
    with pytest.raises(ValueError, match="at least 2"):
        paired_comparison(table, metrics=["worst-group loss"], treatment="grpo", baseline="vanilla")


# ---------------------------------------------------------------------------------------
# Wilson interval
# ---------------------------------------------------------------------------------------
def _exact_coverage(p, n, level=0.95):
    k = np.arange(n + 1)
    low, high = proportion_interval(k, n, level=level)
    covered = (low <= p) & (p <= high)
    return float(stats.binom.pmf(k, n, p)[covered].sum())


def test_wilson_exact_coverage():
    # exact: sum of the binomial probabilities of the k whose interval contains p
    assert 0.93 <= _exact_coverage(0.3, 20) <= 0.99  # 0.975
    # averaged over p the Wilson interval is close to nominal even at n = 20
    cover = [_exact_coverage(p, 20) for p in np.linspace(0.05, 0.95, 91)]
    assert 0.94 <= np.mean(cover) <= 0.96
    assert min(cover) >= 0.90


def test_wilson_known_values():
    z = stats.norm.ppf(0.975)
    low, high = proportion_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(z**2 / (10 + z**2), rel=1e-12)
    low, high = proportion_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(10 / (10 + z**2), rel=1e-12)
    low, high = proportion_interval(3, 10)  # published Wilson 95% values for 3/10
    assert (low, high) == pytest.approx((0.10779, 0.60322), abs=1e-5)
    low, high = proportion_interval(2, 4)
    assert (low, high) == pytest.approx((0.1500, 0.8500), abs=1e-4)
    assert 0.5 - low == pytest.approx(high - 0.5, abs=1e-12)  # symmetric at p̂ = 1/2
    assert isinstance(low, float) and isinstance(high, float)


def test_wilson_vectorised_shapes():
    k = np.array([[0, 1, 2], [3, 4, 5]])
    low, high = proportion_interval(k, 5)
    assert low.shape == high.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert (low[i, j], high[i, j]) == pytest.approx(proportion_interval(int(k[i, j]), 5))
    low, high = proportion_interval(np.array([1, 2, 3]), np.array([[4], [10]]))
    assert low.shape == (2, 3)
    narrow = proportion_interval(50, 100, level=0.8)
    wide = proportion_interval(50, 100, level=0.99)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]


@pytest.mark.parametrize("successes, n, kwargs, match", [
    (1, 0, {}, "n must be"),
    (1, 2.5, {}, "n must be"),
    (-1, 5, {}, "successes"),
    (6, 5, {}, "successes"),
    (np.nan, 5, {}, "successes"),
    ([1, 2], [3, 4, 5], {}, "broadcast"),
    (1, 5, {"level": 0}, "level"),
])
def test_wilson_errors(successes, n, kwargs, match):
    with pytest.raises(ValueError, match=match):
        proportion_interval(successes, n, **kwargs)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=10_000), st.floats(min_value=0.0, max_value=1.0),
       st.floats(min_value=0.5, max_value=0.999))
def test_wilson_within_unit_interval_and_contains_estimate(n, frac, level):
    k = int(round(frac * n))
    low, high = proportion_interval(k, n, level=level)
    assert 0.0 <= low <= k / n <= high <= 1.0


# ---------------------------------------------------------------------------------------
# small_group_note
# ---------------------------------------------------------------------------------------
def test_small_group_note():
    assert MIN_GROUP_PAIRS == 30
    note = small_group_note(4, 0.5)
    assert note == ("only 4 test pairs: a rewards/accuracies of 0.50 is known only to \u00b10.35 "
                    "(95% Wilson 0.15 to 0.85)")
    assert small_group_note(30, 0.5) is None
    assert small_group_note(29, 0.5) is not None
    assert small_group_note(10, 0.7, minimum=10) is None
    assert "90% Wilson" in small_group_note(5, 0.4, level=0.9)
    assert small_group_note(1, 1.0).startswith("only 1 test pair:")
    assert "undefined" in small_group_note(0, float("nan"))
    # the ± shrinks as the group grows
    half = [float(small_group_note(n, 0.5).split("\u00b1")[1].split()[0]) for n in (4, 10, 25)]
    assert half == sorted(half, reverse=True)


@pytest.mark.parametrize("args, kwargs, match", [
    ((-1, 0.5), {}, "n_pairs"),
    ((2.0, 0.5), {}, "n_pairs"),
    ((4, 1.5), {}, "accuracy"),
    ((4, float("nan")), {}, "accuracy"),
    ((4, 0.5), {"minimum": 0}, "minimum"),
    ((4, 0.5), {"level": 2}, "level"),
])
def test_small_group_note_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_group_note(*args, **kwargs)
