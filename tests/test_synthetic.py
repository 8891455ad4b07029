"""The group linear bandit of §5.1: features, labels, metrics, and the paper's ordering."""
import numpy as np
import pytest

from loglinear_grpo.experiments import final_table, run_sweep
from loglinear_grpo.synthetic import GroupLinearBandit, scenario_data

X = np.array([[0.25, 0.5]])
U = 3 / 8 + 1                                   # y = 3, A = 8
C, S = np.cos(np.pi / 4), np.sin(np.pi / 4)


@pytest.mark.parametrize("feature_map, group, expected", [
    ("swapped", 0, [U * C, S / U, 0.0, 1 / U]),
    ("swapped", 1, [S / U, U * C, 1 / U, 0.0]),
    ("same", 1, [U * C, S / U, 0.0, 1 / U]),
    ("flipped", 0, [U * C, S / U, 0.0, 1 / U]),
    ("flipped", 1, [U * S, C / U, U * 1.0, 0.0]),
])
def test_features_match_the_formulas(feature_map, group, expected):
    bandit = GroupLinearBandit(feature_map=feature_map)
    np.testing.assert_allclose(bandit.features(X, [3], [group])[0], expected, atol=1e-15)


def test_reward_is_the_paper_inner_product():
    bandit = GroupLinearBandit()
    assert bandit.reward(X, [3], [0])[0] == pytest.approx(U * C + 3 * S / U + 0 + 3 / U)
    assert bandit.reward(X, [3], [1])[0] == pytest.approx(3 * S / U + U * C + 3 / U + 0)
    np.testing.assert_array_equal(bandit.theta_star, [[1, 3, 1, 3], [3, 1, 3, 1]])


@pytest.mark.parametrize("response, check", [
    ("uniform", lambda a, b: np.all(a != b)),
    ("near", lambda a, b: np.all(np.abs(a - b) == 1)),
    ("far", lambda a, b: np.all(np.abs(a - b) == 4)),
])
def test_response_distributions(response, check):
    sample = GroupLinearBandit().sample(2000, [0.5, 0.5], [response, response], seed=1)
    assert check(sample.chosen, sample.rejected)
    assert set(np.unique(np.r_[sample.chosen, sample.rejected])) == set(range(8))


def test_sizes_shuffle_and_deterministic_labels():
    bandit = GroupLinearBandit()
    sample = bandit.sample(300, [0.2, 0.8], ["near", "far"], seed=0)
    assert list(sample.data.group_sizes) == [60, 240]
    assert not np.all(np.diff(sample.groups) >= 0)                     # order shuffled
    r_w = bandit.reward(sample.states, sample.chosen, sample.groups)
    r_l = bandit.reward(sample.states, sample.rejected, sample.groups)
    assert np.all(r_w >= r_l)
    phi_w = bandit.features(sample.states, sample.chosen, sample.groups)
    phi_l = bandit.features(sample.states, sample.rejected, sample.groups)
    np.testing.assert_allclose(sample.data.diff, phi_w - phi_l)
    np.testing.assert_array_equal(sample.data.ref_margin, 0.0)         # uniform reference


def test_bradley_terry_labels():
    bandit = GroupLinearBandit()
    sample = bandit.sample(40000, [0.5, 0.5], ["uniform", "uniform"], deterministic_ratio=0.0, seed=2)
    r_w = bandit.reward(sample.states, sample.chosen, sample.groups)
    r_l = bandit.reward(sample.states, sample.rejected, sample.groups)
    # under Bradley–Terry E[1{r_w > r_l}] = E[σ(|Δr|)]
    expected = np.mean(1 / (1 + np.exp(-np.abs(r_w - r_l))))
    assert np.mean(r_w > r_l) == pytest.approx(expected, abs=0.01)
    assert np.mean(r_w > r_l) < 0.95                                   # not deterministic


def test_reward_error_metric():
    bandit = GroupLinearBandit()
    _, _, val = scenario_data("imbalanced_both", seed=0)
    for g in range(2):                                     # θ̂ = θ*_g is perfect for group g
        assert bandit.reward_errors(bandit.theta_star[g], val.states, val.groups)[g] == pytest.approx(0, abs=1e-12)
    worst = bandit.reward_errors(-bandit.theta_star[0], val.states, val.groups)
    assert np.all(worst > 0.1)


def test_three_seed_scenario_iii_reproduces_the_ordering():
    df = run_sweep(scenarios=["imbalanced_both"], seeds=3, steps=3000, n_jobs=1, progress=False)
    table = final_table(df).set_index(["method", "metric"])["mean"]
    for family in ("DPO", "IPO"):
        vanilla = table[(family, "worst_val_loss")]
        imp = table[(f"IS-{family}", "worst_val_loss")]
        robust = table[(f"GR-{family}", "worst_val_loss")]
        assert robust < imp <= vanilla, (family, robust, imp, vanilla)
    alpha = df[(df.method == "GR-DPO") & (df.metric == "alpha/group 0") & (df.step == 3000)]["value"]
    assert alpha.mean() > 0.5                              # the small, hard group gets the weight
